//! `cargo xtask build-ebpf`: mesh-ebpf for bpfel-unknown-none with the nightly toolchain;
//! and clippy on it, with the same toolchain, target and flags.

use std::process::Command;

use crate::{
    command::{run, workspace_root},
    setup,
};

pub const TARGET_DIR: &str = "target/bpf";

pub fn build() -> anyhow::Result<()> {
    setup::toolchain()?;
    run(&mut nightly_cargo("build"), "building mesh-ebpf")
}

/// Clippy on mesh-ebpf, warnings as errors.
pub fn clippy() -> anyhow::Result<()> {
    setup::toolchain()?;
    run(
        nightly_cargo("clippy").args(["--", "-D", "warnings"]),
        "cargo clippy (mesh-ebpf)",
    )
}

/// `cargo +nightly <subcommand>` in mesh-ebpf, for bpfel-unknown-none with core built from
/// source, in [`TARGET_DIR`].
fn nightly_cargo(subcommand: &str) -> Command {
    let root = workspace_root();
    // The rustup proxy with +nightly, not the stable cargo running xtask.
    let mut command = Command::new("cargo");
    command
        .current_dir(root.join("mesh-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "+nightly",
            subcommand,
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(root.join(TARGET_DIR));
    command
}
