//! `cvchain worker`: consumes the queue without a Functions host, through the same processing as
//! `serve` (see [`crate::worker`] for the queue semantics).

use crate::settings::Settings;
use crate::startup::Application;
use crate::worker::WorkerOptions;

pub fn run() -> anyhow::Result<()> {
    super::run_then_leave(async move {
        let telemetry = crate::telemetry::init_with(
            crate::settings::log_format_from_env(),
            &crate::telemetry::TelemetrySettings::from_env(),
        );
        let settings = Settings::from_env()?;
        let options = WorkerOptions::from_env(settings.max_dequeue)?;
        let app = Application::build(settings)?;
        let s = &app.settings;
        tracing::info!(
            storage = ?s.storage,
            queue = %s.queue_name,
            table = %s.history_table,
            ?options,
            "settings validated"
        );
        let stats = app
            .run_worker(options, crate::server::shutdown_signal())
            .await?;
        tracing::info!(?stats, "worker stopped");
        telemetry.shutdown(super::TELEMETRY_FLUSH).await;
        Ok(())
    })?
}
