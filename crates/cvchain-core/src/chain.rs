//! The export chain: which exports the user wants, in order, and which one comes next. Pure:
//! GetExports is the source of truth, so the same inputs always give the same answer, and a
//! redelivered message or a crash between two steps never requests an export twice or skips one.

use crate::customvision::{Export, Iteration};
use std::fmt;

/// Known platforms and their flavors (the service's enums are open strings; these are the ones
/// the API reference and Microsoft's samples use).
pub const PLATFORMS: &[(&str, &[&str])] = &[
    ("CoreML", &["CoreMLFloat16"]),
    (
        "TensorFlow",
        &[
            "TensorFlowNormal",
            "TensorFlowLite",
            "TensorFlowSavedModel",
            "TensorFlowLiteFloat16",
            "TensorFlowJs",
        ],
    ),
    ("DockerFile", &["Linux", "Windows", "ARM"]),
    ("ONNX", &["ONNX10", "ONNX12", "OnnxFloat16"]),
    ("VAIDK", &[]),
    ("OpenVino", &["NoPostProcess"]),
];

/// One entry of `CVCHAIN_EXPORTS`, in the service's spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExportTarget {
    pub platform: String,
    pub flavor: Option<String>,
}

impl fmt::Display for ExportTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.flavor {
            Some(flavor) => write!(f, "{}:{flavor}", self.platform),
            None => f.write_str(&self.platform),
        }
    }
}

impl ExportTarget {
    /// An entry without a flavor accepts an export of its platform with any flavor (the service
    /// may fill in a default); an entry with one needs that flavor.
    pub fn matches(&self, export: &Export) -> bool {
        export.platform.eq_ignore_ascii_case(&self.platform)
            && match &self.flavor {
                None => true,
                Some(f) => export
                    .flavor
                    .as_deref()
                    .is_some_and(|ef| ef.eq_ignore_ascii_case(f)),
            }
    }

    /// A table-key-safe name: `TensorFlow-TensorFlowLite`.
    pub fn key(&self) -> String {
        match &self.flavor {
            Some(f) => format!("{}-{f}", self.platform),
            None => self.platform.clone(),
        }
    }
}

/// Parses `ONNX, TensorFlow:TensorFlowLite, DockerFile:Linux` (case-insensitive; `,` or `;`
/// between entries). Names are returned in the service's spelling.
pub fn parse_chain(text: &str) -> Result<Vec<ExportTarget>, String> {
    let mut out: Vec<ExportTarget> = Vec::new();
    for raw in text.split([',', ';']) {
        let entry = raw.trim();
        if entry.is_empty() {
            continue;
        }
        let (platform, flavor) = match entry.split_once(':') {
            Some((p, f)) => (p.trim(), Some(f.trim())),
            None => (entry, None),
        };
        let Some((canonical, flavors)) = PLATFORMS
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(platform))
        else {
            return Err(format!(
                "unknown platform {platform:?} in {entry:?}; known: {}",
                PLATFORMS
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let flavor = match flavor {
            None => None,
            Some("") => return Err(format!("empty flavor in {entry:?}")),
            Some(f) => match flavors.iter().find(|k| k.eq_ignore_ascii_case(f)) {
                Some(k) => Some((*k).to_owned()),
                None if flavors.is_empty() => {
                    return Err(format!("{canonical} has no flavors, found {f:?}"));
                }
                None => {
                    return Err(format!(
                        "unknown flavor {f:?} for {canonical}; known: {}",
                        flavors.join(", ")
                    ));
                }
            },
        };
        let target = ExportTarget {
            platform: (*canonical).to_owned(),
            flavor,
        };
        if out.contains(&target) {
            return Err(format!("{target} appears twice"));
        }
        out.push(target);
    }
    Ok(out)
}

/// Where one chain entry stands, according to GetExports and the iteration. Also the status of
/// its export step row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryState {
    /// Not exported yet.
    Pending,
    Exporting,
    Done,
    Failed,
    /// The iteration's domain cannot export to this platform (`exportableTo`).
    Skipped,
    /// The service refused the request for good (recorded; the chain moves on).
    Refused,
    /// GetExports reports a status the spec does not define. The chain moves on rather than
    /// wait for it forever; the step row says so, and moves to `Done` (and the model is
    /// released) if the export later reports it.
    Unknown,
}

impl EntryState {
    pub const ALL: [EntryState; 7] = [
        EntryState::Pending,
        EntryState::Exporting,
        EntryState::Done,
        EntryState::Failed,
        EntryState::Skipped,
        EntryState::Refused,
        EntryState::Unknown,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            EntryState::Pending => "Pending",
            EntryState::Exporting => "Exporting",
            EntryState::Done => "Done",
            EntryState::Failed => "Failed",
            EntryState::Skipped => "Skipped",
            EntryState::Refused => "Refused",
            EntryState::Unknown => "Unknown",
        }
    }

    /// Done, failed or skipped: nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            EntryState::Done | EntryState::Failed | EntryState::Skipped | EntryState::Refused
        )
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// No chain configured.
    Empty,
    /// Request this export now.
    Request(ExportTarget),
    /// This export is running; its notification moves the chain on.
    Wait(ExportTarget),
    /// Every entry is done, failed or skipped.
    Complete,
    /// The iteration exports nothing (not trained on a compact domain): recorded, not retried.
    NotExportable(String),
    /// The iteration is not trained yet as far as the service says: retry later.
    NotReady(String),
}

