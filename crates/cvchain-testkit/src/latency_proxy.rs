//! A latency proxy in front of Azurite (blob, queue, table) and the Custom Vision stand-in, for
//! the benchmark's cloud-latency model: loopback answers in well under a millisecond, Azure
//! Storage in-region in several and Custom Vision in tens, so what an invocation pays for is the
//! number of round trips it makes one after another. Each request waits the service's latency
//! before it is forwarded; the proxy logs when each of cvchain's requests was sent and answered,
//! and [`LatencyProxy::critical_path`] finds the longest chain of them, each sent after the one
//! before was answered: the invocation's sequential round trips.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Which service a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Storage,
    CustomVision,
}

/// One request, as the proxy saw it.
#[derive(Debug, Clone, Copy)]
pub struct Logged {
    pub service: Service,
    pub sent: Instant,
    pub answered: Instant,
}

/// The sequential round trips on an invocation's critical path, by service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Critical {
    pub storage: usize,
    pub custom_vision: usize,
}

struct Shared {
    upstream: String,
    /// The proxy's own blob address and Azurite's: a copy's source named through the proxy
    /// is Azurite's own blob, read by Azurite itself (as the service copies within itself).
    copy_source: Option<(String, String)>,
    service: Service,
    delay: Duration,
    log: Arc<Mutex<Vec<Logged>>>,
    /// Requests whose `User-Agent` starts with one of these are forwarded but not logged (the
    /// stand-in's own storage requests: the service's time, not cvchain's).
    unlogged: Vec<&'static str>,
    http: reqwest::Client,
}

/// The running proxy: four listeners on a thread and runtime of their own; stops when dropped.
pub struct LatencyProxy {
    pub blob_port: u16,
    pub queue_port: u16,
    pub table_port: u16,
    pub cv_port: u16,
    log: Arc<Mutex<Vec<Logged>>>,
    storage_delay: Duration,
    cv_delay: Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    cv_upstream: Arc<Mutex<String>>,
}

