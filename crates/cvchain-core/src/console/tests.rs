use super::page::{
    Forms, Nav, Notice, chart_svg, content_security_policy, project_page, projects_page,
};
use super::*;
use crate::forms::FormKey;
use crate::gate::Gate;
use crate::history::{Props, Value};
use time::macros::datetime;

const P: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
const Q: &str = "0b8e4c1a-1111-4a51-9a64-0f6a1c2d3e4f";

fn row(pk: &str, rk: &str, props: Vec<(Prop, Value)>) -> HistoryRow {
    HistoryRow {
        partition_key: pk.into(),
        row_key: rk.into(),
        properties: props.into_iter().collect::<Props>(),
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn training(pk: &str, name: &str, n: u32, map: f64, gate: &str) -> HistoryRow {
    use Prop::*;
    row(
        pk,
        &format!("Training_i{n}_TrainingCompleted"),
        vec![
            (EventType, text("Training")),
            (ProjectId, text(pk)),
            (ProjectName, text(name)),
            (IterationId, text(&format!("i{n}"))),
            (IterationName, text(&format!("Iteration {n}"))),
            (Status, text("TrainingCompleted")),
            (
                TrainedAt,
                Value::Time(datetime!(2026-11-20 10:00 UTC) + time::Duration::days(n as i64)),
            ),
            (Precision, Value::Double(map - 0.01)),
            (Recall, Value::Double(map - 0.02)),
            (AveragePrecision, Value::Double(map)),
            (GateVerdict, text(gate)),
            (GateReasons, text(&format!("map {map:.2} >= 0.80"))),
        ],
    )
}

fn step(pk: &str, n: u32, status: &str, release: Option<&str>) -> HistoryRow {
    use Prop::*;
    let mut props = vec![
        (EventType, text("ExportStep")),
        (IterationId, text(&format!("i{n}"))),
        (Platform, text("ONNX")),
        (Flavor, text("")),
        (ChainPosition, Value::Int(1)),
        (Status, text(status)),
        (
            Reason,
            text(if status == "Failed" {
                "Custom Vision reported the export Failed"
            } else {
                ""
            }),
        ),
        (EndedAt, Value::Time(datetime!(2026-11-25 10:00 UTC))),
    ];
    if let Some(r) = release {
        props.push((ReleasePath, text(r)));
        props.push((
            ReleaseUrl,
            text(&format!("https://acct.blob.core.windows.net/models/{r}")),
        ));
    }
    row(pk, &format!("ExportStep_i{n}_ONNX"), props)
}

fn moved(pk: &str, channel: &str, platform: &str, n: u32, rev: i64, reason: &str) -> HistoryRow {
    use Prop::*;
    row(
        pk,
        &format!("ChannelMove_{channel}_{platform}_r{rev:010}"),
        vec![
            (EventType, text("ChannelMove")),
            (Channel, text(channel)),
            (Platform, text(platform)),
            (Flavor, text("")),
            (IterationId, text(&format!("i{n}"))),
            (IterationName, text(&format!("Iteration {n}"))),
            (
                PreviousIterationName,
                text(if n > 1 { "Iteration 1" } else { "" }),
            ),
            (Revision, Value::Int64(rev)),
            (Reason, text(reason)),
            (
                PromotedAt,
                Value::Time(datetime!(2026-11-20 12:00 UTC) + time::Duration::minutes(rev)),
            ),
            (ReleasePath, text(&format!("W/Iteration-{n}/ONNX.zip"))),
            (ChannelPath, text(&format!("W/channels/{channel}/ONNX.zip"))),
        ],
    )
}

fn project_rows() -> (Vec<HistoryRow>, Vec<HistoryRow>) {
    let page = vec![
        training(P, "Wid<gets>", 1, 0.86, "passed"),
        training(P, "Wid<gets>", 2, 0.92, "passed"),
        step(P, 1, "Done", Some("W/Iteration-1/ONNX.zip")),
        step(P, 2, "Failed", None),
    ];
    let moves = vec![
        moved(P, "production", "", 1, 1, "gate"),
        moved(P, "production", "ONNX", 1, 2, "gate"),
        moved(P, "latest", "ONNX", 1, 3, "newest"),
        moved(P, "production", "", 2, 4, "gate"),
        moved(P, "latest", "ONNX", 2, 5, "manual"),
    ];
    (page, moves)
}

#[test]
fn a_channel_is_held_by_its_newest_move_and_the_pointer_comes_first() {
    let (_, moves) = project_rows();
    let h = holders(&moves);
    let line: Vec<(String, bool, String, String)> = h
        .iter()
        .map(|h| {
            (
                h.channel.clone(),
                h.pointer,
                h.target.clone(),
                h.iteration_name.clone(),
            )
        })
        .collect();
    assert_eq!(
        line,
        vec![
            ("production".into(), true, "".into(), "Iteration 2".into()),
            (
                "production".into(),
                false,
                "ONNX".into(),
                "Iteration 1".into()
            ),
            ("latest".into(), false, "ONNX".into(), "Iteration 2".into()),
        ]
    );
    assert_eq!(h[2].reason, "manual");
    assert_eq!(h[2].previous_name, "Iteration 1");
    assert_eq!(h[2].since, "2026-11-20T12:05:00Z");
}

#[test]
fn the_list_names_each_project_its_newest_iteration_and_its_holders() {
    let (page, moves) = project_rows();
    let mut trainings: Vec<HistoryRow> = page
        .iter()
        .filter(|r| r.row_key.starts_with("Training_"))
        .cloned()
        .collect();
    trainings.push(training(Q, "Another", 1, 0.5, "failed"));
    let list = projects(&trainings, &moves);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].project_name, "Another");
    assert!(list[0].production.is_none());
    let w = &list[1];
    assert_eq!(w.project_id, P);
    assert_eq!(w.iterations, 2);
    assert_eq!(w.newest.as_ref().unwrap().iteration_name, "Iteration 2");
    assert_eq!(w.production.as_ref().unwrap().iteration_name, "Iteration 2");
    assert!(w.production.as_ref().unwrap().pointer);
    assert_eq!(w.latest.as_ref().unwrap().iteration_name, "Iteration 2");

    let nav = Nav {
        base: "/api/history".into(),
        keep: "code=k%26y".into(),
    };
    let html = projects_page(&list, &nav, None);
    assert!(
        html.contains(&format!(
            r#"<a href="/api/history/{P}?code=k%26y">Wid&lt;gets&gt;</a>"#
        )),
        "{html}"
    );
    assert!(!html.contains("Wid<gets>"));
}

