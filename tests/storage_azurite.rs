//! The two pieces the SDK lacks, against a real Azurite: SharedKey signing (Blob, Queue, Table)
//! and the Table client.

use azure_core::http::RequestContent;
use azure_storage_queue::models::QueueMessage;
use cvchain_azure::storage::settings::parse_connection_string;
use cvchain_azure::storage::{
    StorageError,
    clients::{RetryPolicy, StorageClients},
    queue::{SentAs, send_text},
    table::{UpdateMode, WriteOutcome, filter_eq},
};
use cvchain_testkit::{Azurite, unique};
use serde_json::{Value, json};
use std::time::Duration;

fn clients(azurite: &Azurite) -> StorageClients {
    StorageClients::new(&azurite.storage_settings()).unwrap()
}

fn entity(pk: &str, rk: &str, extra: Value) -> serde_json::Map<String, Value> {
    let mut e = extra.as_object().cloned().unwrap_or_default();
    e.insert("PartitionKey".into(), pk.into());
    e.insert("RowKey".into(), rk.into());
    e
}

#[tokio::test]
async fn shared_key_signs_blob_requests_including_names_with_spaces() {
    let azurite = Azurite::start();
    let service = clients(&azurite).blob_service().unwrap();
    let container = service.blob_container_client(&unique("c"));
    container.create(None).await.unwrap();
    let name = "b5f7e0a6-9d7e-4a51-9a64-0f6a1c2d3e4f - 3c2a1b0d-8e7f-4a6b-9c5d-1e2f3a4b5c6d.ONNX";
    let blob = container.blob_client(name);
    let body: RequestContent<azure_core::Bytes, azure_core::http::NoFormat> =
        RequestContent::from(b"model bytes".to_vec());
    blob.upload(body, None).await.unwrap();
    let downloaded = blob.download(None).await.unwrap();
    let bytes = downloaded.body.collect().await.unwrap();
    assert_eq!(&bytes[..], b"model bytes");
}

#[tokio::test]
async fn shared_key_signs_queue_requests() {
    let azurite = Azurite::start();
    let queue = clients(&azurite).queue(&unique("q")).unwrap();
    // The queue does not exist yet: send_text creates it.
    assert_eq!(send_text(&queue, "{\"a\":1}").await.unwrap(), SentAs::Text);
    assert_eq!(
        send_text(&queue, "bell\u{7}").await.unwrap(),
        SentAs::Base64
    );
    let got = queue
        .receive_messages(None)
        .await
        .unwrap()
        .into_model()
        .unwrap();
    let texts: Vec<String> = got
        .items
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.message_text)
        .collect();
    assert_eq!(texts, vec!["{\"a\":1}".to_owned()]);
    let msg: RequestContent<QueueMessage, azure_core::http::XmlFormat> = QueueMessage {
        message_text: Some("x".into()),
    }
    .try_into()
    .unwrap();
    queue.send_message(msg, None).await.unwrap();
}

