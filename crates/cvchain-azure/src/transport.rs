//! One HTTP client for every pipeline. Each default `Transport` of `azure_core` builds its own
//! reqwest client, which reads every root certificate of the system (about 10 ms of CPU) and keeps
//! a connection pool of its own: cvchain built one per storage client, and one per release copy.
//! The benchmark's start-up trace and profile showed it; this client is built once, on the first
//! request, so start-up does not pay for it at all.

use azure_core::http::{AsyncRawResponse, HttpClient, Request, Transport, new_http_client};
use std::sync::{Arc, OnceLock};

/// An HTTP client built on its first use.
#[derive(Debug, Default)]
pub struct Lazy(OnceLock<Arc<dyn HttpClient>>);

impl Lazy {
    fn client(&self) -> &Arc<dyn HttpClient> {
        self.0.get_or_init(|| new_http_client(None))
    }

    /// Builds the client now, so a rate-limited caller does not spend its slot building it.
    pub fn warm(&self) {
        self.client();
    }
}

#[async_trait::async_trait]
impl HttpClient for Lazy {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        self.client().execute_request(request).await
    }
}

/// A transport whose HTTP client is built on its first request; clones share the client and its
/// connection pool. One per set of clients rather than one per process: a client's pooled
/// connections belong to the tokio runtime that opened them.
pub fn lazy() -> Transport {
    lazy_with_handle().0
}

/// As `lazy`, with a handle to warm the client.
pub fn lazy_with_handle() -> (Transport, Arc<Lazy>) {
    let client = Arc::new(Lazy::default());
    (Transport::new(client.clone()), client)
}
