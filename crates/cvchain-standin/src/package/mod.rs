//! What an export holds: a zip laid out as Custom Vision's exports of that platform and flavor
//! (the model file, `labels.txt`, `cvexport.manifest` where the service writes one, the web app
//! of a DockerFile export), so a deploy script can open it locally. The ONNX model is a real one
//! (see [`onnx`]); the other platforms' model files are placeholders that say so. Everything is
//! a function of the iteration, so the same iteration always exports the same bytes.
//!
//! `model_size` (tests and benches make big blobs with it) is met without breaking the zip: a
//! stored padding file, or an archive comment when the gap is smaller than a file's headers.

mod onnx;

use sha1::{Digest, Sha1};
use std::io::{Cursor, Write};
use uuid::Uuid;
use zip::{CompressionMethod, DateTime, ZipWriter, result::ZipError, write::SimpleFileOptions};

/// The file that brings a package up to `model_size`, at the zip's root.
pub const PADDING_FILE: &str = "cvchain-standin-padding.bin";
/// What the padding (file or comment) is made of, repeated.
const PADDING_TEXT: &str =
    "cvchain stand-in padding: the stand-in's model_size makes exports this large.\n";

/// Everything an export's content depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPackage {
    pub project: Uuid,
    pub iteration: Uuid,
    /// As GetExports spells it (`ONNX`, `TensorFlow`, `DockerFile`, …).
    pub platform: String,
    pub flavor: Option<String>,
    /// The project's classification type is `Multilabel` (independent scores) rather than
    /// `Multiclass` (scores that sum to one).
    pub multilabel: bool,
    /// The tags the iteration trained on, in order: `labels.txt`, one score each.
    pub labels: Vec<String>,
    /// When the iteration was trained (RFC 3339): the manifest's `ExportedDate` and the zip's
    /// file times, so the bytes do not depend on when the export ran.
    pub trained_at: String,
}

/// The layout an export platform (and flavor) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `model.onnx` (a real model), `labels.txt`, `cvexport.manifest`.
    Onnx,
    /// `model.pb`, `labels.txt`, `cvexport.manifest`.
    TensorFlow,
    /// `model.tflite`, `labels.txt`, `cvexport.manifest`.
    TensorFlowLite,
    /// `model.mlmodel`, `labels.txt`, `cvexport.manifest`.
    CoreML,
    /// `Dockerfile`, and `app/` with `app.py`, `predict.py`, `labels.txt`, `model.pb`.
    Docker,
    /// `model.dlc`, `labels.txt`, `va-snpe-engine-library_config.json` (Vision AI Dev Kit).
    Vaidk,
    /// `model.xml`, `model.bin`, `labels.txt`, `cvexport.manifest`.
    OpenVino,
    /// A platform a later spec adds: `model.bin`, `labels.txt`, `cvexport.manifest`.
    Other,
}

impl Layout {
    /// The layout of `platform` with `flavor`, matched case-insensitively.
    pub fn of(platform: &str, flavor: Option<&str>) -> Layout {
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match platform {
            p if is(p, "ONNX") => Layout::Onnx,
            p if is(p, "TensorFlow") => {
                if flavor.is_some_and(|f| is(f, "TensorFlowLite")) {
                    Layout::TensorFlowLite
                } else {
                    Layout::TensorFlow
                }
            }
            p if is(p, "CoreML") => Layout::CoreML,
            p if is(p, "DockerFile") => Layout::Docker,
            p if is(p, "VAIDK") => Layout::Vaidk,
            p if is(p, "OpenVino") => Layout::OpenVino,
            _ => Layout::Other,
        }
    }

    /// The model file's name, as the manifest names it.
    pub fn model_file(self) -> &'static str {
        match self {
            Layout::Onnx => "model.onnx",
            Layout::TensorFlow => "model.pb",
            Layout::TensorFlowLite => "model.tflite",
            Layout::CoreML => "model.mlmodel",
            Layout::Docker => "app/model.pb",
            Layout::Vaidk => "model.dlc",
            Layout::OpenVino => "model.xml",
            Layout::Other => "model.bin",
        }
    }
}

impl ExportPackage {
    pub fn layout(&self) -> Layout {
        Layout::of(&self.platform, self.flavor.as_deref())
    }

