//! Python's grpcio, a gRPC implementation nobody here wrote, as the client of a gorpc server
//! on each server runtime: the four call kinds of the route guide, a deadline (and the
//! handler it drops), statuses with their messages, metadata both ways with binary values,
//! and gzip both ways.
//!
//! The client is tests/python/interop_client.py: it prints "ok CHECK" or "FAIL CHECK: why"
//! per check and exits non-zero if any failed. This file makes its venv (pinned grpcio
//! packages, stubs generated from proto/ by grpc_tools), once per set of pins and protos,
//! kept under the target directory and shared by the tests; then each test starts the
//! servers and runs the script against them.
//!
//! The tests need python3 with its venv module (or `$GORPC_TEST_PYTHON`), and PyPI the
//! first time: without them they fail, saying what to install.

mod interop;

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use gorpc::{Router, Runtime, Server};
use gorpc_examples::helloworld::GreeterServer;
use gorpc_examples::routeguide::RouteGuideServer;
use gorpc_examples::services::{Guide, Hello};
use gorpc_tests::{loopback, Smol, Tokio, SECOND};
use interop::{servers, MetadataSeen, Seen};

/// What the venv gets from PyPI: versions pinned, so that every run tests the same client.
const PIP_PINS: &[&str] = &[
    "grpcio==1.85.3",
    "grpcio-tools==1.85.1",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "protobuf==7.36.2",
];

/// The protos the stubs are generated from, in examples/proto.
const PROTOS: &[&str] = &["helloworld.proto", "route_guide.proto"];

/// Making the venv downloads and installs the packages; each step gets this long.
const SETUP_LIMIT: Duration = Duration::from_secs(600);

/// The whole Python client: its checks give each call a 20 s deadline.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// The checks that run against every server now, in the order the script prints them.
const CHECKS: &[&str] = &[
    "unary",
    "server_streaming",
    "client_streaming",
    "bidi",
    "deadline",
    "not_found",
    "unimplemented",
    "metadata",
    "gzip",
];

// ---- The Python environment ------------------------------------------------------------

/// The venv's interpreter and the directory of the generated stubs.
struct PythonEnv {
    python: PathBuf,
    stubs: PathBuf,
}

/// The venv, made by the first test that needs it (the others wait for it). Its failure
/// fails every test that needs it, with the reason.
fn python_env() -> &'static PythonEnv {
    static ENV: OnceLock<Result<PythonEnv, String>> = OnceLock::new();
    match ENV.get_or_init(make_python_env) {
        Ok(env) => env,
        Err(why) => panic!("{why}"),
    }
}

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/interop_client.py")
}

/// FNV-1a: a name for the venv that changes with the pins and the protos, the same from
/// one build to the next.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The Python that makes the venv: `python3`, or `$GORPC_TEST_PYTHON`.
fn interpreter() -> std::ffi::OsString {
    std::env::var_os("GORPC_TEST_PYTHON").unwrap_or_else(|| "python3".into())
}

fn env_key() -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325;
    hash = fnv1a(hash, interpreter().as_encoded_bytes());
    for pin in PIP_PINS {
        hash = fnv1a(hash, pin.as_bytes());
        hash = fnv1a(hash, b"\n");
    }
    for proto in PROTOS {
        let text = std::fs::read(proto_dir().join(proto)).expect("the protos are readable");
        hash = fnv1a(hash, proto.as_bytes());
        hash = fnv1a(hash, &text);
    }
    hash
}

/// Makes the venv in a directory of this process's own, then renames it into place: a
/// finished venv is there whole or not at all, whatever other test processes do meanwhile.
fn make_python_env() -> Result<PythonEnv, String> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let name = format!("grpc-python-{:016x}", env_key());
    let dir = root.join(&name);
    let env_at = |dir: &Path| PythonEnv {
        python: dir.join("bin/python"),
        stubs: dir.join("stubs"),
    };
    if dir.join("ready").exists() {
        return Ok(env_at(&dir));
    }
    let started = Instant::now();
    let work = root.join(format!("{name}.{}.tmp", std::process::id()));
    let made = make_venv(&work);
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    made?;
    match std::fs::rename(&work, &dir) {
        Ok(()) => {}
        // Another test process got there first: its venv is as good.
        Err(_) if dir.join("ready").exists() => {
            let _ = std::fs::remove_dir_all(&work);
        }
        Err(e) => return Err(format!("{} -> {}: {e}", work.display(), dir.display())),
    }
    eprintln!(
        "made the Python venv for the gRPC interop tests in {} ({:.1?})",
        dir.display(),
        started.elapsed()
    );
    Ok(env_at(&dir))
}

