//! `gorpc new`: the scaffold builds (offline, from the crates already in ~/.cargo), and its
//! client calls its server, for every kind of method; the server also answers curl, and logs
//! as RUST_LOG says; the starter project does what its README says; no project inside
//! another workspace unless asked.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    gorpc, helloworld_proto, run, spawn_until_line, spawn_until_line_capturing_stderr,
    wait_for_line,
};

const LIMIT: Duration = Duration::from_secs(60);
/// A cold build compiles tokio, prost, protox and gorpc; later runs reuse them.
const BUILD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Shared by all runs, under the workspace's target dir, so dependencies compile once.
fn scaffold_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("gorpc-new-target")
}

/// cargo in a scaffold, offline, with the shared target dir and the same settings every time
/// (so that a later `cargo run` finds the build fresh).
fn cargo_in(project: &Path) -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(project)
        .env("CARGO_TARGET_DIR", scaffold_target_dir())
        .env("CARGO_NET_OFFLINE", "true")
        // The scaffold is its own workspace: keep its build as small as ours.
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only");
    cargo
}

/// Builds the scaffold `name` in `project` into the shared target dir, and checks that its
/// own code compiles without warnings. Returns the path of one of its binaries by name
/// (binaries are named after their project, so scaffolds built side by side keep theirs).
fn build_scaffold(project: &Path, name: &str) -> impl Fn(&str) -> PathBuf {
    let target = scaffold_target_dir();
    let build = run(cargo_in(project).args(["build", "--bins"]), BUILD_LIMIT);
    assert!(build.status.success(), "cargo build: {}", stderr(&build));
    // cargo's summary of a package's warnings: "warning: `name` (bin "server") generated 1
    // warning".
    assert!(
        !stderr(&build).contains(&format!("`{name}` (")),
        "the scaffold has warnings: {}",
        stderr(&build)
    );
    move |bin: &str| {
        target
            .join("debug")
            .join(format!("{bin}{}", std::env::consts::EXE_SUFFIX))
    }
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
        "README.md",
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

    let bin = build_scaffold(&project, "hello-app");
    let (_server, addr, server_log) = spawn_until_line_capturing_stderr(
        Command::new(bin("hello-app-server"))
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "debug"),
        "listening on ",
        LIMIT,
    );
    let client = run(Command::new(bin("hello-app-client")).arg(&addr), LIMIT);
    assert!(client.status.success(), "client: {}", stderr(&client));
    assert_eq!(
        String::from_utf8_lossy(&client.stdout),
        "SayHello -> HelloReply { message: \"\" }\n\
         SayHelloToAll -> HelloAllReply { messages: [] }\n",
        "the client calls each method"
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

    // And curl, with JSON, on the same port.
    let curl = run(
        Command::new("curl")
            .args(["-sS", "-i", "-X", "POST"])
            .arg(format!("http://{addr}/helloworld.Greeter/SayHello"))
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                r#"{"name":"x"}"#,
            ]),
        LIMIT,
    );
    assert!(curl.status.success(), "curl: {}", stderr(&curl));
    let answer = String::from_utf8_lossy(&curl.stdout).to_ascii_lowercase();
    for header in [
        "http/1.1 200 ok\r\n",
        "\r\ncontent-type: application/json\r\n",
        "\r\nx-gorpc-status: 0\r\n",
    ] {
        assert!(answer.contains(header), "{header:?} in {answer}");
    }
    assert!(answer.ends_with("\r\n\r\n{}"), "{answer}");

    // RUST_LOG=debug shows the framework's debug logs: here, a client's connection ending.
    let logged = wait_for_line(
        &server_log,
        |line| line.contains("DEBUG") && line.contains("connection closed"),
        LIMIT,
    );
    assert!(logged.is_ok(), "no debug log from the server: {logged:?}");
}

/// One method of each kind, with the line the scaffold's client prints for it: one response
/// for each kind, since the stubs answer one default response to a call, to a stream of
/// requests, or to each request.
const KINDS: [(&str, &str, &str); 4] = [
    (
        "get",
        "rpc Get (Req) returns (Rsp);",
        "Get -> Rsp { text: \"\" }",
    ),
    (
        "watch",
        "rpc Watch (Req) returns (stream Rsp);",
        "Watch -> Rsp { text: \"\" }",
    ),
    (
        "upload",
        "rpc Upload (stream Req) returns (Rsp);",
        "Upload -> Rsp { text: \"\" }",
    ),
    (
        "chat",
        "rpc Chat (stream Req) returns (stream Rsp);",
        "Chat -> Rsp { text: \"\" }",
    ),
];

