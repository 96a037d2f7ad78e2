//! The storage connection, from the settings the Functions host uses: a connection string
//! (`CVCHAIN_STORAGE`, else `AzureWebJobsStorage`) or identity-based `__` settings, and the
//! naming rules of queues, tables and containers. Every error names the setting that is wrong
//! and never quotes a secret.

use azure_core::credentials::Secret;
use base64::Engine as _;
use cvchain_core::config::{SettingsError, Vars, parse_url};
use std::fmt;
use url::Url;

/// The storage connection setting, and the one the host itself falls back to.
pub const STORAGE_SETTING: &str = "CVCHAIN_STORAGE";
pub const FALLBACK_STORAGE_SETTING: &str = "AzureWebJobsStorage";

/// Azurite's well-known development account (published in Microsoft's Azurite docs).
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn err(setting: impl Into<String>, problem: impl Into<String>) -> SettingsError {
    SettingsError::new(setting, problem)
}

/// Where storage is and how cvchain authenticates to it.
#[derive(Clone)]
pub struct StorageSettings {
    /// The setting the connection came from, for messages.
    pub source: String,
    pub blob_endpoint: Url,
    pub queue_endpoint: Url,
    pub table_endpoint: Url,
    pub auth: StorageAuth,
}

#[derive(Clone)]
pub enum StorageAuth {
    /// Account key from a connection string: requests are signed with SharedKey.
    SharedKey { account: String, key: Secret },
    /// A SAS from a connection string, appended to every URL.
    Sas { token: Secret },
    /// Microsoft Entra ID tokens from `azure_identity`.
    Token(TokenSource),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `__credential=managedidentity`, with `__clientId` for a user-assigned identity.
    ManagedIdentity { client_id: Option<String> },
    /// No `__credential`: the developer's own identity (Azure CLI, azd), as the host does locally.
    Developer,
}

impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSettings")
            .field("source", &self.source)
            .field("blob_endpoint", &self.blob_endpoint.as_str())
            .field("queue_endpoint", &self.queue_endpoint.as_str())
            .field("table_endpoint", &self.table_endpoint.as_str())
            .field("auth", &self.auth)
            .finish()
    }
}

impl fmt::Debug for StorageAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageAuth::SharedKey { account, .. } => write!(f, "SharedKey({account})"),
            StorageAuth::Sas { .. } => f.write_str("Sas"),
            StorageAuth::Token(t) => write!(f, "Token({t:?})"),
        }
    }
}

impl StorageAuth {
    pub fn describe(&self) -> String {
        format!("{self:?}")
    }
}

const IDENTITY_SUFFIXES: &[&str] = &[
    "accountName",
    "blobServiceUri",
    "serviceUri",
    "queueServiceUri",
    "tableServiceUri",
    "credential",
    "clientId",
];

impl StorageSettings {
    /// The storage connection: `CVCHAIN_STORAGE` (string or `__` settings), else
    /// `AzureWebJobsStorage`.
    pub fn from_vars(vars: &Vars) -> Result<Self, SettingsError> {
        from_vars(vars)
    }
}

fn from_vars(vars: &Vars) -> Result<StorageSettings, SettingsError> {
    let get = |name: &str| vars.get(name);
    for prefix in [STORAGE_SETTING, FALLBACK_STORAGE_SETTING] {
        if let Some(value) = get(prefix) {
            return parse_connection_string(prefix, &value);
        }
        if IDENTITY_SUFFIXES
            .iter()
            .any(|s| get(&format!("{prefix}__{s}")).is_some())
        {
            return identity_connection(prefix, &get);
        }
    }
    Err(err(
        STORAGE_SETTING,
        format!(
            "not set (nor {FALLBACK_STORAGE_SETTING}): give a connection string \
             (`UseDevelopmentStorage=true` for Azurite) or identity-based settings \
             {STORAGE_SETTING}__blobServiceUri, __queueServiceUri and __tableServiceUri"
        ),
    ))
}