#[tokio::test]
async fn a_wrong_account_key_gives_a_clear_permanent_error() {
    let azurite = Azurite::start();
    let wrong = azurite.connection_string().replace(
        cvchain_azure::storage::settings::DEV_ACCOUNT_KEY,
        "d3JvbmdrZXl3cm9uZ2tleXdyb25na2V5d3JvbmdrZXk=",
    );
    let settings = parse_connection_string("CVCHAIN_STORAGE", &wrong).unwrap();
    let clients = StorageClients::new(&settings).unwrap();
    let table = clients.table("WrongKey").unwrap();
    let err = table.create_if_missing().await.unwrap_err();
    assert!(
        matches!(err, StorageError::Denied { status: 403, .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(text.contains("check the account key"), "{text}");
    assert!(!text.contains("d3Jvbmdr"), "{text}");

    let queue = clients.queue("wrongkey").unwrap();
    let err = send_text(&queue, "x").await.unwrap_err();
    assert!(
        matches!(err, StorageError::Denied { status: 403, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unreachable_account_is_transient() {
    let mut azurite = Azurite::start();
    let clients = clients(&azurite).with_retry(RetryPolicy {
        max_retries: 1,
        max_total: Duration::from_secs(2),
    });
    azurite.stop();
    let err = clients
        .table("Gone")
        .unwrap()
        .create_if_missing()
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn table_client_inserts_reads_and_updates_conditionally() {
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("T")).unwrap();
    assert!(table.create_if_missing().await.unwrap());
    assert!(!table.create_if_missing().await.unwrap());

    let e = entity("p'1", "r 1", json!({"Status": "new", "Count": 1}));
    let WriteOutcome::Written { etag } = table.insert(&e).await.unwrap() else {
        panic!("insert should write")
    };
    assert!(!etag.is_empty());
    assert_eq!(table.insert(&e).await.unwrap(), WriteOutcome::AlreadyExists);

    let got = table.get("p'1", "r 1").await.unwrap().unwrap();
    assert_eq!(got.entity["Status"], "new");
    assert_eq!(got.entity["Count"], 1);
    assert_eq!(got.etag, etag);
    assert!(table.get("p'1", "missing").await.unwrap().is_none());

    // Merge keeps other properties; the old ETag no longer matches.
    let patch = entity("p'1", "r 1", json!({"Status": "done"}));
    let WriteOutcome::Written { etag: etag2 } = table
        .update(&patch, UpdateMode::Merge, &etag)
        .await
        .unwrap()
    else {
        panic!("update with the current ETag should write")
    };
    assert_eq!(
        table
            .update(&patch, UpdateMode::Replace, &etag)
            .await
            .unwrap(),
        WriteOutcome::Conflict
    );
    let got = table.get("p'1", "r 1").await.unwrap().unwrap();
    assert_eq!(got.entity["Status"], "done");
    assert_eq!(got.entity["Count"], 1);

    // Replace drops what is not sent.
    table
        .update(
            &entity("p'1", "r 1", json!({"Only": true})),
            UpdateMode::Replace,
            &etag2,
        )
        .await
        .unwrap();
    let got = table.get("p'1", "r 1").await.unwrap().unwrap();
    assert_eq!(got.entity.get("Count"), None);
    assert_eq!(got.entity["Only"], true);

    // Upserts create and overwrite without conditions.
    table
        .upsert(&entity("p2", "r", json!({"V": 1})), UpdateMode::Replace)
        .await
        .unwrap();
    table
        .upsert(&entity("p2", "r", json!({"W": 2})), UpdateMode::Merge)
        .await
        .unwrap();
    let got = table.get("p2", "r").await.unwrap().unwrap();
    assert_eq!(
        (got.entity["V"].clone(), got.entity["W"].clone()),
        (json!(1), json!(2))
    );

    // Conditional delete.
    assert_eq!(
        table.delete("p2", "r", "W/\"stale\"").await.unwrap(),
        WriteOutcome::Conflict
    );
    assert!(matches!(
        table.delete("p2", "r", "*").await.unwrap(),
        WriteOutcome::Written { .. }
    ));
    assert!(table.get("p2", "r").await.unwrap().is_none());
}

#[tokio::test]
async fn table_queries_follow_continuations() {
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("Q")).unwrap();
    table.create_if_missing().await.unwrap();
    for i in 0..25 {
        let kind = if i % 2 == 0 { "even" } else { "odd" };
        table
            .insert(&entity("p", &format!("r{i:03}"), json!({"Kind": kind})))
            .await
            .unwrap();
    }
    let first = table.query_page(None, Some(10), None).await.unwrap();
    assert_eq!(first.entities.len(), 10);
    assert!(first.next.is_some(), "a $top page should continue");
    let all = table.query(None, 1000).await.unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.iter().all(|e| !e.etag.is_empty()));
    let filter = filter_eq("Kind", "even");
    let even = table.query(Some(&filter), 1000).await.unwrap();
    assert_eq!(even.len(), 13);
    let limited = table.query(None, 7).await.unwrap();
    assert_eq!(limited.len(), 7);
    // A quote in a filter value stays inside the literal.
    let injected = table
        .query(Some(&filter_eq("Kind", "x' or Kind eq 'even")), 1000)
        .await
        .unwrap();
    assert!(injected.is_empty());
}

/// An account SAS for the dev account (the 2019-12-12 string-to-sign).
fn account_sas() -> String {
    let (sv, ss, srt, sp, se, spr) = (
        "2019-12-12",
        "bqt",
        "sco",
        "rwdlacup",
        "2099-01-01T00:00:00Z",
        "https,http",
    );
    let sts = format!(
        "{}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n{spr}\n{sv}\n",
        cvchain_azure::storage::settings::DEV_ACCOUNT
    );
    let sig = azure_core::hmac::hmac_sha256(
        &sts,
        &azure_core::credentials::Secret::new(cvchain_azure::storage::settings::DEV_ACCOUNT_KEY),
    )
    .unwrap();
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    format!("sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={se}&spr={spr}&sig={sig}")
}

#[tokio::test]
async fn a_sas_connection_string_works_for_tables_and_queues() {
    let azurite = Azurite::start();
    let conn = format!(
        "BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;QueueEndpoint=http://127.0.0.1:{}/devstoreaccount1;TableEndpoint=http://127.0.0.1:{}/devstoreaccount1;SharedAccessSignature={}",
        azurite.blob_port,
        azurite.queue_port,
        azurite.table_port,
        account_sas()
    );
    let settings = parse_connection_string("CVCHAIN_STORAGE", &conn).unwrap();
    let clients = StorageClients::new(&settings).unwrap();
    let table = clients.table(&unique("Sas")).unwrap();
    table.create_if_missing().await.unwrap();
    table
        .insert(&entity("p", "r", json!({"A": 1})))
        .await
        .unwrap();
    assert_eq!(table.get("p", "r").await.unwrap().unwrap().entity["A"], 1);
    assert_eq!(table.query(None, 10).await.unwrap().len(), 1);
    // A transaction authenticates the same way (the SAS on the `$batch` URL).
    let outcome = table
        .transact(&[cvchain_azure::storage::table::BatchOp::Insert(entity(
            "p",
            "r2",
            json!({"A": 2}),
        ))])
        .await
        .unwrap();
    assert_eq!(
        outcome,
        cvchain_azure::storage::table::BatchOutcome::Committed
    );
    let queue = clients.queue(&unique("sas")).unwrap();
    send_text(&queue, "hello").await.unwrap();
    // Debug output of the settings never shows the signature.
    assert!(!format!("{settings:?}").contains("sig="));
}

#[tokio::test]
async fn an_entity_group_transaction_writes_all_or_nothing() {
    use cvchain_azure::storage::table::{BatchOp, BatchOutcome};
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("Batch")).unwrap();
    table.create_if_missing().await.unwrap();
    let e = |rk: &str, v: i64| entity("p", rk, json!({ "V": v }));
    // Two inserts and a merge into a row that does not exist yet: all written.
    let ops = [
        BatchOp::Insert(e("a", 1)),
        BatchOp::Insert(e("b", 2)),
        BatchOp::Merge(e("c", 3)),
    ];
    assert_eq!(table.transact(&ops).await.unwrap(), BatchOutcome::Committed);
    assert_eq!(table.query(None, 10).await.unwrap().len(), 3);
    // The second insert collides: nothing is written, and the answer says which one.
    let ops = [
        BatchOp::Merge(e("a", 10)),
        BatchOp::Insert(e("b", 20)),
        BatchOp::Insert(e("d", 4)),
    ];
    let BatchOutcome::Refused { index, status, .. } = table.transact(&ops).await.unwrap() else {
        panic!("a colliding insert must fail the transaction");
    };
    assert_eq!((index, status), (Some(1), 409));
    let rows = table.query(None, 10).await.unwrap();
    assert_eq!(rows.len(), 3, "d was not written");
    let a = rows.iter().find(|r| r.entity["RowKey"] == "a").unwrap();
    assert_eq!(
        a.entity["V"], 1,
        "the merge before the collision was rolled back"
    );
    // Mixed partitions are refused before anything is sent.
    let ops = [
        BatchOp::Insert(e("x", 1)),
        BatchOp::Insert(entity("q", "y", json!({}))),
    ];
    assert!(table.transact(&ops).await.is_err());
}

/// A claim is given back in the transaction that records its work: the delete is conditional on
/// the claim's ETag, so a claim taken over meanwhile fails the transaction and is left alone.
#[tokio::test]
async fn a_transaction_deletes_a_row_only_at_its_etag() {
    use cvchain_azure::storage::table::{BatchOp, BatchOutcome, WriteOutcome};
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("BatchDel")).unwrap();
    table.create_if_missing().await.unwrap();
    let WriteOutcome::Written { etag } = table
        .insert(&entity("p", "claim", json!({ "Owner": "me" })))
        .await
        .unwrap()
    else {
        panic!("the claim is new");
    };
    let delete = |etag: &str| BatchOp::Delete {
        partition_key: "p".into(),
        row_key: "claim".into(),
        etag: etag.into(),
    };
    // A stale ETag: nothing is written, the delete is named as the refused operation.
    let ops = [
        BatchOp::Insert(entity("p", "step", json!({ "V": 1 }))),
        delete("W/\"datetime'2000-01-01T00%3A00%3A00.0000000Z'\""),
    ];
    let BatchOutcome::Refused { index, status, .. } = table.transact(&ops).await.unwrap() else {
        panic!("a stale ETag must fail the transaction");
    };
    assert_eq!((index, status), (Some(1), 412));
    assert!(table.get("p", "step").await.unwrap().is_none());
    assert!(table.get("p", "claim").await.unwrap().is_some());
    // The claim's own ETag: the row is written and the claim gone, together.
    let ops = [
        BatchOp::Insert(entity("p", "step", json!({ "V": 1 }))),
        delete(&etag),
    ];
    assert_eq!(table.transact(&ops).await.unwrap(), BatchOutcome::Committed);
    assert!(table.get("p", "step").await.unwrap().is_some());
    assert!(table.get("p", "claim").await.unwrap().is_none());
}

/// A download link (an account-key service SAS) reads its one blob with no other credential,
/// and nothing else: not another blob, not a write, not after it expires.
#[tokio::test]
async fn a_download_link_reads_its_blob_and_nothing_else() {
    use cvchain_azure::storage::links::Links;
    let azurite = Azurite::start();
    let clients = clients(&azurite);
    let name = unique("models");
    let container = clients.blob_service().unwrap().blob_container_client(&name);
    container.create(None).await.unwrap();
    for (blob, body) in [
        ("Widget Detector/Iteration-1/ONNX.zip", &b"the model"[..]),
        ("Widget Detector/Iteration-2/ONNX.zip", &b"another"[..]),
    ] {
        container
            .blob_client(blob)
            .upload(RequestContent::from(body.to_vec()), None)
            .await
            .unwrap();
    }
    let links = Links::new(&clients);
    let now = time::OffsetDateTime::now_utc();
    let url = links
        .read_url(&name, "Widget Detector/Iteration-1/ONNX.zip", now)
        .await
        .unwrap()
        .expect("a link under an account key");
    let q = url.query().unwrap();
    assert!(q.contains("sr=b") && q.contains("sp=r"), "{q}");
    assert!(
        !url.as_str()
            .contains(cvchain_azure::storage::settings::DEV_ACCOUNT_KEY)
    );
    let http = reqwest::Client::new();
    let got = http.get(url.as_str()).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"the model");
    // The signature covers the blob: the same query on another blob is refused.
    let other = url.as_str().replace("Iteration-1", "Iteration-2");
    assert_eq!(http.get(other).send().await.unwrap().status(), 403);
    // Read only.
    let put = http
        .put(url.as_str())
        .header("x-ms-blob-type", "BlockBlob")
        .body("overwritten")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 403);
    // Expired.
    let old = links
        .read_url(
            &name,
            "Widget Detector/Iteration-1/ONNX.zip",
            now - time::Duration::hours(1),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(http.get(old.as_str()).send().await.unwrap().status(), 403);
}

/// Names are any Unicode: a line or paragraph separator (U+2028, U+2029), a next-line (U+0085),
/// a BOM, right-to-left marks, emoji, an escaped NUL: a transaction (`$batch`, a multipart
/// body that the service and Azurite read line by line) carries them as written, and so does a
/// single write. Azurite once refused the transaction: its parser's `.` stops at U+2028.
#[tokio::test]
async fn a_transaction_carries_any_unicode_in_its_values() {
    use cvchain_azure::storage::table::{BatchOp, BatchOutcome};
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("Unicode")).unwrap();
    table.create_if_missing().await.unwrap();
    let names = [
        "line\u{2028}separator",
        "paragraph\u{2029}separator",
        "next\u{85}line \u{feff}bom \u{200f}rtl\u{202e}override 😀 \u{0}nul \u{7f}del",
        "}{\"]\\\r\n\t --changeset_x\r\n{\"PartitionKey\":\"q\"}",
        "\u{2028}\u{2029}\u{2028}{\u{2029}}",
    ];
    let ops: Vec<BatchOp> = names
        .iter()
        .enumerate()
        .map(|(i, n)| BatchOp::Insert(entity("p", &format!("r{i}"), json!({ "Name": n }))))
        .collect();
    assert_eq!(table.transact(&ops).await.unwrap(), BatchOutcome::Committed);
    let merges = [BatchOp::Merge(entity(
        "p",
        "r0",
        json!({ "Other": names.join("|") }),
    ))];
    assert_eq!(
        table.transact(&merges).await.unwrap(),
        BatchOutcome::Committed
    );
    for (i, n) in names.iter().enumerate() {
        let got = table.get("p", &format!("r{i}")).await.unwrap().unwrap();
        assert_eq!(got.entity["Name"], *n, "row {i}");
    }
    let got = table.get("p", "r0").await.unwrap().unwrap();
    assert_eq!(got.entity["Other"], names.join("|"));
    // A single write carries them too.
    let single = entity("p", "single", json!({ "Name": names.join("|") }));
    assert!(matches!(
        table.insert(&single).await.unwrap(),
        WriteOutcome::Written { .. }
    ));
    let got = table.get("p", "single").await.unwrap().unwrap();
    assert_eq!(got.entity["Name"], names.join("|"));
}

/// The tail of an invocation goes with the notification's row in one transaction: what
/// another writer got to first is dropped alone (an insert whose row exists, with its outbox
/// rows; an outbox row told already; a claim taken over), changes of one row are folded into
/// one operation, and a notification row that exists already leaves the rest written and is
/// returned as found.
#[tokio::test]
async fn the_tail_is_written_with_the_row_and_only_what_others_wrote_first_is_dropped() {
    use cvchain_azure::history::claims::Claim;
    use cvchain_azure::history::store::{HistoryStore, Recorded, TailWrite};
    use cvchain_azure::storage::table::WriteOutcome;
    use cvchain_core::history::{HistoryRow, Prop, Props};
    let azurite = Azurite::start();
    let table = clients(&azurite).table(&unique("Tail")).unwrap();
    table.create_if_missing().await.unwrap();
    let store = HistoryStore::new(table.clone());
    let row = |rk: &str, reason: &str| {
        let mut properties = Props::new();
        properties.set(Prop::Reason, reason);
        HistoryRow {
            partition_key: "p".into(),
            row_key: rk.into(),
            properties,
        }
    };
    let claim = |rk: &str, etag: String| Claim {
        partition_key: "p".into(),
        row_key: rk.into(),
        etag,
        owner: uuid::Uuid::new_v4(),
        taken_over: false,
        set_at: tokio::time::Instant::now(),
    };
    // Written by others first: a step row, an outbox row, a claim since taken over.
    store.record(&row("step-theirs", "theirs")).await.unwrap();
    store.record(&row("Outbox_told", "told")).await.unwrap();
    let WriteOutcome::Written { etag: stale } = table
        .insert(&entity("p", "claim-lost", json!({ "Owner": "me" })))
        .await
        .unwrap()
    else {
        panic!("the claim is new");
    };
    table
        .upsert(
            &entity("p", "claim-lost", json!({ "Owner": "another" })),
            cvchain_azure::storage::table::UpdateMode::Replace,
        )
        .await
        .unwrap();
    let WriteOutcome::Written { etag: mine } = table
        .insert(&entity("p", "claim-mine", json!({ "Owner": "me" })))
        .await
        .unwrap()
    else {
        panic!("the claim is new");
    };
    let mut merged = Props::new();
    merged.set(Prop::Status, "Done");
    let tail = vec![
        TailWrite::Insert {
            row: row("step-theirs", "mine"),
            outbox: vec![row("Outbox_of-theirs", "dropped with it")],
            release: Some(claim("claim-mine", mine)),
        },
        TailWrite::Insert {
            row: row("step-new", "new"),
            outbox: vec![row("Outbox_told", "again"), row("Outbox_new", "new")],
            release: Some(claim("claim-lost", stale)),
        },
        TailWrite::Merge {
            partition_key: "p".into(),
            row_key: "step-new".into(),
            properties: merged,
            outbox: Vec::new(),
            release: None,
        },
    ];
    let recorded = store
        .record_with_tail(
            &row("notification", "first"),
            &[row("Outbox_n", "n")],
            &tail,
        )
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::Inserted);
    let get = |rk: &'static str| {
        let store = store.clone();
        async move { store.get("p", rk).await.unwrap() }
    };
    assert_eq!(
        get("step-theirs")
            .await
            .unwrap()
            .properties
            .text(Prop::Reason),
        "theirs"
    );
    assert!(get("Outbox_of-theirs").await.is_none());
    assert_eq!(
        get("Outbox_told")
            .await
            .unwrap()
            .properties
            .text(Prop::Reason),
        "told"
    );
    let new = get("step-new").await.unwrap();
    assert_eq!(
        (
            new.properties.text(Prop::Reason),
            new.properties.text(Prop::Status)
        ),
        ("new", "Done")
    );
    assert!(get("Outbox_new").await.is_some());
    assert!(get("Outbox_n").await.is_some());
    assert!(get("notification").await.is_some());
    // Our claim is given back; the one taken over is left to its holder.
    assert!(get("claim-mine").await.is_none());
    assert!(get("claim-lost").await.is_some());
    // The notification's row exists already: the rest is written, the row left and returned.
    let tail = vec![TailWrite::Insert {
        row: row("step-later", "later"),
        outbox: Vec::new(),
        release: None,
    }];
    let recorded = store
        .record_with_tail(
            &row("notification", "second"),
            &[row("Outbox_n2", "n2")],
            &tail,
        )
        .await
        .unwrap();
    let Recorded::AlreadyPresent(existing) = recorded else {
        panic!("the row was there");
    };
    assert_eq!(existing.properties.text(Prop::Reason), "first");
    assert!(get("step-later").await.is_some());
    assert!(get("Outbox_n2").await.is_none());
}