#[test]
fn scaffolds_every_kind_of_method() {
    let parent = tempfile::tempdir().unwrap();
    // Each kind first once: the server serves all four, the client calls them in order.
    for first in 0..KINDS.len() {
        let (method, _, _) = KINDS[first];
        let order = (0..KINDS.len()).map(|i| KINDS[(first + i) % KINDS.len()]);
        let rpcs: Vec<&str> = order.clone().map(|(_, rpc, _)| rpc).collect();
        let printed: String = order.map(|(_, _, line)| format!("{line}\n")).collect();
        let proto = parent.path().join(format!("{method}.proto"));
        std::fs::write(
            &proto,
            format!(
                "syntax = \"proto3\";\npackage kinds;\n\
                 message Req {{ string text = 1; }}\n\
                 message Rsp {{ string text = 1; }}\n\
                 service Kinds {{\n  {}\n}}\n",
                rpcs.join("\n  ")
            ),
        )
        .unwrap();
        let name = format!("kinds-{method}");
        let output = new_project(&name, proto.to_str().unwrap(), parent.path());
        assert!(output.status.success(), "gorpc new: {}", stderr(&output));
        let project = parent.path().join(&name);
        let server_rs = std::fs::read_to_string(project.join("src/bin/server.rs")).unwrap();
        for (stub, _, _) in KINDS {
            assert!(
                server_rs.contains(&format!("async fn {stub}(")),
                "{server_rs}"
            );
        }
        let cargo_toml = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
        assert!(cargo_toml.contains("\nfutures = "), "{cargo_toml}");

        let bin = build_scaffold(&project, &name);
        let (_server, addr) = spawn_until_line(
            Command::new(bin(&format!("{name}-server"))).arg("127.0.0.1:0"),
            "listening on ",
            LIMIT,
        );
        let client = run(
            Command::new(bin(&format!("{name}-client"))).arg(&addr),
            LIMIT,
        );
        assert!(
            client.status.success(),
            "{name} client: {}",
            stderr(&client)
        );
        assert_eq!(
            String::from_utf8_lossy(&client.stdout),
            printed,
            "{name} client"
        );
    }
}

#[test]
fn refuses_bad_names() {
    let parent = tempfile::tempdir().unwrap();
    for name in ["2fast", "has space", "fn", "tokio", "futures"] {
        let output = new_project(name, &helloworld_proto(), parent.path());
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains("not a valid crate name"),
            "{name}: {}",
            stderr(&output)
        );
    }

    let output = new_project("nothing", "no/such.proto", parent.path());
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

/// What the starter project's client prints: the two methods of the starter Greeter.
const STARTER_CLIENT_OUTPUT: &str = "SayHello -> HelloReply { message: \"\" }\n\
                                     SayHelloStream -> HelloReply { message: \"\" }\n";

