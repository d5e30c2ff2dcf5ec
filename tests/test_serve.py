"""``salgl serve`` (``jobs.inference.serve``): HTTP POSTs of images answered with ``salgl predict``'s records.

Unit tests (no Ray): the two request forms parse, and requests that cannot be read are refused
with a message; ``salgl serve`` of a missing checkpoint is a usage error. Integration test (a local
Ray instance): Serve on a free port answers a raw image and the JSON form as ``predict_files``
does, and two concurrent requests are scored in one forward pass.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from jobs.inference.loading import load_for_inference
from jobs.inference.predict import predict_files
from jobs.inference.serve import BadRequest, TooLarge, parse_request, read_body, replica_device, torch_threads
from tests._servers import free_port
from tests._tiny_checkpoint import write_tiny_checkpoint
from tests._data_trees import noise_pngs

VOCABULARY = [f"label_{i}" for i in range(10)]
PARAMS = {"threshold": 0.505, "top_k": 3}  # not the defaults; the tiny model scores 0.48-0.52, so it splits the labels


# ---------------------------------------------------------------------------------------------
# Unit: request parsing and the CLI's usage errors


def test_raw_body_is_one_image_with_query_options() -> None:
    req = parse_request(b"\x89PNG...", {"threshold": "0.7", "other": "x"})
    assert req.images == [b"\x89PNG..."] and req.single and req.threshold == 0.7 and req.top_k == 5


def test_json_body_is_a_list_of_base64_images_with_options() -> None:
    body = json.dumps({"images": [base64.b64encode(b"one").decode(), base64.encodebytes(b"two" * 40).decode()], "top_k": 2})
    req = parse_request(body.encode(), {})
    assert req.images == [b"one", b"two" * 40] and not req.single and req.threshold == 0.5 and req.top_k == 2


@pytest.mark.parametrize("body, message", [
    (b"", "empty body"),
    (b'{"images": [', "not valid JSON"),
    (b'{"images": []}', "non-empty list"),
    (b'{"images": "abc"}', "non-empty list"),
    (b'{"images": [1]}', "images[0] must be a base64 string"),
    (b'{"images": ["not base64!"]}', "images[0] is not valid base64"),
    (b'{"images": ["AAAA"], "top_k": -1}', "top_k must be"),
    (b'{"images": ["AAAA"], "top_k": 1.5}', "top_k must be"),
    (b'{"images": ["AAAA"], "threshold": "high"}', "threshold must be a number"),
    (b'{"images": ["AAAA"], "path": "/etc/passwd"}', "unknown key"),
])
def test_requests_that_cannot_be_read_are_refused_with_a_message(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(message)):
        parse_request(body, {})


def test_a_batch_over_the_image_limit_is_too_large() -> None:
    body = json.dumps({"images": [base64.b64encode(b"x").decode()] * 3}).encode()
    assert len(parse_request(body, {}, max_images=3).images) == 3
    with pytest.raises(TooLarge, match="3 images in one request, over the limit of 2") as err:
        parse_request(body, {}, max_images=2)
    assert err.value.status == 413


class FakeRequest:
    """What ``read_body`` uses of Starlette's request: headers and a chunked body stream."""

    def __init__(self, chunks: list[bytes], content_length: str | None) -> None:
        self.chunks, self.streamed = chunks, 0
        self.headers = {} if content_length is None else {"content-length": content_length}

    async def stream(self):
        for chunk in self.chunks:
            self.streamed += 1
            yield chunk


@pytest.mark.parametrize("declared", ["10", None], ids=["declared", "chunked"])
def test_a_body_is_read_up_to_its_limit(declared: str | None) -> None:
    import asyncio

    assert asyncio.run(read_body(FakeRequest([b"12345", b"67890"], declared), max_bytes=10)) == b"1234567890"
    over = FakeRequest([b"12345", b"67890", b"x", b"never read"], None if declared is None else "21")
    with pytest.raises(TooLarge, match="over the limit of 10"):
        asyncio.run(read_body(over, max_bytes=10))
    assert over.streamed == (0 if declared else 3)  # a declared length is refused unread; a stream where it passes


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    import io

    from PIL import Image

    from pipeline.transforms import decode_image

    buffer = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buffer, format="PNG")  # a few KB declaring 2 megapixels
    data = buffer.getvalue()
    assert decode_image(data).size == (2000, 1000)
    with pytest.raises(Image.DecompressionBombError, match="2000 x 1000 = 2,000,000 pixels is over the limit of 1,999,999"):
        decode_image(data, max_pixels=1_999_999)


