"""`tokenfuse serve` end to end on CPU through a real HTTP client: answers equal a direct run,
a bounded load test loses nothing it accepted, overload gets 429, malformed input gets a 4xx."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from tokenfuse.engines.runtime import load
from tokenfuse.engines.serve import Preprocessor, create_app
from tokenfuse.exporter import export


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on a free port; stopping it runs the graceful shutdown."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny.onnx"
    export("timm:vit_tiny_patch16_224", path, random_init=True, method="pitome", r=0.9, validate=False, log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, minilm_path):
    path = tmp_path_factory.mktemp("serve-text") / "minilm.onnx"
    export(f"hf:{minilm_path}", path, method="pitome", r=0.9, seq_len=32, validate=False, log=lambda *_: None)
    return path


def _png(seed: int, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_match_a_direct_run_and_service_endpoints(vision_model):
    runner = load(vision_model)
    pre = Preprocessor(runner.manifest)
    with Server(create_app(vision_model, max_batch=4)) as url, httpx.Client(base_url=url, timeout=60) as client:
        files = [("files", (f"{i}.png", _png(i), "image/png")) for i in range(3)]
        reply = client.post("/v1/embed/images", files=files)
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        for i, item in enumerate(data):
            direct = runner.run(pre.image(_png(i)))["logits"][0]
            assert np.abs(np.array(item["logits"]) - direct).max() < 1e-4
        assert client.get("/health").json()["status"] == "ok"
        metrics = client.get("/metrics").text
        assert 'tokenfuse_requests_total{endpoint="images",status="200"} 1.0' in metrics
        assert "tokenfuse_batch_size_bucket" in metrics
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/embed/images", "/v1/embed/texts", "/health", "/metrics"}


def test_texts_match_a_direct_run(text_model):
    runner = load(text_model)
    pre = Preprocessor(runner.manifest)
    texts = ["a cat sits on the mat", "token merging makes transformers faster"]
    with Server(create_app(text_model)) as url, httpx.Client(base_url=url, timeout=60) as client:
        reply = client.post("/v1/embed/texts", json={"texts": texts})
        assert reply.status_code == 200, reply.text
        for text, item in zip(texts, reply.json()["data"]):
            assert np.abs(np.array(item["embedding"]) - runner.run(pre.text(text))["embedding"][0]).max() < 1e-4


@pytest.mark.parametrize(
    "request_kwargs, status",
    [
        (dict(files=[("files", ("x.png", b"not an image", "image/png"))]), 415),
        (dict(files=[("files", ("x.gif", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif"))]), 415),
        (dict(files=[]), 422),
        (dict(data={"nothing": "here"}), 422),
    ],
)
def test_malformed_images_get_4xx(vision_model, request_kwargs, status):
    with Server(create_app(vision_model)) as url, httpx.Client(base_url=url, timeout=30) as client:
        reply = client.post("/v1/embed/images", **request_kwargs)
        assert reply.status_code == status and reply.json()["detail"]
        wrong_kind = client.post("/v1/embed/texts", json={"texts": ["hello"]})
        assert wrong_kind.status_code == 400
        assert client.post("/v1/embed/texts", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_bounded_load_loses_nothing_it_accepted(vision_model):
    """16 concurrent clients for a bounded time; every accepted request is answered correctly,
    the rest get 429, and no request gets a 5xx."""
    runner = load(vision_model)
    pre = Preprocessor(runner.manifest)
    expected = {i: runner.run(pre.image(_png(i)))["logits"][0] for i in range(8)}
    statuses, wrong = [], []
    with Server(create_app(vision_model, max_batch=8, queue_size=6)) as url:
        def client_loop(worker: int):
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.time() + 8
                while time.time() < deadline:
                    i = worker % 8
                    reply = client.post("/v1/embed/images", files=[("files", ("a.png", _png(i), "image/png"))])
                    statuses.append(reply.status_code)
                    if reply.status_code == 200 and np.abs(np.array(reply.json()["data"][0]["logits"]) - expected[i]).max() > 1e-4:
                        wrong.append(i)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client_loop, range(16)))
    assert statuses.count(200) > 0 and not wrong
    assert set(statuses) <= {200, 429}, set(statuses)
    assert statuses.count(429) > 0  # the queue of 6 is smaller than 16 clients: overload was exercised


def test_shutdown_finishes_requests_in_flight(vision_model):
    app = create_app(vision_model, max_batch=2, max_delay_ms=200)
    server = Server(app)
    results = []
    with server as url:
        def one():
            with httpx.Client(base_url=url, timeout=60) as client:
                results.append(client.post("/v1/embed/images", files=[("files", ("a.png", _png(1), "image/png"))]).status_code)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.1)  # requests are queued, the batcher is still waiting to fill a batch
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]
