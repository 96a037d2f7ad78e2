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
use tokio::net::TcpListener;

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

    /// Serves the Functions custom-handler protocol on `listener` until SIGTERM or SIGINT.
    pub async fn serve(self, listener: TcpListener, drain: Duration) -> std::io::Result<()> {
        let console =
            crate::console::Console::new(&self.settings, &self.clients, self.processor.history());
        let state = crate::server::AppState::new(self.processor, console);
        crate::server::serve(listener, state, drain).await
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
