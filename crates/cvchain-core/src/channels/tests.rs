use super::*;
use crate::history::StepRow;
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
        release_path: format!(
            "Widgets/{}/{}.zip",
            crate::release::sanitize(&iteration.name),
            target.key()
        ),
        target,
        size: 10,
        content_md5: Some(MD5.into()),
    }
}

fn path(c: Channel, t: &ExportTarget) -> Option<String> {
    Some(format!("Widgets/channels/{}/{}.zip", c.as_str(), t.key()))
}

fn w_paths() -> Paths {
    Paths::default()
}

fn none(_: Uuid) -> Option<IterationRef> {
    None
}

/// The MD5 of nothing, as blob storage spells a Content-MD5.
const MD5: &str = "1B2M2Y8AsgTpgAmY7PhCfg==";

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
    let c = m.rollback(Channel::Production, NOW, &none).unwrap();
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
    assert!(m.rollback(Channel::Production, NOW, &none).is_err());
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
    let paths = w_paths();
    let back = Manifest::parse("Widgets/channels.json", &bytes, m.project_id, &paths).unwrap();
    assert_eq!(back, m);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.contains("\"schema\": \"cvchain.channels/1\""),
        "{text}"
    );
    assert!(text.contains("\"mAP\": 0.8"), "{text}");
    assert!(
        text.contains(&format!("\"contentMd5\": \"{MD5}\"")),
        "{text}"
    );
    assert!(matches!(
        Manifest::parse("p", b"{not json", m.project_id, &paths),
        Err(ManifestError::NotJson { .. })
    ));
    assert!(matches!(
        Manifest::parse("p", br#"{"channels":{}}"#, m.project_id, &paths),
        Err(ManifestError::NotOurs { .. })
    ));
    let e =
        Manifest::parse("Widgets/channels.json", &bytes, Uuid::from_u128(7), &paths).unwrap_err();
    assert!(matches!(e, ManifestError::OtherProject { .. }));
    assert!(
        e.to_string()
            .starts_with("Widgets/channels.json is the manifest of project")
    );
}

