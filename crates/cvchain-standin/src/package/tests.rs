use super::*;
use std::io::Read;

fn package(platform: &str, flavor: Option<&str>) -> ExportPackage {
    ExportPackage {
        project: Uuid::from_u128(0x1111),
        iteration: Uuid::from_u128(0x2222),
        platform: platform.into(),
        flavor: flavor.map(str::to_owned),
        multilabel: false,
        labels: vec!["widget".into(), "gadget".into()],
        trained_at: "2026-11-26T10:20:30.123Z".into(),
    }
}

/// Every target the v3.4-preview spec accepts, and a platform it does not know.
const TARGETS: &[(&str, Option<&str>)] = &[
    ("ONNX", None),
    ("ONNX", Some("ONNX10")),
    ("ONNX", Some("ONNX12")),
    ("TensorFlow", None),
    ("TensorFlow", Some("TensorFlowNormal")),
    ("TensorFlow", Some("TensorFlowLite")),
    ("CoreML", None),
    ("DockerFile", None),
    ("DockerFile", Some("Linux")),
    ("DockerFile", Some("Windows")),
    ("DockerFile", Some("ARM")),
    ("VAIDK", None),
    ("OpenVino", None),
    ("Caffe", None),
];

/// The zip's entries, read back with the zip crate: names and contents.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut body = Vec::new();
            f.read_to_end(&mut body).unwrap();
            (f.name().unwrap().into_owned(), body)
        })
        .collect()
}

fn names(files: &[(String, Vec<u8>)]) -> Vec<&str> {
    files.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn each_platform_gets_its_layout() {
    let expect: &[(&str, Option<&str>, &[&str])] = &[
        (
            "ONNX",
            None,
            &["model.onnx", "labels.txt", "cvexport.manifest"],
        ),
        (
            "TensorFlow",
            None,
            &["model.pb", "labels.txt", "cvexport.manifest"],
        ),
        (
            "TensorFlow",
            Some("TensorFlowLite"),
            &["model.tflite", "labels.txt", "cvexport.manifest"],
        ),
        (
            "CoreML",
            None,
            &["model.mlmodel", "labels.txt", "cvexport.manifest"],
        ),
        (
            "DockerFile",
            Some("Linux"),
            &[
                "Dockerfile",
                "app/",
                "app/app.py",
                "app/predict.py",
                "app/labels.txt",
                "app/model.pb",
            ],
        ),
        (
            "VAIDK",
            None,
            &[
                "model.dlc",
                "labels.txt",
                "va-snpe-engine-library_config.json",
            ],
        ),
        (
            "OpenVino",
            None,
            &["model.xml", "model.bin", "labels.txt", "cvexport.manifest"],
        ),
    ];
    for (platform, flavor, files) in expect {
        let p = package(platform, *flavor);
        assert_eq!(names(&p.files()), *files, "{platform} {flavor:?}");
        assert_eq!(names(&unzip(&p.zip(0).unwrap())), *files);
    }
    assert_eq!(Layout::of("onnx", Some("onnx12")), Layout::Onnx);
    assert_eq!(
        Layout::of("tensorflow", Some("tensorflowlite")),
        Layout::TensorFlowLite
    );
}

#[test]
fn every_zip_opens_and_holds_exactly_the_files() {
    for (platform, flavor) in TARGETS {
        let p = package(platform, *flavor);
        assert_eq!(
            unzip(&p.zip(0).unwrap()),
            p.files(),
            "{platform} {flavor:?}"
        );
    }
}

#[test]
fn labels_are_the_tags_one_a_line_with_crlf() {
    let p = package("ONNX", None);
    let files = p.files();
    assert_eq!(
        files[1],
        ("labels.txt".into(), b"widget\r\ngadget".to_vec())
    );
    // A tag cannot break a line in two.
    assert_eq!(labels_txt(&["a\nb".into(), "c".into()]), "a b\r\nc");
}

#[test]
fn the_manifest_names_the_model_and_its_sha1() {
    let p = package("ONNX", Some("ONNX12"));
    let files = p.files();
    let manifest: serde_json::Value = serde_json::from_slice(&files[2].1).unwrap();
    let sha1: String = Sha1::digest(&files[0].1)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        manifest,
        serde_json::json!({
            "DomainType": "Classification",
            "Platform": "ONNX",
            "Flavor": "ONNX12",
            "ExporterVersion": "2.0",
            "ExportedDate": "2026-11-26T10:20:30.123Z",
            "IterationId": "00000000-0000-0000-0000-000000002222",
            "ModelFileName": "model.onnx",
            "LabelFileName": "labels.txt",
            "ModelFileSHA1": sha1,
            "SchemaVersion": "1.0",
        })
    );
    // The keys in the service's order.
    let text = String::from_utf8(files[2].1.clone()).unwrap();
    assert!(text.starts_with("{\n  \"DomainType\": \"Classification\",\n  \"Platform\""));
    let none = package("TensorFlow", None).files();
    let manifest: serde_json::Value = serde_json::from_slice(&none[2].1).unwrap();
    assert_eq!(manifest["Flavor"], serde_json::Value::Null);
    assert_eq!(manifest["ModelFileName"], "model.pb");
}

