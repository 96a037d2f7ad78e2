use super::*;
use time::macros::datetime;

fn it(n: u128, day: u8, map: f64) -> IterationRef {
    IterationRef {
        id: Uuid::from_u128(n),
        name: format!("Iteration {n}"),
        trained_at: Some(format!("2026-11-{day:02}T10:00:00Z")),
        precision: Some(map),
        recall: Some(map),
        map: Some(map),
    }
}

fn onnx() -> ExportTarget {
    ExportTarget {
        platform: "ONNX".into(),
        flavor: None,
    }
}

fn tflite() -> ExportTarget {
    ExportTarget {
        platform: "TensorFlow".into(),
        flavor: Some("TensorFlowLite".into()),
    }
}

fn release(target: ExportTarget, iteration: &IterationRef) -> Release {
    Release {
        release_path: format!("W/{}/{}.zip", iteration.name, target.key()),
        target,
        size: 10,
        content_md5: Some("md5==".into()),
    }
}

fn path(c: Channel, t: &ExportTarget) -> String {
    format!("W/channels/{}/{}.zip", c.as_str(), t.key())
}

const NOW: OffsetDateTime = datetime!(2026-11-30 12:00 UTC);

fn manifest() -> Manifest {
    Manifest::new(Uuid::from_u128(99), "Widgets", NOW)
}

fn holder(m: &Manifest, c: Channel, t: &ExportTarget) -> Option<Uuid> {
    m.entry(c, t).map(|e| e.holder.iteration.id)
}

#[test]
fn latest_follows_the_newest_release_and_never_goes_back() {
    let mut m = manifest();
    let (one, two) = (it(1, 1, 0.5), it(2, 2, 0.6));
    let c = m.released(&two, &[release(onnx(), &two)], &path, NOW);
    assert_eq!(c.moves.len(), 1);
    assert_eq!(c.moves[0].channel, Channel::Latest);
    assert_eq!(c.moves[0].to.reason, Reason::Newest);
    assert_eq!(c.moves[0].to.revision, 1);
    // The older iteration's late release moves nothing, nor does the same one again.
    assert!(
        m.released(&one, &[release(onnx(), &one)], &path, NOW)
            .is_empty()
    );
    assert!(
        m.released(&two, &[release(onnx(), &two)], &path, NOW)
            .is_empty()
    );
    assert_eq!(m.revision, 1);
    assert_eq!(holder(&m, Channel::Latest, &onnx()), Some(two.id));
    // Nothing passed the gate: production is empty.
    assert_eq!(holder(&m, Channel::Production, &onnx()), None);
}

#[test]
fn production_follows_the_pointer_target_by_target() {
    let mut m = manifest();
    let two = it(2, 2, 0.8);
    let c = m.gate_passed(&two, NOW);
    assert_eq!(c.pointer.as_ref().unwrap().to.id, two.id);
    assert!(c.moves.is_empty());
    // ONNX released first, TFLite later: each moves when its copy exists.
    let c = m.released(&two, &[release(onnx(), &two)], &path, NOW);
    let channels: Vec<Channel> = c.moves.iter().map(|m| m.channel).collect();
    assert_eq!(channels, vec![Channel::Latest, Channel::Production]);
    assert_eq!(c.moves[1].to.reason, Reason::Gate);
    assert_eq!(holder(&m, Channel::Production, &tflite()), None);
    m.released(&two, &[release(tflite(), &two)], &path, NOW);
    assert_eq!(holder(&m, Channel::Production, &tflite()), Some(two.id));
    // An older iteration that passes later does not take the pointer back.
    let one = it(1, 1, 0.9);
    assert!(m.gate_passed(&one, NOW).is_empty());
    assert!(
        m.released(&one, &[release(onnx(), &one)], &path, NOW)
            .is_empty()
    );
    // A newer one does; the old holder goes to the history.
    let three = it(3, 3, 0.9);
    m.gate_passed(&three, NOW);
    let c = m.released(&three, &[release(onnx(), &three)], &path, NOW);
    let prod = c
        .moves
        .iter()
        .find(|mv| mv.channel == Channel::Production)
        .unwrap();
    assert_eq!(prod.from.as_ref().unwrap().id, two.id);
    let e = m.entry(Channel::Production, &onnx()).unwrap();
    assert_eq!(e.previous.as_ref().unwrap().id, two.id);
    assert_eq!(e.history.len(), 1);
    assert_eq!(m.held_iterations(), vec![two.id, three.id]);
}