#[test]
fn paths_render_like_release_paths() {
    let paths = Paths::default();
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

/// A change to a manifest's JSON.
type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;

/// A manifest with both channels on the second of two iterations, for both targets.
fn full() -> Manifest {
    let mut m = manifest();
    for i in [it(1, 1, 0.8), it(2, 2, 0.9)] {
        m.gate_passed(&i, NOW);
        m.released(
            &i,
            &[release(onnx(), &i), release(tflite(), &i)],
            &path,
            NOW,
        );
    }
    m
}

/// The manifest as JSON, changed by `f`, parsed back.
fn reparse(m: &Manifest, f: impl Fn(&mut serde_json::Value)) -> Result<Manifest, ManifestError> {
    let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
    f(&mut v);
    Manifest::parse(
        "Widgets/channels.json",
        &serde_json::to_vec(&v).unwrap(),
        m.project_id,
        &w_paths(),
    )
}

#[test]
fn a_manifest_out_of_its_bounds_is_refused_naming_the_blob_and_the_field() {
    let m = full();
    assert_eq!(reparse(&m, |_| {}).unwrap(), m);
    let onnx = |v: &mut serde_json::Value| -> serde_json::Value {
        v["channels"]["production"]["targets"]["ONNX"].take()
    };
    let set = |field: &'static str, value: serde_json::Value| {
        move |v: &mut serde_json::Value| {
            let mut e = onnx(v);
            e[field] = value.clone();
            v["channels"]["production"]["targets"]["ONNX"] = e;
        }
    };
    let gadgets = "Gadgets/Iteration-2/ONNX.zip".to_owned();
    let cases: Vec<(&str, Edit)> = vec![
        ("revision", Box::new(|v| v["revision"] = u64::MAX.into())),
        (
            "revision",
            Box::new(|v| v["revision"] = (MAX_REVISION + 1).into()),
        ),
        (
            "productionPointer.revision",
            Box::new(|v| v["productionPointer"]["revision"] = 99.into()),
        ),
        (
            "channels.production.targets.ONNX.revision",
            Box::new(set("revision", 99.into())),
        ),
        (
            "channels.production.targets.ONNX.releasePath",
            Box::new(set("releasePath", gadgets.clone().into())),
        ),
        (
            "channels.production.targets.ONNX.releasePath",
            Box::new(set(
                "releasePath",
                "Widgets/Iteration-2/../../Gadgets/ONNX.zip".into(),
            )),
        ),
        (
            "channels.production.targets.ONNX.channelPath",
            Box::new(set(
                "channelPath",
                "Gadgets/channels/production/ONNX.zip".into(),
            )),
        ),
        (
            "channels.production.targets.ONNX.size",
            Box::new(set("size", u64::MAX.into())),
        ),
        (
            "channels.production.targets.ONNX.contentMd5",
            Box::new(set("contentMd5", "not an md5".into())),
        ),
        (
            "channels.production.targets.ONNX.iteration.mAP",
            Box::new(|v| {
                let mut e = onnx(v);
                e["iteration"]["mAP"] = 1.5.into();
                v["channels"]["production"]["targets"]["ONNX"] = e;
            }),
        ),
        (
            "channels.production.targets.ONNX.iteration.id",
            Box::new(|v| {
                let mut e = onnx(v);
                e["iteration"]["id"] = Uuid::nil().to_string().into();
                v["channels"]["production"]["targets"]["ONNX"] = e;
            }),
        ),
        (
            "channels.production.targets.ONNX.previous",
            Box::new(set(
                "previous",
                serde_json::to_value(it(7, 7, 0.5)).unwrap(),
            )),
        ),
        (
            "channels.production.targets.ONNX.history",
            Box::new(|v| {
                let mut e = onnx(v);
                let h = e["history"][0].clone();
                e["history"] = vec![h; HISTORY_DEPTH + 1].into();
                v["channels"]["production"]["targets"]["ONNX"] = e;
            }),
        ),
        (
            "channels.production.targets.ONNX",
            Box::new(set("platform", "CoreML".into())),
        ),
        (
            "channels.production.vetoed",
            Box::new(|v| {
                v["channels"]["production"]["vetoed"] = (0..=VETO_DEPTH as u128)
                    .map(|n| Uuid::from_u128(n + 1000).to_string())
                    .collect::<Vec<_>>()
                    .into()
            }),
        ),
        (
            "projectName",
            Box::new(|v| v["projectName"] = "Gadgets".into()),
        ),
        (
            "updatedAt",
            Box::new(|v| v["updatedAt"] = "yesterday".into()),
        ),
    ];
    for (field, change) in cases {
        let e = reparse(&m, change).unwrap_err();
        let ManifestError::Invalid {
            path, field: got, ..
        } = &e
        else {
            panic!("{field}: {e:?}");
        };
        assert_eq!(
            (path.as_str(), got.as_str()),
            ("Widgets/channels.json", field)
        );
        assert!(
            e.to_string()
                .starts_with("Widgets/channels.json cannot be used: "),
            "{e}"
        );
    }
    // The id-qualified manifest of a project whose name another project holds is fine.
    let qualified = format!("Widgets-{}/channels.json", m.project_id);
    assert!(Manifest::parse(&qualified, &m.to_json(), m.project_id, &w_paths()).is_ok());
}

