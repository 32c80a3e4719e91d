//! Test hosts for Strait: "pods" as Linux network namespaces on a bridge that lives in a network
//! namespace of its own, so test addresses never touch the host's interfaces; the processes
//! that run in them; and the local-mode mesh config that describes them.
//!
//! Used by the e2e tests, the benchmarks and `strait demo`. Everything a [`Net`] creates is
//! removed when it is dropped (also on panic), and namespaces left by a killed run are removed
//! by the next one (their owner PID is in their name).

pub mod app;
pub mod config;
pub mod netns;

pub use config::{MeshConfig, ServiceDef, SidecarOpts};
pub use netns::{Net, Pod, Proc};

use std::path::PathBuf;

/// Directory of the workspace's binaries: `STRAIT_BIN_DIR`, else the directory of the running
/// executable (or its parent, for test executables in `target/<profile>/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRAIT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(PathBuf::from).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of one of the workspace's binaries; fails with a hint when it was not built.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        anyhow::bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace --bins), or set STRAIT_BIN_DIR",
            path.display()
        )
    }
}

/// Whether this process may create network namespaces.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
