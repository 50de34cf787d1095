//! Running processes with a time limit.

#![allow(dead_code)] // each test file uses a part

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The gorpc binary under test.
pub fn gorpc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gorpc"))
}

/// The repository's examples/proto/helloworld.proto.
pub fn helloworld_proto() -> String {
    format!(
        "{}/../examples/proto/helloworld.proto",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs `command` to completion, capturing its output; kills it and panics after `limit`.
pub fn run(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{command:?} did not finish within {limit:?}; stderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// A child process killed when this is dropped, even when the test panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and waits up to `limit` for a line of its stdout starting with `prefix`;
/// returns the process and the rest of that line.
pub fn spawn_until_line(
    command: &mut Command,
    prefix: &str,
    limit: Duration,
) -> (KillOnDrop, String) {
    spawn_with_stderr(command, Stdio::inherit(), prefix, limit)
}

/// Like [`spawn_until_line`], with the lines of the process's stderr on a channel.
pub fn spawn_until_line_capturing_stderr(
    command: &mut Command,
    prefix: &str,
    limit: Duration,
) -> (KillOnDrop, String, mpsc::Receiver<String>) {
    let (mut child, rest) = spawn_with_stderr(command, Stdio::piped(), prefix, limit);
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rest, rx)
}

fn spawn_with_stderr(
    command: &mut Command,
    stderr: Stdio,
    prefix: &str,
    limit: Duration,
) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}")),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let wanted = prefix.to_owned();
    thread::spawn(move || {
        // Keeps reading after the match so the child never blocks on a full pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(&wanted) {
                let _ = tx.send(rest.trim().to_owned());
            }
        }
    });
    let rest = rx
        .recv_timeout(limit)
        .unwrap_or_else(|e| panic!("{command:?} printed no `{prefix}` line: {e}"));
    (child, rest)
}

/// Waits up to `limit` for a line from `lines` that `wanted` accepts, and returns it; the
/// lines before it otherwise.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    wanted: impl Fn(&str) -> bool,
    limit: Duration,
) -> Result<String, Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return Ok(line),
            Ok(line) => seen.push(line),
            Err(_) => return Err(seen),
        }
    }
}
