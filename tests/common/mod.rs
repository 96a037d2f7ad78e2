//! Test helpers: an Azurite of the test's own (free loopback ports, own data folder, stopped on
//! drop), and the `cvchain serve` process driven as the Functions host drives it.
#![allow(dead_code)]

use cvchain::settings::{DEV_ACCOUNT, DEV_ACCOUNT_KEY, StorageSettings, parse_connection_string};
use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// An Azurite process with its own ports and data folder.
pub struct Azurite {
    child: Option<Child>,
    pub blob_port: u16,
    pub queue_port: u16,
    pub table_port: u16,
    dir: tempfile::TempDir,
    /// `--oauth basic` over https with this certificate (leaf, key, CA).
    oauth: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Azurite's `--debug` log: one line per request, for counting what a client asked.
    pub debug_log: Option<PathBuf>,
    /// `--inMemoryPersistence`: no database saved to disk (benchmarks, where Azurite rewriting its
    /// whole database every few seconds would be what is measured).
    pub in_memory: bool,
}

impl Azurite {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut a = Self {
            child: None,
            blob_port: free_port(),
            queue_port: free_port(),
            table_port: free_port(),
            dir,
            oauth: None,
            debug_log: None,
            in_memory: false,
        };
        a.spawn();
        a
    }

    /// Azurite that keeps everything in memory, for benchmarks.
    pub fn start_in_memory() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut a = Self {
            child: None,
            blob_port: free_port(),
            queue_port: free_port(),
            table_port: free_port(),
            debug_log: None,
            dir,
            oauth: None,
            in_memory: true,
        };
        a.spawn();
        a
    }

    /// Azurite that logs every request to `debug.log` in its data folder.
    pub fn start_debug() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut a = Self {
            child: None,
            blob_port: free_port(),
            queue_port: free_port(),
            table_port: free_port(),
            debug_log: Some(dir.path().join("debug.log")),
            dir,
            oauth: None,
            in_memory: false,
        };
        a.spawn();
        a
    }

    /// Azurite over https that accepts Microsoft Entra ID tokens (`--oauth basic`).
    pub fn start_oauth(ca: &TestCa) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut a = Self {
            child: None,
            blob_port: free_port(),
            queue_port: free_port(),
            table_port: free_port(),
            dir,
            oauth: Some((ca.cert.clone(), ca.key.clone(), ca.ca_cert.clone())),
            debug_log: None,
            in_memory: false,
        };
        a.spawn();
        a
    }

    /// Identity-based settings pointing at this (https) Azurite.
    pub fn identity_settings(&self) -> StorageSettings {
        let url = |port: u16| format!("https://127.0.0.1:{port}/{DEV_ACCOUNT}");
        let vars: std::collections::HashMap<String, String> = [
            ("CVCHAIN_STORAGE__blobServiceUri", url(self.blob_port)),
            ("CVCHAIN_STORAGE__queueServiceUri", url(self.queue_port)),
            ("CVCHAIN_STORAGE__tableServiceUri", url(self.table_port)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        cvchain::settings::from_lookup(&move |k| vars.get(k).cloned())
            .unwrap()
            .storage
    }

    fn executable() -> PathBuf {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/azurite");
        assert!(
            path.exists(),
            "Azurite is not installed at {}: run `npm ci` in the repository root",
            path.display()
        );
        path
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(Self::executable());
        if let Some((cert, key, ca)) = &self.oauth {
            cmd.args(["--oauth", "basic", "--cert"])
                .arg(cert)
                .arg("--key")
                .arg(key)
                // Copies whose source carries a SAS make Azurite fetch from itself over https.
                .env("NODE_EXTRA_CA_CERTS", ca);
        }
        if self.in_memory {
            cmd.arg("--inMemoryPersistence");
        } else {
            cmd.arg("--location").arg(self.dir.path());
        }
        if let Some(log) = &self.debug_log {
            cmd.arg("--debug").arg(log);
        }
        let child = cmd
            .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"])
            .args([
                "--blobHost",
                "127.0.0.1",
                "--queueHost",
                "127.0.0.1",
                "--tableHost",
                "127.0.0.1",
            ])
            .args(["--blobPort", &self.blob_port.to_string()])
            .args(["--queuePort", &self.queue_port.to_string()])
            .args(["--tablePort", &self.table_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Azurite");
        self.child = Some(child);
        for port in [self.blob_port, self.queue_port, self.table_port] {
            assert!(
                wait_for_port(port, Duration::from_secs(30)),
                "Azurite did not open port {port}"
            );
        }
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
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};\
             QueueEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};\
             TableEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};",
            self.blob_port, self.queue_port, self.table_port
        )
    }

    pub fn storage_settings(&self) -> StorageSettings {
        parse_connection_string("CVCHAIN_STORAGE", &self.connection_string()).unwrap()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A unique lowercase suffix for queue and table names within one Azurite.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
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
        let port = free_port();
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cvchain"));
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

/// The envelope the host POSTs for a queue message: the text JSON-encoded twice, numbers as
/// strings, `Id` and `PopReceipt` double-encoded, `sys` a real object.
pub fn host_envelope(message_text: &str, message_id: &str, dequeue_count: u32) -> String {
    let twice = |s: &str| serde_json::to_string(&serde_json::to_string(s).unwrap()).unwrap();
    format!(
        r#"{{"Data":{{"notification":{}}},"Metadata":{{"DequeueCount":"{dequeue_count}","ExpirationTime":"2026-12-03T10:00:00+00:00","Id":{},"InsertionTime":"2026-11-26T10:00:00+00:00","NextVisibleTime":"2026-11-26T10:10:00+00:00","PopReceipt":{},"sys":{{"MethodName":"CustomVisionNotification","RandGuid":"e59556b5-0000-0000-0000-000000000000","UtcNow":"2026-11-26T10:00:00.1234567Z"}}}}}}"#,
        twice(message_text),
        twice(message_id),
        twice("MThGZWIyMDI1MDM6MDY6MjA3NjM1"),
    )
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/notifications")
            .join(name),
    )
    .unwrap()
}

