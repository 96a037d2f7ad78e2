//! The same message delivered to two instances at the same moment: one export request, one copy,
//! no conflicting rows. Claims are conditional writes, and a crashed holder's claim expires.

use cvchain_azure::history::claims::Claims;
use cvchain_azure::storage::clients::StorageClients;
use cvchain_core::claims::{ClaimKey, Purpose};
use cvchain_standin::{COMPACT_DOMAIN, Standin, StandinConfig};
use cvchain_testkit::{Azurite, Handler, StandinApi, host_envelope, standin_calls, unique};
use std::time::Duration;

const KEY: &str = "concurrency-key";

fn key(row_key: &str) -> ClaimKey {
    ClaimKey {
        partition_key: "p".into(),
        row_key: row_key.into(),
        purpose: Purpose::ExportRequest,
    }
}

#[tokio::test]
async fn one_claim_at_a_time_and_an_expired_claim_is_taken_over_once() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table = unique("Claims");
    let claims = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(60));
    let first = claims.acquire(&key("Claim_x")).await.unwrap().unwrap();
    assert!(claims.acquire(&key("Claim_x")).await.unwrap().is_none());
    claims.release(&first).await.unwrap();
    let again = claims.acquire(&key("Claim_x")).await.unwrap();
    assert!(again.is_some());

    // A holder that crashed: its one-second claim expires, then ten contenders race for it.
    let short = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(1));
    let crashed = short.acquire(&key("Claim_y")).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(60));
        tasks.push(tokio::spawn(async move {
            c.acquire(&key("Claim_y")).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    // The crashed holder's late release does not free the new holder's claim.
    claims.release(&crashed).await.unwrap();
    assert!(claims.acquire(&key("Claim_y")).await.unwrap().is_none());
}

/// A claim taken well before its work begins (a copy reads its source beside taking its claim;
/// taking a claim over takes three round trips) is renewed on its own clock, not the work's:
/// its first renewal comes a third of its life after it was written, at once if that is past.
#[tokio::test]
async fn a_claim_taken_before_its_work_begins_is_renewed_in_time() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let table = unique("Claims");
    let claims = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(3));
    let taken = tokio::time::Instant::now();
    let claim = claims.acquire(&key("Claim_z")).await.unwrap().unwrap();
    // Its work begins two and a half seconds into its three-second life.
    tokio::time::sleep_until(taken + Duration::from_millis(2500)).await;
    let contender = Claims::new(clients.table(&table).unwrap(), Duration::from_secs(60));
    let work = async {
        // Past the expiry the claim was written with: renewed by now, so not taken over.
        tokio::time::sleep_until(taken + Duration::from_millis(3300)).await;
        let rival = contender.acquire(&key("Claim_z")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        rival
    };
    let (rival, held) = claims.hold_keep(claim, work).await.unwrap();
    assert!(rival.is_none(), "a live holder's claim was taken over");
    claims.release(&held).await.unwrap();
}

#[tokio::test]
async fn two_instances_given_the_same_messages_request_and_copy_once() {
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    let standin = Standin::start(StandinConfig {
        training_key: KEY.into(),
        storage: Some(clients.clone()),
        train_delay: Duration::from_millis(10),
        export_delay: Duration::from_millis(10),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = unique("History");
    let backup = format!(
        "http://127.0.0.1:{}/devstoreaccount1/cvbackups",
        azurite.blob_port
    );
    let env = vec![
        ("CVCHAIN_STORAGE", azurite.connection_string()),
        ("CVCHAIN_QUEUE", unique("q")),
        ("CVCHAIN_HISTORY_TABLE", table.clone()),
        ("CUSTOM_VISION_ENDPOINT", standin.endpoint()),
        ("CUSTOM_VISION_TRAINING_KEY", KEY.into()),
        ("CVCHAIN_EXPORTS", "ONNX".into()),
        ("CVCHAIN_BACKUP_CONTAINER", backup.clone()),
    ];
    let a = Handler::start(&env);
    let b = Handler::start(&env);
    let http = reqwest::Client::new();
    let api = StandinApi::with_storage(&standin.endpoint(), KEY, &clients);
    let pid = api
        .create_project(&[
            ("name", "Race"),
            ("domainId", COMPACT_DOMAIN),
            ("exportModelContainerUri", backup.as_str()),
        ])
        .await;

    let deliver_to_both = |text: String, id: String| {
        let (ua, ub) = (
            a.url("/CustomVisionNotification"),
            b.url("/CustomVisionNotification"),
        );
        let http = http.clone();
        async move {
            let body = host_envelope(&text, &id, 1);
            let (ra, rb) = tokio::join!(
                http.post(ua.clone()).body(body.clone()).send(),
                http.post(ub).body(body).send()
            );
            let mut logs = String::new();
            let mut retry = false;
            for r in [ra.unwrap(), rb.unwrap()] {
                // The loser of a claim asks the host to retry (500); the retry finds the work
                // done and changes nothing.
                match r.status().as_u16() {
                    200 => logs.push_str(&r.text().await.unwrap()),
                    500 => retry = true,
                    other => panic!("unexpected {other}"),
                }
            }
            if retry {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let body = host_envelope(&text, &id, 2);
                let r = http.post(ua).body(body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                logs.push_str(&r.text().await.unwrap());
            }
            logs
        }
    };

    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let iid = api.train(pid).await.to_string();
        // Wait for the training to complete, as the notification would say.
        api.wait_for(&format!("projects/{pid}/iterations/{iid}"), |it| {
            it["status"] == "Completed"
        })
        .await;
        let trained = format!(
            r#"{{"version":"1.0","type":"Training","Content":{{"projectId":"{pid}","iterationId":"{iid}","trainingStatus":"TrainingCompleted"}}}}"#
        );
        deliver_to_both(trained, format!("t-{round}")).await;
        let calls = standin_calls(&standin.endpoint()).await;
        let for_this: Vec<_> = calls
            .exports
            .iter()
            .filter(|e| e.iteration_id.to_string() == iid)
            .collect();
        assert_eq!(for_this.len(), 1, "round {round}: {for_this:?}");
        assert_eq!(for_this[0].outcome, "accepted");

        // Wait for the export to finish, then both instances get its notification at once.
        api.wait_for(&format!("projects/{pid}/iterations/{iid}/export"), |e| {
            e[0]["status"] == "Done"
        })
        .await;
        let exported = format!(
            r#"{{"version":"1.0","type":"Export","Content":{{"projectId":"{pid}","iterationId":"{iid}","exportStatus":"ExportCompleted","modelUri":"{backup}/{pid}%20-%20{iid}.ONNX"}}}}"#
        );
        let logs = deliver_to_both(exported, format!("e-{round}")).await;
        assert_eq!(
            logs.matches("released ONNX").count(),
            1,
            "round {round}: {logs}"
        );
    }
    // One step row per iteration, released once; no claim left behind.
    let rows = clients
        .table(&table)
        .unwrap()
        .query(None, 10_000)
        .await
        .unwrap();
    let steps: Vec<_> = rows
        .iter()
        .filter(|r| r.entity["EventType"] == "ExportStep")
        .collect();
    assert_eq!(steps.len(), ROUNDS);
    assert!(steps.iter().all(|s| s.entity.contains_key("ReleaseUrl")));
    assert!(!rows.iter().any(|r| r.entity["EventType"] == "Claim"));
    let secrets = [KEY, cvchain_azure::storage::settings::DEV_ACCOUNT_KEY];
    let all = serde_json::to_string(&rows.iter().map(|r| &r.entity).collect::<Vec<_>>()).unwrap();
    cvchain_testkit::assert_no_secrets("the history rows", &all, &secrets);
    for h in [&a, &b] {
        cvchain_testkit::assert_no_secrets("the handlers' logs", &h.stderr(), &secrets);
    }
}
