"""`tokenfuse serve` end to end on CPU through a real HTTP client: answers equal a direct run,
a bounded load test loses nothing it accepted, overload gets 429, malformed input gets a 4xx."""

from __future__ import annotations

import asyncio
import json
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from tokenfuse.engines.runtime import load
from tokenfuse.engines.preprocess import Preprocessor
from tokenfuse.engines.serve import create_app
from tokenfuse.exporter import export

pytestmark = pytest.mark.xdist_group("serve")  # one pytest-xdist worker makes this module's models once (apart from the engine tests' group: a ViT-Ti export is seconds)


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
def vision_model(tmp_path_factory, shared_exports):
    """conftest's ViT-Ti pitome export, served under the name `tiny`."""
    shared, _ = shared_exports.get("vit-ti", "pitome")
    path = tmp_path_factory.mktemp("serve") / "tiny.onnx"
    for suffix in (".onnx", ".json"):
        shutil.copyfile(shared.with_suffix(suffix), path.with_suffix(suffix))
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, minilm_path):
    path = tmp_path_factory.mktemp("serve-text") / "minilm.onnx"
    export(f"hf:{minilm_path}", path, method="pitome", r=0.9, seq_len=32, validate=False, log=lambda *_: None)
    return path


@pytest.fixture(scope="module")
def default_vision_server(vision_model):
    """One server of the ViT-Ti model with the default settings, for tests that check only their own replies."""
    with Server(create_app(vision_model)) as url:
        yield url


