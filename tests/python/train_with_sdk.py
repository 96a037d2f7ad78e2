"""A training script written against Microsoft's Custom Vision SDK for Python, unchanged: only
the endpoint and the key point it at `cvchain standin` instead of Azure.

It creates a project wired to a notification queue and a backup container, uploads tagged images
(from files, from data and from URLs), trains, reads the iteration and its performance, exports,
publishes and unpublishes; a second project trains and has its iteration deleted. On the way it
makes mistakes on purpose, and each must raise the SDK's own CustomVisionErrorException with the
service's error code. Run by tests/python_sdk.rs; prints a JSON summary last.

Environment: CV_ENDPOINT, CV_KEY, QUEUE_URI, CONTAINER_URI, MISSING_QUEUE_URI, PREDICTION_ID.
"""

import json
import os
import struct
import sys
import time
import uuid
import zlib

from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient
from azure.cognitiveservices.vision.customvision.training.models import (
    CustomVisionErrorException,
    ImageFileCreateBatch,
    ImageFileCreateEntry,
    ImageUrlCreateBatch,
    ImageUrlCreateEntry,
)
from msrest.authentication import ApiKeyCredentials

ENDPOINT = os.environ["CV_ENDPOINT"]
KEY = os.environ["CV_KEY"]
QUEUE_URI = os.environ["QUEUE_URI"]
CONTAINER_URI = os.environ["CONTAINER_URI"]
MISSING_QUEUE_URI = os.environ["MISSING_QUEUE_URI"]
PREDICTION_ID = os.environ["PREDICTION_ID"]

codes_seen = []


def png(rgb, size=32):
    """A small valid PNG of one colour."""
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def expect_error(code, call, *args, **kwargs):
    """`call` must fail with the SDK's CustomVisionErrorException carrying `code`."""
    try:
        call(*args, **kwargs)
    except CustomVisionErrorException as e:
        got = e.error.code if e.error is not None else None
        assert got == code, f"{call.__name__}: expected {code}, got {got} ({e.message})"
        assert e.error.message, f"{call.__name__}: {code} without a message"
        codes_seen.append(code)
        return
    raise AssertionError(f"{call.__name__}: expected {code}, but it succeeded")


