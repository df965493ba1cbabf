//! `rust-version` in Cargo.toml is a promise: no locked dependency may ask for a newer Rust.
//! The code's own needs (async closures, Rust 1.85) are below the dependencies'; clippy's
//! `incompatible_msrv` lint holds the standard library calls to the same version.

use std::process::Command;

/// `1.89` and `1.89.0` alike, as `[1, 89, 0]`.
fn version(text: &str) -> Vec<u32> {
    let mut parts: Vec<u32> = text
        .split('.')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("not a version: {text}"))
        })
        .collect();
    parts.resize(3, 0);
    parts
}

/// The host triple (`x86_64-unknown-linux-gnu`…): the packages built here.
fn host() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc -vV");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[test]
fn rust_version_covers_every_locked_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let newer: Vec<String> = meta["packages"]
        .as_array()
        .expect("a package list")
        .iter()
        .filter_map(|p| {
            let wants = p["rust_version"].as_str()?;
            (version(wants) > ours).then(|| format!("{} {} needs {wants}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        newer.is_empty(),
        "Cargo.toml says rust-version {}, but {newer:?}",
        env!("CARGO_PKG_RUST_VERSION")
    );
}
