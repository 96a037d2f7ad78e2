//! Azurite, the storage emulator, started from the repository's `node_modules` on free loopback
//! ports: by `cvchain dev` (data in `.azurite/`) and by the tests (data in a folder of their own,
//! or in memory). Stopped with SIGTERM on drop, so it saves its data.

use cvchain_azure::storage::settings::{
    DEV_ACCOUNT, DEV_ACCOUNT_KEY, StorageSettings, parse_connection_string,
};
use std::{
    io,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A free loopback port (free when asked; bind it soon).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on the port.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Where Azurite keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A folder (kept across restarts).
    Dir(PathBuf),
    /// `--inMemoryPersistence`: nothing saved (benchmarks, where Azurite rewriting its whole
    /// database every few seconds would be what is measured).
    Memory,
}

/// How to start Azurite.
#[derive(Debug, Clone)]
pub struct Options {
    /// The repository root: Azurite runs from `node_modules/.bin/azurite` there.
    pub root: PathBuf,
    pub data: Data,
    /// `--debug`: one line per request, for counting what a client asked.
    pub debug_log: Option<PathBuf>,
    /// `--oauth basic` over https with this certificate, key and the CA that signed them.
    pub oauth: Option<Tls>,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Options {
    pub fn new(root: impl Into<PathBuf>, data: Data) -> Self {
        Self {
            root: root.into(),
            data,
            debug_log: None,
            oauth: None,
        }
    }
}

/// A running Azurite with its own ports.
#[derive(Debug)]
pub struct Azurite {
    child: Option<Child>,
    pub blob_port: u16,
    pub queue_port: u16,
    pub table_port: u16,
    pub options: Options,
}

impl Azurite {
    /// Starts Azurite and waits until its three ports answer.
    pub fn start(options: Options) -> io::Result<Self> {
        let mut a = Self {
            child: None,
            blob_port: 0,
            queue_port: 0,
            table_port: 0,
            options,
        };
        // A free port can be taken by another process before Azurite binds it (tests start
        // many at once): then it starts again on other ports.
        let mut last = None;
        for _ in 0..3 {
            (a.blob_port, a.queue_port, a.table_port) = (free_port()?, free_port()?, free_port()?);
            match a.spawn() {
                Ok(()) => return Ok(a),
                Err(e) => {
                    a.stop();
                    last = Some(e);
                }
            }
        }
        Err(last.expect("three attempts were made"))
    }

    fn executable(root: &Path) -> io::Result<PathBuf> {
        let exe = root.join("node_modules/.bin/azurite");
        if exe.exists() {
            Ok(exe)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "Azurite is not installed at {}: run `npm ci` in the repository root \
                     (scripts/run-local and .ci/run do it)",
                    exe.display()
                ),
            ))
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let exe = Self::executable(&self.options.root)?;
        let mut cmd = Command::new(&exe);
        if let Some(tls) = &self.options.oauth {
            cmd.args(["--oauth", "basic", "--cert"])
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key)
                // Copies whose source carries a SAS make Azurite fetch from itself over https.
                .env("NODE_EXTRA_CA_CERTS", &tls.ca);
        }
        match &self.options.data {
            Data::Memory => {
                cmd.arg("--inMemoryPersistence");
            }
            Data::Dir(dir) => {
                std::fs::create_dir_all(dir)?;
                cmd.arg("--location").arg(dir);
            }
        }
        if let Some(log) = &self.options.debug_log {
            cmd.arg("--debug").arg(log);
        }
        let child = cmd
            .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"])
            .args(["--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1"])
            .args(["--tableHost", "127.0.0.1"])
            .args(["--blobPort", &self.blob_port.to_string()])
            .args(["--queuePort", &self.queue_port.to_string()])
            .args(["--tablePort", &self.table_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot start {}: {e}", exe.display()))
            })?;
        self.child = Some(child);
        let started = Instant::now();
        for port in [self.blob_port, self.queue_port, self.table_port] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                // Exited: the port was taken between choosing it and binding it, most likely.
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.child = None;
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("Azurite exited ({status}) before opening port {port}"),
                    ));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("Azurite did not open port {port} within 60 s"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Stops Azurite, keeping its data, so a test can see what an outage does. SIGTERM lets it
    /// save its database (it keeps data in memory and saves it periodically): a storage outage
    /// must not look like storage that forgets acknowledged writes.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn()
    }

    fn scheme(&self) -> &'static str {
        if self.options.oauth.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The SharedKey connection string for this Azurite's development account.
    pub fn connection_string(&self) -> String {
        let s = self.scheme();
        format!(
            "DefaultEndpointsProtocol={s};AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};\
             BlobEndpoint={s}://127.0.0.1:{}/{DEV_ACCOUNT};\
             QueueEndpoint={s}://127.0.0.1:{}/{DEV_ACCOUNT};\
             TableEndpoint={s}://127.0.0.1:{}/{DEV_ACCOUNT};",
            self.blob_port, self.queue_port, self.table_port
        )
    }

    pub fn storage_settings(&self) -> StorageSettings {
        parse_connection_string("CVCHAIN_STORAGE", &self.connection_string())
            .expect("Azurite's connection string parses")
    }

    /// The blob service URL, without a trailing slash.
    pub fn blob_url(&self) -> String {
        format!(
            "{}://127.0.0.1:{}/{DEV_ACCOUNT}",
            self.scheme(),
            self.blob_port
        )
    }

    /// A container's URL in this Azurite.
    pub fn container_url(&self, name: &str) -> String {
        format!("{}/{name}", self.blob_url())
    }

    /// A queue's URL in this Azurite.
    pub fn queue_url(&self, name: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{DEV_ACCOUNT}/{name}",
            self.scheme(),
            self.queue_port
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