/// `gorpc new demo`, as a newcomer types it in an empty directory: the starter project
/// builds, and everything its README says to run works against its running server: the
/// server and the client through `cargo run`, `gorpc call` of both methods, curl with JSON on
/// the same port, the logs RUST_LOG asks for.
#[test]
fn starter_project_works_as_its_readme_says() {
    let parent = tempfile::tempdir().unwrap();
    let output = run(
        gorpc().args(["new", "demo"]).current_dir(parent.path()),
        LIMIT,
    );
    assert!(output.status.success(), "gorpc new: {}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    for step in ["cargo run --bin demo-server", "cargo run --bin demo-client"] {
        assert!(printed.contains(step), "{printed}");
    }
    let project = parent.path().join("demo");
    let proto = std::fs::read_to_string(project.join("proto/demo.proto")).unwrap();
    for line in [
        "package demo;",
        "service Greeter {",
        "rpc SayHello (HelloRequest) returns (HelloReply);",
        "rpc SayHelloStream (HelloRequest) returns (stream HelloReply);",
    ] {
        assert!(proto.contains(line), "{line} in {proto}");
    }
    let bin = build_scaffold(&project, "demo");
    for binary in ["demo-server", "demo-client"] {
        assert!(bin(binary).is_file(), "no binary {binary}");
    }

    let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
    let commands = shell_blocks(&readme);
    // Every command the README gives is run below; a new one needs a test.
    let mut calls = Vec::new();
    let mut curls = Vec::new();
    for command in &commands {
        match command.as_str() {
            "cargo run --bin demo-server" | "cargo run --bin demo-client" => {}
            c if c.starts_with("cargo install --path ") => {
                let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
                assert_eq!(
                    Path::new(&c["cargo install --path ".len()..])
                        .canonicalize()
                        .unwrap(),
                    checkout.canonicalize().unwrap(),
                    "the README installs gorpc from this checkout's gorpc-cli"
                );
            }
            c if c.starts_with("gorpc call ") => calls.push(c),
            c if c.starts_with("curl ") => curls.push(c),
            c => panic!("README.md has a command this test does not run: {c}"),
        }
    }
    assert_eq!(
        calls,
        [
            "gorpc call 127.0.0.1:50051 /demo.Greeter/SayHello --proto proto/demo.proto \
             --data '{\"name\":\"\"}'",
            "gorpc call 127.0.0.1:50051 /demo.Greeter/SayHelloStream --proto proto/demo.proto \
             --data '{\"name\":\"\"}'",
        ]
    );
    assert_eq!(
        curls,
        ["curl -X POST http://127.0.0.1:50051/demo.Greeter/SayHello \
          -H 'content-type: application/json' -d '{\"name\":\"\"}'"]
    );

    // The README's server and client, on a free port instead of 50051 (given after `--`,
    // as the README says); cargo run replaces itself with the binary, so killing it stops
    // the server.
    let (_server, addr, server_log) = spawn_until_line_capturing_stderr(
        cargo_in(&project)
            .args(["run", "--bin", "demo-server", "--", "127.0.0.1:0"])
            .env("RUST_LOG", "debug"),
        "listening on ",
        BUILD_LIMIT,
    );
    let client = run(
        cargo_in(&project).args(["run", "--bin", "demo-client", "--", &addr]),
        BUILD_LIMIT,
    );
    assert!(client.status.success(), "client: {}", stderr(&client));
    assert_eq!(
        String::from_utf8_lossy(&client.stdout),
        STARTER_CLIENT_OUTPUT,
        "the client calls the unary and the stream method"
    );

    // The README's own command lines, through a shell, with this gorpc first on the PATH.
    let gorpc_dir = Path::new(env!("CARGO_BIN_EXE_gorpc")).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(gorpc_dir.to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    for command in calls.iter().chain(&curls) {
        let output = run(
            Command::new("sh")
                .arg("-c")
                .arg(command.replace("127.0.0.1:50051", &addr))
                .current_dir(&project)
                .env("PATH", &path),
            LIMIT,
        );
        assert!(output.status.success(), "{command}: {}", stderr(&output));
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{command} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        assert_eq!(
            reply,
            serde_json::json!({}),
            "{command}: the stubs answer defaults"
        );
    }

    // RUST_LOG=debug shows the framework's debug logs: here, the client's connection ending.
    let logged = wait_for_line(
        &server_log,
        |line| line.contains("DEBUG") && line.contains("connection closed"),
        LIMIT,
    );
    assert!(logged.is_ok(), "no debug log from the server: {logged:?}");
}

/// The command lines of a README's ```sh blocks.
fn shell_blocks(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in readme.lines() {
        if in_block {
            if line.trim() == "```" {
                in_block = false;
            } else if !line.trim().is_empty() {
                commands.push(line.trim().to_owned());
            }
        } else if line.trim() == "```sh" {
            in_block = true;
        }
    }
    assert!(!in_block, "unclosed ```sh block in {readme}");
    commands
}

/// Inside another Cargo workspace, `gorpc new` creates nothing unless given
/// `--in-workspace`; then the project is a workspace of its own all the same.
#[test]
fn refuses_to_scaffold_inside_a_workspace_unless_asked() {
    let temp = tempfile::tempdir().unwrap();
    let workspace = temp.path().join("ws");
    std::fs::create_dir(&workspace).unwrap();
    std::fs::write(
        workspace.join("Cargo.toml"),
        "[workspace]\nresolver = \"2\"\nmembers = []\n",
    )
    .unwrap();
    let manifest = workspace.canonicalize().unwrap().join("Cargo.toml");

    // In the workspace's directory itself, and with a --dir below it that does not exist yet.
    let apps = workspace.join("apps");
    for (cwd, dir) in [
        (workspace.as_path(), None),
        (temp.path(), Some(apps.as_path())),
    ] {
        let mut command = gorpc();
        command.args(["new", "nested"]).current_dir(cwd);
        if let Some(dir) = dir {
            command.arg("--dir").arg(dir);
        }
        let output = run(&mut command, LIMIT);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let message = stderr(&output);
        for part in [
            manifest.display().to_string().as_str(),
            "pass --in-workspace",
            "choose another --dir",
        ] {
            assert!(message.contains(part), "{part:?} in {message}");
        }
        assert!(!workspace.join("nested").exists(), "created a project");
        assert!(!apps.exists(), "created --dir");
    }

    let output = run(
        gorpc()
            .args(["new", "nested", "--in-workspace", "--dir"])
            .arg(&apps),
        LIMIT,
    );
    assert!(output.status.success(), "gorpc new: {}", stderr(&output));
    let project = apps.join("nested");
    assert!(project.join("src/bin/server.rs").is_file());
    // Cargo takes the project, not the workspace around it, for its workspace root.
    let located = run(
        cargo_in(&project).args(["locate-project", "--workspace", "--message-format", "plain"]),
        LIMIT,
    );
    assert!(located.status.success(), "cargo: {}", stderr(&located));
    assert_eq!(
        Path::new(String::from_utf8_lossy(&located.stdout).trim()),
        project.canonicalize().unwrap().join("Cargo.toml")
    );
}