#[test]
fn a_manifest_larger_than_any_cvchain_writes_is_refused_unread() {
    let m = full();
    let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
    v["channels"]["production"]["targets"]["ONNX"]["note"] =
        "x".repeat(MAX_MANIFEST_BYTES as usize).into();
    let bytes = serde_json::to_vec(&v).unwrap();
    let e = Manifest::parse("Widgets/channels.json", &bytes, m.project_id, &w_paths()).unwrap_err();
    assert!(
        matches!(e, ManifestError::TooLarge { size, limit, .. }
            if size == bytes.len() as u64 && limit == MAX_MANIFEST_BYTES),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with("Widgets/channels.json is larger"),
        "{e}"
    );
    // The largest manifest cvchain writes stays below the bound: a dozen targets (more than
    // Custom Vision's platforms and flavors), both channels, full histories, and names as long
    // as a manifest may hold (longer ones are cut).
    let mut m = manifest();
    let targets: Vec<ExportTarget> = (0..12)
        .map(|n| ExportTarget {
            platform: format!("Platform{n}"),
            flavor: Some(format!("Flavor{n}")),
        })
        .collect();
    for n in 1..=(HISTORY_DEPTH as u8 + 3) {
        let mut i = it(n.into(), n, 0.5);
        i.name = "N".repeat(5000);
        m.gate_passed(&i, NOW);
        let rs: Vec<Release> = targets.iter().map(|t| release(t.clone(), &i)).collect();
        m.released(&i, &rs, &path, NOW);
    }
    let size = m.to_json().len() as u64;
    assert!(size < MAX_MANIFEST_BYTES, "{size}");
    assert!(reparse(&m, |_| {}).is_ok());
}

#[test]
fn revisions_never_overflow() {
    let mut m = manifest();
    m.revision = u64::MAX;
    let two = it(2, 2, 0.8);
    m.gate_passed(&two, NOW);
    m.released(&two, &[release(onnx(), &two)], &path, NOW);
    assert_eq!(m.revision, u64::MAX);
    // Such a manifest is never read back.
    assert!(matches!(
        Manifest::parse(
            "Widgets/channels.json",
            &m.to_json(),
            m.project_id,
            &w_paths()
        ),
        Err(ManifestError::Invalid { .. })
    ));
}

#[test]
fn release_paths_are_told_whatever_the_iteration_was_called() {
    let paths = w_paths();
    let (p, i) = (Uuid::from_u128(99), Uuid::from_u128(5));
    let ours = |path: &str, t: &ExportTarget| paths.is_release_path(p, "Widgets", i, t, path);
    assert!(ours("Widgets/Iteration-5/ONNX.zip", &onnx()));
    assert!(ours("Widgets/Renamed_later.v2/ONNX.zip", &onnx()));
    assert!(ours(
        &format!("Widgets-{p}/Iteration-5-{i}/ONNX.zip"),
        &onnx()
    ));
    // A name that sanitizes to nothing is replaced by the id.
    assert!(ours(&format!("Widgets/{i}/ONNX.zip"), &onnx()));
    assert!(ours(&format!("Widgets-{p}/{i}/ONNX.zip"), &onnx()));
    // A target without a flavor matches an export of its platform with any flavor.
    assert!(ours("Widgets/It/ONNX-Flavored.zip", &onnx()));
    assert!(ours("Widgets/It/TensorFlow-TensorFlowLite.zip", &tflite()));
    assert!(!ours("Widgets/It/TensorFlow-Other.zip", &tflite()));
    for foreign in [
        "Gadgets/Iteration-5/ONNX.zip",
        "Widgets/Iteration-5/CoreML.zip",
        "Widgets/a/b/ONNX.zip",
        "Widgets/../ONNX.zip",
        "Widgets//ONNX.zip",
        "Widgets/Iteration-5/ONNX.zip.exe",
    ] {
        assert!(!ours(foreign, &onnx()), "{foreign}");
    }
    // Another project's or another iteration's qualified path.
    let other = Uuid::from_u128(7);
    assert!(!ours(
        &format!("Widgets-{other}/Iteration-5-{i}/ONNX.zip"),
        &onnx()
    ));
    assert!(!ours(
        &format!("Widgets-{p}/Iteration-5-{other}/ONNX.zip"),
        &onnx()
    ));
}

