//! Runs a short concurrency sweep over the raw echo and checks its lines and its plot.

use std::process::{Command, Stdio};

#[test]
fn sweep_prints_a_line_per_concurrency_and_writes_the_plot() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let png = dir.path().join("sweep.png");
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "raw", "--secs", "0.3", "--warmup", "0"])
        .args(["--sweep", "1,4", "--payload", "64", "--plot"])
        .arg(&png)
        .stdin(Stdio::null())
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);

    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let runs: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["system"].as_str().unwrap(),
                r["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(runs, [("raw", 1), ("raw", 4)]);
    for row in &rows {
        assert!(row["qps"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
    }
    assert!(stderr.contains("| raw | 4 | 64 | 1 |"), "{stderr}");

    let bytes = std::fs::read(&png).expect("the plot was written");
    assert_eq!(bytes[..8], [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]);
}

#[test]
fn plot_needs_a_sweep_and_a_png_path() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("the benchmark runs")
    };
    // Rejected before anything runs: no JSON line.
    for args in [
        &["--plot", "x.png"][..],
        &["--sweep", "1,4", "--concurrency", "8"],
        &["--sweep", "1,0"],
        &["--sweep", "1,4", "--plot", "x.svg"],
        &["--sweep", "1,4", "--plot", "/no/such/dir/x.png"],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?} ran");
    }
}
