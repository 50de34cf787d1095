//! Runs the benchmark briefly over every system and checks its output.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn all_systems_answer_without_errors() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "all", "--secs", "1", "--warmup", "0"])
        .args(["--concurrency", "4", "--payload", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the benchmark starts");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });

    // Seven systems of about a second each; anything near a minute and a half is a hang.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the benchmark") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the benchmark did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap().expect("reading stdout");
    assert!(status.success(), "benchmark failed: {status}\n{out}");

    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let systems: Vec<&str> = rows.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(
        systems,
        [
            "gorpc-tokio",
            "gorpc-smol",
            "tonic",
            "gorpc-grpc-server",
            "gorpc-grpc-client",
            "tarpc",
            "raw"
        ]
    );
    for (line, row) in out.lines().zip(&rows) {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys.len(), 9, "{line}");
        // The keys come in this order on the line itself.
        let mut at = 0;
        for key in [
            "system",
            "concurrency",
            "payload",
            "connections",
            "qps",
            "p50_us",
            "p99_us",
            "p999_us",
            "errors",
        ] {
            let pos = line[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} out of order in {line}"));
            at += pos + 1;
        }
        assert!(row["qps"].as_f64().unwrap() > 0.0, "{line}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{line}");
        assert_eq!(row["concurrency"].as_u64(), Some(4), "{line}");
        assert_eq!(row["payload"].as_u64(), Some(64), "{line}");
        assert!(row["p50_us"].as_f64().unwrap() > 0.0, "{line}");
    }
}

#[test]
fn the_stream_workload_runs_where_there_are_streams() {
    stream_workload_runs("stream");
}

#[test]
fn the_upload_workload_runs_where_there_are_streams() {
    stream_workload_runs("upload");
}

fn stream_workload_runs(workload: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "all", "--workload", workload, "--secs", "1"])
        .args(["--warmup", "0", "--concurrency", "2", "--payload", "64"])
        .args(["--messages", "1000"])
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("skipping tarpc:"), "{stderr}");
    assert!(
        stderr.contains("messages/s ratios: gorpc-tokio/tonic"),
        "{stderr}"
    );
    assert!(stderr.contains("gorpc-tokio/raw"), "{stderr}");
    assert!(
        stderr.contains("gorpc-grpc-server/tonic") && stderr.contains("gorpc-grpc-client/tonic"),
        "{stderr}"
    );

    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let systems: Vec<&str> = rows.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(
        systems,
        [
            "gorpc-tokio",
            "gorpc-smol",
            "tonic",
            "gorpc-grpc-server",
            "gorpc-grpc-client",
            "raw"
        ]
    );
    for (line, row) in stdout.lines().zip(&rows) {
        // Many 1000-message streams in a second: stream ends and restarts are exercised.
        assert!(row["msgs_per_s"].as_f64().unwrap() > 1000.0, "{line}");
        assert!(row["mb_per_s"].as_f64().unwrap() > 0.0, "{line}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{line}");
        assert_eq!(row["concurrency"].as_u64(), Some(2), "{line}");
        assert_eq!(row["payload"].as_u64(), Some(64), "{line}");
        assert_eq!(row["messages"].as_u64(), Some(1000), "{line}");
    }
}

#[test]
fn the_stream_workload_refuses_systems_without_streams() {
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "tarpc", "--workload", "stream", "--secs", "1"])
        .output()
        .expect("the benchmark runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert!(stderr.contains("every system but tarpc"), "{stderr}");
}

#[test]
fn the_upload_workload_refuses_client_windows() {
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "gorpc-tokio", "--workload", "upload"])
        .args(["--stream-window", "1048576"])
        .output()
        .expect("the benchmark runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert!(stderr.contains("which an upload does not use"), "{stderr}");
}