/// Parses `Key=Value;…` storage connection strings, as the Azure SDKs do.
pub fn parse_connection_string(
    setting: &str,
    value: &str,
) -> Result<StorageSettings, SettingsError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in value.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(err(
                setting,
                "is not a connection string (expected `Key=Value;…` pairs)",
            ));
        };
        pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let find = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());

    if let Some(v) = find("usedevelopmentstorage") {
        if !v.eq_ignore_ascii_case("true") {
            return Err(err(setting, "UseDevelopmentStorage must be `true`"));
        }
        let base = match find("developmentstorageproxyuri") {
            Some(p) => parse_url(setting, "DevelopmentStorageProxyUri", &p)?,
            None => Url::parse("http://127.0.0.1").expect("static URL"),
        };
        let host = base.host_str().unwrap_or("127.0.0.1").to_owned();
        let at = |port: u16| {
            Url::parse(&format!("{}://{host}:{port}/{DEV_ACCOUNT}", base.scheme()))
                .expect("valid dev URL")
        };
        return Ok(StorageSettings {
            source: setting.to_owned(),
            blob_endpoint: at(10000),
            queue_endpoint: at(10001),
            table_endpoint: at(10002),
            auth: StorageAuth::SharedKey {
                account: DEV_ACCOUNT.to_owned(),
                key: Secret::new(DEV_ACCOUNT_KEY),
            },
        });
    }

    let account = find("accountname");
    let protocol = find("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
    if !matches!(protocol.as_str(), "http" | "https") {
        return Err(err(
            setting,
            "DefaultEndpointsProtocol must be `http` or `https`",
        ));
    }
    let suffix = find("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
    let endpoint = |key: &str, service: &str| -> Result<Url, SettingsError> {
        if let Some(v) = find(&key.to_ascii_lowercase()) {
            return parse_url(setting, key, &v);
        }
        match &account {
            Some(a) => parse_url(
                setting,
                "AccountName",
                &format!("{protocol}://{a}.{service}.{suffix}"),
            ),
            None => Err(err(
                setting,
                format!("needs AccountName or {key} to know where the {service} service is"),
            )),
        }
    };
    let blob_endpoint = endpoint("BlobEndpoint", "blob")?;
    let queue_endpoint = endpoint("QueueEndpoint", "queue")?;
    let table_endpoint = endpoint("TableEndpoint", "table")?;

    let auth = if let Some(key) = find("accountkey") {
        let Some(account) = account.clone() else {
            return Err(err(setting, "has AccountKey but no AccountName"));
        };
        if base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map(|k| k.is_empty())
            .unwrap_or(true)
        {
            return Err(err(
                setting,
                "AccountKey is not valid base64 (copy it again from the storage account's Access keys)",
            ));
        }
        StorageAuth::SharedKey {
            account,
            key: Secret::new(key),
        }
    } else if let Some(sas) = find("sharedaccesssignature") {
        StorageAuth::Sas {
            token: Secret::new(sas.trim_start_matches('?').to_owned()),
        }
    } else {
        return Err(err(
            setting,
            "has neither AccountKey nor SharedAccessSignature; for Microsoft Entra ID use the \
             identity-based settings (__blobServiceUri, __queueServiceUri, __tableServiceUri, __credential)",
        ));
    };
    Ok(StorageSettings {
        source: setting.to_owned(),
        blob_endpoint,
        queue_endpoint,
        table_endpoint,
        auth,
    })
}

fn identity_connection(
    prefix: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<StorageSettings, SettingsError> {
    let name = |s: &str| format!("{prefix}__{s}");
    let (blob, queue, table) = if let Some(account) = get(&name("accountName")) {
        let account = account.trim().to_owned();
        if account.is_empty()
            || account.len() > 24
            || !account
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(err(
                name("accountName"),
                "must be a storage account name (3-24 lowercase letters and digits)",
            ));
        }
        let at = |svc: &str| {
            Url::parse(&format!("https://{account}.{svc}.core.windows.net")).expect("valid URL")
        };
        (at("blob"), at("queue"), at("table"))
    } else {
        let service = |suffixes: &[&str]| -> Result<Url, SettingsError> {
            for s in suffixes {
                if let Some(v) = get(&name(s)) {
                    let url = parse_url(&name(s), "value", &v)?;
                    if url.scheme() != "https" {
                        return Err(err(
                            name(s),
                            "must use https: Microsoft Entra ID tokens are only sent over https",
                        ));
                    }
                    return Ok(url);
                }
            }
            Err(err(
                name(suffixes[0]),
                format!(
                    "is required with identity-based connections (or set {})",
                    name("accountName")
                ),
            ))
        };
        (
            service(&["blobServiceUri", "serviceUri"])?,
            service(&["queueServiceUri"])?,
            service(&["tableServiceUri"])?,
        )
    };
    let client_id = get(&name("clientId")).map(|c| c.trim().to_owned());
    let source = match get(&name("credential")) {
        None => {
            if client_id.is_some() {
                return Err(err(
                    name("clientId"),
                    format!("only applies with {}=managedidentity", name("credential")),
                ));
            }
            TokenSource::Developer
        }
        Some(c) if c.trim().eq_ignore_ascii_case("managedidentity") => {
            TokenSource::ManagedIdentity { client_id }
        }
        Some(_) => {
            return Err(err(
                name("credential"),
                "must be `managedidentity` (or unset to use your developer sign-in)",
            ));
        }
    };
    Ok(StorageSettings {
        source: prefix.to_owned(),
        blob_endpoint: blob,
        queue_endpoint: queue,
        table_endpoint: table,
        auth: StorageAuth::Token(source),
    })
}

/// Azure container names: 3-63 lowercase letters, digits and single hyphens.
pub fn validate_container_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid container name (3-63 lowercase letters, digits and single hyphens)"
        ))
    }
}