    /// The files of the export, in the zip's order; a name ending in `/` is a directory.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let layout = self.layout();
        let labels = labels_txt(&self.labels).into_bytes();
        let f = |name: &str, body: Vec<u8>| (name.to_owned(), body);
        match layout {
            Layout::Docker => vec![
                f(
                    "Dockerfile",
                    dockerfile(self.flavor.as_deref()).into_bytes(),
                ),
                f("app/", Vec::new()),
                f("app/app.py", APP_PY.as_bytes().to_vec()),
                f("app/predict.py", self.predict_py().into_bytes()),
                f("app/labels.txt", labels),
                f("app/model.pb", self.placeholder("TensorFlow", "model.pb")),
            ],
            Layout::Vaidk => vec![
                f(
                    "model.dlc",
                    self.placeholder("Qualcomm SNPE (DLC)", "model.dlc"),
                ),
                f("labels.txt", labels),
                f(
                    "va-snpe-engine-library_config.json",
                    VAIDK_CONFIG.as_bytes().to_vec(),
                ),
            ],
            _ => {
                let model_name = layout.model_file();
                let model = match layout {
                    Layout::Onnx => {
                        onnx::classifier(self.iteration, self.labels.len(), self.multilabel)
                    }
                    Layout::TensorFlow => self.placeholder("TensorFlow", model_name),
                    Layout::TensorFlowLite => self.placeholder("TensorFlow Lite", model_name),
                    Layout::CoreML => self.placeholder("CoreML", model_name),
                    Layout::OpenVino => self.openvino_xml(),
                    _ => self.placeholder(&self.platform, model_name),
                };
                let manifest = self.manifest(model_name, &model).into_bytes();
                let mut files = vec![f(model_name, model)];
                if layout == Layout::OpenVino {
                    files.push(f("model.bin", self.placeholder("OpenVINO IR", "model.bin")));
                }
                files.push(f("labels.txt", labels));
                files.push(f("cvexport.manifest", manifest));
                files
            }
        }
    }

    /// The export as a zip of at least `size` bytes: exactly `size` when the files fit in it.
    pub fn zip(&self, size: usize) -> Result<Vec<u8>, ZipError> {
        let files = self.files();
        let time = zip_time(&self.trained_at);
        let unpadded = write_zip(&files, time, None, 0)?;
        if size <= unpadded.len() {
            return Ok(unpadded);
        }
        let headers = write_zip(&files, time, Some(0), 0)?.len() - unpadded.len();
        match padding(unpadded.len(), headers, size) {
            Padding::None => Ok(unpadded),
            Padding::File(len) => write_zip(&files, time, Some(len), 0),
            Padding::Comment(len) => write_zip(&files, time, None, len),
        }
    }

    /// `cvexport.manifest`: the keys and order of the manifests Custom Vision writes.
    fn manifest(&self, model_name: &str, model: &[u8]) -> String {
        let s = |v: &str| serde_json::Value::from(v).to_string();
        let flavor = self.flavor.as_deref().map_or("null".to_owned(), s);
        let sha1: String = Sha1::digest(model)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let fields = [
            ("DomainType", s("Classification")),
            ("Platform", s(&self.platform)),
            ("Flavor", flavor),
            ("ExporterVersion", s("2.0")),
            ("ExportedDate", s(&self.trained_at)),
            ("IterationId", s(&self.iteration.to_string())),
            ("ModelFileName", s(model_name)),
            ("LabelFileName", s("labels.txt")),
            ("ModelFileSHA1", s(&sha1)),
            ("SchemaVersion", s("1.0")),
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("  \"{k}\": {v}"))
            .collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
    }

    /// A model file the stand-in cannot make: text that says what it stands for.
    fn placeholder(&self, format: &str, name: &str) -> Vec<u8> {
        format!(
            "cvchain stand-in placeholder, not a {format} model: {name} of iteration {} of \
             project {}, {} tags ({}). The stand-in's ONNX export holds a real model.\n",
            self.iteration,
            self.project,
            self.labels.len(),
            self.labels.join(", ")
        )
        .into_bytes()
    }

    /// OpenVINO's `model.xml`: well-formed XML, with the placeholder text as a comment.
    fn openvino_xml(&self) -> Vec<u8> {
        let text = String::from_utf8_lossy(&self.placeholder("OpenVINO IR", "model.xml"))
            .replace("--", "- -");
        format!(
            "<?xml version=\"1.0\"?>\n<!-- {} -->\n<net name=\"cvchain-standin\" version=\"10\"/>\n",
            text.trim_end()
        )
        .into_bytes()
    }

    /// The DockerFile export's prediction module: every tag the same probability (its
    /// `model.pb` is a placeholder), in the Prediction API's answer shape; standard library only.
    fn predict_py(&self) -> String {
        PREDICT_PY
            .replace("{project}", &self.project.to_string())
            .replace("{iteration}", &self.iteration.to_string())
    }
}

/// `labels.txt`: one tag a line, CRLF between lines as the service writes them.
pub fn labels_txt(labels: &[String]) -> String {
    labels
        .iter()
        .map(|l| l.replace(['\r', '\n'], " "))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// How a package reaches `model_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Padding {
    None,
    /// A stored padding file with this many bytes of content.
    File(usize),
    /// An archive comment of this many bytes (the gap is smaller than a file's headers).
    Comment(usize),
}

/// The padding that makes a zip of `unpadded` bytes exactly `size`, given what a padding file's
/// headers add (`headers`); none when it is already that large.
fn padding(unpadded: usize, headers: usize, size: usize) -> Padding {
    let Some(gap) = size.checked_sub(unpadded).filter(|g| *g > 0) else {
        return Padding::None;
    };
    if gap >= headers {
        Padding::File(gap - headers)
    } else if gap <= usize::from(u16::MAX) {
        Padding::Comment(gap)
    } else {
        Padding::None
    }
}

