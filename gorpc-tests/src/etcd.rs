//! A real etcd server for tests: `/usr/bin/etcd` (Debian package etcd-server) on 127.0.0.1,
//! free ports, a temporary data directory, killed and removed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's etcd-server package installs the server.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running single-node etcd cluster.
pub struct EtcdServer {
    process: Option<Child>,
    data_dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports itself healthy. Panics (failing the test)
    /// if the binary is missing or the server does not come up.
    pub fn start() -> EtcdServer {
        assert!(
            Path::new(ETCD_BINARY).exists(),
            "{ETCD_BINARY} is missing: the etcd tests need a real etcd server; \
             install it with `apt-get install etcd-server`"
        );
        let data_dir = tempfile::Builder::new()
            .prefix("gorpc-etcd-")
            .tempdir()
            .expect("temporary data directory for etcd");
        let mut server = EtcdServer {
            process: None,
            data_dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        // A port found free can be taken before etcd binds it; try again with new ones.
        let mut last_error = String::new();
        for _ in 0..3 {
            match server.launch() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    server.kill();
                    let _ = std::fs::remove_dir_all(server.etcd_data_dir());
                    server.client_port = free_port();
                    server.peer_port = free_port();
                }
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Kills the server; its data stays for [`EtcdServer::restart`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.launch() {
            panic!("etcd did not restart: {e}");
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let child = Command::new(ETCD_BINARY)
            .arg("--name=gorpc-test")
            .arg(format!("--data-dir={}", self.etcd_data_dir().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=gorpc-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {ETCD_BINARY}: {e}"))?;
        self.process = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .process
                .as_mut()
                .and_then(|p| p.try_wait().ok().flatten())
            {
                return Err(format!("etcd exited with {status}; log:\n{}", self.log()));
            }
            if healthy(self.client_addr()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd not healthy after {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn etcd_data_dir(&self) -> PathBuf {
        self.data_dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("etcd.log")
    }

    /// What etcd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        // The TempDir removes the data directory after this.
    }
}

/// A port nobody listened on a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether etcd's `/health` says `"health":"true"`.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