def test_a_replica_uses_a_gpu_only_when_ray_gave_it_one() -> None:
    assert replica_device([]) == "cpu" and replica_device(["0"]) == "cuda" and replica_device([1]) == "cuda"
    assert [torch_threads(c) for c in (0.25, 1, 1.5, 4)] == [1, 1, 2, 4]


def test_serve_of_a_missing_checkpoint_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salgl serve: error: checkpoint") and err.count("\n") == 1, err


def test_serve_refuses_bad_options_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "nope"), "--max-batch-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("salgl serve: error: --replicas and --max-batch-size")


@pytest.mark.parametrize("console, serve_level", [(logging.INFO, "WARNING"), (logging.DEBUG, "INFO")], ids=["default", "-v"])
def test_serve_logs_its_info_lines_only_at_verbose(monkeypatch: pytest.MonkeyPatch, console: int, serve_level: str) -> None:
    import jobs.inference.serve as serving

    driver_logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(driver_logger, "level", driver_logger.level)  # restored after the test
    monkeypatch.setattr(serving, "console_level", lambda: console)
    assert serving.serve_logging_config().log_level == serve_level  # Serve's controller, proxy and replicas
    assert logging.getLevelName(driver_logger.level) == serve_level  # "Started Serve", "Application ... is ready"


# ---------------------------------------------------------------------------------------------
# Integration: a Serve deployment on a local Ray instance


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", VOCABULARY))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Two encoded PNGs of noise (one at the model's size, one predict must resize) and a non-image."""
    return [path.read_bytes() for path in noise_pngs(tmp_path_factory.mktemp("images"))] + [b"not an image"]


def post(url: str, body: bytes, content_type: str) -> Any:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def assert_same_record(got: dict, want: dict) -> None:
    """Equal but for float noise of a different batch composition (scores to 1e-5)."""
    assert got.keys() == want.keys()
    if "error" in want:
        assert got == want
        return
    assert got["labels"] == want["labels"] and got["scene"] == want["scene"]
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
    assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert [t["score"] for t in got["top_k"]] == pytest.approx([t["score"] for t in want["top_k"]], abs=1e-5)
    assert got["scene_probability"] == pytest.approx(want["scene_probability"], abs=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_served_answers_equal_salgl_predict(ray_local: None, checkpoint: str, images: list[bytes]) -> None:
    from ray import serve

    from jobs.inference.serve import APP_NAME, ServeOptions, start_serving, stop_serving

    loaded = load_for_inference(checkpoint)
    want = list(predict_files(loaded.model, loaded.cfg.data, loaded.vocabulary, images, progress=False, **PARAMS))
    # A long wait with a batch of 2: two concurrent images always fill one batch, and nothing waits 1 s but a lone image.
    options = ServeOptions(port=free_port(), route_prefix="/salgl", max_batch_size=2, batch_wait_timeout_s=1.0, **PARAMS)
    try:
        url = start_serving(loaded, options)
        assert url == f"http://127.0.0.1:{options.port}/salgl/"
        assert_same_record(post(url, images[0], "image/png"), want[0])
        assert_same_record(post(url, images[2], "application/octet-stream"), want[2])  # its error record, not a 500
        both = post(url, json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode(), "application/json")
        assert len(both) == 3
        for got, expected in zip(both, want):
            assert_same_record(got, expected)
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(url, b'{"images": [', "application/json")
        assert bad.value.code == 400 and "not valid JSON" in json.loads(bad.value.read())["error"]

        handle = serve.get_app_handle(APP_NAME)
        before = handle.status.remote().result()["batch_sizes"]
        answers: dict[int, Any] = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, post(url, images[i], "image/png"))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i in range(2):
            assert_same_record(answers[i], want[i])
        after = handle.status.remote().result()["batch_sizes"]
        assert {size: n - before.get(size, 0) for size, n in after.items() if n != before.get(size, 0)} == {2: 1}  # one pass for both
    finally:
        stop_serving(whole_instance=True)
