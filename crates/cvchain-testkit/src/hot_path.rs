//! The work cvchain does per notification besides I/O, as one function for the criterion bench,
//! the allocation count and callgrind: decode the host's envelope, parse the message, plan, build
//! the history and step rows as the table requests carry them, and encode the answer.

use cvchain_azure::history::{props_to_entity, to_entity};
use cvchain_core::chain::{parse_chain, plan_chain};
use cvchain_core::config::ChainSettings;
use cvchain_core::customvision::{Export, Iteration, IterationPerformance, Project};
use cvchain_core::envelope::{
    InvocationResponse, TRIGGER_BINDING, decode_queue_invocation, encode_queue_invocation,
};
use cvchain_core::message::{Incoming, Received};
use cvchain_core::plan::{Action, Observed, PlanConfig, StepWrite, plan, step_writes};
use time::OffsetDateTime;
use uuid::Uuid;

pub const PROJECT: &str = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f";
pub const ITERATION: &str = "3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d";

/// A notification as the host POSTs it.
pub struct Case {
    pub name: &'static str,
    pub body: Vec<u8>,
}

/// The three messages of a trained and exported iteration, in the host's envelope.
pub fn cases() -> Vec<Case> {
    let training = format!(
        r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","trainingStatus":"TrainingCompleted"}}}}"#
    );
    let export = |platform: &str| {
        format!(
            r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{PROJECT}","iterationId":"{ITERATION}","exportStatus":"ExportCompleted","modelUri":"https://acct.blob.core.windows.net/cvbackups/{PROJECT}%20-%20{ITERATION}.{platform}"}}}}"#
        )
    };
    [
        ("TrainingCompleted", training),
        ("ExportCompleted", export("ONNX")),
    ]
    .into_iter()
    .map(|(name, text)| Case {
        name,
        body: encode_queue_invocation(
            &text,
            "3f1c9a52-4a6e-4c1e-9f0b-6d2b8e7a1c55",
            1,
            OffsetDateTime::UNIX_EPOCH,
            Uuid::nil(),
        )
        .into_bytes(),
    })
    .collect()
}

/// Settings as the suite's runs use them.
pub fn config() -> PlanConfig {
    PlanConfig {
        poison_queue: "cvchain-notifications-poison".into(),
        chain: ChainSettings {
            exports: parse_chain("ONNX,TensorFlow,CoreML").unwrap(),
            publish: None,
        },
        custom_vision: true,
        backup_container: Some(
            url::Url::parse("https://acct.blob.core.windows.net/cvbackups").unwrap(),
        ),
        projects: None,
        lifecycle: Default::default(),
    }
}

/// What Custom Vision answered for the iteration (two exports done).
pub fn observed() -> Observed {
    let p = Uuid::parse_str(PROJECT).unwrap();
    let i = Uuid::parse_str(ITERATION).unwrap();
    let export = |platform: &str| Export {
        platform: platform.into(),
        status: "Done".into(),
        download_uri: Some(format!(
            "https://irisprodeu.blob.core.windows.net/m/{p}/{i}/{platform}.zip?sv=2020&sig=x"
        )),
        flavor: None,
        newer_version_available: false,
        decode_notes: Vec::new(),
    };
    Observed {
        project: Some(Project {
            id: p,
            name: "Widgets".into(),
            ..Default::default()
        }),
        iteration: Some(Iteration {
            id: i,
            name: "Iteration 3".into(),
            status: "Completed".into(),
            trained_at: Some("2026-11-26T09:58:00Z".into()),
            training_time_in_minutes: Some(4),
            exportable: true,
            exportable_to: vec!["ONNX".into(), "TensorFlow".into(), "CoreML".into()],
            ..Default::default()
        }),
        performance: Some(IterationPerformance {
            precision: Some(0.91),
            recall: Some(0.87),
            average_precision: Some(0.93),
            ..Default::default()
        }),
        exports: Some(vec![export("ONNX"), export("TensorFlow")]),
        production: Default::default(),
        problem: None,
    }
}

/// One notification's CPU work; returns the bytes it would send, so nothing is optimised away.
pub fn process(body: &[u8], observed: &Observed, config: &PlanConfig) -> usize {
    let inv = decode_queue_invocation(body, TRIGGER_BINDING).expect("envelope");
    let now = OffsetDateTime::now_utc();
    let incoming = Incoming::decode(Received {
        text: inv.message_text,
        message_id: inv.message_id,
        dequeue_count: inv.dequeue_count,
        received_at: now,
    });
    assert!(incoming.parsed.is_ok(), "the bench's messages are valid");
    let (_, actions) = plan(&incoming, observed, config);
    let mut sent = 0;
    let mut logs = Vec::new();
    for a in actions {
        match a {
            Action::Record(row) => {
                sent += serde_json::to_vec(&to_entity(&row)).unwrap().len();
                logs.push(row.describe());
            }
            Action::Chain { project, iteration } => {
                let it = observed.iteration.as_ref().unwrap();
                let exports = observed.exports.clone().unwrap_or_default();
                let plan = plan_chain(&config.chain.exports, it, &exports, &[]);
                for w in step_writes(project, iteration, &plan, &[], now) {
                    sent += match w {
                        StepWrite::Insert(row) => serde_json::to_vec(&to_entity(&row)),
                        StepWrite::Merge { properties, .. } => {
                            serde_json::to_vec(&props_to_entity(&properties))
                        }
                    }
                    .unwrap()
                    .len();
                }
            }
            other => logs.push(format!("{other:?}")),
        }
    }
    sent + serde_json::to_vec(&InvocationResponse::with_logs(logs))
        .unwrap()
        .len()
}