def _png(seed: int, size=(64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_match_a_direct_run_and_service_endpoints(vision_model):
    runner = load(vision_model)
    pre = Preprocessor(runner.manifest.preprocess)
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
    pre = Preprocessor(runner.manifest.preprocess)
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
def test_malformed_images_get_4xx(default_vision_server, request_kwargs, status):
    with httpx.Client(base_url=default_vision_server, timeout=30) as client:
        reply = client.post("/v1/embed/images", **request_kwargs)
        assert reply.status_code == status and reply.json()["detail"]
        wrong_kind = client.post("/v1/embed/texts", json={"texts": ["hello"]})
        assert wrong_kind.status_code == 400
        assert client.post("/v1/embed/texts", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_bounded_load_loses_nothing_it_accepted(vision_model):
    """16 concurrent clients for 3 seconds; every accepted request is answered correctly,
    the rest get 429, and no request gets a 5xx."""
    runner = load(vision_model)
    pre = Preprocessor(runner.manifest.preprocess)
    expected = {i: runner.run(pre.image(_png(i)))["logits"][0] for i in range(8)}
    statuses, wrong = [], []
    with Server(create_app(vision_model, max_batch=8, queue_size=6, max_queue_delay_ms=None)) as url:
        def client_loop(worker: int):
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.time() + 3
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
    app = create_app(vision_model, max_batch=4, max_delay_ms=3000, max_queue_delay_ms=None)
    server = Server(app)
    results = []
    with server as url:
        def one():
            with httpx.Client(base_url=url, timeout=60) as client:
                results.append(client.post("/v1/embed/images", files=[("files", ("a.png", _png(1), "image/png"))]).status_code)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while httpx.get(f"{url}/health").json()["models"]["tiny"]["queue"] < 3:  # queued; the batch waits to fill
            assert time.time() < deadline
            time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]


# --- several models, the OpenAI and KServe v2 protocols ---------------------------------------


@pytest.fixture(scope="module")
def two_models(text_model, vision_model):
    """The text model under a given name beside the vision model under its file stem."""
    app = create_app([f"minilm-merged={text_model}", vision_model], max_batch=8, max_inputs=8, max_image_pixels=100_000,
                     max_body_mb=0.05)
    with Server(app) as url:
        yield url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_openai_client_gets_the_direct_embeddings(text_model, two_models):
    import base64

    import openai
    from transformers import AutoTokenizer

    runner = load(text_model)
    pre = Preprocessor(runner.manifest.preprocess)
    tokenizer = AutoTokenizer.from_pretrained(runner.manifest.preprocess["tokenizer"])
    texts = ["a cat sits on the mat", "token merging makes transformers faster", "hello"]
    direct = [runner.run(pre.text(t))["embedding"][0] for t in texts]
    client = openai.OpenAI(base_url=f"{two_models}/v1", api_key="not-needed", max_retries=0)
    assert {m.id for m in client.models.list()} == {"minilm-merged", "tiny"}

    for encoding in ("float", "base64", None):  # None: the client asks for base64 and decodes it itself
        options = {"encoding_format": encoding} if encoding else {}
        reply = client.embeddings.create(model="minilm-merged", input=texts, **options)
        assert reply.model == "minilm-merged" and [d.index for d in reply.data] == [0, 1, 2]
        for item, expected in zip(reply.data, direct):
            vector = np.frombuffer(base64.b64decode(item.embedding), "<f4") if encoding == "base64" else np.array(item.embedding)
            assert np.abs(vector - expected).max() < 1e-4
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)

    single = client.embeddings.create(model="minilm-merged", input="hello")
    assert len(single.data) == 1 and np.abs(np.array(single.data[0].embedding) - direct[2]).max() < 1e-4
    ids = tokenizer("hello")["input_ids"]  # ready-made token ids give the text's embedding
    by_ids = client.embeddings.create(model="minilm-merged", input=[ids], encoding_format="float")
    assert np.abs(np.array(by_ids.data[0].embedding) - direct[2]).max() < 1e-4 and by_ids.usage.prompt_tokens == len(ids)

    with pytest.raises(openai.NotFoundError, match="not served"):
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    with pytest.raises(openai.BadRequestError, match="takes images"):
        client.embeddings.create(model="tiny", input="hello")
    with pytest.raises(openai.BadRequestError, match="outside"):
        client.embeddings.create(model="minilm-merged", input=[[10**7]])


def test_kserve_v2_with_tritonclient_matches_onnxruntime(text_model, two_models):
    import onnxruntime
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    session = onnxruntime.InferenceSession(str(text_model), providers=["CPUExecutionProvider"])
    client = triton.InferenceServerClient(f"127.0.0.1:{_port(two_models)}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("minilm-merged")
    assert not client.is_model_ready("nothing")
    metadata = client.get_model_metadata("minilm-merged")
    assert [(i["name"], i["datatype"], i["shape"][1:]) for i in metadata["inputs"]] == [
        (i.name, "INT64", i.shape[1:]) for i in session.get_inputs()]
    assert [o["name"] for o in metadata["outputs"]] == [o.name for o in session.get_outputs()]

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, (3, 32)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input_ids": ids, "attention_mask": mask})))
    for binary in (False, True):
        inputs = [triton.InferInput("input_ids", list(ids.shape), "INT64"), triton.InferInput("attention_mask", list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids, binary_data=binary)
        inputs[1].set_data_from_numpy(mask, binary_data=binary)
        outputs = [triton.InferRequestedOutput("embedding", binary_data=binary), triton.InferRequestedOutput("last_hidden_state", binary_data=not binary)]
        result = client.infer("minilm-merged", inputs, outputs=outputs, request_id="r1")
        assert result.get_response()["model_name"] == "minilm-merged" and result.get_response()["id"] == "r1"
        for name in ("embedding", "last_hidden_state"):
            assert result.as_numpy(name).shape == expected[name].shape
            assert np.abs(result.as_numpy(name) - expected[name]).max() < 1e-4
    every = client.infer("minilm-merged", inputs)  # no outputs named: all of them, binary
    assert {o["name"] for o in every.get_response()["outputs"]} == set(expected)

    wrong_type = triton.InferInput("input_ids", list(ids.shape), "INT32")
    wrong_type.set_data_from_numpy(ids.astype(np.int32), binary_data=False)
    with pytest.raises(InferenceServerException, match="datatype"):
        client.infer("minilm-merged", [wrong_type, inputs[1]])
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("nothing", inputs)


def test_images_as_base64_and_data_urls(vision_model, two_models):
    import base64

    runner = load(vision_model)
    pre = Preprocessor(runner.manifest.preprocess)
    encoded = [base64.b64encode(_png(i)).decode() for i in range(2)]
    with httpx.Client(base_url=two_models, timeout=60) as client:
        reply = client.post("/v1/embed/images", json={"model": "tiny", "images": [encoded[0], "data:image/png;base64," + encoded[1]]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "tiny"
        for i, item in enumerate(reply.json()["data"]):
            assert np.abs(np.array(item["logits"]) - runner.run(pre.image(_png(i)))["logits"][0]).max() < 1e-4
        multipart = client.post("/v1/embed/images", data={"model": "tiny"}, files=[("files", ("a.png", _png(0), "image/png"))])
        assert multipart.status_code == 200
        assert np.abs(np.array(multipart.json()["data"][0]["logits"]) - np.array(reply.json()["data"][0]["logits"])).max() < 1e-4


def _flat_png(size) -> bytes:
    """A one-colour PNG: many pixels in a few bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


MALFORMED = [
    ("post", "/v1/embed/texts", dict(json={"texts": ["a"]}), 400, "several models"),
    ("post", "/v1/embed/texts", dict(json={"texts": ["a"], "model": "nothing"}), 404, "not served"),
    ("post", "/v1/embed/texts", dict(json={"texts": ["a"] * 9, "model": "minilm-merged"}), 413, "--max-inputs"),
    ("post", "/v1/embed/texts", dict(json={"texts": ["word " * 20000], "model": "minilm-merged"}), 413, "--max-body-mb"),
    ("post", "/v1/embed/texts", dict(content=iter([b'{"texts": ["', b"a" * 60000, b'"]}']), headers={"content-type": "application/json"}), 413, "--max-body-mb"),  # streamed: chunked, no length
    ("post", "/v1/embed/texts", dict(json={"texts": [], "model": "minilm-merged"}), 422, None),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": []}), 400, "empty"),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": [[]]}), 400, "empty"),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": [list(range(40))]}), 400, "at most 32"),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": [[-1]]}), 400, "outside"),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": "a", "encoding_format": "int8"}), 422, None),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": "a", "dimensions": 3}), 400, "dimensions"),
    ("post", "/v1/embeddings", dict(json={"model": "minilm-merged", "input": [1, "a"]}), 422, None),
    ("post", "/v1/embeddings", dict(json={"input": "a"}), 422, None),
    ("post", "/v1/embeddings", dict(content=b"\xff\xfe", headers={"content-type": "application/json"}), 422, None),
    ("post", "/v1/embed/images", dict(json={"model": "tiny", "images": ["%%%"]}), 422, "base64"),
    ("post", "/v1/embed/images", dict(json={"model": "tiny", "images": ["data:image/png,abc"]}), 422, "base64"),
    ("post", "/v1/embed/images", dict(json={"model": "tiny", "images": [7]}), 422, "not a string"),
    ("post", "/v1/embed/images", dict(json={"model": "tiny", "images": []}), 422, "no images"),
    ("post", "/v1/embed/images", dict(json=["x"]), 422, "images"),
    ("post", "/v1/embed/images", dict(content=b"{", headers={"content-type": "application/json"}), 422, "JSON"),
    ("post", "/v1/embed/images", dict(data={"model": "tiny"}, files=[("files", ("big.png", None, "image/png"))]), 413, "--max-image-pixels"),
    ("post", "/v1/embed/images", dict(data={"model": "minilm-merged"}, files=[("files", ("a.png", None, "image/png"))]), 400, "takes texts"),
    ("post", "/v2/models/minilm-merged/infer", dict(content=b"[1, 2"), 400, "not valid JSON"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": "x"}), 400, "inputs"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": [{"name": "input_ids", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32}]}), 400, "takes inputs"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": [
        {"name": "input_ids", "shape": [1, 32], "datatype": "INT64", "data": [1] * 31},
        {"name": "attention_mask", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32}]}), 400, "31 values"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": [
        {"name": "input_ids", "shape": [1, 16], "datatype": "INT64", "data": [1] * 16},
        {"name": "attention_mask", "shape": [1, 16], "datatype": "INT64", "data": [1] * 16}]}), 400, "expected"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": [
        {"name": "input_ids", "shape": [1, 32], "datatype": "INT64", "data": ["x"] * 32},
        {"name": "attention_mask", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32}]}), 400, "not INT64"),
    ("post", "/v2/models/minilm-merged/infer", dict(json={"inputs": [
        {"name": "input_ids", "shape": [1, 32], "datatype": "INT64", "data": [10**8] * 32},
        {"name": "attention_mask", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32}], "outputs": [{"name": "nope"}]}), 400, "outside"),
    ("post", "/v2/models/minilm-merged/infer", dict(content=b'{"inputs": []}', headers={"inference-header-content-length": "999"}), 400, "Inference-Header"),
    ("get", "/v2/models/nothing", {}, 400, "not served"),
    ("get", "/v2/models/minilm-merged/versions/2", {}, 400, "version 1"),
]


@pytest.mark.parametrize("method, path, kwargs, status, message", MALFORMED, ids=[f"{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_4xx_with_a_message(two_models, method, path, kwargs, status, message):
    if "files" in kwargs:  # filled in here: the big image is over --max-image-pixels (100,000), the small one not
        big = kwargs["files"][0][1][0] == "big.png"
        kwargs = dict(kwargs, files=[("files", ("x.png", _flat_png((400, 300)) if big else _png(0), "image/png"))])
    with httpx.Client(base_url=two_models, timeout=30) as client:
        reply = getattr(client, method)(path, **kwargs)
    assert reply.status_code == status, reply.text
    if message:
        assert message in reply.text


# --- overload ------------------------------------------------------------------------------


class SlowRunner:
    """Doubles its input after `seconds`; records every example it computed."""

    def __init__(self, seconds: float):
        self.seconds, self.seen = seconds, []

    def run(self, feeds):
        time.sleep(self.seconds)
        self.seen.extend(feeds["x"][:, 0].tolist())
        return {"y": feeds["x"] * 2}


def _examples(*values):
    return [{"x": np.array([[v]], np.float32)} for v in values]


def test_admission_is_all_or_nothing_and_waiting_is_bounded():
    from tokenfuse.engines.batching import Batcher, Refusal

    async def scenario():
        runner = SlowRunner(0.3)
        batcher = Batcher(runner, max_batch=2, max_delay_ms=0, queue_size=3, max_queue_delay_ms=150)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(3, _examples(1, 2, 3)))  # starts at once, needs two calls
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit(1, _examples(4)))  # fits, but cannot start within 150 ms
        await asyncio.sleep(0)
        assert batcher.depth == 2
        prepared = []

        async def preprocess():  # would run only once admitted
            prepared.append(True)
            return _examples(5, 6, 7)

        with pytest.raises(Refusal) as refused:  # 2 waiting + 3 > 3: refused whole, before preprocessing
            await batcher.submit(3, preprocess())
        assert not prepared
        assert refused.value.status == 429 and refused.value.retry_after >= 1
        with pytest.raises(Refusal) as expired:
            await late
        assert expired.value.status == 503 and expired.value.retry_after >= 1
        results = await first  # its third example runs after 150 ms: once started, a request is finished
        assert [r["y"][0, 0] for r in results] == [2, 4, 6]
        assert batcher.calls.estimate(2) >= 0.3
        running = asyncio.ensure_future(batcher.submit(1, _examples(9)))
        await asyncio.sleep(0.05)  # it runs; one more would wait a whole call, over 150 ms: refused on arrival
        started = time.perf_counter()
        with pytest.raises(Refusal) as predicted:
            await batcher.submit(1, _examples(10))
        assert predicted.value.status == 429 and time.perf_counter() - started < 0.05
        await running
        await batcher.drain()
        with pytest.raises(Refusal) as closed:
            await batcher.submit(1, _examples(8))
        assert closed.value.status == 503
        return runner.seen

    assert asyncio.run(scenario()) == [1, 2, 3, 9]  # nothing refused or expired was computed


def test_admission_costs_each_call_at_its_size_and_counts_the_requests_own_inputs():
    """The estimate behind admission: calls are costed at the recent time of calls their size (a
    full call extrapolated from smaller ones until one runs), the running call is counted whole,
    and a request's own inputs fill the calls ahead of its last one. Admitted only when the call
    holding its last input is expected to end within the bound, or when it would start at once."""
    from tokenfuse.engines.batching import Batcher

    async def scenario():
        batcher = Batcher(SlowRunner(0.1), max_batch=4, max_delay_ms=0, queue_size=64, max_queue_delay_ms=1000)
        batcher.start()
        assert batcher.refusal(1) is None and batcher.expected_finish(1) is None  # nothing measured: admitted
        await batcher.submit(1, _examples(1))
        one = batcher.calls.estimate(1)
        assert 0.09 <= one < 0.3 and batcher.calls.estimate(4) == pytest.approx(4 * one)  # a full call: extrapolated
        batcher.running = 1  # light load: a one-example call runs, nothing waits
        assert batcher.expected_finish(1) == pytest.approx(2 * one) and batcher.refusal(1) is None
        batcher.running = 0
        batcher.pending.extend([None] * 2)  # two examples waiting (a stand-in queue: nothing runs)
        assert batcher.expected_finish(1) == pytest.approx(3 * one)  # joins them in one call of 3
        batcher.pending.append(None)  # three waiting
        assert batcher.expected_finish(1) == pytest.approx(4 * one)  # joins them in one full call
        assert batcher.expected_finish(2) == pytest.approx(8 * one)  # its second input in the next call, filled by later arrivals
        assert (batcher.refusal(2) is None) == (8 * one <= 1.0)
        batcher.pending.extend([None] * 8)  # 11 waiting: 3 full calls, then its own
        assert batcher.refusal(2).status == 429 and "expected in about" in batcher.refusal(2).message
        batcher.pending.clear()
        await batcher.drain()

    asyncio.run(scenario())


class ServeProcess:
    """`tokenfuse serve` in its own process on a free port, started and warm."""

    def __init__(self, *args: str):
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "import sys; from tokenfuse.cli import main; sys.exit(main())", "serve", *args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and self.process.poll() is None, "server did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.post(f"{self.url}/v1/embed/texts", json={"texts": ["warm up"]}, timeout=60).status_code == 200
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


PROBE = """
import json, sys, time, httpx
latencies = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as client:
    for _ in range(10):
        for path in ("/health", "/metrics"):
            started = time.perf_counter()
            reply = client.get(path)
            latencies.append((path, reply.status_code, time.perf_counter() - started, reply.text if path == "/health" else ""))
        time.sleep(0.1)
print(json.dumps(latencies))
"""


def test_health_and_metrics_answer_quickly_while_saturated(text_model):
    """32 clients keep the queue of a `tokenfuse serve` process full; /health and /metrics, probed
    from a third process, answer in under 100 ms (median)."""
    import json
    import subprocess
    import sys

    with ServeProcess(str(text_model), "--max-batch", "16", "--queue-size", "64", "--max-inputs", "16") as server:
        stop, statuses = threading.Event(), []

        def load_loop(worker: int):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.is_set():
                    texts = [f"client {worker} sends text number {i} about token merging" for i in range(16)]
                    statuses.append(client.post("/v1/embeddings", json={"model": text_model.stem, "input": texts}).status_code)
                    if statuses[-1] != 200:
                        time.sleep(0.05)  # a short back-off, as clients do on 429/503

        with ThreadPoolExecutor(32) as pool:
            for worker in range(32):
                pool.submit(load_loop, worker)
            time.sleep(2)
            probes = json.loads(subprocess.run([sys.executable, "-c", PROBE, server.url], capture_output=True, text=True, check=True).stdout)
            stop.set()
    assert all(status == 200 for _, status, _, _ in probes)
    depths = [json.loads(text)["models"][text_model.stem]["queue"] for path, _, _, text in probes if path == "/health"]
    assert max(depths) > 0 and statuses.count(429) > 0, (depths, set(statuses))  # it was saturated
    assert set(statuses) <= {200, 429, 503}
    latencies = [seconds for _, _, seconds, _ in probes]
    assert float(np.median(latencies)) < 0.1, latencies


def test_sigterm_under_load_answers_every_accepted_request(text_model):
    """`tokenfuse serve` in a subprocess under load gets SIGTERM: requests sent before it all get an
    HTTP answer (200, or 429 if refused at admission), new ones get 503, and it exits 0."""
    import signal

    with ServeProcess(str(text_model), "--max-batch", "8", "--queue-size", "64", "--max-queue-delay-ms", "0") as server:
        url, process = server.url, server.process
        terminated = threading.Event()
        before, after, lost = [], [], []

        def client_loop(worker: int):
            with httpx.Client(base_url=url, timeout=60) as client:
                while not terminated.is_set():
                    try:
                        reply = client.post("/v1/embed/texts", json={"texts": [f"text {worker} {i}" for i in range(8)]})
                    except httpx.TransportError as exc:
                        lost.append(repr(exc))
                        return
                    (after if terminated.is_set() else before).append(reply.status_code)
                    if reply.status_code != 200:
                        time.sleep(0.05)

        with ThreadPoolExecutor(16) as pool:
            for worker in range(16):
                pool.submit(client_loop, worker)
            time.sleep(3)
            process.send_signal(signal.SIGTERM)
            terminated.set()
            refused_new = []
            with httpx.Client(base_url=url, timeout=10) as client:
                for _ in range(50):
                    try:
                        refused_new.append(client.post("/v1/embed/texts", json={"texts": ["new"]}).status_code)
                    except httpx.TransportError:
                        break
                    if refused_new[-1] == 503:
                        break
                    time.sleep(0.01)
        code = process.wait(60)
        stderr = process.stderr.read()
    assert not lost, lost
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert after.count(200) > 0, (before, after)  # requests in flight at SIGTERM were answered
    assert set(before + after) <= {200, 429, 503}
    assert 503 in refused_new, refused_new


def test_model_names_come_from_stems_or_name_equals_path(tmp_path, capsys):
    from tokenfuse.cli import main
    from tokenfuse.engines.serve import model_files
    from tokenfuse.exporter.errors import UsageError

    assert model_files([tmp_path / "a" / "vit.onnx", "plain=/x/vit-none.onnx"]) == {"vit": tmp_path / "a" / "vit.onnx", "plain": Path("/x/vit-none.onnx")}
    with pytest.raises(UsageError, match="two models are named 'vit'"):
        model_files(["a/vit.onnx", "b/vit.onnx"])
    with pytest.raises(UsageError, match="cannot be a model name"):
        model_files(["a/my model.onnx"])
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert "tokenfuse: error:" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "x.onnx"), "--queue-size", "8", "--max-inputs", "9"]) == 2
    assert "--max-inputs 9 is over --queue-size 8" in capsys.readouterr().err


class _Stub:
    """A served model whose batcher refuses (or admits) every request, for FastPath alone."""

    def __init__(self, refusal):
        self.batcher = type("B", (), {"refusal": staticmethod(lambda count: refusal)})()


class _Served(dict):
    closing = last_responses = False


def _fast_path(refusal, hold_s=0.0, closing=False):
    """FastPath over one stub model; the app behind it notes the path and answers 200."""
    from prometheus_client import CollectorRegistry, Counter

    from tokenfuse.engines.serve import FastPath

    inner = []

    async def app(scope, receive, send):
        inner.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    served = _Served(m=_Stub(refusal))
    served.closing = served.last_responses = closing
    counter = Counter("requests", "", ["endpoint", "status"], registry=CollectorRegistry())
    return FastPath(app, served, lambda: ({"status": "ok"}, 200), counter, hold_s), inner


def _call(middleware, method, path):
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(event):
        sent.append(event)

    started = time.perf_counter()
    asyncio.run(middleware({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
    return sent, reads, time.perf_counter() - started


def test_a_request_no_model_could_admit_is_refused_before_its_body_is_read():
    """Refusing must cost little beside serving: no routing, no body, no validation; the answer is
    held (about the hold, jittered) so a client ignoring Retry-After cannot spin on it."""
    from tokenfuse.engines.batching import Refusal

    middleware, inner = _fast_path(Refusal(429, "the queue is full", retry_after=2), hold_s=0.2)
    sent, reads, elapsed = _call(middleware, "POST", "/v1/embeddings")
    assert not inner and not reads and 0.14 <= elapsed < 1.0
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"2" and b"connection" not in headers
    assert json.loads(body["body"])["error"]["message"] == "the queue is full"  # the OpenAI error shape
    for path in ("/v1/embed/texts", "/v1/embed/images", "/v2/models/m/infer", "/v2/models/m/versions/1/infer"):
        assert _call(middleware, "POST", path)[0][0]["status"] == 429
    assert _call(middleware, "GET", "/v1/models")[0][0]["status"] == 200 and inner == ["/v1/models"]  # not a model call: routed as usual


def test_at_the_end_of_shutdown_every_response_closes_the_connection_and_health_skips_routing():
    """Once the service has stopped listening, refusals and answers alike say Connection: close (a
    client reusing the connection would be cut off when the server closes it); before, they keep it."""
    from tokenfuse.engines.batching import Refusal

    middleware, inner = _fast_path(Refusal(503, "shutting down"), closing=True)
    start = _call(middleware, "POST", "/v1/embed/texts")[0][0]
    assert start["status"] == 503 and dict(start["headers"])[b"connection"] == b"close"
    sent = _call(middleware, "GET", "/health")[0]
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"status": "ok"} and not inner
    for closing in (True, False):
        admitted, inner = _fast_path(None, closing=closing)
        start = _call(admitted, "POST", "/v1/embeddings")[0][0]
        assert inner == ["/v1/embeddings"]  # a request some model can admit goes on to the routes
        assert start["status"] == 200 and (dict(start["headers"]).get(b"connection") == b"close") == closing


def test_health_port_answers_from_its_own_thread():
    from tokenfuse.engines.serve import start_health_server
    from tokenfuse.exporter.errors import UsageError

    port = _free_port()
    server = start_health_server("127.0.0.1", port, lambda: ({"status": "ok"}, 200), lambda: (b"tokenfuse_up 1\n", "text/plain"))
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").text == "tokenfuse_up 1\n"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/embeddings").status_code == 404
        with pytest.raises(UsageError, match="--health-port"):
            start_health_server("127.0.0.1", port, lambda: ({}, 200), lambda: (b"", "text/plain"))
    finally:
        server.shutdown()


class BucketedRunner(SlowRunner):
    """A SlowRunner whose examples fall in groups (as a length-adaptive model's buckets); records each call's groups."""

    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.calls = []

    def group_of(self, example):
        return int(example["x"][0, 0]) // 10

    def run(self, feeds):
        self.calls.append(sorted({int(v) // 10 for v in feeds["x"][:, 0]}))
        return super().run(feeds)


def test_a_call_takes_one_bucket_oldest_first():
    """Queued texts are batched by length bucket: each model call runs the oldest waiting example's
    bucket, up to max_batch of it, and every example is still answered with its own result."""
    from tokenfuse.engines.batching import Batcher

    async def scenario():
        runner = BucketedRunner(0.05)
        batcher = Batcher(runner, max_batch=3, max_delay_ms=20, queue_size=64)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(1, _examples(99)))  # keeps the model busy while the rest queue
        await asyncio.sleep(0.01)
        values = [1, 21, 2, 11, 3, 4, 22, 12]
        waiting = [asyncio.ensure_future(batcher.submit(1, _examples(v))) for v in values]
        results = await asyncio.gather(blocker, *waiting)
        await batcher.drain()
        return runner, [r[0]["y"][0, 0] for r in results]

    runner, answers = asyncio.run(scenario())
    assert answers == [2 * v for v in [99, 1, 21, 2, 11, 3, 4, 22, 12]]
    assert all(len(groups) == 1 for groups in runner.calls)  # never two buckets in one call
    # oldest first: bucket 0 (a full call), then 21's bucket, 11's, and the rest of bucket 0
    assert runner.seen == [99, 1, 2, 3, 21, 22, 11, 12, 4]