impl LatencyProxy {
    /// In front of Azurite's three ports and (once [`set_custom_vision`](Self::set_custom_vision)
    /// names it) the stand-in.
    pub fn start(
        azurite: &cvchain_standin::azurite::Azurite,
        storage_delay: Duration,
        cv_delay: Duration,
    ) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let ports = [
            crate::free_port(),
            crate::free_port(),
            crate::free_port(),
            crate::free_port(),
        ];
        let cv_upstream = Arc::new(Mutex::new(String::new()));
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("a client");
        // A copy's source is named through the proxy and left so: the header is signed (Shared
        // Key covers every `x-ms-` header), and Azurite reads a same-account source by its path
        // whatever the host, as the service copies within itself.
        let copy_source: Option<(String, String)> = None;
        let shared = |port: u16, service, delay| {
            Arc::new(Shared {
                upstream: format!("http://127.0.0.1:{port}"),
                copy_source: copy_source.clone(),
                service,
                delay,
                log: log.clone(),
                unlogged: vec!["cvchain-standin", "cvchain-bench"],
                http: http.clone(),
            })
        };
        let states = [
            shared(azurite.blob_port, Service::Storage, storage_delay),
            shared(azurite.queue_port, Service::Storage, storage_delay),
            shared(azurite.table_port, Service::Storage, storage_delay),
        ];
        let cv = cv_upstream.clone();
        let cv_state = (log.clone(), cv_delay, http.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the proxy's runtime");
            rt.block_on(async move {
                let mut servers = Vec::new();
                for (port, state) in ports[..3].iter().zip(states) {
                    let listener = tokio::net::TcpListener::bind(("127.0.0.1", *port))
                        .await
                        .expect("the proxy's port");
                    let app = Router::new().fallback(forward).with_state(state);
                    servers.push(tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    }));
                }
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", ports[3]))
                    .await
                    .expect("the proxy's port");
                let app = Router::new()
                    .fallback(forward_cv)
                    .with_state((cv, cv_state));
                servers.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                }));
                ready_tx.send(()).unwrap();
                let _ = stopped.await;
                for s in servers {
                    s.abort();
                }
            });
        });
        ready.recv().expect("the proxy started");
        Self {
            blob_port: ports[0],
            queue_port: ports[1],
            table_port: ports[2],
            cv_port: ports[3],
            log,
            storage_delay,
            cv_delay,
            stop: Some(stop),
            thread: Some(thread),
            cv_upstream,
        }
    }

    /// The stand-in's endpoint, which Custom Vision calls are forwarded to.
    pub fn set_custom_vision(&self, endpoint: &str) {
        *self.cv_upstream.lock().unwrap() = endpoint.trim_end_matches('/').to_owned();
    }

    /// A connection string for Azurite's account with every endpoint through the proxy.
    pub fn connection_string(&self) -> String {
        use cvchain_azure::storage::settings::{DEV_ACCOUNT, DEV_ACCOUNT_KEY};
        format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};\
             QueueEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};\
             TableEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};",
            self.blob_port, self.queue_port, self.table_port
        )
    }

    /// The stand-in's endpoint through the proxy.
    pub fn custom_vision_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.cv_port)
    }

    /// Forgets what was logged (before an invocation).
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// What was logged since [`clear`](Self::clear).
    pub fn logged(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    /// The critical path of what was logged since [`clear`](Self::clear), weighted by each
    /// service's latency.
    pub fn critical_path(&self) -> Critical {
        critical_path(&self.logged(), self.storage_delay, self.cv_delay)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The chain of requests, each sent after the one before was answered, that costs the most
/// latency: the round trips an invocation made one after another.
pub fn critical_path(log: &[Logged], storage: Duration, cv: Duration) -> Critical {
    let mut order: Vec<&Logged> = log.iter().collect();
    order.sort_by_key(|l| l.answered);
    let weight = |l: &Logged| match l.service {
        Service::Storage => storage.max(Duration::from_nanos(1)),
        Service::CustomVision => cv.max(Duration::from_nanos(1)),
    };
    // best[i]: the costliest chain ending with request i, and its round trips.
    let mut best: Vec<(Duration, Critical)> = Vec::with_capacity(order.len());
    for (i, l) in order.iter().enumerate() {
        let before = (0..i)
            .filter(|j| order[*j].answered <= l.sent)
            .map(|j| best[j])
            .max_by_key(|(d, _)| *d)
            .unwrap_or_default();
        let mut c = before.1;
        match l.service {
            Service::Storage => c.storage += 1,
            Service::CustomVision => c.custom_vision += 1,
        }
        best.push((before.0 + weight(l), c));
    }
    best.into_iter()
        .max_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
        .unwrap_or_default()
}

async fn send_on(shared: &Shared, upstream: &str, request: Request, service: Service) -> Response {
    let (parts, body) = request.into_parts();
    let logged = !parts
        .headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| shared.unlogged.iter().any(|u| ua.starts_with(u)));
    let body: Bytes = axum::body::to_bytes(body, 256 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let sent = Instant::now();
    tokio::time::sleep(shared.delay).await;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut req = shared
        .http
        .request(parts.method.clone(), format!("{upstream}{path_and_query}"));
    for (name, value) in &parts.headers {
        // `Host` is kept: Azurite checks that a signed copy source (a download link) names the
        // instance the copy request reached, which is the proxy.
        if matches!(
            name.as_str(),
            "connection" | "content-length" | "transfer-encoding"
        ) {
            continue;
        }
        match (&shared.copy_source, value.to_str()) {
            (Some((proxy, azurite)), Ok(v))
                if name.as_str() == "x-ms-copy-source" && v.starts_with(proxy.as_str()) =>
            {
                req = req.header(name, v.replacen(proxy.as_str(), azurite, 1));
            }
            _ => req = req.header(name, value),
        }
    }
    let answer = match req.body(body).send().await {
        Ok(a) => a,
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::from(format!("proxy: {e}")))
                .unwrap();
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "keep-alive"
        ) {
            response = response.header(name, value);
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    if logged {
        shared.log.lock().unwrap().push(Logged {
            service,
            sent,
            answered: Instant::now(),
        });
    }
    response.body(Body::from(bytes)).unwrap()
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let upstream = shared.upstream.clone();
    send_on(&shared, &upstream, request, shared.service).await
}

type CvState = (
    Arc<Mutex<String>>,
    (Arc<Mutex<Vec<Logged>>>, Duration, reqwest::Client),
);

async fn forward_cv(
    State((upstream, (log, delay, http))): State<CvState>,
    request: Request,
) -> Response {
    let upstream = upstream.lock().unwrap().clone();
    let shared = Shared {
        upstream: upstream.clone(),
        copy_source: None,
        service: Service::CustomVision,
        delay,
        log,
        unlogged: Vec::new(),
        http,
    };
    send_on(&shared, &upstream, request, Service::CustomVision).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critical_path_is_the_costliest_sequential_chain() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let r = |service, s, e| Logged {
            service,
            sent: at(s),
            answered: at(e),
        };
        use Service::*;
        // Two storage reads together, then a CV call, then three storage writes in a row,
        // with a fourth write beside them.
        let log = [
            r(Storage, 0, 5),
            r(Storage, 0, 5),
            r(CustomVision, 5, 65),
            r(Storage, 65, 70),
            r(Storage, 70, 75),
            r(Storage, 75, 80),
            r(Storage, 65, 70),
        ];
        let c = critical_path(&log, Duration::from_millis(5), Duration::from_millis(60));
        assert_eq!(
            c,
            Critical {
                storage: 4,
                custom_vision: 1
            }
        );
        assert_eq!(
            critical_path(&[], Duration::from_millis(5), Duration::from_millis(60)),
            Critical::default()
        );
    }
}
