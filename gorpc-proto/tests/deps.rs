//! The core's dependency rule: nothing that does I/O, runs tasks or reads a clock.

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "smol",
    "async-io",
    "async-std",
    "async-executor",
    "mio",
    "futures-io",
    "polling",
    "socket2",
    "rand",
    "getrandom",
];

#[test]
fn gorpc_proto_depends_on_no_runtime_io_or_rng() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "gorpc-proto",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"gorpc-proto") && crates.contains(&"bytes"),
        "unexpected tree: {tree}"
    );
    for name in FORBIDDEN {
        assert!(
            !crates.contains(name),
            "gorpc-proto depends on {name}:\n{tree}"
        );
    }
}
