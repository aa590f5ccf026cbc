//! `cargo xtask check-manifests`: renders `deploy/kubernetes` (the base, every overlay, the
//! node clean-up of `uninstall/` and the walkthrough's `demo/`) with kustomize and checks
//! every object offline with `xtask/manifests/check.py`: strict schemas of Kubernetes
//! [`KUBERNETES_VERSION`], references between the objects, the agent's config through
//! `mesh-agent config check --source kubernetes` and against the DaemonSet, the clean-up
//! against every install, and the example custom resources against their CRDs and the demo.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{
    command::{cargo, run, target_dir, workspace_root},
    setup,
};

/// The Kubernetes version the built-in objects are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

/// The development overlay's CA, which each user makes (git ignores it).
const DEV_CA: &str = "overlays/dev-ca/ca";
/// The CA overlay's files (the CA's key and chain, the root's certificate), made the same way.
const CA_FILES: &str = "overlays/ca/ca";

pub fn check() -> anyhow::Result<()> {
    let tools = setup::manifest_tools()?;
    run(
        cargo().args(["build", "--quiet", "-p", "mesh-agent"]),
        "cargo build -p mesh-agent",
    )?;
    let agent = target_dir().join("debug/mesh-agent");
    let source = workspace_root().join("deploy/kubernetes");
    let work = target_dir().join("manifests");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    // A copy of the tree, with throwaway CAs where the overlays want the user's.
    let tree = work.join("kubernetes");
    copy_tree(
        &source,
        &tree,
        &[source.join(DEV_CA), source.join(CA_FILES)],
    )?;
    let ca_init = |dir: &Path, parent: Option<&Path>, what: &str| {
        let mut command = Command::new(&agent);
        command.args(["ca", "init", "--dir"]).arg(dir);
        if let Some(parent) = parent {
            command.arg("--parent").arg(parent);
        }
        run(&mut command, what)
    };
    ca_init(
        &tree.join(DEV_CA),
        None,
        "mesh-agent ca init (a CA for the dev-ca overlay)",
    )?;
    let root = work.join("root");
    ca_init(
        &root,
        None,
        "mesh-agent ca init (a root for the ca overlay)",
    )?;
    ca_init(
        &tree.join(CA_FILES),
        Some(&root),
        "mesh-agent ca init --parent (the ca overlay's CA)",
    )?;
    fs::copy(root.join("ca.crt"), tree.join(CA_FILES).join("root.crt"))
        .context("copying the root's certificate into the ca overlay")?;

    let mut kustomizations = vec![
        PathBuf::from("base"),
        PathBuf::from("uninstall"),
        PathBuf::from("demo"),
    ];
    for entry in fs::read_dir(tree.join("overlays")).context("reading overlays/")? {
        kustomizations.push(Path::new("overlays").join(entry?.file_name()));
    }
    kustomizations.sort();
    let mut rendered = Vec::new();
    for dir in &kustomizations {
        let name = format!("deploy/kubernetes/{}", dir.display());
        let out = Command::new(&tools.kubectl)
            .arg("kustomize")
            .arg(tree.join(dir))
            .output()
            .with_context(|| format!("starting {}", tools.kubectl.display()))?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize {name} failed:\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Named after the kustomization, so that errors say which rendering.
        let file = work.join(format!("{}.yaml", name.replace('/', "_")));
        fs::write(&file, &out.stdout).with_context(|| format!("writing {}", file.display()))?;
        rendered.push(file);
    }
    run(
        Command::new(&tools.python)
            .arg(workspace_root().join("xtask/manifests/check.py"))
            .args(["--kubernetes", KUBERNETES_VERSION, "--mesh-agent"])
            .arg(&agent)
            .arg("--examples")
            .arg(source.join("examples"))
            .args(&rendered),
        "the manifest checks",
    )
}

/// Copies the files under `from` to `to`, leaving out `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &[PathBuf]) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        if skip.contains(&path) {
            continue;
        }
        let target = to.join(path.file_name().context("a file name")?);
        if path.is_dir() {
            copy_tree(&path, &target, skip)?;
        } else {
            fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}
