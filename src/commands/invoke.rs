//! `cvchain invoke`: delivers a queue message to a running handler exactly as the Functions host
//! does (double-encoded envelope, string `DequeueCount`, quoted `Id`) and prints the answer.

use anyhow::Context;
use azure_core::http::{Method, Request, Url, new_http_client};
use cvchain_core::envelope::{FUNCTION_NAME, encode_queue_invocation};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The message text, from a file, or `-` for standard input.
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,
    /// The handler's base URL [default: http://127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT/, where
    /// `cvchain serve` listens; 8080 when unset].
    #[arg(long)]
    pub url: Option<String>,
    /// The queue message id (default: a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// The delivery count the host would send.
    #[arg(long, default_value_t = 1)]
    pub dequeue_count: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let id = args.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let url = match args.url {
        Some(u) => u,
        None => {
            let port = crate::settings::handler_port(&|k| std::env::var(k).ok())?;
            format!("http://127.0.0.1:{port}/")
        }
    };
    let (status, body) =
        super::runtime()?.block_on(invoke(&url, &text, &id, args.dequeue_count))?;
    println!("HTTP {status} {body}");
    if !(200..300).contains(&status) {
        anyhow::bail!("the handler answered HTTP {status}");
    }
    Ok(())
}

/// POSTs `message_text` to a handler as the host would; returns the status and the body.
pub async fn invoke(
    base_url: &str,
    message_text: &str,
    message_id: &str,
    dequeue_count: u32,
) -> anyhow::Result<(u16, String)> {
    let url = Url::parse(base_url)?.join(FUNCTION_NAME)?;
    let mut req = Request::new(url, Method::Post);
    req.insert_header("content-type", "application/json; charset=utf-8");
    req.insert_header(
        "x-azure-functions-invocationid",
        uuid::Uuid::new_v4().to_string(),
    );
    let body = encode_queue_invocation(
        message_text,
        message_id,
        dequeue_count,
        time::OffsetDateTime::now_utc(),
        uuid::Uuid::new_v4(),
    );
    req.set_body(body.into_bytes());
    let rsp = new_http_client(None).execute_request(&req).await?;
    let (status, _, body) = rsp.deconstruct();
    let body = body.collect_string().await?;
    Ok((u16::from(status), body))
}