#[test]
fn an_entry_keeps_its_place_and_a_race_loser_is_moved_under_a_new_revision() {
    let mut m = manifest();
    let (one, two, three) = (it(1, 1, 0.8), it(2, 2, 0.85), it(3, 3, 0.9));
    m.released(&one, &[release(onnx(), &one)], &path, NOW);
    let plain = path(Channel::Latest, &onnx()).unwrap();
    let qualified = format!("Widgets-{}/channels/latest/ONNX.zip", m.project_id);
    // The first copy lost the plain path to another project of the same name.
    let before = m.revision;
    assert!(m.relocate(Channel::Latest, &onnx(), &plain, &qualified, NOW));
    assert_eq!(m.revision, before + 1);
    let e = m.entry(Channel::Latest, &onnx()).unwrap();
    assert_eq!(e.holder.channel_path, qualified);
    // The move keeps its own revision (its history row's key).
    assert_eq!(e.holder.revision, before);
    // Done already by another writer: nothing to do.
    assert!(!m.relocate(Channel::Latest, &onnx(), &plain, &qualified, NOW));
    // Later moves stay at the entry's place, whatever a fresh path would be.
    let c = m.released(&two, &[release(onnx(), &two)], &path, NOW);
    assert_eq!(c.moves[0].to.channel_path, qualified);
    let c = m.promote(
        Channel::Latest,
        &three,
        &[release(onnx(), &three)],
        &path,
        "x",
        NOW,
    );
    assert_eq!(c.moves[0].to.channel_path, qualified);
    // A rollback too, although the previous holder was copied to the plain path.
    let c = m.rollback(Channel::Latest, NOW, &none).unwrap();
    assert_eq!(c.moves[0].to.iteration.id, two.id);
    assert_eq!(c.moves[0].to.channel_path, qualified);
    assert!(reparse(&m, |_| {}).is_ok());
}

#[test]
fn a_move_that_could_not_happen_is_withdrawn_unless_a_later_one_replaced_it() {
    let mut m = manifest();
    let (one, two) = (it(1, 1, 0.8), it(2, 2, 0.9));
    let first = m.released(&one, &[release(onnx(), &one)], &path, NOW);
    let r1 = first.moves[0].to.revision;
    let second = m.released(&two, &[release(onnx(), &two)], &path, NOW);
    let r2 = second.moves[0].to.revision;
    // Not the holder (another iteration or revision): nothing.
    assert!(!m.withdraw(Channel::Latest, &onnx(), one.id, r1, NOW));
    assert!(!m.withdraw(Channel::Latest, &onnx(), two.id, r1, NOW));
    assert!(!m.withdraw(Channel::Production, &onnx(), two.id, r2, NOW));
    let before = m.revision;
    assert!(m.withdraw(Channel::Latest, &onnx(), two.id, r2, NOW));
    assert_eq!(m.revision, before + 1);
    let e = m.entry(Channel::Latest, &onnx()).unwrap();
    assert_eq!(e.holder.iteration.id, one.id);
    assert_eq!(e.holder.revision, r1);
    assert!(e.history.is_empty() && e.previous.is_none());
    // A first move withdrawn leaves no entry.
    assert!(m.withdraw(Channel::Latest, &onnx(), one.id, r1, NOW));
    assert!(m.entry(Channel::Latest, &onnx()).is_none());
    assert!(reparse(&m, |_| {}).is_ok());
    // And the iteration moves again on its next release.
    assert_eq!(
        m.released(&two, &[release(onnx(), &two)], &path, NOW)
            .moves
            .len(),
        1
    );
}

fn step(project: Uuid, iteration: Uuid, target: &ExportTarget, path: &str) -> StepRow {
    let mut row = crate::history::step_row(
        project,
        iteration,
        0,
        target,
        crate::chain::EntryState::Done,
    );
    row.properties.set(Prop::ReleasePath, path);
    StepRow::from_row(&row)
}

