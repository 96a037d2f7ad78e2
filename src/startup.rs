//! One start-up for every entry point: the settings become storage clients, a Training API
//! client and the processor, once; `serve`, `worker` and `dev` run on the [`Application`].

use crate::process::Processor;
use crate::settings::Settings;
use crate::worker::{WorkerOptions, WorkerStats};
use azure_storage_queue::QueueClient;
use cvchain_azure::customvision::{TrainingApi, training_client};
use cvchain_azure::history::store::HistoryStore;
use cvchain_azure::storage::{StorageError, clients::StorageClients, queue::poison_queue_name};
use cvchain_core::customvision::CvError;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::{net::TcpListener, task::JoinHandle};

/// Why cvchain cannot start with these settings.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    CustomVision(#[from] CvError),
}

/// Everything a running cvchain needs, built once from the settings.
pub struct Application {
    pub settings: Settings,
    pub clients: StorageClients,
    pub processor: Arc<Processor>,
    cv: Option<Arc<dyn TrainingApi>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Application {
    /// The storage clients, the Training API client (when an endpoint is configured) and the
    /// processor the settings describe. No request is sent yet.
    pub fn build(settings: Settings) -> Result<Self, StartError> {
        let cv = match &settings.custom_vision {
            Some(cv) => Some(Arc::new(training_client(cv)?) as Arc<dyn TrainingApi>),
            None => None,
        };
        let clients = StorageClients::new(&settings.storage)?;
        Self::with(settings, clients, cv)
    }

    /// As `build`, with given storage clients and Training API (tests, benchmarks).
    pub fn with(
        settings: Settings,
        clients: StorageClients,
        cv: Option<Arc<dyn TrainingApi>>,
    ) -> Result<Self, StartError> {
        let processor = Arc::new(Processor::new(&settings, &clients, cv.clone())?);
        Ok(Self {
            settings,
            clients,
            processor,
            cv,
        })
    }

    /// The Training API, when an endpoint is configured.
    pub fn training_api(&self) -> Option<&Arc<dyn TrainingApi>> {
        self.cv.as_ref()
    }

    /// The history table's store.
    pub fn history(&self) -> &HistoryStore {
        self.processor.history()
    }

    /// The notification queue and its poison queue, as the settings name them.
    pub fn queues(&self) -> Result<(Arc<QueueClient>, Arc<QueueClient>), StorageError> {
        let name = &self.settings.queue_name;
        Ok((
            Arc::new(self.clients.queue(name)?),
            Arc::new(self.clients.queue(&poison_queue_name(name))?),
        ))
    }

    /// The handler's state: the processor and the registry console.
    pub fn handler_state(&self) -> crate::server::AppState {
        let console =
            crate::console::Console::new(&self.settings, &self.clients, self.processor.history());
        crate::server::AppState::new(self.processor.clone(), console)
    }

    /// Consumes the queue until `shutdown` completes, then drains.
    pub async fn run_worker(
        self,
        options: WorkerOptions,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerStats, StorageError> {
        let (queue, poison) = self.queues()?;
        Ok(crate::worker::run(self.processor, queue, poison, options, shutdown).await)
    }
}

/// `serve`'s listener, answering before the [`Application`] is built: the host's readiness
/// probe (`GET /`) is answered as soon as the port is bound, and the clients, the processor, the
/// console and telemetry (most of start-up's work, which on two busy cores would otherwise
/// compete with that first answer) are built after it. An invocation or a console request
/// arriving meanwhile waits for them.
pub struct Serving {
    ready: crate::server::RoutesReady,
    server: JoinHandle<std::io::Result<()>>,
}

/// How long the build waits for the first request before starting anyway, so that a wrong
/// setting found while building is still reported at once when nothing probes.
const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(20);

impl Serving {
    /// Serves the Functions custom-handler protocol on `listener` from now until SIGTERM or
    /// SIGINT, then lets in-flight invocations finish (up to `drain`).
    pub fn start(listener: TcpListener, drain: Duration) -> Self {
        let (ready, routes) = crate::server::Routes::pending();
        let server = tokio::spawn(crate::server::serve(
            listener,
            routes,
            crate::server::Limits::default(),
            drain,
        ));
        Self { ready, server }
    }

    /// Once the first request was answered (or waits for the application), or after
    /// [`FIRST_REQUEST_WAIT`]: the moment to build the rest.
    pub async fn first_answered(&self) {
        let _ = tokio::time::timeout(FIRST_REQUEST_WAIT, self.ready.asked()).await;
    }

    /// Hands `app` to the waiting requests and serves until the server stops.
    pub async fn run(self, app: Application) -> std::io::Result<()> {
        self.ready.ready(app.handler_state());
        self.server.await.map_err(std::io::Error::other)?
    }
}