#[test]
fn a_projects_page_shows_its_channels_iterations_events_and_failures() {
    let (page, moves) = project_rows();
    let poisoned = vec![row(
        "_failed",
        "m-9",
        vec![
            (Prop::EventType, text("Failed")),
            (Prop::ProjectId, text(P)),
            (Prop::MessageId, text("m-9")),
            (Prop::DequeueCount, Value::Int(5)),
            (Prop::Reason, text("storage unreachable")),
            (
                Prop::ReceivedAt,
                Value::Time(datetime!(2026-11-26 09:00 UTC)),
            ),
        ],
    )];
    let mut view = ProjectView::build(P, &page, &moves, &[], &poisoned, 50);
    assert_eq!(view.project_name, "Wid<gets>");
    assert_eq!(view.iterations.len(), 2);
    // The paged read's iterations carry the channels their moves left.
    assert_eq!(view.iterations[0].channels, vec!["latest ONNX"]);
    assert_eq!(view.iterations[1].channels, vec!["production ONNX"]);
    let kinds: Vec<&str> = view.failures.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["message", "export"]);
    assert!(view.failures[1].what.starts_with("ONNX of Iteration 2"));
    view.manifest = Some("W/channels.json".into());
    assert_eq!(
        view.blob_paths(),
        [
            "W/Iteration-1/ONNX.zip",
            "W/Iteration-2/ONNX.zip",
            "W/channels.json",
            "W/channels/latest/ONNX.zip",
            "W/channels/production/ONNX.zip"
        ]
    );
    view.downloads.insert(
        "W/Iteration-1/ONNX.zip".into(),
        "https://acct.blob.core.windows.net/models/W/Iteration-1/ONNX.zip?sv=x&sig=y".into(),
    );
    // A link a forged row could carry is not a web link: shown as text only.
    view.downloads
        .insert("W/channels.json".into(), "javascript:alert(1)".into());

    let key = FormKey::derive(b"k");
    let forms = Forms {
        key: &key,
        session: "c2Vzc2lvbi1vZi10aGUtYnJvd3Nlcg",
        now: 1_796_000_000,
    };
    let nav = Nav {
        base: "/api/history".into(),
        keep: String::new(),
    };
    let gate = Gate::parse("map>=0.80,improves:map").unwrap();
    let html = project_page(&view, &gate, &nav, Some(&forms), None, None);
    assert!(html.contains("<h1>Wid&lt;gets&gt;</h1>"));
    assert!(
        html.contains(r#"data-channel="production" data-target="pointer">Iteration 2"#),
        "{html}"
    );
    assert!(html.contains(r#"data-channel="production" data-target="ONNX">Iteration 1"#));
    assert!(html.contains(r#"data-channel="latest" data-target="ONNX">Iteration 2"#));
    assert!(html.contains(r#"<a href="https://acct.blob.core.windows.net/models/W/Iteration-1/ONNX.zip?sv=x&amp;sig=y">W/Iteration-1/ONNX.zip</a>"#));
    assert!(!html.contains("javascript:"));
    assert!(html.contains(r#"data-gate="passed""#));
    // The forms: one promote per released iteration, one rollback per channel held.
    assert_eq!(
        html.matches(r#"action="/api/history/b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f/promote""#)
            .count(),
        1
    );
    assert_eq!(html.matches("/rollback\"").count(), 2);
    let token = key.issue("promote", P, forms.session, forms.now);
    assert!(html.contains(&format!(r#"name="token" value="{token}""#)));
    assert!(html.contains(r#"data-threshold="mAP""#));
    assert!(html.contains("storage unreachable"));
    // Read-only: no form at all.
    let ro = project_page(
        &view,
        &gate,
        &nav,
        None,
        Some(&Notice {
            ok: true,
            lines: vec!["moved <b>".into()],
        }),
        Some("/api/history/x?npk=a&nrk=b"),
    );
    assert!(!ro.contains("<form"));
    assert!(ro.contains("moved &lt;b&gt;"));
    assert!(ro.contains(r#"href="/api/history/x?npk=a&amp;nrk=b""#));
}

#[test]
fn the_chart_zooms_to_the_metrics_and_draws_the_gates_thresholds() {
    let (page, _) = project_rows();
    let views = crate::report::iterations(&page);
    let gate = Gate::parse("map>=0.80").unwrap();
    let svg = chart_svg(&views, &gate);
    // mAP 0.86 and 0.92, precision and recall a little lower, the threshold at 0.80: the range
    // is 75 % to 95 %, not 0 to 100 %, so the two iterations are far apart on the chart.
    assert!(svg.contains("from 75% to 95%"), "{svg}");
    // Iteration 1's mAP (0.86) 45 % of the plot's height (240 px) below its top (16 px).
    assert!(
        svg.contains(r##"data-series="mAP" fill="none" stroke="#2ca02c" stroke-width="3" points="52.0,124.0 590.0,52.0""##),
        "{svg}"
    );
    assert!(svg.contains(r#"data-threshold="mAP""#));
    assert!(svg.contains("gate: mAP ≥ 80%"));
    // Nothing to draw: the full range.
    assert!(chart_svg(&[], &Gate::default()).contains("from 0% to 100%"));
    assert!(content_security_policy().contains("form-action 'self'"));
    assert!(content_security_policy().starts_with("default-src 'none'; style-src 'sha256-"));
}