#[test]
fn rollback_goes_to_the_previous_holder_and_vetoes_the_current() {
    let mut m = manifest();
    let (two, four) = (it(2, 2, 0.8), it(4, 4, 0.9));
    for i in [&two, &four] {
        m.gate_passed(i, NOW);
        m.released(i, &[release(onnx(), i), release(tflite(), i)], &path, NOW);
    }
    let c = m.rollback(Channel::Production, NOW).unwrap();
    assert_eq!(c.pointer.as_ref().unwrap().to.id, two.id);
    assert_eq!(c.moves.len(), 2);
    assert!(c.moves.iter().all(|mv| mv.to.reason == Reason::Rollback
        && mv.to.iteration.id == two.id
        && mv.from.as_ref().unwrap().id == four.id));
    assert_eq!(holder(&m, Channel::Production, &onnx()), Some(two.id));
    assert!(
        m.entry(Channel::Production, &onnx())
            .unwrap()
            .history
            .is_empty()
    );
    // Redelivered messages of the vetoed iteration move nothing back.
    assert!(m.gate_passed(&four, NOW).is_empty());
    assert!(
        m.released(&four, &[release(onnx(), &four)], &path, NOW)
            .moves
            .iter()
            .all(|mv| mv.channel != Channel::Production)
    );
    // Nothing left to roll back to.
    assert!(m.rollback(Channel::Production, NOW).is_err());
    // A manual promote lifts the veto.
    let c = m.promote(
        Channel::Production,
        &four,
        &[release(onnx(), &four)],
        &path,
        "promoted by hand; the gate was not consulted",
        NOW,
    );
    assert_eq!(c.pointer.as_ref().unwrap().reason, Reason::Manual);
    assert_eq!(c.moves.len(), 1);
    assert_eq!(
        c.moves[0].to.note.as_deref().unwrap(),
        "promoted by hand; the gate was not consulted"
    );
    assert!(!m.is_vetoed(Channel::Production, four.id));
    assert_eq!(holder(&m, Channel::Production, &onnx()), Some(four.id));
}

#[test]
fn promote_can_move_backwards_on_purpose() {
    let mut m = manifest();
    let (one, two) = (it(1, 1, 0.5), it(2, 2, 0.6));
    m.released(&two, &[release(onnx(), &two)], &path, NOW);
    let c = m.promote(
        Channel::Latest,
        &one,
        &[release(onnx(), &one)],
        &path,
        "x",
        NOW,
    );
    assert!(c.pointer.is_none());
    assert_eq!(holder(&m, Channel::Latest, &onnx()), Some(one.id));
}

#[test]
fn stored_manifests_are_checked_before_use() {
    let mut m = manifest();
    let two = it(2, 2, 0.8);
    m.gate_passed(&two, NOW);
    m.released(&two, &[release(onnx(), &two)], &path, NOW);
    let bytes = m.to_json();
    let back = Manifest::parse("W/channels.json", &bytes, m.project_id).unwrap();
    assert_eq!(back, m);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.contains("\"schema\": \"cvchain.channels/1\""),
        "{text}"
    );
    assert!(text.contains("\"mAP\": 0.8"), "{text}");
    assert!(text.contains("\"contentMd5\": \"md5==\""), "{text}");
    assert!(matches!(
        Manifest::parse("p", b"{not json", m.project_id),
        Err(ManifestError::NotJson { .. })
    ));
    assert!(matches!(
        Manifest::parse("p", br#"{"channels":{}}"#, m.project_id),
        Err(ManifestError::NotOurs { .. })
    ));
    let e = Manifest::parse("W/channels.json", &bytes, Uuid::from_u128(7)).unwrap_err();
    assert!(matches!(e, ManifestError::OtherProject { .. }));
    assert!(
        e.to_string()
            .starts_with("W/channels.json is the manifest of project")
    );
}

