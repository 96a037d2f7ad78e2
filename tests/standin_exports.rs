//! The stand-in's exports are packages a deploy script can open: driven through the Training API
//! as a user's script drives it (create project, tags, images, train, export, GetExports'
//! `downloadUri` and the backup blob), every export of every platform and flavor is a zip laid
//! out as Custom Vision's, opened here with the zip crate and by `tests/python/check_exports.py`
//! with Python's zipfile, the onnx checker and onnxruntime (pinned, installed by
//! `scripts/python-models`), which load and run each ONNX model on an image-sized input. The
//! same iteration exports the same bytes; another iteration exports another model.

use cvchain_azure::storage::clients::StorageClients;
use cvchain_standin::{
    COMPACT_DOMAIN, ExportPackage, Standin, StandinConfig, script::TrainingScript,
};
use cvchain_testkit::{Azurite, blob_bytes, repo_root};
use reqwest::Method;
use serde_json::{Value, json};
use std::{io::Read, process::Stdio, time::Duration};
use uuid::Uuid;

const KEY: &str = "exports-key";
/// Every package is padded to exactly this (`model_size`), which tests the padding too.
const SIZE: usize = 12_000;

/// The venv's python, installed (once) by the same script `.ci/run` calls.
fn python() -> String {
    let out = std::process::Command::new(repo_root().join("scripts/python-models"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/python-models runs");
    assert!(out.status.success(), "scripts/python-models failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

struct World {
    _azurite: Azurite,
    _standin: Standin,
    clients: StorageClients,
    api: TrainingScript,
    container_uri: String,
}

/// One export as downloaded, with what it should hold.
struct Downloaded {
    project: Uuid,
    iteration: Uuid,
    platform: String,
    flavor: Option<String>,
    labels: Vec<String>,
    multilabel: bool,
    bytes: Vec<u8>,
}

impl World {
    async fn call(&self, method: Method, path: &str, query: &[(&str, &str)]) -> Value {
        self.api
            .call(method, path, query, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A compact-domain project of `kind` (Multiclass or Multilabel) backed up to the container,
    /// with `tags` and enough images each.
    async fn project(&self, name: &str, kind: &str, tags: &[&str]) -> Uuid {
        let p = self
            .api
            .call(
                Method::POST,
                "projects",
                &[
                    ("name", name),
                    ("domainId", COMPACT_DOMAIN),
                    ("classificationType", kind),
                ],
                Some(json!({ "exportModelContainerUri": self.container_uri })),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = Uuid::parse_str(p["id"].as_str().unwrap()).unwrap();
        self.api.add_tagged_images(pid, tags, 0).await.unwrap();
        pid
    }

    /// Trains (forced, so a project trains again on the same images) and waits for it.
    async fn train(&self, project: Uuid) -> Uuid {
        let iteration = self.api.train(project, true).await.unwrap();
        self.wait(&format!("projects/{project}/iterations/{iteration}"), |v| {
            v["status"] == "Completed"
        })
        .await;
        iteration
    }

    async fn wait(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..500 {
            let v = self.call(Method::GET, path, &[]).await;
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never got there");
    }

    /// Requests the exports of one iteration, waits until all are done and downloads each from
    /// GetExports' `downloadUri`, as a deploy script does.
    async fn export(
        &self,
        project: Uuid,
        iteration: Uuid,
        targets: &[(&str, Option<&str>)],
    ) -> Vec<Downloaded> {
        let path = format!("projects/{project}/iterations/{iteration}/export");
        for (platform, flavor) in targets {
            let mut q = vec![("platform", *platform)];
            if let Some(f) = flavor {
                q.push(("flavor", f));
            }
            self.call(Method::POST, &path, &q).await;
        }
        let exports = self
            .wait(&path, |v| {
                v.as_array()
                    .is_some_and(|a| a.iter().all(|e| e["status"] != "Exporting"))
            })
            .await;
        let project_view = self
            .call(Method::GET, &format!("projects/{project}"), &[])
            .await;
        let tags = self
            .call(Method::GET, &format!("projects/{project}/tags"), &[])
            .await;
        let labels: Vec<String> = tags
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        let mut out = Vec::new();
        for (platform, flavor) in targets {
            let e = exports
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["platform"] == *platform && e["flavor"].as_str() == *flavor)
                .unwrap_or_else(|| panic!("{platform} {flavor:?} in {exports}"));
            assert_eq!(e["status"], "Done", "{e}");
            let rsp = reqwest::get(e["downloadUri"].as_str().unwrap())
                .await
                .unwrap();
            assert_eq!(rsp.status(), 200);
            out.push(Downloaded {
                project,
                iteration,
                platform: platform.to_string(),
                flavor: flavor.map(str::to_owned),
                labels: labels.clone(),
                multilabel: project_view["settings"]["classificationType"] == "Multilabel",
                bytes: rsp.bytes().await.unwrap().to_vec(),
            });
        }
        out
    }

    async fn backup(&self, d: &Downloaded) -> Vec<u8> {
        let name = format!("{} - {}.{}", d.project, d.iteration, d.platform);
        blob_bytes(&self.clients, "exportbackups", &name).await
    }
}

/// The zip's file names and contents, read with the zip crate.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .unwrap_or_else(|e| panic!("not a zip ({e}): {:?}", &bytes[..bytes.len().min(80)]));
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut body = Vec::new();
            f.read_to_end(&mut body).unwrap();
            (f.name().unwrap().into_owned(), body)
        })
        .collect()
}

fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &files
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} in {:?}",
                files.iter().map(|f| &f.0).collect::<Vec<_>>()
            )
        })
        .1
}

