//! The cold-start baseline: the least an axum server can be as a custom handler (read the port
//! the host gives, answer `GET /`). Built in the same workspace, with the same dependencies and
//! profile as cvchain, so the benchmark's ratio is cvchain's own start-up cost.

use axum::{Router, routing::get};

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            let app = Router::new().route("/", get(|| async { "ready" }));
            axum::serve(listener, app).await
        })
}