/// Runs the benchmark with `args` (and a short window) to its end; returns its JSON lines
/// and its stderr, having checked that it succeeded.
fn run_ok(args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--secs", "1", "--warmup", "0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert!(
        out.status.success(),
        "{args:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    // Not a terminal: no progress line.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let rows = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (rows, stderr)
}

fn systems_of(rows: &[serde_json::Value]) -> Vec<&str> {
    rows.iter().map(|r| r["system"].as_str().unwrap()).collect()
}

#[test]
fn the_grpc_rows_say_hello_to_tonic() {
    let (rows, stderr) = run_ok(&[
        "--system",
        "tonic,gorpc-grpc-server,gorpc-grpc-client",
        "--workload",
        "hello",
        "--concurrency",
        "4",
    ]);
    assert_eq!(
        systems_of(&rows),
        ["tonic", "gorpc-grpc-server", "gorpc-grpc-client"]
    );
    for row in &rows {
        assert!(row["qps"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
        assert_eq!(row["payload"].as_u64(), Some(5), "{row}");
    }
    assert!(
        stderr.contains("qps ratios: gorpc-grpc-server/tonic ")
            && stderr.contains(", gorpc-grpc-client/tonic "),
        "{stderr}"
    );
}

#[test]
fn the_http_workload_runs_on_gorpc() {
    let (rows, stderr) = run_ok(&[
        "--system",
        "all",
        "--workload",
        "http",
        "--concurrency",
        "8",
        "--payload",
        "1024",
    ]);
    assert!(
        stderr.contains(
            "skipping tonic, gorpc-grpc-server, gorpc-grpc-client, tarpc and raw: \
             the http workload runs on gorpc-tokio and gorpc-smol only"
        ),
        "{stderr}"
    );
    assert_eq!(systems_of(&rows), ["gorpc-tokio", "gorpc-smol"]);
    for row in &rows {
        assert!(row["qps"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
        assert_eq!(row["payload"].as_u64(), Some(1024), "{row}");
        // A connection per caller.
        assert_eq!(row["connections"].as_u64(), Some(8), "{row}");
    }
    assert!(
        stderr.contains("qps ratios: gorpc-smol/gorpc-tokio "),
        "{stderr}"
    );
}

#[test]
fn the_http_workload_refuses_the_other_systems() {
    let out = Command::new(env!("CARGO_BIN_EXE_gorpc-bench"))
        .args(["--system", "tonic,raw", "--workload", "http", "--secs", "1"])
        .stdin(Stdio::null())
        .output()
        .expect("the benchmark runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).expect("utf-8 stderr");
    assert!(
        stderr.contains("runs on gorpc-tokio and gorpc-smol only"),
        "{stderr}"
    );
}

#[test]
fn repeat_prints_each_run_and_the_median_of_the_ratios() {
    let (rows, stderr) = run_ok(&[
        "--system",
        "gorpc-tokio,tonic",
        "--repeat",
        "2",
        "--concurrency",
        "4",
        "--payload",
        "64",
    ]);
    let runs: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| (r["system"].as_str().unwrap(), r["run"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        runs,
        [
            ("gorpc-tokio", 1),
            ("tonic", 1),
            ("gorpc-tokio", 2),
            ("tonic", 2)
        ]
    );
    for row in &rows {
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
    }
    assert!(stderr.contains("\nrun 1 of 2:\n"), "{stderr}");
    assert!(stderr.contains("\nrun 2 of 2:\n"), "{stderr}");
    assert_eq!(
        stderr.matches("qps ratios: gorpc-tokio/tonic ").count(),
        2,
        "{stderr}"
    );
    let median = stderr
        .lines()
        .find(|l| l.starts_with("qps ratios, median of 2 runs (min–max): gorpc-tokio/tonic "))
        .unwrap_or_else(|| panic!("no median line in {stderr}"));
    assert!(median.ends_with("x)"), "{median}");
}

#[test]
fn idle_connections_reads_each_servers_memory() {
    let (rows, stderr) = run_ok(&[
        "--system",
        "gorpc-tokio,gorpc-grpc-client,raw",
        "--idle-connections",
        "20",
    ]);
    assert!(
        stderr.contains("skipping gorpc-grpc-client: --idle-connections measures servers"),
        "{stderr}"
    );
    assert_eq!(systems_of(&rows), ["gorpc-tokio", "raw"]);
    for row in &rows {
        assert_eq!(row["idle_connections"].as_u64(), Some(20), "{row}");
        assert_eq!(row["errors"].as_u64(), Some(0), "{row}");
        assert!(row["rss_baseline_kib"].as_u64().unwrap() > 0, "{row}");
        assert!(row["rss_after_kib"].as_u64().is_some(), "{row}");
        assert!(row["kib_per_connection"].as_f64().is_some(), "{row}");
    }
    assert!(
        stderr.contains("| system | idle connections | payload |"),
        "{stderr}"
    );
}