/// Plays the Functions host's queue trigger against a running handler: receives messages with a
/// visibility lease, POSTs each as the host does, deletes on 2xx, leaves it for a retry on
/// non-2xx, and moves it to `<queue>-poison` once `DequeueCount` reaches `max_dequeue`.
pub struct HostEmulator {
    pub queue: azure_storage_queue::QueueClient,
    pub poison: azure_storage_queue::QueueClient,
    pub handler_url: String,
    pub http: reqwest::Client,
    pub max_dequeue: i64,
    /// How many times each message is POSTed before it is deleted (1 = the host's normal case;
    /// more plays redeliveries).
    pub deliveries: u32,
    pub visibility_seconds: i32,
    /// Every message completed, as (text, id), in order.
    pub completed: std::sync::Mutex<Vec<(String, String)>>,
}

/// What a pump did.
#[derive(Debug, Default, Clone)]
pub struct PumpStats {
    pub posts: u32,
    pub failures: u32,
    pub completed: u32,
    pub poisoned: u32,
}

impl HostEmulator {
    pub fn new(
        clients: &cvchain::storage::connection::StorageClients,
        queue: &str,
        handler_url: String,
    ) -> Self {
        Self {
            queue: clients.queue(queue).unwrap(),
            poison: clients.queue(&format!("{queue}-poison")).unwrap(),
            handler_url,
            http: reqwest::Client::new(),
            max_dequeue: 5,
            deliveries: 1,
            visibility_seconds: 2,
            completed: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// One receive-and-deliver round; returns how many messages it saw.
    pub async fn round(&self, stats: &mut PumpStats) -> usize {
        use azure_storage_queue::models::QueueClientReceiveMessagesOptions;
        let got = match self
            .queue
            .receive_messages(Some(QueueClientReceiveMessagesOptions {
                number_of_messages: Some(16),
                visibility_timeout: Some(self.visibility_seconds),
                ..Default::default()
            }))
            .await
        {
            Ok(rsp) => rsp.into_model().unwrap(),
            // No queue yet, or storage down: the host just polls again later.
            Err(_) => return 0,
        };
        let messages = got.items.unwrap_or_default();
        let n = messages.len();
        // The host runs a batch's invocations concurrently.
        let outcomes =
            futures::future::join_all(messages.into_iter().map(|m| self.deliver(m))).await;
        for o in outcomes {
            stats.posts += o.posts;
            stats.failures += o.failures;
            stats.completed += o.completed;
            stats.poisoned += o.poisoned;
        }
        n
    }

    /// One message, as the host handles it: POST, then delete, retry later or poison.
    async fn deliver(&self, m: azure_storage_queue::models::ReceivedMessage) -> PumpStats {
        let mut stats = PumpStats::default();
        {
            let text = m.message_text.clone().unwrap_or_default();
            let id = m.message_id.clone().unwrap_or_default();
            let pop = m.pop_receipt.clone().unwrap_or_default();
            let count = m.dequeue_count.unwrap_or(1);
            let mut ok = false;
            for extra in 0..self.deliveries {
                let body = host_envelope(&text, &id, (count as u32) + extra);
                let rsp = self
                    .http
                    .post(format!("{}/CustomVisionNotification", self.handler_url))
                    .header("content-type", "application/json; charset=utf-8")
                    .body(body)
                    .send()
                    .await;
                stats.posts += 1;
                ok = matches!(&rsp, Ok(r) if r.status().is_success());
                if !ok {
                    stats.failures += 1;
                    break;
                }
            }
            if ok {
                // A failed delete (storage down) only means a redelivery later.
                if self.queue.delete_message(&id, &pop, None).await.is_ok() {
                    self.completed
                        .lock()
                        .unwrap()
                        .push((text.clone(), id.clone()));
                }
                stats.completed += 1;
            } else if count >= self.max_dequeue
                && cvchain::storage::queue::send_text(&self.poison, &text)
                    .await
                    .is_ok()
            {
                let _ = self.queue.delete_message(&id, &pop, None).await;
                stats.poisoned += 1;
            }
        }
        stats
    }

    /// POSTs a message again, as a redelivery would; returns the HTTP status.
    pub async fn redeliver(&self, text: &str, id: &str, dequeue_count: u32) -> u16 {
        self.http
            .post(format!("{}/CustomVisionNotification", self.handler_url))
            .header("content-type", "application/json; charset=utf-8")
            .body(host_envelope(text, id, dequeue_count))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Pumps until `done()` holds after a round, or `timeout` passes.
    pub async fn pump_until<F, Fut>(&self, timeout: Duration, mut done: F) -> PumpStats
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut stats = PumpStats::default();
        let start = Instant::now();
        loop {
            let n = self.round(&mut stats).await;
            if done().await {
                return stats;
            }
            assert!(
                start.elapsed() < timeout,
                "gave up after {timeout:?}: {stats:?}"
            );
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The stand-in's call log over HTTP, as any client would read it.
pub async fn standin_calls(endpoint: &str) -> cvchain::customvision::standin::CallLog {
    reqwest::get(format!("{endpoint}/_standin/calls"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A small CA and a leaf certificate for 127.0.0.1 (CA:FALSE, as rustls wants), made with the
/// `openssl` command line.
pub struct TestCa {
    _dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl command line");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cvchain test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&csr);
        std::fs::write(
            p("leaf.ext"),
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        Self {
            ca_cert: p("ca.pem"),
            cert: p("leaf.pem"),
            key: p("leaf.key"),
            _dir: dir,
        }
    }

    /// An `azure_core` transport whose HTTP client trusts this CA.
    pub fn transport(&self) -> azure_core::http::Transport {
        let pem = std::fs::read(&self.ca_cert).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        azure_core::http::Transport::new(std::sync::Arc::new(client))
    }
}

/// A token credential that hands out the unsigned JWTs Azurite's `--oauth basic` accepts.
#[derive(Debug, Default)]
pub struct AzuriteTokenCredential {
    pub requests: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for AzuriteTokenCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine as _;
        assert_eq!(scopes, ["https://storage.azure.com/.default"]);
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = azure_core::time::OffsetDateTime::now_utc().unix_timestamp();
        let token = format!(
            "{}.{}.{}",
            b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            b64(serde_json::json!({
                "aud": "https://storage.azure.com",
                "iss": "https://sts.windows.net/ab1f708d-50f6-404c-a006-d71b2ac7a606/",
                "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
                "oid": "11111111-2222-3333-4444-555555555555",
                "tid": "ab1f708d-50f6-404c-a006-d71b2ac7a606",
            })),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("unsigned"),
        );
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(token),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// A token credential that hands out `token-for:<scopes>` and remembers what it was asked for.
#[derive(Debug, Default)]
pub struct RecordingCredential {
    pub scopes: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for RecordingCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        let joined = scopes.join(" ");
        self.scopes.lock().unwrap().push(joined.clone());
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(format!("token-for:{joined}")),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// Fails when `text` holds one of `secrets`, or any SAS signature (`sig=` not followed by the
/// redaction marker).
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} contains a secret ({} characters)",
            secret.len()
        );
    }
    let lower = text.to_ascii_lowercase();
    for marker in ["sig=", "sig%3d", "sig\\u003d"] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(marker) {
            let start = from + at;
            let value = &lower[start + marker.len()..];
            let preceded_by_word = start > 0 && lower.as_bytes()[start - 1].is_ascii_alphanumeric();
            if !preceded_by_word {
                assert!(
                    value.is_empty() || value.starts_with("redacted"),
                    "{what} contains a SAS signature near: {}",
                    &text[start.saturating_sub(40)..(start + 12).min(text.len())]
                );
            }
            from = start + marker.len();
        }
    }
}

/// The Custom Vision stand-in's REST API, as a user's script would call it to set a project up.
pub struct StandinApi {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl StandinApi {
    pub fn new(endpoint: &str, key: &str) -> Self {
        Self {
            base: format!("{endpoint}/customvision/v3.3/training"),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// POSTs, retrying while the stand-in injects faults, and returns the JSON answer.
    pub async fn post(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        for _ in 0..50 {
            let rsp = self
                .http
                .post(format!("{}/{path}", self.base))
                .query(query)
                .header("Training-Key", &self.key)
                .send()
                .await
                .unwrap();
            if rsp.status().is_success() {
                return rsp.json().await.unwrap();
            }
        }
        panic!("POST {path} kept failing");
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}/{path}", self.base))
            .header("Training-Key", &self.key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// CreateProject with the given query (name, domainId, notificationQueueUri, …).
    pub async fn create_project(&self, query: &[(&str, &str)]) -> uuid::Uuid {
        let p = self.post("projects", query).await;
        uuid::Uuid::parse_str(p["id"].as_str().unwrap()).unwrap()
    }

    /// TrainProject; returns the new iteration's id.
    pub async fn train(&self, project: uuid::Uuid) -> uuid::Uuid {
        let it = self.post(&format!("projects/{project}/train"), &[]).await;
        uuid::Uuid::parse_str(it["id"].as_str().unwrap()).unwrap()
    }

    /// Polls until `check` holds for the JSON at `path`.
    pub async fn wait_for(&self, path: &str, check: impl Fn(&serde_json::Value) -> bool) {
        for _ in 0..500 {
            if check(&self.get(path).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never got there");
    }
}

/// The stand-in's configuration for tests: this key, writing to `clients`' account, training and
/// exports completing after `delay_ms`. Override fields with struct update syntax.
pub fn standin_config(
    clients: &cvchain::storage::connection::StorageClients,
    key: &str,
    delay_ms: u64,
) -> cvchain::customvision::standin::StandinConfig {
    cvchain::customvision::standin::StandinConfig {
        training_key: key.into(),
        storage: Some(clients.clone()),
        train_delay: Duration::from_millis(delay_ms),
        export_delay: Duration::from_millis(delay_ms),
        ..Default::default()
    }
}

impl Azurite {
    /// A container's URL in this (http) Azurite.
    pub fn container_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{DEV_ACCOUNT}/{name}", self.blob_port)
    }
}
