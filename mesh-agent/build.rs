//! Finds the eBPF object built by `cargo xtask build-ebpf` and hands its path to the
//! agent, which embeds it. Without it the build stops with the command to run.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = match env::var_os("MESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
            manifest.join("../target/bpf/bpfel-unknown-none/release/mesh-ebpf")
        }
    };
    if !object.is_file() {
        panic!(
            "\n\nThe eBPF object {} is missing.\nRun `cargo xtask build-ebpf` first \
             (it installs what it needs and builds mesh-ebpf), then build the agent again.\n\n",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}
