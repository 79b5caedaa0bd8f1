//! Builds the guest's vDSO (`vdso/vdso.c`, laid out by `vdso/vdso.lds`) with the host C
//! compiler into `$OUT_DIR/vdso.so`, which `src/lib.rs` embeds. No prebuilt image is kept.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("vdso.so");
    let src = dir.join("vdso/vdso.c");
    let lds = dir.join("vdso/vdso.lds");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", lds.display());
    println!("cargo:rerun-if-env-changed=CC");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-O2",
            "-fPIC",
            "-fno-stack-protector",
            "-fno-builtin",
            "-ffreestanding",
            "-fcf-protection=none",
            "-fno-plt",
            "-nostdlib",
            "-shared",
            "-Wall",
            "-Werror",
            "-Wl,--hash-style=both",
            "-Wl,-soname=linux-vdso.so.1",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,--no-undefined",
            "-Wl,-Bsymbolic",
        ])
        .arg(format!("-Wl,-T,{}", lds.display()))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` to build the vDSO: {e}"));
    assert!(status.success(), "building the vDSO with `{cc}` failed");
}