#[test]
fn the_same_iteration_exports_the_same_bytes_and_another_iteration_others() {
    for (platform, flavor) in TARGETS {
        let p = package(platform, *flavor);
        assert_eq!(p.zip(0).unwrap(), p.zip(0).unwrap(), "{platform}");
        assert_eq!(p.zip(9000).unwrap(), p.zip(9000).unwrap(), "{platform}");
        let other = ExportPackage {
            iteration: Uuid::from_u128(0x3333),
            ..p.clone()
        };
        assert_ne!(p.zip(0).unwrap(), other.zip(0).unwrap(), "{platform}");
    }
    // The ONNX flavors hold the same model.
    let model = |flavor| package("ONNX", flavor).files()[0].1.clone();
    assert_eq!(model(None), model(Some("ONNX10")));
    assert_eq!(model(None), model(Some("ONNX12")));
}

#[test]
fn model_size_is_met_exactly_without_breaking_the_zip() {
    for (platform, flavor) in TARGETS {
        let p = package(platform, *flavor);
        let natural = p.zip(0).unwrap().len();
        // Every gap: none, smaller than a padding file's headers (a comment), larger (a file).
        for size in (natural..natural + 300).chain([4096, 10_000, 64 * 1024, 256 * 1024]) {
            let z = p.zip(size).unwrap();
            assert_eq!(z.len(), size, "{platform} {flavor:?} {size}");
            let files = unzip(&z);
            assert_eq!(
                &files[..p.files().len()],
                &p.files()[..],
                "{platform} {size}"
            );
            if let Some((name, body)) = files.get(p.files().len()) {
                assert_eq!(name, PADDING_FILE);
                assert_eq!(*body, filler(body.len()));
            }
        }
        // Smaller than the files: the package as it is.
        assert_eq!(p.zip(10).unwrap().len(), natural);
    }
}

#[test]
fn packages_fit_the_sizes_tests_ask_for() {
    // tests/faults.rs checks release copies are exactly 4096 bytes for this chain's platforms.
    for (platform, flavor) in TARGETS {
        let len = package(platform, *flavor).zip(0).unwrap().len();
        assert!(len < 4096, "{platform} {flavor:?}: {len}");
    }
}

#[test]
fn padding_decides_file_comment_or_nothing() {
    assert_eq!(padding(100, 80, 100), Padding::None);
    assert_eq!(padding(100, 80, 50), Padding::None);
    assert_eq!(padding(100, 80, 179), Padding::Comment(79));
    assert_eq!(padding(100, 80, 180), Padding::File(0));
    assert_eq!(padding(100, 80, 1100), Padding::File(920));
    assert_eq!(padding(0, 70_000, 69_999), Padding::None);
}

#[test]
fn zip_times_are_the_trainings_or_1980() {
    let t = zip_time("2026-11-26T10:20:30.123+01:00");
    assert_eq!(
        (
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        (2026, 11, 26, 9, 20, 30)
    );
    assert_eq!(zip_time("yesterday"), DateTime::default());
    assert_eq!(zip_time("1970-01-01T00:00:00Z"), DateTime::default());
}

#[test]
fn placeholders_say_what_they_are_and_the_docker_app_names_the_iteration() {
    let p = package("DockerFile", Some("ARM"));
    let files = p.files();
    let text = |name: &str| {
        String::from_utf8(files.iter().find(|(n, _)| n == name).unwrap().1.clone()).unwrap()
    };
    assert!(text("Dockerfile").starts_with("FROM arm32v7/python:3.7-slim\n"));
    assert!(text("Dockerfile").contains("COPY app /app"));
    assert!(text("app/model.pb").starts_with("cvchain stand-in placeholder, not a TensorFlow"));
    assert!(
        text("app/predict.py").contains("ITERATION = \"00000000-0000-0000-0000-000000002222\"")
    );
    let xml = package("OpenVino", None).files()[0].1.clone();
    let xml = String::from_utf8(xml).unwrap();
    assert!(xml.starts_with("<?xml version=\"1.0\"?>\n<!-- cvchain stand-in placeholder"));
}

#[test]
fn hostile_names_make_packages_too() {
    let p = ExportPackage {
        labels: vec![
            "\"}\u{2028}\r\n../x".into(),
            String::new(),
            "😀".repeat(100),
        ],
        platform: "O\"NNX".into(),
        flavor: Some("\\".into()),
        trained_at: "\u{0}".into(),
        ..package("ONNX", None)
    };
    let z = p.zip(5000).unwrap();
    assert_eq!(z.len(), 5000);
    let files = unzip(&z);
    let manifest: serde_json::Value = serde_json::from_slice(&files[2].1).unwrap();
    assert_eq!(manifest["Platform"], "O\"NNX");
    let none = ExportPackage {
        labels: Vec::new(),
        ..package("ONNX", None)
    };
    assert_eq!(unzip(&none.zip(0).unwrap()).len(), 3);
}