/// The venv in `work`: the pinned packages, the stubs, and a file saying it is whole.
fn make_venv(work: &Path) -> Result<(), String> {
    // Left by an earlier process of the same id that died making it.
    let _ = std::fs::remove_dir_all(work);
    let python = interpreter();
    let python = Path::new(&python);
    let venv = run_setup(
        Command::new(python).arg("-m").arg("venv").arg(work),
        "creating the venv",
    );
    match venv {
        Err(SetupError::NotFound) => {
            return Err(format!(
                "{} was not found. The gRPC interop tests need Python 3 with venv and pip \
                 (Debian: apt-get install python3 python3-venv python3-pip); set \
                 GORPC_TEST_PYTHON to use another interpreter",
                python.display()
            ))
        }
        Err(SetupError::Failed(why)) => {
            return Err(format!(
                "`{} -m venv` failed: the gRPC interop tests need Python 3's venv module \
                 (Debian: apt-get install python3-venv).\n{why}",
                python.display()
            ))
        }
        Ok(()) => {}
    }
    let venv_python = work.join("bin/python");
    let pip = run_setup(
        Command::new(&venv_python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(["--quiet"])
            .args(PIP_PINS),
        "pip install",
    );
    if let Err(why) = pip {
        let why = match why {
            SetupError::NotFound => "the venv has no python".to_owned(),
            SetupError::Failed(why) => why,
        };
        return Err(format!(
            "pip could not install {} into {}: the gRPC interop tests need pip and PyPI \
             reachable the first time (Debian: apt-get install python3-pip).\n{why}",
            PIP_PINS.join(" "),
            work.display()
        ));
    }
    let stubs = work.join("stubs");
    std::fs::create_dir_all(&stubs).map_err(|e| format!("{}: {e}", stubs.display()))?;
    let protoc = run_setup(
        Command::new(&venv_python)
            .args(["-m", "grpc_tools.protoc"])
            .arg("-I")
            .arg(proto_dir())
            .arg("--python_out")
            .arg(&stubs)
            .arg("--grpc_python_out")
            .arg(&stubs)
            .args(PROTOS),
        "generating the stubs",
    );
    protoc.map_err(|e| match e {
        SetupError::NotFound => "the venv has no python".to_owned(),
        SetupError::Failed(why) => format!("grpc_tools.protoc failed on examples/proto:\n{why}"),
    })?;
    std::fs::write(work.join("ready"), PIP_PINS.join("\n"))
        .map_err(|e| format!("{}: {e}", work.display()))
}

enum SetupError {
    NotFound,
    Failed(String),
}

/// Runs one setup step to its end, within [`SETUP_LIMIT`].
fn run_setup(command: &mut Command, what: &str) -> Result<(), SetupError> {
    let spawned = match Spawned::start(command) {
        Ok(spawned) => spawned,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SetupError::NotFound),
        Err(e) => return Err(SetupError::Failed(format!("{what}: {e}"))),
    };
    let rt = Smol::new();
    let finished = smol::block_on(spawned.finish(&rt, SETUP_LIMIT))
        .map_err(|e| SetupError::Failed(format!("{what}: {e}")))?;
    if finished.status.success() {
        Ok(())
    } else {
        Err(SetupError::Failed(format!(
            "{what}: {}\n{}{}",
            finished.status, finished.stdout, finished.stderr
        )))
    }
}

// ---- Child processes -------------------------------------------------------------------

