//! `deploy/main.bicep` gives the app settings cvchain reads, spelled as `settings.rs` spells them:
//! its app settings, with sample values for the resource properties, go through
//! `Settings::from_lookup` and must come out as identity-based storage and Custom Vision access.
//! checkov (`scripts/check-deploy`, run by `.ci/run`) checks the rest of the template.

use cvchain::settings::{self, Settings};
use cvchain_azure::customvision::{self, CvAuthSetting};
use cvchain_azure::storage::settings::{StorageAuth, TokenSource};
use cvchain_core::config;
use std::{collections::BTreeMap, fs, path::PathBuf};

fn template() -> String {
    fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/main.bicep")).unwrap()
}

/// The default of `param <name> <type> = '<value>'`.
fn param_default(bicep: &str, name: &str) -> Option<String> {
    let prefix = format!("param {name} string = '");
    bicep
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.trim_end().trim_end_matches('\'').to_owned())
}

/// The default of `param <name> int = <value>`.
fn int_param(bicep: &str, name: &str) -> Option<i64> {
    let prefix = format!("param {name} int = ");
    bicep
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `string(<int param>)`, as Bicep evaluates it with the parameter's default.
fn string_of_int_param(bicep: &str, expr: &str) -> Option<String> {
    let name = expr.strip_prefix("string(")?.strip_suffix(')')?;
    int_param(bicep, name.trim()).map(|v| v.to_string())
}

/// A Bicep value as deployed: literals, parameters with their defaults, and sample values for
/// the properties Azure fills in. An expression this does not know fails the test, so a new
/// setting is looked at here.
fn eval(bicep: &str, expr: &str) -> String {
    let expr = expr.trim();
    if let Some(lit) = expr.strip_prefix('\'').and_then(|e| e.strip_suffix('\'')) {
        let mut out = String::new();
        let mut rest = lit;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').unwrap() + start;
            out.push_str(&eval(bicep, &rest[start + 2..end]));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        return out;
    }
    if let Some(v) = param_default(bicep, expr) {
        return v;
    }
    if let Some(v) = string_of_int_param(bicep, expr) {
        return v;
    }
    match expr {
        "storage.name" => "cvchainabc".into(),
        "storage.properties.primaryEndpoints.blob" => {
            "https://cvchainabc.blob.core.windows.net/".into()
        }
        "storage.properties.primaryEndpoints.queue" => {
            "https://cvchainabc.queue.core.windows.net/".into()
        }
        "storage.properties.primaryEndpoints.table" => {
            "https://cvchainabc.table.core.windows.net/".into()
        }
        "insights.properties.ConnectionString" => {
            "InstrumentationKey=00000000-0000-0000-0000-000000000000".into()
        }
        // `param consoleSecret string = newGuid()`: a new GUID per deployment.
        "consoleSecret" => "2f0c3d6e-8a1b-4c5d-9e7f-0a1b2c3d4e5f".into(),
        "customVisionAccount.properties.endpoint" => {
            "https://mycv.cognitiveservices.azure.com/".into()
        }
        other => panic!("deploy_template.rs does not know the Bicep expression {other:?}"),
    }
}

/// Every `{ name: '…' value: … }` pair in the template's setting lists.
fn app_settings(bicep: &str) -> BTreeMap<String, String> {
    let mut settings = BTreeMap::new();
    let mut name = None;
    for line in bicep.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("name: '") {
            name = Some(n.trim_end_matches('\'').to_owned());
        } else if let Some(v) = line.strip_prefix("value: ") {
            if let Some(n) = name
                .take()
                .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            {
                settings.insert(n, eval(bicep, v));
            }
        } else if !line.starts_with("//") {
            name = None;
        }
    }
    settings
}

#[test]
fn the_templates_app_settings_are_the_ones_cvchain_reads() {
    let bicep = template();
    let app = app_settings(&bicep);
    for required in [
        "AzureWebJobsStorage__accountName",
        "CVCHAIN_STORAGE__blobServiceUri",
        "CVCHAIN_STORAGE__queueServiceUri",
        "CVCHAIN_STORAGE__tableServiceUri",
        "CVCHAIN_STORAGE__credential",
        settings::QUEUE_SETTING,
        settings::HISTORY_TABLE_SETTING,
        settings::BACKUP_CONTAINER_SETTING,
        settings::RELEASE_CONTAINER_SETTING,
        config::EXPORTS_SETTING,
        customvision::CV_ENDPOINT_SETTING,
        customvision::CV_CREDENTIAL_SETTING,
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        settings::CONSOLE_SECRET_SETTING,
    ] {
        assert!(
            app.contains_key(required),
            "{required} missing from {app:?}"
        );
    }
    // Flex Consumption takes the runtime from functionAppConfig and refuses these as settings.
    for refused in [
        "FUNCTIONS_WORKER_RUNTIME",
        "FUNCTIONS_EXTENSION_VERSION",
        "WEBSITE_RUN_FROM_PACKAGE",
        "WEBSITE_CONTENTSHARE",
    ] {
        assert!(
            !app.contains_key(refused),
            "{refused} is not allowed on Flex Consumption"
        );
    }
    assert!(bicep.contains("name: 'custom'") && bicep.contains("version: '1.0'"));

    let s = Settings::from_lookup(&|k| app.get(k).cloned()).unwrap();
    assert_eq!(s.storage.source, "CVCHAIN_STORAGE");
    assert!(matches!(
        s.storage.auth,
        StorageAuth::Token(TokenSource::ManagedIdentity { client_id: None })
    ));
    assert_eq!(
        s.storage.queue_endpoint.host_str(),
        Some("cvchainabc.queue.core.windows.net")
    );
    assert_eq!(s.queue_name, "customvision-notifications");
    let cv = s.custom_vision.expect("Custom Vision is configured");
    assert!(matches!(
        cv.auth,
        CvAuthSetting::ManagedIdentity { client_id: None }
    ));
    assert_eq!(
        s.release.backup_container.unwrap().as_str(),
        "https://cvchainabc.blob.core.windows.net/cvbackups"
    );
    assert!(!s.chain.exports.is_empty());
    // Flex Consumption's lowest maximumInstanceCount outside the preview regions is 40.
    assert_eq!(int_param(&bicep, "maximumInstanceCount"), Some(40));
    // Each instance's ceiling is the resource's whole limit, however many instances run: they
    // find their shares from the service's 429s, not from a static division.
    assert_eq!(int_param(&bicep, "customVisionCallsPerSecond"), Some(10));
    assert_eq!(app["CVCHAIN_CV_MAX_RPS"], "10");
    assert_eq!(cv.max_rps, 10);
    assert!(!bicep.contains("/ maximumInstanceCount"));
}

#[test]
fn the_template_stores_no_key_and_the_host_reads_the_same_connection() {
    let bicep = template();
    for secret in [
        "listKeys(",
        "AccountKey",
        "SharedAccessSignature",
        "TRAINING_KEY",
    ] {
        assert!(
            !bicep.contains(secret),
            "deploy/main.bicep mentions {secret}"
        );
    }
    assert!(bicep.contains("allowSharedKeyAccess: false"));
    // The queue trigger reads CVCHAIN_STORAGE and %CVCHAIN_QUEUE%, which the template sets.
    let function: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("functions/CustomVisionNotification/function.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let app = app_settings(&bicep);
    let connection = function["bindings"][0]["connection"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("{connection}__credential"))
            .map(String::as_str),
        Some("managedidentity")
    );
    assert!(app.contains_key(&format!("{connection}__queueServiceUri")));
    assert_eq!(function["bindings"][0]["queueName"], "%CVCHAIN_QUEUE%");
}