#[tokio::test]
async fn every_export_is_a_package_a_deploy_script_can_open_and_run() {
    let python = python();
    let azurite = Azurite::start();
    let clients = StorageClients::new(&azurite.storage_settings()).unwrap();
    cvchain_testkit::standin::create_container(&clients, "exportbackups").await;
    let standin = Standin::start(StandinConfig {
        model_size: SIZE,
        ..cvchain_testkit::standin_config(&clients, KEY, 20)
    })
    .await
    .unwrap();
    let w = World {
        api: TrainingScript::new(&standin.endpoint(), KEY),
        container_uri: azurite.container_url("exportbackups"),
        _standin: standin,
        _azurite: azurite,
        clients,
    };

    // A Multiclass project: one export per platform (each has its own backup blob), then the
    // other flavors of the same iteration, then a second iteration.
    let widgets = w
        .project("Widgets", "Multiclass", &["widget", "gadget", "gizmo"])
        .await;
    let first = w.train(widgets).await;
    let per_platform = w
        .export(
            widgets,
            first,
            &[
                ("ONNX", None),
                ("TensorFlow", None),
                ("CoreML", None),
                ("DockerFile", Some("Linux")),
                ("VAIDK", None),
                ("OpenVino", None),
            ],
        )
        .await;
    // The backup blob holds the same bytes as the downloadUri.
    for d in &per_platform {
        assert_eq!(w.backup(d).await, d.bytes, "{} backup", d.platform);
    }
    let flavors = w
        .export(
            widgets,
            first,
            &[
                ("ONNX", Some("ONNX10")),
                ("ONNX", Some("ONNX12")),
                ("TensorFlow", Some("TensorFlowNormal")),
                ("TensorFlow", Some("TensorFlowLite")),
                ("DockerFile", None),
                ("DockerFile", Some("Windows")),
                ("DockerFile", Some("ARM")),
            ],
        )
        .await;
    let second = w.train(widgets).await;
    let again = w.export(widgets, second, &[("ONNX", None)]).await;
    // A Multilabel project, with other tags.
    let pets = w
        .project("Pets", "Multilabel", &["cat", "dog", "bird", "fish"])
        .await;
    let pet_iteration = w.train(pets).await;
    let multilabel = w
        .export(
            pets,
            pet_iteration,
            &[("ONNX", None), ("DockerFile", Some("Linux"))],
        )
        .await;

    let all: Vec<&Downloaded> = per_platform
        .iter()
        .chain(&flavors)
        .chain(&again)
        .chain(&multilabel)
        .collect();
    for d in &all {
        let what = format!("{} {:?}", d.platform, d.flavor);
        // Opens as a zip, at exactly model_size, with labels.txt and a model file.
        assert_eq!(d.bytes.len(), SIZE, "{what}");
        let files = unzip(&d.bytes);
        let labels_path = if d.platform == "DockerFile" {
            "app/labels.txt"
        } else {
            "labels.txt"
        };
        assert_eq!(
            String::from_utf8(file(&files, labels_path).to_vec()).unwrap(),
            d.labels.join("\r\n"),
            "{what}"
        );
        assert_eq!(
            files.last().unwrap().0,
            cvchain_standin::package::PADDING_FILE
        );
        // The same iteration always exports the same bytes: the package rebuilt from what the
        // API says of the iteration is byte for byte the download.
        let iteration = w
            .call(
                Method::GET,
                &format!("projects/{}/iterations/{}", d.project, d.iteration),
                &[],
            )
            .await;
        let rebuilt = ExportPackage {
            project: d.project,
            iteration: d.iteration,
            platform: d.platform.clone(),
            flavor: d.flavor.clone(),
            multilabel: d.multilabel,
            labels: d.labels.clone(),
            trained_at: iteration["trainedAt"].as_str().unwrap().to_owned(),
        };
        assert_eq!(rebuilt.zip(SIZE).unwrap(), d.bytes, "{what}");
    }
    // The three ONNX flavors of one iteration hold one model; the next iteration another.
    let onnx = |d: &Downloaded| file(&unzip(&d.bytes), "model.onnx").to_vec();
    assert_eq!(onnx(&per_platform[0]), onnx(&flavors[0]));
    assert_eq!(onnx(&per_platform[0]), onnx(&flavors[1]));
    assert_ne!(onnx(&per_platform[0]), onnx(&again[0]));

    // Python's zipfile, the onnx checker and onnxruntime.
    let dir = tempfile::tempdir().unwrap();
    let mut expect = Vec::new();
    for (n, d) in all.iter().enumerate() {
        let name = format!("{n}-{}.zip", d.platform);
        std::fs::write(dir.path().join(&name), &d.bytes).unwrap();
        expect.push(json!({
            "file": name,
            "platform": d.platform,
            "flavor": d.flavor,
            "iteration": d.iteration.to_string(),
            "labels": d.labels,
            "multilabel": d.multilabel,
            "size": SIZE,
        }));
    }
    std::fs::write(
        dir.path().join("expect.json"),
        serde_json::to_vec(&expect).unwrap(),
    )
    .unwrap();
    let out = tokio::process::Command::new(&python)
        .arg(repo_root().join("tests/python/check_exports.py"))
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "check_exports.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.len(), all.len());
    let scores: Vec<(usize, Vec<f64>)> = reports
        .iter()
        .enumerate()
        .filter_map(|(n, r)| {
            r["scores"]
                .as_array()
                .map(|s| (n, s.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()))
        })
        .collect();
    // Every ONNX export ran (four of the first project, one of the second) with one score per tag.
    assert_eq!(scores.len(), 5, "{reports:?}");
    for (n, s) in &scores {
        assert_eq!(s.len(), all[*n].labels.len(), "{}", reports[*n]);
    }
    let of = |d: &Downloaded| {
        let n = all.iter().position(|x| std::ptr::eq(*x, d)).unwrap();
        reports[n]["scores"].clone()
    };
    // Same model, same scores; another iteration's model scores the same picture otherwise.
    assert_eq!(of(&per_platform[0]), of(&flavors[1]));
    assert_ne!(of(&per_platform[0]), of(&again[0]));
    // Multilabel scores are independent: they need not sum to one.
    let pet: Vec<f64> = of(&multilabel[0])
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((pet.iter().sum::<f64>() - 1.0).abs() > 1e-3, "{pet:?}");
}
