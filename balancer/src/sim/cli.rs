//! `mosvm sim`: command-line flags and entry point.

use clap::Args;

/// Flags of `mosvm sim`.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 64)]
    pub nodes: u32,
}

/// Run the simulator with `args`, printing a table (or JSON) to stdout.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    Ok(())
}
