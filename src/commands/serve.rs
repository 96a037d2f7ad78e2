//! `cvchain serve`: the Azure Functions custom handler, on 127.0.0.1 at the port the host gives.

use crate::settings::{Settings, handler_port};
use crate::startup::{Application, Serving};
use anyhow::Context;
use std::time::Duration;

/// How long SIGTERM waits for in-flight invocations.
const DRAIN: Duration = Duration::from_secs(20);

pub fn run() -> anyhow::Result<()> {
    super::run_then_leave(async move {
        // Read and checked before anything is served: a wrong setting fails the start, named.
        let settings = Settings::from_env()?;
        let port = handler_port(&|k| std::env::var(k).ok())?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        // `GET /` answers from here on; what follows is built once it did, and a failure there
        // still ends the start with its reason.
        let serving = Serving::start(listener, DRAIN);
        serving.first_answered().await;
        let telemetry = crate::telemetry::init_with(
            crate::settings::log_format_from_env(),
            &crate::telemetry::TelemetrySettings::from_env(),
        );
        let app = Application::build(settings)?;
        let s = &app.settings;
        if s.custom_vision.is_none() {
            tracing::info!("no CUSTOM_VISION_ENDPOINT: recording notifications only");
        }
        tracing::info!(
            storage = ?s.storage,
            queue = %s.queue_name,
            table = %s.history_table,
            custom_vision = ?s.custom_vision,
            exports = %s.chain.exports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            "settings validated"
        );
        tracing::info!(%addr, "cvchain handler listening");
        serving.run(app).await?;
        // After the invocations in flight finished: what they recorded goes out now.
        telemetry.shutdown(super::TELEMETRY_FLUSH).await;
        Ok(())
    })?
}