fn filler(len: usize) -> Vec<u8> {
    PADDING_TEXT.bytes().cycle().take(len).collect()
}

/// The zip's file times: the training's, in DOS time (1980 when it cannot say).
fn zip_time(trained_at: &str) -> DateTime {
    time::OffsetDateTime::parse(trained_at, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.to_offset(time::UtcOffset::UTC))
        .and_then(|t| {
            DateTime::from_date_and_time(
                u16::try_from(t.year()).ok()?,
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
            )
            .ok()
        })
        .unwrap_or_default()
}

fn write_zip(
    files: &[(String, Vec<u8>)],
    time: DateTime,
    padding_file: Option<usize>,
    comment: usize,
) -> Result<Vec<u8>, ZipError> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    let deflated = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(time)
        .unix_permissions(0o644);
    for (name, body) in files {
        if name.ends_with('/') {
            zip.add_directory(name.as_str(), deflated.unix_permissions(0o755))?;
        } else {
            zip.start_file(name.as_str(), deflated)?;
            zip.write_all(body)?;
        }
    }
    if let Some(len) = padding_file {
        zip.start_file(
            PADDING_FILE,
            deflated.compression_method(CompressionMethod::Stored),
        )?;
        zip.write_all(&filler(len))?;
    }
    if comment > 0 {
        zip.set_comment(String::from_utf8_lossy(&filler(comment)).into_owned())?;
    }
    Ok(zip.finish()?.into_inner())
}

fn dockerfile(flavor: Option<&str>) -> String {
    let base = match flavor {
        Some(f) if f.eq_ignore_ascii_case("ARM") => "arm32v7/python:3.7-slim",
        Some(f) if f.eq_ignore_ascii_case("Windows") => "python:3.7-windowsservercore",
        _ => "python:3.7-slim",
    };
    format!(
        "FROM {base}\n\nRUN pip install -U pip\nRUN pip install --no-cache-dir flask~=2.2.5\n\n\
         COPY app /app\n\n# Expose the port\nEXPOSE 80\n\n# Set the working directory\nWORKDIR /app\n\n\
         # Run the flask server for the endpoints\nCMD python -u app.py\n"
    )
}

/// The DockerFile export's web app: the Prediction API's image routes, answered by `predict.py`.
const APP_PY: &str = r#"# cvchain stand-in: the web app of a Custom Vision DockerFile export. It serves the
# Prediction API's image routes on port 80 and answers with predict.py.
from flask import Flask, jsonify, request

from predict import initialize, predict_image

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 4 * 1024 * 1024  # 4 MB, as the service takes


@app.route("/")
def index():
    return "Custom Vision model host (cvchain stand-in)"


@app.route("/image", methods=["POST"])
@app.route("/<project>/image", methods=["POST"])
@app.route("/<project>/image/nostore", methods=["POST"])
@app.route("/<project>/classify/iterations/<published_name>/image", methods=["POST"])
@app.route("/<project>/classify/iterations/<published_name>/image/nostore", methods=["POST"])
def predict_image_handler(project=None, published_name=None):
    if "imageData" in request.files:
        data = request.files["imageData"].read()
    else:
        data = request.get_data()
    return jsonify(predict_image(data))


if __name__ == "__main__":
    initialize()
    app.run(host="0.0.0.0", port=80)
"#;

/// The DockerFile export's prediction module (`{project}` and `{iteration}` filled in).
const PREDICT_PY: &str = r#"# cvchain stand-in: the prediction module of a Custom Vision DockerFile export. Its model.pb
# is a placeholder, so every tag in labels.txt gets the same probability, in the shape the
# Prediction API answers. Standard library only.
import datetime
import os

PROJECT = "{project}"
ITERATION = "{iteration}"
LABELS_FILENAME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labels.txt")

labels = []


def initialize():
    with open(LABELS_FILENAME, encoding="utf-8") as f:
        labels[:] = [line.strip() for line in f.read().split("\n") if line.strip()]


def predict_image(image):
    if not labels:
        initialize()
    probability = 1.0 / len(labels) if labels else 0.0
    return {
        "id": "",
        "project": PROJECT,
        "iteration": ITERATION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "predictions": [
            {"probability": probability, "tagId": "", "tagName": name, "boundingBox": None}
            for name in labels
        ],
    }
"#;

/// The Vision AI Dev Kit's engine configuration, naming the model and labels files.
const VAIDK_CONFIG: &str = r#"{
  "Engine": 0,
  "NetworkIO": 1,
  "ScaleWidth": 224,
  "ScaleHeight": 224,
  "PixelNorm": 1,
  "BlueMean": 0,
  "GreenMean": 0,
  "RedMean": 0,
  "TargetFPS": 30,
  "ConfThreshold": 0.0,
  "DLC_NAME": "model.dlc",
  "LABELS_NAME": "labels.txt",
  "InputLayers": "data:0",
  "OutputLayers": ["model_output"],
  "ResultLayers": ["model_output:0"],
  "Runtime": 1
}
"#;

#[cfg(test)]
mod tests;
