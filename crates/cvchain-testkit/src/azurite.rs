//! An Azurite of the test's own: `cvchain-standin`'s launcher with a temporary data folder.

use cvchain_azure::storage::settings::StorageSettings;
use cvchain_core::config::Vars;
use cvchain_standin::azurite::{self, Data, Options, Tls};
use std::{
    ops::{Deref, DerefMut},
    path::PathBuf,
};

/// A running Azurite with its own ports and data folder; stopped on drop.
pub struct Azurite {
    inner: azurite::Azurite,
    /// Azurite's `--debug` log, when asked for: one line per request.
    pub debug_log: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

/// How to start it: on disk by default; in memory, with a request log, or over https with
/// `--oauth basic` on request.
#[derive(Default)]
pub struct Builder {
    in_memory: bool,
    debug_log: bool,
    oauth: Option<Tls>,
}

impl Builder {
    /// Keep everything in memory (benchmarks).
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// Log every request to `debug.log` in the data folder.
    pub fn debug_log(mut self) -> Self {
        self.debug_log = true;
        self
    }

    /// Serve https and accept Microsoft Entra ID tokens, with a certificate from `ca`.
    pub fn oauth(mut self, ca: &crate::TestCa) -> Self {
        self.oauth = Some(Tls {
            cert: ca.cert.clone(),
            key: ca.key.clone(),
            ca: ca.ca_cert.clone(),
        });
        self
    }

    pub fn start(self) -> Azurite {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = if self.in_memory {
            Data::Memory
        } else {
            Data::Dir(dir.path().join("data"))
        };
        let debug_log = self.debug_log.then(|| dir.path().join("debug.log"));
        let mut options = Options::new(crate::repo_root(), data);
        options.debug_log = debug_log.clone();
        options.oauth = self.oauth;
        Azurite {
            inner: azurite::Azurite::start(options).expect("start Azurite"),
            debug_log,
            _dir: dir,
        }
    }
}

impl Azurite {
    /// On disk, plain http, SharedKey.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Stops it, keeping the data (a storage outage).
    pub fn stop(&mut self) {
        self.inner.stop();
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.inner.restart().expect("restart Azurite");
    }

    /// Identity-based settings pointing at this (https) Azurite.
    pub fn identity_settings(&self) -> StorageSettings {
        let url = |port: u16| format!("https://127.0.0.1:{port}/devstoreaccount1");
        let vars: std::collections::HashMap<String, String> = [
            ("CVCHAIN_STORAGE__blobServiceUri", url(self.blob_port)),
            ("CVCHAIN_STORAGE__queueServiceUri", url(self.queue_port)),
            ("CVCHAIN_STORAGE__tableServiceUri", url(self.table_port)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let lookup = move |k: &str| vars.get(k).cloned();
        StorageSettings::from_vars(&Vars::new(&lookup)).unwrap()
    }
}

impl Deref for Azurite {
    type Target = azurite::Azurite;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Azurite {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
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
