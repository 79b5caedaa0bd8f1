//! Run the simulator outside the `mosvm` binary: `cargo run --release -p balancer --example sim -- --help`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sim",
    about = "mosvm balancer simulator (same flags as `mosvm sim`)"
)]
struct Cli {
    #[command(flatten)]
    args: balancer::sim::cli::SimArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = balancer::sim::cli::run(&cli.args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