def wait_until(what, check, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def train_and_wait(trainer, project_id, **kwargs):
    iteration = trainer.train_project(project_id, **kwargs)
    assert iteration.status == "Training", iteration.status
    return wait_until(
        "training",
        lambda: (lambda it: it if it.status == "Completed" else None)(
            trainer.get_iteration(project_id, iteration.id)),
    )


def tagged_images(trainer, project_id, tags, salt):
    """Five images per tag, as files (base64 in JSON), each batch tagged."""
    for n, tag in enumerate(tags):
        entries = [ImageFileCreateEntry(name=f"{tag.name}-{i}.png", contents=png((n * 60, i * 40, salt)))
                   for i in range(5)]
        result = trainer.create_images_from_files(
            project_id, ImageFileCreateBatch(images=entries, tag_ids=[tag.id]))
        assert result.is_batch_successful, [i.status for i in result.images]


def main():
    trainer = CustomVisionTrainingClient(ENDPOINT, ApiKeyCredentials(in_headers={"Training-key": KEY}))
    # The service (and the stand-in) allow 10 calls a second and refuse the rest with 429 and
    # Retry-After; msrest's default policy retries neither 429 nor a POST. A script that makes
    # calls back to back has to, as one against the service would.
    policy = trainer.config.retry_policy.policy
    policy.status_forcelist = set(policy.status_forcelist) | {429}
    policy.allowed_methods = None

    compact = next(d for d in trainer.get_domains() if d.name == "General (compact)")
    assert compact.exportable

    # The storage integration is checked at creation, as in Azure: a queue that does not exist
    # fails the set-up.
    expect_error("BadRequestInvalidUri", trainer.create_project, "Nowhere", domain_id=compact.id,
                 notification_queue_uri=MISSING_QUEUE_URI)
    project = trainer.create_project(
        "SDK Widgets", description="trained with Microsoft's SDK", domain_id=compact.id,
        notification_queue_uri=QUEUE_URI, export_model_container_uri=CONTAINER_URI)
    assert project.settings.notification_queue_uri == QUEUE_URI
    assert project.settings.export_model_container_uri == CONTAINER_URI
    assert trainer.get_project(project.id).name == "SDK Widgets"
    assert any(p.id == project.id for p in trainer.get_projects())

    # Nothing to train on yet.
    expect_error("BadRequestTrainingValidationFailed", trainer.train_project, project.id)

    widget = trainer.create_tag(project.id, "widget")
    gadget = trainer.create_tag(project.id, "gadget")
    expect_error("BadRequestTagNameNotUnique", trainer.create_tag, project.id, "Widget")
    assert {t.name for t in trainer.get_tags(project.id)} == {"widget", "gadget"}

    tagged_images(trainer, project.id, [widget], salt=1)
    # From data (multipart/form-data), one image a call, tagged.
    for i in range(5):
        result = trainer.create_images_from_data(project.id, png((200, i * 40, 9)), tag_ids=[gadget.id])
        assert result.is_batch_successful and result.images[0].status == "OK"
    # One untagged image.
    untagged = trainer.create_images_from_data(project.id, png((1, 2, 3)))
    assert untagged.images[0].image.tags is None
    # From URLs: one the service can fetch (an image it already holds: a duplicate) and one it
    # cannot; a batch with a failure answers 207 and says which.
    known = trainer.get_tagged_images(project.id, tag_ids=[widget.id], take=1)[0]
    result = trainer.create_images_from_urls(project.id, ImageUrlCreateBatch(images=[
        ImageUrlCreateEntry(url=known.original_image_uri, tag_ids=[widget.id]),
        ImageUrlCreateEntry(url="http://127.0.0.1:9/not-there.png"),
    ]))
    assert not result.is_batch_successful
    assert [i.status for i in result.images] == ["OKDuplicate", "ErrorSource"], result.images
    # Not an image at all.
    result = trainer.create_images_from_files(project.id, ImageFileCreateBatch(images=[
        ImageFileCreateEntry(name="notes.txt", contents=b"not an image", tag_ids=[widget.id])]))
    assert [i.status for i in result.images] == ["ErrorImageFormat"]
    assert trainer.get_tagged_image_count(project.id) == 10
    assert trainer.get_untagged_image_count(project.id) == 1
    assert {t.name: t.image_count for t in trainer.get_tags(project.id)} == {"widget": 5, "gadget": 5}

    iteration = train_and_wait(trainer, project.id)
    assert iteration.exportable and "OpenVino" in iteration.exportable_to
    # The same images again: nothing to do, as the service says.
    expect_error("BadRequestTrainingNotNeeded", trainer.train_project, project.id)
    assert [i.id for i in trainer.get_iterations(project.id)] == [iteration.id]
    renamed = trainer.update_iteration(project.id, iteration.id, name="SDK first")
    assert renamed.name == "SDK first"
    performance = trainer.get_iteration_performance(project.id, iteration.id)
    assert 0 < performance.precision <= 1 and 0 < performance.recall <= 1
    assert {t.name for t in performance.per_tag_performance} == {"widget", "gadget"}

    # Exports of the platforms a compact domain adds in v3.4-preview; cvchain's worker exports
    # the chain's own (ONNX, TensorFlow) from the training notification meanwhile.
    for platform in ["VAIDK", "OpenVino"]:
        export = trainer.export_iteration(project.id, iteration.id, platform)
        assert export.status == "Exporting" and export.platform == platform
    expect_error("BadRequestExportAlreadyInProgress", trainer.export_iteration, project.id,
                 iteration.id, "VAIDK")
    expect_error("BadRequestExportValidationFailed", trainer.export_iteration, project.id,
                 iteration.id, "ONNX", flavor="Linux")
    expect_error("NotFoundIteration", trainer.export_iteration, project.id, str(uuid.uuid4()), "ONNX")
    wait_until("the SDK's exports", lambda: {
        e.platform for e in trainer.get_exports(project.id, iteration.id)
        if e.status == "Done" and e.download_uri} >= {"VAIDK", "OpenVino"})

    # Publish, refuse to delete while published, unpublish.
    assert trainer.publish_iteration(project.id, iteration.id, "sdk-widgets", PREDICTION_ID) is True
    assert trainer.get_iteration(project.id, iteration.id).publish_name == "sdk-widgets"
    expect_error("BadRequestIterationIsPublished", trainer.delete_iteration, project.id, iteration.id)
    trainer.unpublish_iteration(project.id, iteration.id)
    expect_error("BadRequestIterationNotPublished", trainer.unpublish_iteration, project.id, iteration.id)
    assert trainer.get_iteration(project.id, iteration.id).publish_name == ""

    # A scratch project on a domain that cannot export: train, delete the iteration and the
    # project.
    general = next(d for d in trainer.get_domains() if d.name == "General")
    scratch = trainer.create_project("SDK Scratch", domain_id=general.id)
    tags = [trainer.create_tag(scratch.id, name) for name in ["a", "b"]]
    tagged_images(trainer, scratch.id, tags, salt=7)
    first = train_and_wait(trainer, scratch.id)
    assert not first.exportable
    expect_error("BadRequestProjectUnsupportedExportPlatform", trainer.export_iteration, scratch.id,
                 first.id, "ONNX")
    trainer.delete_iteration(scratch.id, first.id)
    expect_error("NotFoundIteration", trainer.get_iteration, scratch.id, first.id)
    trainer.delete_project(scratch.id)
    expect_error("NotFoundProject", trainer.get_project, scratch.id)

    # A wrong key: the gateway's 401, still the SDK's exception.
    wrong = CustomVisionTrainingClient(ENDPOINT, ApiKeyCredentials(in_headers={"Training-key": "wrong"}))
    try:
        wrong.get_domains()
        raise AssertionError("a wrong key was accepted")
    except CustomVisionErrorException as e:
        assert e.response.status_code == 401, e.response.status_code

    print(json.dumps({
        "projectId": project.id,
        "iterationId": iteration.id,
        "errorCodes": codes_seen,
    }))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        import traceback
        traceback.print_exc()
        sys.exit(1)
