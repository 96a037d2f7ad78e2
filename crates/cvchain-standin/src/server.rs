//! A running stand-in: the listener (http, or https with a given certificate) and the handle
//! tests and commands hold.

use crate::config::StandinConfig;
use crate::faults::{CallLog, Faults};
use crate::routes::router;
use crate::state::{S, Shared, World};
use axum::Router;
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

/// A running stand-in.
pub struct Standin {
    pub addr: SocketAddr,
    shared: S,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Standin {
    /// Starts on 127.0.0.1 at a free port.
    pub async fn start(config: StandinConfig) -> std::io::Result<Self> {
        Self::start_on(config, 0).await
    }

    pub async fn start_on(mut config: StandinConfig, port: u16) -> std::io::Result<Self> {
        // The service's own storage requests, told apart from cvchain's in request logs.
        config.storage = config
            .storage
            .map(|c| c.with_application_id("cvchain-standin"));
        let shared = Arc::new(Shared {
            world: Mutex::new(World {
                projects: Vec::new(),
                rate_limit: config.rate_limit,
                served: Default::default(),
                faults: Faults::default(),
                calls: CallLog::default(),
                rng: config.seed.max(1),
            }),
            config,
            started: Instant::now(),
            endpoint: OnceLock::new(),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let scheme = if shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let _ = shared.endpoint.set(format!("{scheme}://{addr}"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        let tls = match &shared.config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        match tls {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(serve_tls(listener, app, acceptor, rx));
            }
        }
        Ok(Self {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// The endpoint to give cvchain as `CUSTOM_VISION_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        self.shared.endpoint.get().cloned().unwrap_or_default()
    }

    pub fn training_key(&self) -> &str {
        &self.shared.config.training_key
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.world().faults = faults;
    }

    /// Calls served per second before 429 (`None`: no limit), from now on.
    pub fn set_rate_limit(&self, limit: Option<u32>) {
        let mut w = self.shared.world();
        w.rate_limit = limit;
        w.served.clear();
    }

    pub fn calls(&self) -> CallLog {
        self.shared.world().calls.clone()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A TLS acceptor for `cert` and `key` (PEM): for the stand-in, and for the tests' other local
/// https servers.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| invalid(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// axum over rustls: one hyper HTTP/1 connection per accepted TLS stream.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        }
    }
}
