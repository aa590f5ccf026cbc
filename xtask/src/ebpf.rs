//! `cargo xtask build-ebpf`: mesh-ebpf for bpfel-unknown-none with the nightly toolchain.

use crate::{run, setup, workspace_root};

pub const TARGET_DIR: &str = "target/bpf";

pub fn build() -> anyhow::Result<()> {
    setup::toolchain()?;
    let root = workspace_root();
    // The rustup proxy with +nightly, not the stable cargo running xtask.
    let mut command = std::process::Command::new("cargo");
    command
        .current_dir(root.join("mesh-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(root.join(TARGET_DIR));
    run(&mut command, "building mesh-ebpf")
}
