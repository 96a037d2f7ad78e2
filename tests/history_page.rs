//! The History function's page, served by the same binary: JSON for API clients, HTML with an
//! inline SVG chart for browsers, rendered here in headless Chromium to see that the chart is
//! drawn.

use cvchain_azure::storage::clients::StorageClients;
use cvchain_testkit::{Azurite, Handler, unique};
use serde_json::{Value, json};
use std::process::Command;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";

async fn setup() -> (Azurite, Handler) {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table_name = unique("History");
    let table = clients.table(&table_name).unwrap();
    table.create_if_missing().await.unwrap();
    for (n, p, r, m) in [
        (1, 0.62, 0.55, 0.58),
        (2, 0.78, 0.70, 0.74),
        (3, 0.91, 0.86, 0.89),
    ] {
        let iteration = format!("00000000-0000-0000-0000-00000000000{n}");
        table
            .insert(
                json!({"PartitionKey": P, "RowKey": format!("Training_{iteration}_TrainingCompleted"),
                    "EventType": "Training", "ProjectId": P, "ProjectName": "Widgets",
                    "IterationId": iteration, "IterationName": format!("Iteration {n}"),
                    "Status": "TrainingCompleted", "TrainedAt": format!("2026-11-2{n}T10:00:00.0000000Z"),
                    "Precision": p, "Recall": r, "AveragePrecision": m})
                .as_object()
                .unwrap(),
            )
            .await
            .unwrap();
        table
            .insert(
                json!({"PartitionKey": P, "RowKey": format!("ExportStep_{iteration}_ONNX"),
                    "EventType": "ExportStep", "IterationId": iteration, "Platform": "ONNX",
                    "Flavor": "", "ChainPosition": 1, "Status": "Done",
                    "ReleasePath": format!("Widgets/Iteration-{n}/ONNX.zip"),
                    "ReleaseUrl": format!("http://127.0.0.1/models/Widgets/Iteration-{n}/ONNX.zip")})
                .as_object()
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let handler = Handler::start(&[
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_HISTORY_TABLE", table_name),
    ]);
    (azurite, handler)
}

#[tokio::test]
async fn json_for_clients_html_for_browsers() {
    let (_azurite, handler) = setup().await;
    let http = reqwest::Client::new();
    let v: Value = http
        .get(handler.url(&format!("/api/history/{P}")))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[0]["iterationName"], "Iteration 3");
    assert_eq!(
        v[0]["exports"][0]["releasePath"],
        "Widgets/Iteration-3/ONNX.zip"
    );

    let rsp = http
        .get(handler.url("/api/history"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert!(
        rsp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = rsp.text().await.unwrap();
    assert!(html.contains(r#"<svg id="chart""#) && html.contains(r#"data-series="mAP""#));
    assert!(html.contains("Widgets/Iteration-1/ONNX.zip"));

    let rsp = http
        .get(handler.url("/api/history/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 400);
}

/// Share of pixels within a small distance of `rgb`.
fn pixels_near(img: &[u8], channels: usize, rgb: [u8; 3]) -> usize {
    img.chunks(channels)
        .filter(|p| {
            p[..3]
                .iter()
                .zip(rgb)
                .all(|(a, b)| (*a as i32 - b as i32).abs() <= 24)
        })
        .count()
}

#[tokio::test]
async fn chromium_draws_the_chart() {
    let (_azurite, handler) = setup().await;
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok())
        .expect("Chromium is not installed: .ci/run installs Debian's chromium package");
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("history.png");
    let url = handler.url(&format!("/api/history/{P}?format=html"));
    let out = tokio::task::spawn_blocking({
        let (shot, profile) = (shot.clone(), dir.path().join("profile"));
        move || {
            Command::new(chromium)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    "--window-size=800,600",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg(format!("--screenshot={}", shot.display()))
                .arg(url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let img = &buf[..info.buffer_size()];
    // Each series' line and points are drawn: hundreds of pixels in its colour.
    for (name, colour) in cvchain_core::report::SERIES {
        let rgb = [
            u8::from_str_radix(&colour[1..3], 16).unwrap(),
            u8::from_str_radix(&colour[3..5], 16).unwrap(),
            u8::from_str_radix(&colour[5..7], 16).unwrap(),
        ];
        let n = pixels_near(img, channels, rgb);
        assert!(
            n > 300,
            "the {name} series has only {n} pixels in the screenshot"
        );
    }
}