fn copy_meta(project: Uuid, iteration: Uuid) -> std::collections::HashMap<String, String> {
    [
        ("projectid".to_owned(), project.to_string()),
        ("IterationId".to_owned(), iteration.to_string()),
    ]
    .into_iter()
    .collect()
}

#[test]
fn a_release_is_checked_against_the_history_and_the_copy() {
    let (p, i, other) = (Uuid::from_u128(99), Uuid::from_u128(5), Uuid::from_u128(7));
    let at = "Widgets/Iteration-5/ONNX.zip";
    let steps = vec![step(p, i, &onnx(), at)];
    let meta = copy_meta(p, i);
    assert_eq!(
        verify_release(p, i, &onnx(), at, &steps, Some(&meta)),
        Ok(())
    );
    // Another iteration (another project's, or one that never was): nothing recorded.
    let e = verify_release(p, other, &onnx(), at, &steps, Some(&meta)).unwrap_err();
    assert!(matches!(e, Mismatch::NotReleased { .. }), "{e}");
    assert!(e.to_string().contains(&other.to_string()), "{e}");
    // Another target of a released iteration.
    assert!(matches!(
        verify_release(p, i, &tflite(), at, &steps, Some(&meta)),
        Err(Mismatch::NotReleased { .. })
    ));
    // Another path than the one recorded.
    let e =
        verify_release(p, i, &onnx(), "Widgets/Other/ONNX.zip", &steps, Some(&meta)).unwrap_err();
    assert!(matches!(e, Mismatch::OtherPath { .. }), "{e}");
    assert!(e.to_string().contains(at), "{e}");
    // A copy gone, or one someone replaced with another's model.
    assert!(matches!(
        verify_release(p, i, &onnx(), at, &steps, None),
        Err(Mismatch::CopyGone { .. })
    ));
    let e = verify_release(p, i, &onnx(), at, &steps, Some(&copy_meta(other, i))).unwrap_err();
    assert!(matches!(e, Mismatch::CopyOfAnother { .. }), "{e}");
    let e = verify_release(
        p,
        i,
        &onnx(),
        at,
        &steps,
        Some(&std::collections::HashMap::new()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("names project none"), "{e}");
}

#[test]
fn rollback_names_the_iterations_as_the_history_does() {
    let mut m = full();
    let recorded = |id: Uuid| {
        (id == Uuid::from_u128(1)).then(|| IterationRef {
            name: "Iteration 1 (recorded)".into(),
            ..it(1, 1, 0.8)
        })
    };
    let c = m.rollback(Channel::Production, NOW, &recorded).unwrap();
    assert_eq!(c.pointer.unwrap().to.name, "Iteration 1 (recorded)");
    assert!(
        c.moves
            .iter()
            .all(|mv| mv.to.iteration.name == "Iteration 1 (recorded)")
    );
    assert_eq!(
        m.production_pointer.unwrap().iteration.name,
        "Iteration 1 (recorded)"
    );
}

#[test]
fn vetoes_stay_bounded() {
    let mut m = manifest();
    for n in 1..=(2 * VETO_DEPTH as u128) {
        let i = it(n, 1, 0.5);
        m.promote(Channel::Latest, &i, &[release(onnx(), &i)], &path, "x", NOW);
        let _ = m.rollback(Channel::Latest, NOW, &none);
    }
    let vetoed = &m.channels[&Channel::Latest].vetoed;
    assert!(vetoed.len() <= VETO_DEPTH, "{}", vetoed.len());
}

#[test]
fn a_failed_move_is_a_row_and_a_line_until_a_later_move() {
    let p = Uuid::from_u128(99);
    let two = it(2, 2, 0.9);
    let f = FailedMove {
        channel: Some(Channel::Latest),
        target: Some(onnx()),
        iteration: two.clone(),
        release_path: Some("Widgets/Iteration-2/ONNX.zip".into()),
        channel_path: Some("Widgets/channels/latest/ONNX.zip".into()),
        reason: "both paths hold someone else's blobs".into(),
        transient: false,
    };
    assert!(f.describe().starts_with("latest ONNX → Iteration 2 failed"));
    let row = failed_move_row(p, &f, NOW);
    assert_eq!(row.kind(), Some(RowKind::ChannelMoveFailed));
    assert_eq!(
        row.row_key,
        format!("ChannelMoveFailed_latest_ONNX_{}", two.id)
    );
    // The same failure again is the same row.
    assert_eq!(failed_move_row(p, &f, NOW).row_key, row.row_key);
    let pointer = failed_move_row(
        p,
        &FailedMove {
            channel: None,
            target: None,
            ..f.clone()
        },
        NOW,
    );
    assert_eq!(
        pointer.row_key,
        format!("ChannelMoveFailed_any_pointer_{}", two.id)
    );
    // Listed until a later move of that channel and target.
    let open = FailedMoveRow::open(std::slice::from_ref(&row));
    assert_eq!(open.len(), 1);
    assert!(
        open[0].describe().contains("both paths hold"),
        "{}",
        open[0].describe()
    );
    let mut later = manifest();
    let mv = later
        .released(
            &two,
            &[release(onnx(), &two)],
            &path,
            NOW + time::Duration::minutes(1),
        )
        .moves
        .remove(0);
    let moved = move_row(p, &mv);
    assert!(FailedMoveRow::open(&[row.clone(), moved]).is_empty());
    // A move of another target does not.
    let mut other = manifest();
    let mv = other
        .released(
            &two,
            &[release(tflite(), &two)],
            &path,
            NOW + time::Duration::minutes(1),
        )
        .moves
        .remove(0);
    assert_eq!(FailedMoveRow::open(&[row, move_row(p, &mv)]).len(), 1);
}

#[test]
fn a_new_entry_without_a_place_does_not_move_and_the_other_channel_does() {
    let mut m = manifest();
    let two = it(2, 2, 0.9);
    m.gate_passed(&two, NOW);
    // Both production paths hold someone else's blobs; latest's are free.
    let place = |c: Channel, t: &ExportTarget| match c {
        Channel::Production => None,
        Channel::Latest => path(c, t),
    };
    let c = m.released(&two, &[release(onnx(), &two)], &place, NOW);
    let moved: Vec<Channel> = c.moves.iter().map(|mv| mv.channel).collect();
    assert_eq!(moved, vec![Channel::Latest]);
    assert!(m.entry(Channel::Production, &onnx()).is_none());
    // Nothing to place and nothing else to move: no change, no new revision.
    let mut n = manifest();
    n.gate_passed(&two, NOW);
    let revision = n.revision;
    assert!(
        n.released(&two, &[release(onnx(), &two)], &|_, _| None, NOW)
            .is_empty()
    );
    assert_eq!(n.revision, revision);
}

#[test]
fn a_rollback_whose_copy_failed_is_restored_as_it_was() {
    let mut m = full();
    let before = m.clone();
    let c = m.rollback(Channel::Production, NOW, &none).unwrap();
    let mv = c.moves.iter().find(|mv| mv.target == onnx()).unwrap();
    // The rollback took the previous holder out of the history: taking it back must not pop
    // an older one, but put back the entry as it was.
    assert!(m.restore(
        Channel::Production,
        &onnx(),
        mv.to.iteration.id,
        mv.to.revision,
        before.entry(Channel::Production, &onnx()).cloned(),
        NOW,
    ));
    assert_eq!(
        m.entry(Channel::Production, &onnx()),
        before.entry(Channel::Production, &onnx())
    );
    // Only while the entry still holds that move.
    assert!(!m.restore(
        Channel::Production,
        &onnx(),
        mv.to.iteration.id,
        mv.to.revision,
        None,
        NOW,
    ));
    // The other target stays rolled back.
    assert_eq!(
        holder(&m, Channel::Production, &tflite()),
        Some(Uuid::from_u128(1))
    );
    assert!(reparse(&m, |_| {}).is_ok());
}
