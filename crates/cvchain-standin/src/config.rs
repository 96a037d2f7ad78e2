//! How a stand-in behaves.

use cvchain_azure::storage::clients::StorageClients;
use std::time::Duration;

/// Projects per resource (S0): the default of [`StandinConfig::max_projects`].
pub const MAX_PROJECTS: usize = 100;
/// Calls per second a resource serves (S0 and F0), for all its callers together: the default of
/// [`StandinConfig::rate_limit`].
pub const RATE_LIMIT: u32 = 10;

/// How the stand-in behaves.
#[derive(Clone)]
pub struct StandinConfig {
    /// The key callers must send as `Training-Key` (a Bearer token is accepted too).
    pub training_key: String,
    /// The storage account the integration may write to: a `notificationQueueUri` or
    /// `exportModelContainerUri` must name a queue or container that exists in this account
    /// (none: no integration can be set up, as for a resource without a storage role).
    pub storage: Option<StorageClients>,
    /// How long a training takes.
    pub train_delay: Duration,
    /// How long an export takes.
    pub export_delay: Duration,
    /// Base64-encode notification messages (whether the service does is unknown).
    pub base64_messages: bool,
    pub model_size: usize,
    pub seed: u64,
    /// Serve https with this PEM certificate chain and key (for Microsoft Entra ID clients,
    /// which send tokens only over https).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A Bearer token to accept besides the key (any other token is refused).
    pub accept_bearer: Option<String>,
    /// Projects the resource holds before CreateProject answers `BadRequestExceedProjectLimit`:
    /// the S0 tier's 100 unless raised. Only the benchmarks raise it, to stand for several
    /// resources' projects in one stand-in.
    pub max_projects: usize,
    /// Calls served in any second, by all callers together, before the next is refused with
    /// 429 and `Retry-After`, as the service does: [`RATE_LIMIT`]. `None` serves every call, for
    /// a test or benchmark that sets up more than the service would let it (turn it back on with
    /// [`crate::Standin::set_rate_limit`]).
    pub rate_limit: Option<u32>,
}

impl std::fmt::Debug for StandinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandinConfig")
            .field("train_delay", &self.train_delay)
            .field("export_delay", &self.export_delay)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

impl Default for StandinConfig {
    fn default() -> Self {
        Self {
            training_key: "standin-training-key".into(),
            storage: None,
            train_delay: Duration::from_millis(200),
            export_delay: Duration::from_millis(200),
            base64_messages: false,
            model_size: 64 * 1024,
            seed: 7,
            tls: None,
            accept_bearer: None,
            max_projects: MAX_PROJECTS,
            rate_limit: Some(RATE_LIMIT),
        }
    }
}
