//! The `cvchain` binary, started as the Functions host starts it: app settings as environment
//! variables and a port in `FUNCTIONS_CUSTOMHANDLER_PORT`; or as a queue worker.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The `cvchain` binary cargo built beside the running test or benchmark (`target/<profile>/`),
/// or `CVCHAIN_BIN`.
pub fn cvchain_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CVCHAIN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test's executable");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/cvchain
    let dir = exe.parent().expect("deps folder");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile folder")
    } else {
        dir
    };
    let bin = dir.join("cvchain");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo builds it for the cvchain package's tests)",
        bin.display()
    );
    bin
}

/// `cvchain serve`, started as the host starts it: app settings as environment variables and a
/// port in FUNCTIONS_CUSTOMHANDLER_PORT; ready once `GET /` answers.
pub struct Handler {
    child: Option<Child>,
    pub port: u16,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// `serve` (answers GET /) or `worker` (consumes the queue itself).
    command: &'static str,
    /// The binary: cvchain's own build, or another one (an earlier revision, for benchmarks).
    bin: PathBuf,
}

impl Handler {
    pub fn start(env: &[(&str, String)]) -> Self {
        Self::start_command("serve", env)
    }

    /// `cvchain worker` with these settings: no port, it polls the queue.
    pub fn start_worker(env: &[(&str, String)]) -> Self {
        Self::start_command("worker", env)
    }

    fn start_command(command: &'static str, env: &[(&str, String)]) -> Self {
        Self::start_with(&cvchain_bin(), command, env)
    }

    /// `bin` (a cvchain binary) with this command and settings.
    pub fn start_with(
        bin: &std::path::Path,
        command: &'static str,
        env: &[(&str, String)],
    ) -> Self {
        let port = crate::free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr_path = dir.path().join("stderr.log");
        let mut h = Self {
            child: None,
            port,
            stderr_path,
            _dir: dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            command,
            bin: bin.to_owned(),
        };
        h.spawn();
        h
    }

    /// SIGKILL, as a crashed host instance: no drain, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the handler again on the same port, as the host restarts it.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn spawn(&mut self) {
        let port = self.port;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg(self.command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_WORKER_RUNTIME", "custom")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start cvchain"));
        if self.command == "serve" {
            self.wait_ready();
        }
    }

    /// The host's readiness probe: `GET /` every 25 ms until any answer, for up to 30 s.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        let url = format!("http://127.0.0.1:{}/", self.port);
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cvchain serve exited early ({status}): {}", self.stderr());
            }
            if blocking_get(&url).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("cvchain serve never answered GET /: {}", self.stderr());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal and waits for the exit status, up to `timeout`.
    pub fn signal_and_wait(
        &mut self,
        signal: &str,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.1 GET over std, for readiness polling without an async runtime.
fn blocking_get(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s = TcpStream::connect_timeout(&host.parse().ok()?, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}