/// A child process whose output two threads read to its end; killed if dropped before it
/// exits.
struct Spawned {
    child: Child,
    exited: bool,
    stdout: oneshot::Receiver<String>,
    stderr: oneshot::Receiver<String>,
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Spawned {
    fn start(command: &mut Command) -> std::io::Result<Spawned> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let read = |mut pipe: Box<dyn Read + Send>| {
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
            });
            rx
        };
        let stdout = read(Box::new(child.stdout.take().expect("piped")));
        let stderr = read(Box::new(child.stderr.take().expect("piped")));
        Ok(Spawned {
            child,
            exited: false,
            stdout,
            stderr,
        })
    }

    /// Waits until the child closed its output, then for its exit status; after `limit`
    /// it is killed instead.
    async fn finish<R: Runtime>(mut self, rt: &R, limit: Duration) -> Result<Finished, String> {
        let output = async {
            let stdout = (&mut self.stdout).await.unwrap_or_default();
            let stderr = (&mut self.stderr).await.unwrap_or_default();
            (stdout, stderr)
        };
        let Some((stdout, stderr)) = bounded(rt, limit, output).await else {
            return Err(format!("still running after {limit:?}; killed"));
        };
        // Its output closed: it is exiting.
        let status = self.child.wait().map_err(|e| e.to_string())?;
        self.exited = true;
        Ok(Finished {
            status,
            stdout,
            stderr,
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `future`'s output, unless `limit` passes first.
async fn bounded<R: Runtime, T>(
    rt: &R,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Option<T> {
    let mut future = std::pin::pin!(future);
    let mut timer = rt.sleep_until(Instant::now() + limit);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(v));
        }
        if std::pin::Pin::new(&mut timer).poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await
}

/// Runs the Python client with `checks` against the two servers; returns its output lines
/// once it exited, panicking with all it printed if it failed.
async fn run_client<R: Runtime>(
    rt: &R,
    addr: &str,
    gzip_addr: &str,
    checks: &[&str],
) -> Vec<String> {
    let env = python_env();
    let spawned = Spawned::start(
        Command::new(&env.python)
            .arg(script())
            .args(["--addr", addr, "--gzip-addr", gzip_addr])
            .args(checks)
            .env("PYTHONPATH", &env.stubs)
            .env("PYTHONUNBUFFERED", "1"),
    )
    .expect("the venv's python starts");
    let finished = spawned
        .finish(rt, CLIENT_LIMIT)
        .await
        .unwrap_or_else(|e| panic!("the Python client: {e}"));
    let lines: Vec<String> = finished.stdout.lines().map(str::to_owned).collect();
    assert!(
        finished.status.success(),
        "the Python client failed ({}):\n{}\n--- its stderr:\n{}",
        finished.status,
        finished.stdout,
        finished.stderr
    );
    lines
}

// ---- The tests -------------------------------------------------------------------------

async fn python_client<R: Runtime>(rt: R) {
    let seen = Seen::new();
    let (server, gzip_server) = servers(rt.clone(), &seen).await;
    let addr = server.local_addr().to_string();
    let gzip_addr = gzip_server.local_addr().to_string();

    let lines = run_client(&rt, &addr, &gzip_addr, CHECKS).await;
    let expected: Vec<String> = CHECKS.iter().map(|check| format!("ok {check}")).collect();
    assert_eq!(lines, expected, "the Python client's verdicts");

    // The deadline dropped the stalled handler, with no help from the server's shutdown.
    seen.stalls.wait_dropped(&rt, 1).await;
    // The request metadata reached the handlers, the binary value decoded.
    assert_eq!(
        seen.metadata(),
        [
            MetadataSeen::sent_to("/interop.Test/Echo"),
            MetadataSeen::sent_to("/interop.Test/Trailers")
        ],
        "what the handlers saw"
    );

    assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
    assert_eq!(
        gzip_server.shutdown(SECOND).await,
        gorpc::Shutdown::Graceful
    );
}

#[test]
fn python_client_against_tokio_server() {
    let rt = gorpc_tests::tokio_runtime();
    let tokio = Tokio::from_handle(rt.handle().clone());
    rt.block_on(python_client(tokio));
}

#[test]
fn python_client_against_smol_server() {
    smol::block_on(python_client(Smol::new()));
}

/// grpc.health.v1.Health/Check on "" answers SERVING, and reflection (grpcio's client
/// speaks v1alpha) lists both services.
#[test]
fn python_health_and_reflection() {
    smol::block_on(async {
        let rt = Smol::new();
        let router = Router::new()
            .add_service(GreeterServer::new(Hello))
            .add_service(RouteGuideServer::new(Guide));
        let server = Server::new(rt.clone(), router)
            .http()
            .health()
            .reflection()
            .bind(loopback())
            .await
            .expect("the server binds");
        let addr = server.local_addr().to_string();
        let lines = run_client(&rt, &addr, &addr, &["health", "reflection"]).await;
        assert_eq!(lines, ["ok health", "ok reflection"]);
        assert_eq!(server.shutdown(SECOND).await, gorpc::Shutdown::Graceful);
    });
}
