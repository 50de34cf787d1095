//! `gorpc new`: the scaffold builds (offline, from the crates already in ~/.cargo), and its
//! client calls its server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{gorpc, helloworld_proto, run, spawn_until_line};

const LIMIT: Duration = Duration::from_secs(60);
/// A cold build compiles tokio, prost, protox and gorpc; later runs reuse them.
const BUILD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Shared by all runs, under the workspace's target dir, so dependencies compile once.
fn scaffold_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("gorpc-new-target")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn new_project(name: &str, proto: &str, parent: &Path) -> Output {
    run(
        gorpc()
            .args(["new", name, "--proto", proto, "--dir"])
            .arg(parent),
        LIMIT,
    )
}

#[test]
fn scaffold_builds_and_its_client_calls_its_server() {
    let parent = tempfile::tempdir().unwrap();
    let output = new_project("hello-app", &helloworld_proto(), parent.path());
    assert!(output.status.success(), "gorpc new: {}", stderr(&output));
    let project = parent.path().join("hello-app");
    for file in [
        "Cargo.toml",
        "build.rs",
        "proto/helloworld.proto",
        "src/lib.rs",
        "src/bin/server.rs",
        "src/bin/client.rs",
    ] {
        assert!(project.join(file).is_file(), "{file} missing");
    }
    let server_rs = std::fs::read_to_string(project.join("src/bin/server.rs")).unwrap();
    assert!(
        server_rs.contains("async fn say_hello_to_all("),
        "{server_rs}"
    );
    assert!(server_rs.contains("TODO"), "{server_rs}");

    // Never overwrites.
    let again = new_project("hello-app", &helloworld_proto(), parent.path());
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let target = scaffold_target_dir();
    let build = run(
        Command::new(env!("CARGO"))
            .args(["build", "--offline", "--bins"])
            .current_dir(&project)
            .env("CARGO_TARGET_DIR", &target),
        BUILD_LIMIT,
    );
    assert!(build.status.success(), "cargo build: {}", stderr(&build));

    let bin = |name: &str| {
        target
            .join("debug")
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    };
    let (_server, addr) = spawn_until_line(
        Command::new(bin("server")).arg("127.0.0.1:0"),
        "listening on ",
        LIMIT,
    );
    let client = run(Command::new(bin("client")).arg(&addr), LIMIT);
    let stdout = String::from_utf8_lossy(&client.stdout);
    assert!(client.status.success(), "client: {}", stderr(&client));
    assert!(
        stdout.contains("SayHello -> HelloReply"),
        "client printed: {stdout}"
    );

    // And the call tool talks to it too.
    let call = run(
        gorpc().args([
            "call",
            &addr,
            "/helloworld.Greeter/SayHelloToAll",
            "--proto",
            &helloworld_proto(),
            "--data",
            r#"{"names":["x"]}"#,
        ]),
        LIMIT,
    );
    assert!(call.status.success(), "call: {}", stderr(&call));
    let reply: serde_json::Value = serde_json::from_slice(&call.stdout).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({}),
        "the scaffold answers defaults"
    );
}

#[test]
fn refuses_bad_names_and_streaming_methods() {
    let parent = tempfile::tempdir().unwrap();
    for name in ["2fast", "has space", "fn", "tokio"] {
        let output = new_project(name, &helloworld_proto(), parent.path());
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("not a valid crate name"),
            "{name}: {}",
            stderr(&output)
        );
    }

    let proto = parent.path().join("watch.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage w;\nmessage M {}\n\
         service Watcher { rpc Watch (M) returns (stream M); }\n",
    )
    .unwrap();
    let output = new_project("watcher", proto.to_str().unwrap(), parent.path());
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("/w.Watcher/Watch: streaming"),
        "{}",
        stderr(&output)
    );
    assert!(!parent.path().join("watcher").exists());

    let output = new_project("nothing", "no/such.proto", parent.path());
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
