"""``salgl serve`` under abuse and overload: every bad request gets its error record or a 4xx, a full
replica answers 503 at once, and a replica killed mid-request is replaced while its client gets
one clean error. After each case the replica must still answer a good request.

One deployment on a local Ray instance serves every case, with small limits (64 KiB bodies, 4
images a request, 1 megapixel, 4 queued images) and a batch of 4 that waits up to 20 s to fill: a
request of 4 images is scored at once, while a smaller one stays queued for as long as a case needs
it to (the test waits on the replica's own count of queued images, never on time).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from jobs.inference.loading import load_for_inference
from tests._servers import free_port
from tests._tiny_checkpoint import write_tiny_checkpoint

VOCABULARY = [f"label_{i}" for i in range(10)]
KIB = 1024


def png(width: int, height: int, *, noise: bool = True) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8) if noise else np.zeros((height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = png(32, 32)  # 4 of them, base64, well under the 64 KiB limit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 120) -> tuple[int, Any, Message]:
    """(status, JSON answer, headers: case-insensitive), for 4xx/5xx answers too."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text.decode(errors="replace")
        return err.code, answer, err.headers


def batch_of_four(first: bytes) -> bytes:
    """A JSON request that fills a batch at once: ``first``, then three good images."""
    return json.dumps({"images": [b64(first)] + [b64(GOOD)] * 3}).encode()


def get_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())["replica"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.05)  # polling a server's state, not synchronising on time


def assert_still_serving(url: str) -> None:
    status, answer, _ = post(url, batch_of_four(GOOD))
    assert status == 200 and len(answer) == 4 and all("labels" in record for record in answer), answer


# Requests answered with a status and a message, nothing scored.
REFUSED = [
    ("body over --max-body-mib (raw)", lambda: (os.urandom(65 * KIB), "application/octet-stream"), 413, "over the limit"),
    ("body over --max-body-mib (JSON)", lambda: (json.dumps({"images": [b64(os.urandom(60 * KIB))]}).encode(), "application/json"),
     413, "over the limit"),
    ("more images than --max-images-per-request", lambda: (json.dumps({"images": [b64(GOOD)] * 5}).encode(), "application/json"),
     413, "5 images in one request"),
    ("JSON that does not parse", lambda: (b'{"images": [', "application/json"), 400, "not valid JSON"),
    ("images not a list", lambda: (b'{"images": "abc"}', "application/json"), 400, "non-empty list"),
    ("an unknown key", lambda: (json.dumps({"imgs": [b64(GOOD)]}).encode(), "application/json"), 400, "unknown key"),
    ("an image that is not base64", lambda: (b'{"images": ["%%%"]}', "application/json"), 400, "not valid base64"),
    ("top_k of the wrong type", lambda: (json.dumps({"images": [b64(GOOD)], "top_k": "all"}).encode(), "application/json"),
     400, "top_k must be"),
    ("an empty body", lambda: (b"", "application/octet-stream"), 400, "empty body"),
]

# Images answered with an error record in their place, the batch's other images scored.
UNREADABLE = [
    ("decompression bomb (small file, 2000 x 2000 canvas)", lambda: png(2000, 2000, noise=False), "DecompressionBombError"),
    ("truncated PNG", lambda: GOOD[: len(GOOD) // 2], "OSError"),
    ("bytes that are no image", lambda: b"GIF89a not really", "cannot identify image file"),
    ("a JSON list sent as a raw body", lambda: b"[1, 2, 3]", "cannot identify image file"),
]


@pytest.fixture(scope="module")
def server(ray_local: None, tmp_path_factory: pytest.TempPathFactory):
    from jobs.inference.serve import RequestLimits, ServeOptions, start_serving, stop_serving

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000001", VOCABULARY)
    limits = RequestLimits(max_body_bytes=64 * KIB, max_images=4, max_pixels=1_000_000)
    options = ServeOptions(port=free_port(), max_batch_size=4, batch_wait_timeout_s=20.0, max_queued_images=4, limits=limits)
    try:
        yield start_serving(load_for_inference(str(checkpoint)), options)
    finally:
        stop_serving(whole_instance=True)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bad_requests_get_their_answer_and_the_replica_keeps_serving(server: str) -> None:
    assert_still_serving(server)
    for name, make, code, message in REFUSED:
        body, content_type = make()
        status, answer, _ = post(server, body, content_type)
        assert (status, message in str(answer)) == (code, True), f"{name}: {status} {answer}"
        assert_still_serving(server)
    for name, make, error in UNREADABLE:
        status, answer, _ = post(server, batch_of_four(make()))
        assert status == 200 and error in answer[0].get("error", ""), f"{name}: {status} {answer}"
        assert all("labels" in record for record in answer[1:]), f"{name}: the good images were not scored: {answer}"
        assert_still_serving(server)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_full_replica_answers_503_at_once_and_serves_what_it_queued(server: str) -> None:
    queued: dict[str, Any] = {}
    three = json.dumps({"images": [b64(GOOD)] * 3}).encode()
    thread = threading.Thread(target=lambda: queued.setdefault("answer", post(server, three)))
    thread.start()
    wait_for(lambda: get_status(server)["pending"] == 3, "the first request's 3 images were not queued")
    status, answer, headers = post(server, json.dumps({"images": [b64(GOOD)] * 2}).encode(), timeout=10)
    assert status == 503 and "busy" in answer["error"] and headers.get("Retry-After") == "1", (status, answer)
    assert get_status(server)["pending"] == 3, "the 503 came only after the queued batch was scored"
    status, answer, _ = post(server, json.dumps({"images": [b64(GOOD)]}).encode())  # fits: the batch of 4 fills
    assert status == 200 and "labels" in answer[0], answer
    thread.join(timeout=120)
    status, answer, _ = queued["answer"]
    assert status == 200 and len(answer) == 3 and all("labels" in record for record in answer)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_replica_killed_mid_request_is_replaced_and_its_client_gets_one_error(server: str) -> None:
    before = get_status(server)
    answers: list[tuple[int, Any, Message]] = []
    thread = threading.Thread(target=lambda: answers.append(post(server, json.dumps({"images": [b64(GOOD)]}).encode())))
    thread.start()
    wait_for(lambda: get_status(server)["pending"] == 1, "the request's image was not queued")
    os.kill(before["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    assert len(answers) == 1 and 500 <= answers[0][0] < 600, answers  # one clean HTTP error, no hang
    wait_for(lambda: _answers_good(server), "Serve did not replace the killed replica", timeout=180)
    assert get_status(server)["pid"] != before["pid"]


def _answers_good(url: str) -> bool:
    try:
        status, answer, _ = post(url, batch_of_four(GOOD), timeout=30)
    except OSError:
        return False
    return status == 200 and len(answer) == 4
