//! Builds `guest-examples/` for `wasm32-wasip2` once per test binary and hands
//! out the paths of the components. Real components, never fakes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the built component `name` (as named in `guest-examples/`, e.g.
/// `echo`, `rag-qa`). Panics with cargo's output if the build fails.
pub fn guest_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = root().join("guest-examples");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&dir)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(dir.join("target"));
        // The outer `cargo test` must not leak its flags into the guest build.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MAKEFLAGS",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.output().expect("run cargo for guest-examples");
        assert!(
            out.status.success(),
            "building guest-examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let file = format!("{}.wasm", name.replace('-', "_"));
    let path = root()
        .join("guest-examples/target/wasm32-wasip2/release")
        .join(file);
    assert!(path.exists(), "guest component {} missing", path.display());
    path
}

/// The bytes of the built component `name`.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest_wasm(name)).expect("read guest component")
}
