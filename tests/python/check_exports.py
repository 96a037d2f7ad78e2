"""Opens every export the stand-in made, as a deploy script would, with implementations that are
not cvchain's: Python's zipfile for the package, the onnx package's checker and onnxruntime for
each ONNX model, run on an image-sized input the way Microsoft's export samples prepare one.

Usage: check_exports.py DIR. DIR holds the downloaded zips and expect.json, a list of
{"file", "platform", "flavor", "iteration", "labels", "multilabel", "size"}. Every check is an
assertion (the exit status says whether all held); the report on stdout (JSON) gives, per zip,
its file names, the model's SHA-1 and the scores the ONNX model gave, for the Rust test to compare
across exports.
"""

import hashlib
import importlib.util
import io
import json
import math
import pathlib
import sys
import tempfile
import zipfile

import numpy as np
import onnx
import onnx.checker
import onnxruntime

# The layouts of Custom Vision's exports, written down here independently of the stand-in.
MANIFEST = "cvexport.manifest"
LAYOUTS = {
    ("onnx", None): ["model.onnx", "labels.txt", MANIFEST],
    ("tensorflow", None): ["model.pb", "labels.txt", MANIFEST],
    ("tensorflow", "tensorflowlite"): ["model.tflite", "labels.txt", MANIFEST],
    ("coreml", None): ["model.mlmodel", "labels.txt", MANIFEST],
    ("dockerfile", None): [
        "Dockerfile", "app/", "app/app.py", "app/predict.py", "app/labels.txt", "app/model.pb"],
    ("vaidk", None): ["model.dlc", "labels.txt", "va-snpe-engine-library_config.json"],
    ("openvino", None): ["model.xml", "model.bin", "labels.txt", MANIFEST],
}
PADDING = "cvchain-standin-padding.bin"


def layout(platform, flavor):
    key = (platform.lower(), (flavor or "").lower() or None)
    return LAYOUTS.get(key) or LAYOUTS[(key[0], None)]


def image_input(session, metadata):
    """An image-sized input prepared as the samples' predict.py does: a 224x224 RGB picture
    (a deterministic gradient), NCHW, BGR when the metadata says Bgr8, divided by 255 unless
    it says NominalRange_0_255."""
    inp = session.get_inputs()[0]
    height, width = inp.shape[2:]
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1)
    array = rgb.astype(np.float32)[np.newaxis].transpose((0, 3, 1, 2))
    if metadata.get("Image.BitmapPixelFormat") == "Bgr8":
        array = array[:, (2, 1, 0), :, :]
    if metadata.get("Image.NominalPixelRange") != "NominalRange_0_255":
        array = array / 255
    dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}[inp.type]
    return {inp.name: array.astype(dtype)}


def check_onnx(data, labels, multilabel):
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    metadata = {p.key: p.value for p in model.metadata_props}
    # Both keys are read by the samples (the C# one fails without them).
    assert metadata["Image.BitmapPixelFormat"] in ("Bgr8", "Rgb8"), metadata
    assert metadata["Image.NominalPixelRange"] in ("NominalRange_0_255", "Normalized_0_1"), metadata

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert len(inputs) == 1, [i.name for i in inputs]
    assert inputs[0].name == "data", inputs[0].name
    assert inputs[0].shape == [1, 3, 224, 224], inputs[0].shape
    assert inputs[0].type == "tensor(float)", inputs[0].type
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == ["model_output"], [o.name for o in outputs]
    assert outputs[0].shape == [1, len(labels)], outputs[0].shape

    scores = session.run(None, image_input(session, metadata))[0]
    assert scores.shape == (1, len(labels)), scores.shape
    scores = [float(s) for s in scores[0]]
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores), scores
    if not multilabel:
        assert abs(sum(scores) - 1.0) < 1e-4, scores
    return scores


def check_docker_app(z, labels):
    """The DockerFile export's app runs: its Python compiles, and predict.py answers one
    prediction per tag (flask, which app.py needs, is not installed here)."""
    for name in ("app/app.py", "app/predict.py"):
        compile(z.read(name), name, "exec")
    dockerfile = z.read("Dockerfile").decode()
    assert dockerfile.startswith("FROM "), dockerfile
    assert "COPY app /app" in dockerfile, dockerfile
    with tempfile.TemporaryDirectory() as d:
        z.extractall(d)
        spec = importlib.util.spec_from_file_location("predict", pathlib.Path(d, "app/predict.py"))
        predict = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(predict)
        predict.initialize()
        answer = predict.predict_image(b"\x89PNG")
    assert [p["tagName"] for p in answer["predictions"]] == labels, answer


def check(directory, e):
    data = pathlib.Path(directory, e["file"]).read_bytes()
    if e.get("size") is not None:
        assert len(data) == e["size"], (len(data), e["size"])
    z = zipfile.ZipFile(io.BytesIO(data))
    assert z.testzip() is None, "a file's CRC does not match"
    names = z.namelist()
    want = layout(e["platform"], e["flavor"])
    assert names[: len(want)] == want, names
    assert names[len(want):] in ([], [PADDING]), names

    base = "app/" if e["platform"].lower() == "dockerfile" else ""
    labels = z.read(base + "labels.txt").decode("utf-8").split("\r\n")
    assert labels == e["labels"], labels
    report = {"file": e["file"], "names": names}

    if MANIFEST in names:
        manifest = json.loads(z.read(MANIFEST))
        assert manifest["DomainType"] == "Classification", manifest
        assert manifest["Platform"] == e["platform"], manifest
        assert manifest["Flavor"] == e["flavor"], manifest
        assert manifest["IterationId"] == e["iteration"], manifest
        assert manifest["LabelFileName"] == "labels.txt", manifest
        model = z.read(manifest["ModelFileName"])
        assert manifest["ModelFileSHA1"] == hashlib.sha1(model).hexdigest(), manifest
    if "va-snpe-engine-library_config.json" in names:
        config = json.loads(z.read("va-snpe-engine-library_config.json"))
        z.getinfo(config["DLC_NAME"])
        z.getinfo(config["LABELS_NAME"])

    if "model.onnx" in names:
        model = z.read("model.onnx")
        report["model_sha1"] = hashlib.sha1(model).hexdigest()
        report["scores"] = check_onnx(model, labels, e["multilabel"])
    if e["platform"].lower() == "dockerfile":
        check_docker_app(z, labels)
    return report


def main():
    directory = sys.argv[1]
    expected = json.loads(pathlib.Path(directory, "expect.json").read_text())
    assert expected, "nothing to check"
    reports = []
    for e in expected:
        try:
            reports.append(check(directory, e))
        except Exception as err:
            raise SystemExit(f"{e['file']} ({e['platform']} {e['flavor']}): {err!r}")
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