/// The chain's state and the next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPlan {
    pub entries: Vec<(ExportTarget, EntryState)>,
    pub next: Next,
}

/// Decides the next export from the chain, the iteration and GetExports. Entries run one at a
/// time, in order: an entry that is exporting holds back the ones after it. `refused` are
/// entries the service refused earlier (from their step rows): they are not asked again.
pub fn plan_chain(
    chain: &[ExportTarget],
    iteration: &Iteration,
    exports: &[Export],
    refused: &[ExportTarget],
) -> ChainPlan {
    if chain.is_empty() {
        return ChainPlan {
            entries: Vec::new(),
            next: Next::Empty,
        };
    }
    if !iteration.status.eq_ignore_ascii_case("Completed") {
        return ChainPlan {
            entries: Vec::new(),
            next: Next::NotReady(format!(
                "iteration status is {:?}, not Completed",
                iteration.status
            )),
        };
    }
    if !iteration.exportable {
        return ChainPlan {
            entries: chain
                .iter()
                .map(|t| (t.clone(), EntryState::Skipped))
                .collect(),
            next: Next::NotExportable(
                "the iteration is not exportable (train it on a compact domain)".into(),
            ),
        };
    }
    let entries: Vec<(ExportTarget, EntryState)> = chain
        .iter()
        .map(|t| {
            let state = match exports.iter().find(|e| t.matches(e)) {
                Some(e) if e.is_done() => EntryState::Done,
                Some(e) if e.is_failed() => EntryState::Failed,
                Some(e) if e.is_unknown_status() => EntryState::Unknown,
                Some(_) => EntryState::Exporting,
                None if !iteration.can_export_to(&t.platform) => EntryState::Skipped,
                None if refused.contains(t) => EntryState::Refused,
                None => EntryState::Pending,
            };
            (t.clone(), state)
        })
        .collect();
    let next = entries
        .iter()
        .find_map(|(t, s)| match s {
            EntryState::Exporting => Some(Next::Wait(t.clone())),
            EntryState::Pending => Some(Next::Request(t.clone())),
            _ => None,
        })
        .unwrap_or(Next::Complete);
    ChainPlan { entries, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_export_status_does_not_hold_the_chain() {
        let chain = chain();
        let it = iteration();
        let exports = [export("ONNX", None, "Queued")];
        let plan = plan3(&chain, &it, &exports);
        assert_eq!(plan.entries[0].1, EntryState::Unknown);
        assert!(!EntryState::Unknown.is_final(), "it may still turn Done");
        assert_eq!(plan.next, Next::Request(chain[1].clone()));
        // Once it reports Done, it is done.
        let exports = [export("ONNX", None, "done")];
        assert_eq!(plan3(&chain, &it, &exports).entries[0].1, EntryState::Done);
    }

    fn t(p: &str, f: Option<&str>) -> ExportTarget {
        ExportTarget {
            platform: p.into(),
            flavor: f.map(Into::into),
        }
    }

    fn plan3(chain: &[ExportTarget], it: &Iteration, exports: &[Export]) -> ChainPlan {
        plan_chain(chain, it, exports, &[])
    }

    fn chain() -> Vec<ExportTarget> {
        parse_chain("onnx, TensorFlow:tensorflowlite; DockerFile:Linux").unwrap()
    }

    fn iteration() -> Iteration {
        Iteration {
            name: "Iteration 1".into(),
            status: "Completed".into(),
            exportable: true,
            exportable_to: vec![
                "ONNX".into(),
                "DockerFile".into(),
                "TensorFlow".into(),
                "CoreML".into(),
            ],
            ..Default::default()
        }
    }

    fn export(p: &str, f: Option<&str>, status: &str) -> Export {
        Export {
            platform: p.into(),
            flavor: f.map(Into::into),
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_chain_setting_parses_case_insensitively_into_service_spelling() {
        assert_eq!(
            chain(),
            vec![
                t("ONNX", None),
                t("TensorFlow", Some("TensorFlowLite")),
                t("DockerFile", Some("Linux")),
            ]
        );
        assert_eq!(parse_chain("").unwrap(), vec![]);
        assert_eq!(parse_chain(" , ").unwrap(), vec![]);
        assert_eq!(chain()[1].to_string(), "TensorFlow:TensorFlowLite");
        assert_eq!(chain()[1].key(), "TensorFlow-TensorFlowLite");
    }

    #[test]
    fn bad_chain_settings_say_what_is_wrong() {
        for (text, want) in [
            ("ONX", "unknown platform \"ONX\""),
            ("ONNX:ONNX99", "unknown flavor \"ONNX99\" for ONNX"),
            ("VAIDK:x", "VAIDK has no flavors"),
            ("ONNX:", "empty flavor"),
            ("onnx, ONNX", "ONNX appears twice"),
        ] {
            let e = parse_chain(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_fresh_iteration_requests_the_first_entry() {
        let plan = plan3(&chain(), &iteration(), &[]);
        assert_eq!(plan.next, Next::Request(t("ONNX", None)));
        assert!(plan.entries.iter().all(|(_, s)| *s == EntryState::Pending));
    }

    #[test]
    fn each_finished_export_moves_to_the_next_failed_or_not() {
        let plan = plan3(&chain(), &iteration(), &[export("ONNX", None, "Done")]);
        assert_eq!(
            plan.next,
            Next::Request(t("TensorFlow", Some("TensorFlowLite")))
        );
        let plan = plan3(
            &chain(),
            &iteration(),
            &[
                export("ONNX", None, "Done"),
                export("TensorFlow", Some("TensorFlowLite"), "Failed"),
            ],
        );
        assert_eq!(plan.next, Next::Request(t("DockerFile", Some("Linux"))));
        assert_eq!(plan.entries[1].1, EntryState::Failed);
    }

    #[test]
    fn a_running_export_holds_the_chain() {
        let plan = plan3(&chain(), &iteration(), &[export("onnx", None, "Exporting")]);
        assert_eq!(plan.next, Next::Wait(t("ONNX", None)));
    }

    #[test]
    fn a_redelivered_message_never_requests_twice() {
        // Whatever message triggers it, the same GetExports gives the same answer.
        let exports = [
            export("ONNX", None, "Done"),
            export("TensorFlow", Some("TensorFlowLite"), "Exporting"),
        ];
        for _ in 0..3 {
            assert_eq!(
                plan3(&chain(), &iteration(), &exports).next,
                Next::Wait(t("TensorFlow", Some("TensorFlowLite")))
            );
        }
    }

    #[test]
    fn a_complete_chain_does_nothing() {
        let exports = [
            export("ONNX", Some("ONNX12"), "Done"),
            export("TensorFlow", Some("TensorFlowLite"), "Done"),
            export("DockerFile", Some("Linux"), "Failed"),
        ];
        let plan = plan3(&chain(), &iteration(), &exports);
        assert_eq!(plan.next, Next::Complete);
    }

    #[test]
    fn entries_the_iteration_cannot_export_to_are_skipped() {
        let mut it = iteration();
        it.exportable_to = vec!["DockerFile".into()];
        let plan = plan3(&chain(), &it, &[]);
        assert_eq!(plan.entries[0].1, EntryState::Skipped);
        assert_eq!(plan.entries[1].1, EntryState::Skipped);
        assert_eq!(plan.next, Next::Request(t("DockerFile", Some("Linux"))));
        // All skipped: complete.
        it.exportable_to = vec!["CoreML".into()];
        assert_eq!(plan3(&chain(), &it, &[]).next, Next::Complete);
    }

    #[test]
    fn a_flavor_must_match_but_no_flavor_matches_any() {
        // TensorFlow without the configured flavor does not count as the TensorFlowLite entry.
        let plan = plan3(
            &chain(),
            &iteration(),
            &[
                export("ONNX", Some("ONNX10"), "Done"),
                export("TensorFlow", Some("TensorFlowNormal"), "Done"),
            ],
        );
        assert_eq!(
            plan.next,
            Next::Request(t("TensorFlow", Some("TensorFlowLite")))
        );
        assert_eq!(plan.entries[0].1, EntryState::Done);
    }

    #[test]
    fn a_refused_entry_is_not_asked_again_and_the_chain_moves_on() {
        let plan = plan_chain(
            &chain(),
            &iteration(),
            &[export("ONNX", None, "Done")],
            &[t("TensorFlow", Some("TensorFlowLite"))],
        );
        assert_eq!(plan.entries[1].1, EntryState::Refused);
        assert_eq!(plan.next, Next::Request(t("DockerFile", Some("Linux"))));
    }

    #[test]
    fn empty_chain_and_unusable_iterations() {
        assert_eq!(plan3(&[], &iteration(), &[]).next, Next::Empty);
        let mut it = iteration();
        it.exportable = false;
        let plan = plan3(&chain(), &it, &[]);
        assert!(matches!(plan.next, Next::NotExportable(_)));
        assert!(plan.entries.iter().all(|(_, s)| *s == EntryState::Skipped));
        let mut it = iteration();
        it.status = "Training".into();
        assert!(matches!(plan3(&chain(), &it, &[]).next, Next::NotReady(_)));
    }
}