#[test]
fn paths_render_like_release_paths() {
    let paths = Paths {
        template: crate::release::PathTemplate::parse_channel(DEFAULT_CHANNEL_TEMPLATE).unwrap(),
    };
    let p = Uuid::from_u128(99);
    assert_eq!(
        paths.channel_path(
            p,
            "Widget Detector (prod)",
            Channel::Production,
            &tflite(),
            false
        ),
        "Widget-Detector-prod/channels/production/TensorFlow-TensorFlowLite.zip"
    );
    assert_eq!(
        paths.channel_path(p, "Widgets", Channel::Latest, &onnx(), false),
        "Widgets/channels/latest/ONNX.zip"
    );
    assert_eq!(
        paths.channel_path(p, "Widgets", Channel::Latest, &onnx(), true),
        format!("Widgets-{p}/channels/latest/ONNX.zip")
    );
    assert_eq!(
        manifest_path(p, "Widget Detector", false),
        "Widget-Detector/channels.json"
    );
    assert_eq!(manifest_path(p, "", false), format!("{p}/channels.json"));
    for (bad, want) in [
        ("{projectName}/{channel}/{platform}.zip", "{flavor}"),
        (
            "{projectName}/{iterationName}/{channel}/{platform}-{flavor}",
            "unknown token",
        ),
        ("{platform}-{flavor}-{channel}", "must name the project"),
    ] {
        let e = crate::release::PathTemplate::parse_channel(bad).unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn channel_metadata_names_the_iteration_and_the_previous_one() {
    let mut m = manifest();
    let (one, two) = (it(1, 1, 0.5), it(2, 2, 0.6));
    m.released(&one, &[release(onnx(), &one)], &path, NOW);
    let c = m.released(&two, &[release(onnx(), &two)], &path, NOW);
    let meta = channel_metadata(Channel::Latest, &c.moves[0], m.project_id, "Wïdgets");
    assert_eq!(meta["iterationid"], two.id.to_string());
    assert_eq!(meta["previousiterationid"], one.id.to_string());
    assert_eq!(meta["reason"], "newest");
    assert_eq!(meta["channel"], "latest");
    assert_eq!(meta["map"], "0.6000");
    assert_eq!(meta["projectname"], "W%C3%AFdgets");
}

#[test]
fn histories_stay_bounded() {
    let mut m = manifest();
    for n in 1..=15u8 {
        let i = it(n.into(), n, 0.5);
        m.gate_passed(&i, NOW);
        m.released(&i, &[release(onnx(), &i)], &path, NOW);
    }
    let e = m.entry(Channel::Production, &onnx()).unwrap();
    assert_eq!(e.history.len(), HISTORY_DEPTH);
    assert_eq!(e.history.first().unwrap().iteration.id, Uuid::from_u128(5));
    assert_eq!(
        m.production_pointer.as_ref().unwrap().history.len(),
        HISTORY_DEPTH
    );
}

#[test]
fn a_channel_copy_is_current_only_when_its_copy_ended_well() {
    use crate::release::{BeforeCopy, CopyState};
    // The metadata names revision 3 from the moment the copy request is accepted.
    assert_eq!(before_sync(3, CopyState::Success, 3), BeforeCopy::Current);
    assert_eq!(before_sync(4, CopyState::None, 3), BeforeCopy::Current);
    assert_eq!(before_sync(2, CopyState::Success, 3), BeforeCopy::Copy);
    assert_eq!(before_sync(3, CopyState::Pending, 3), BeforeCopy::AwaitCopy);
    assert_eq!(before_sync(3, CopyState::Failed, 3), BeforeCopy::Copy);
    assert_eq!(before_sync(9, CopyState::Failed, 3), BeforeCopy::Copy);
}
