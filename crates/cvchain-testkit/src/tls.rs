//! A test CA and token credentials, for the Microsoft Entra ID paths (Azurite `--oauth basic`,
//! the stand-in over https).

use std::{path::PathBuf, process::Command};

/// A small CA and a leaf certificate for 127.0.0.1 (CA:FALSE, as rustls wants), made with the
/// `openssl` command line.
pub struct TestCa {
    _dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl command line");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cvchain test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&csr);
        std::fs::write(
            p("leaf.ext"),
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        Self {
            ca_cert: p("ca.pem"),
            cert: p("leaf.pem"),
            key: p("leaf.key"),
            _dir: dir,
        }
    }

    /// An `azure_core` transport whose HTTP client trusts this CA.
    pub fn transport(&self) -> azure_core::http::Transport {
        let pem = std::fs::read(&self.ca_cert).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        azure_core::http::Transport::new(std::sync::Arc::new(client))
    }
}

/// A token credential that hands out the unsigned JWTs Azurite's `--oauth basic` accepts.
#[derive(Debug, Default)]
pub struct AzuriteTokenCredential {
    pub requests: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for AzuriteTokenCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine as _;
        assert_eq!(scopes, ["https://storage.azure.com/.default"]);
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let now = azure_core::time::OffsetDateTime::now_utc().unix_timestamp();
        let token = format!(
            "{}.{}.{}",
            b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            b64(serde_json::json!({
                "aud": "https://storage.azure.com",
                "iss": "https://sts.windows.net/ab1f708d-50f6-404c-a006-d71b2ac7a606/",
                "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
                "oid": "11111111-2222-3333-4444-555555555555",
                "tid": "ab1f708d-50f6-404c-a006-d71b2ac7a606",
            })),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("unsigned"),
        );
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(token),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// A token credential that hands out `token-for:<scopes>` and remembers what it was asked for.
#[derive(Debug, Default)]
pub struct RecordingCredential {
    pub scopes: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for RecordingCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        let joined = scopes.join(" ");
        self.scopes.lock().unwrap().push(joined.clone());
        Ok(azure_core::credentials::AccessToken::new(
            azure_core::credentials::Secret::new(format!("token-for:{joined}")),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}