/// Azure queue names: 3-63 lowercase letters, digits and single hyphens; `-poison` must still fit.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(3..=56).contains(&name.len())
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        return Err(format!(
            "{name:?} is not a valid queue name (3-56 lowercase letters, digits and single hyphens, \
             so that `{name}-poison` is valid too)"
        ));
    }
    Ok(())
}

/// Azure table names: a letter, then 2-62 letters or digits.
pub fn validate_table_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !(3..=63).contains(&name.len()) || !chars.all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "{name:?} is not a valid table name (a letter, then 2-62 letters or digits)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn storage(vars: &[(&str, &str)]) -> Result<StorageSettings, SettingsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| map.get(k).cloned();
        StorageSettings::from_vars(&Vars::new(&lookup))
    }

    #[test]
    fn development_storage_means_azurite_on_its_default_ports() {
        let s = storage(&[("CVCHAIN_STORAGE", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(
            s.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert_eq!(
            s.queue_endpoint.as_str(),
            "http://127.0.0.1:10001/devstoreaccount1"
        );
        assert_eq!(
            s.table_endpoint.as_str(),
            "http://127.0.0.1:10002/devstoreaccount1"
        );
        assert!(
            matches!(s.auth, StorageAuth::SharedKey { ref account, .. } if account == DEV_ACCOUNT)
        );
    }

    #[test]
    fn falls_back_to_azure_web_jobs_storage() {
        let s = storage(&[("AzureWebJobsStorage", "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.source, "AzureWebJobsStorage");
        // CVCHAIN_STORAGE wins when both are set.
        let s = storage(&[
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
            (
                "CVCHAIN_STORAGE__blobServiceUri",
                "https://a.blob.core.windows.net",
            ),
            (
                "CVCHAIN_STORAGE__queueServiceUri",
                "https://a.queue.core.windows.net",
            ),
            (
                "CVCHAIN_STORAGE__tableServiceUri",
                "https://a.table.core.windows.net",
            ),
        ])
        .unwrap();
        assert_eq!(s.source, "CVCHAIN_STORAGE");
        assert!(matches!(s.auth, StorageAuth::Token(TokenSource::Developer)));
    }

    #[test]
    fn account_key_connection_strings_with_and_without_endpoints() {
        let s = storage(&[(
            "CVCHAIN_STORAGE",
            "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )])
        .unwrap();
        assert_eq!(
            s.table_endpoint.as_str(),
            "https://acct.table.core.windows.net/"
        );
        let s = storage(&[(
            "CVCHAIN_STORAGE",
            "AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:5000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:5001/devstoreaccount1;TableEndpoint=http://127.0.0.1:5002/devstoreaccount1;",
        )])
        .unwrap();
        assert_eq!(
            s.queue_endpoint.as_str(),
            "http://127.0.0.1:5001/devstoreaccount1"
        );
    }

    #[test]
    fn identity_settings_build_token_auth() {
        let s = storage(&[
            ("CVCHAIN_STORAGE__accountName", "prodmodels"),
            ("CVCHAIN_STORAGE__credential", "managedidentity"),
            (
                "CVCHAIN_STORAGE__clientId",
                "11111111-2222-3333-4444-555555555555",
            ),
        ])
        .unwrap();
        assert_eq!(
            s.blob_endpoint.as_str(),
            "https://prodmodels.blob.core.windows.net/"
        );
        assert_eq!(
            s.auth.describe(),
            r#"Token(ManagedIdentity { client_id: Some("11111111-2222-3333-4444-555555555555") })"#
        );
    }

    #[test]
    fn each_error_names_the_wrong_setting() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (vec![], "CVCHAIN_STORAGE", "not set"),
            (
                vec![("CVCHAIN_STORAGE", "garbage")],
                "CVCHAIN_STORAGE",
                "not a connection string",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE",
                    "AccountName=a;AccountKey=***notbase64***",
                )],
                "CVCHAIN_STORAGE",
                "AccountKey is not valid base64",
            ),
            (
                vec![("CVCHAIN_STORAGE", "AccountName=a")],
                "CVCHAIN_STORAGE",
                "neither AccountKey nor SharedAccessSignature",
            ),
            (
                vec![("CVCHAIN_STORAGE", "AccountKey=a2V5;BlobEndpoint=http://x")],
                "CVCHAIN_STORAGE",
                "QueueEndpoint",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE",
                    "AccountName=a;AccountKey=a2V5;BlobEndpoint=nope",
                )],
                "CVCHAIN_STORAGE",
                "BlobEndpoint is not an http(s) URL",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE__blobServiceUri",
                    "https://a.blob.core.windows.net",
                )],
                "CVCHAIN_STORAGE__queueServiceUri",
                "is required",
            ),
            (
                vec![(
                    "CVCHAIN_STORAGE__blobServiceUri",
                    "http://a.blob.core.windows.net",
                )],
                "CVCHAIN_STORAGE__blobServiceUri",
                "must use https",
            ),
            (
                vec![
                    ("CVCHAIN_STORAGE__accountName", "acct"),
                    ("CVCHAIN_STORAGE__credential", "clientsecret"),
                ],
                "CVCHAIN_STORAGE__credential",
                "must be `managedidentity`",
            ),
            (
                vec![("CVCHAIN_STORAGE__accountName", "Bad_Name")],
                "CVCHAIN_STORAGE__accountName",
                "storage account name",
            ),
        ];
        for (vars, setting, problem) in cases {
            let e = storage(&vars).expect_err(&format!("{vars:?} should fail"));
            assert_eq!(e.setting, setting, "{vars:?}: {e}");
            assert!(e.problem.contains(problem), "{vars:?}: {e}");
            assert!(e.to_string().starts_with(&format!("setting {setting}:")));
            assert!(!e.to_string().contains("***notbase64***"), "{e}");
        }
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let s = storage(&[(
            "CVCHAIN_STORAGE",
            "AccountName=acct;AccountKey=c2VjcmV0a2V5",
        )])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("c2VjcmV0a2V5"), "{shown}");
    }

    #[test]
    fn names_follow_azure_rules() {
        assert!(validate_queue_name("customvision-notifications").is_ok());
        assert!(validate_queue_name("Bad_Queue").is_err());
        assert!(validate_table_name("CustomVisionHistory").is_ok());
        assert!(validate_table_name("1table").is_err());
        assert!(validate_container_name("models").is_ok());
        assert!(validate_container_name("Models").is_err());
    }
}
