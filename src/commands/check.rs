//! `cvchain check`: validates the settings, then reaches every dependency with the configured
//! credentials and says what to fix.

use crate::settings::Settings;
use azure_core::http::StatusCode;
use cvchain_azure::customvision::{CvAuthSetting, TrainingApi, training_client};
use cvchain_azure::events::sinks::Sinks;
use cvchain_azure::storage::{
    StorageError, clients::StorageClients, queue::poison_queue_name, settings::StorageAuth,
};

/// One line of `cvchain check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.ok { "✓" } else { "✗" };
        write!(f, "{mark} {}", self.what)?;
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// What to fix when storage says no: the setting, and the role for identity-based access.
fn storage_hint(settings: &Settings, role: &str, e: &StorageError) -> String {
    let setting = &settings.storage.source;
    match (e, &settings.storage.auth) {
        (StorageError::Denied { .. }, StorageAuth::Token(_)) => {
            format!("{e} — give the identity in {setting}__credential/__clientId the role {role}")
        }
        (StorageError::Denied { .. }, _) => format!("{e} — fix the key or SAS in {setting}"),
        (StorageError::Unreachable { .. }, _) => {
            format!("{e} — check the endpoints in {setting}")
        }
        _ => format!("{e} (setting {setting})"),
    }
}

fn ok(what: String, detail: impl Into<String>) -> Check {
    Check {
        what,
        ok: true,
        detail: detail.into(),
    }
}

fn failed(what: String, detail: String) -> Check {
    Check {
        what,
        ok: false,
        detail,
    }
}

/// Reaches the queue, the poison queue, the history table, the containers and Custom Vision.
pub async fn check(
    settings: &Settings,
    clients: &StorageClients,
    cv: Option<&dyn TrainingApi>,
) -> Vec<Check> {
    let mut out = Vec::new();
    for name in [
        settings.queue_name.clone(),
        poison_queue_name(&settings.queue_name),
    ] {
        let what = format!("queue {name}");
        let result = match clients.queue(&name) {
            Ok(q) => match q.get_properties(None).await {
                Ok(_) => Ok("reachable".to_owned()),
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                    Ok("does not exist yet (created on first use)".to_owned())
                }
                Err(e) => Err(StorageError::from_azure("queue", &e)),
            },
            Err(e) => Err(e),
        };
        out.push(match result {
            Ok(d) => ok(what, d),
            Err(e) => failed(
                what,
                storage_hint(settings, "Storage Queue Data Contributor", &e),
            ),
        });
    }

    let what = format!("table {}", settings.history_table);
    let result = match clients.table(&settings.history_table) {
        Ok(t) => match t.query_page(None, Some(1), None).await {
            Ok(_) => Ok("reachable".to_owned()),
            Err(StorageError::Service { status: 404, .. }) => {
                Ok("does not exist yet (created on first use)".to_owned())
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    out.push(match result {
        Ok(d) => ok(what, d),
        Err(e) => failed(
            what,
            storage_hint(settings, "Storage Table Data Contributor", &e),
        ),
    });

    let mut containers = vec![(settings.release.container.clone(), "release container")];
    if let Some(url) = &settings.release.backup_container
        && let Some(name) = url
            .path_segments()
            .and_then(|mut s| s.rfind(|p| !p.is_empty()))
    {
        containers.push((name.to_owned(), "backup container"));
    }
    for (name, kind) in containers {
        let what = format!("{kind} {name}");
        let result = match clients.blob_service() {
            Ok(s) => match s.blob_container_client(&name).get_properties(None).await {
                Ok(_) => Ok("reachable".to_owned()),
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                    Ok(if kind == "release container" {
                        "does not exist yet (created on first copy)".to_owned()
                    } else {
                        "does not exist yet (Custom Vision creates it)".to_owned()
                    })
                }
                Err(e) => Err(StorageError::from_azure("blob", &e)),
            },
            Err(e) => Err(e),
        };
        out.push(match result {
            Ok(d) => ok(what, d),
            Err(e) => failed(what, storage_hint(settings, "Storage Blob Data Owner", &e)),
        });
    }

    match (cv, &settings.custom_vision) {
        (Some(cv), Some(cfg)) => {
            let what = format!(
                "Custom Vision {}",
                cvchain_core::redact::url_without_secrets(cfg.endpoint.as_str())
            );
            // A project that cannot exist: NotFoundProject proves the key or identity works.
            out.push(match cv.get_project(uuid::Uuid::nil()).await {
                Ok(_) => ok(what, "reachable"),
                Err(e) if e.is_not_found() => ok(what, "reachable, credentials accepted"),
                Err(e) => {
                    let fix = match &cfg.auth {
                        CvAuthSetting::Key(_) => {
                            "fix CUSTOM_VISION_TRAINING_KEY or CUSTOM_VISION_ENDPOINT".to_owned()
                        }
                        CvAuthSetting::ManagedIdentity { .. } => {
                            "give the identity (CUSTOM_VISION_CLIENT_ID) a Custom Vision role, and use a custom-subdomain CUSTOM_VISION_ENDPOINT".to_owned()
                        }
                    };
                    failed(what, format!("{e} — {fix}"))
                }
            });
        }
        _ => out.push(ok(
            "Custom Vision".into(),
            "not configured (CUSTOM_VISION_ENDPOINT unset): notifications are only recorded",
        )),
    }
    out.extend(check_sinks(settings, clients).await);
    out
}

/// Reaches each event sink without sending an event.
async fn check_sinks(settings: &Settings, clients: &StorageClients) -> Vec<Check> {
    if !settings.events.any() {
        return vec![ok(
            "event sinks".into(),
            "none configured (CVCHAIN_EVENTS_QUEUE, CVCHAIN_EVENTGRID_ENDPOINT, CVCHAIN_WEBHOOK_URL, CVCHAIN_TEAMS_WEBHOOK_URL, CVCHAIN_SLACK_WEBHOOK_URL): no events are recorded",
        )];
    }
    let sinks = match Sinks::new(&settings.events, clients, Default::default()) {
        Ok(s) => s,
        Err(e) => return vec![failed("event sinks".into(), e.to_string())],
    };
    let mut out = Vec::new();
    for sink in sinks.configured() {
        let what = format!("event sink: {}", sinks.describe(sink));
        out.push(match sinks.reach(sink).await {
            Ok(d) => ok(what, d),
            Err(d) => failed(what, d),
        });
    }
    out
}

/// Runs the checks, prints one line each, and fails when any failed.
pub fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    println!("✓ settings valid");
    let failures = super::runtime()?.block_on(async {
        let clients = StorageClients::new(&settings.storage)?;
        let cv = match &settings.custom_vision {
            Some(cv) => Some(training_client(cv)?),
            None => None,
        };
        let checks = check(
            &settings,
            &clients,
            cv.as_ref().map(|c| c as &dyn TrainingApi),
        )
        .await;
        for c in &checks {
            println!("{c}");
        }
        // Where telemetry goes (not reached: an export that fails never fails cvchain), and
        // what of its settings cannot be used.
        let telemetry = crate::telemetry::TelemetrySettings::from_env();
        for p in &telemetry.problems {
            println!("✗ telemetry: {p}");
        }
        println!("✓ telemetry: {}", telemetry.describe());
        anyhow::Ok(checks.iter().filter(|c| !c.ok).count() + telemetry.problems.len())
    })?;
    if failures > 0 {
        anyhow::bail!("{failures} check(s) failed");
    }
    Ok(())
}
