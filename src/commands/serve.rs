//! `cvchain serve`: the Azure Functions custom handler, on 127.0.0.1 at the port the host gives.

use crate::settings::{Settings, handler_port};
use crate::startup::Application;
use anyhow::Context;
use std::time::Duration;

/// How long SIGTERM waits for in-flight invocations.
const DRAIN: Duration = Duration::from_secs(20);

pub fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let port = handler_port(&|k| std::env::var(k).ok())?;
    super::runtime()?.block_on(async move {
        let app = Application::build(settings)?;
        let s = &app.settings;
        if s.custom_vision.is_none() {
            tracing::info!("no CUSTOM_VISION_ENDPOINT: recording notifications only");
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        tracing::info!(
            storage = ?s.storage,
            queue = %s.queue_name,
            table = %s.history_table,
            custom_vision = ?s.custom_vision,
            exports = %s.chain.exports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            "settings validated"
        );
        app.serve(listener, DRAIN).await?;
        Ok(())
    })
}
