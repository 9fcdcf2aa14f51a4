"""`tokenfuse serve`: embeddings and logits over HTTP for one or more models (FastAPI + uvicorn).

Each model is served under a name (its file's stem unless given as NAME=PATH) on three sets of
routes: tokenfuse's own (/v1/embed/texts, /v1/embed/images), the OpenAI embeddings API
(/v1/embeddings) and the KServe v2 inference protocol (/v2/...), see protocols.py. Requests go
through one batcher per model (batching.py): admitted whole or refused with 429, answered 503 when
they cannot start within the queue-delay bound or once shutdown starts. Tokenising and image
decoding run on a worker thread per model, so /health and /metrics stay quick under load.
"""


import asyncio
import base64
import binascii
import gc
import io
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from .batching import Batcher, Refusal
from .preprocess import Preprocessor
from .runtime import Runner, load


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
POOLED_PREFERENCE = ("embedding", "pooler_output", "logits")


def model_files(models) -> dict[str, Path]:
    """Served name -> file, from paths or NAME=PATH; a name defaults to the file's stem."""
    if isinstance(models, (str, Path)):
        models = [models]
    named: dict[str, Path] = {}
    for spec in models:
        text = str(spec)
        name, given, path = text.partition("=")
        if not (given and NAME.match(name) and not Path(text).is_file()):
            name, path = Path(text).stem, text
        if not NAME.match(name):
            raise UsageError(f"{text}: {name!r} cannot be a model name (letters, digits, . _ -); give one as NAME=PATH")
        if name in named:
            raise UsageError(f"two models are named {name!r}; name them apart as NAME=PATH")
        named[name] = Path(path)
    if not named:
        raise UsageError("give at least one model to serve")
    return named


class ServedModel:
    """One model behind the service: runner, preprocessing (on its own thread) and batcher, under its name."""

    def __init__(self, name: str, runner: Runner, batcher: Batcher, max_image_pixels: int):
        self.name, self.runner, self.batcher, self.max_image_pixels = name, runner, batcher, max_image_pixels
        self.method = runner.manifest.method if runner.manifest else None
        self.preprocess = Preprocessor(runner.manifest.preprocess if runner.manifest else None)
        if self.preprocess.kind is None:
            raise UsageError(f"{name}: no export manifest with preprocessing beside it; serve a model written by tokenfuse export")
        self.kind = self.preprocess.kind
        self.pooled = [o["name"] for o in runner.outputs if len(o["shape"]) == 2]
        self.embedding = next((n for n in POOLED_PREFERENCE if n in self.pooled), self.pooled[0] if self.pooled else None)
        # one thread: a Hugging Face tokenizer must not be called from two threads at once
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"tokenfuse-prepare-{name}")

    def require(self, kind: str):
        if self.kind != kind:
            other = "/v1/embed/images" if self.kind == "image" else "/v1/embed/texts or /v1/embeddings"
            raise Refusal(400, f"model {self.name!r} takes {self.kind}s, not {kind}s; send them to {other}")

    async def _in_worker(self, work):
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    def texts(self, texts: list[str]):
        """A coroutine giving the model inputs of `texts` (tokenised on the worker thread once awaited)."""
        self.require("text")
        return self._in_worker(lambda: [self.preprocess.text(t) for t in texts])

    def images(self, blobs: list[tuple[str, bytes]]):
        """A coroutine giving the model inputs of (label, encoded image) pairs, decoded on the worker thread."""
        self.require("image")
        return self._in_worker(lambda: [self._image(*blob) for blob in blobs])

    def _image(self, label: str, data: bytes) -> dict:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as picture:
                width, height = picture.size
        except Image.DecompressionBombError:
            raise Refusal(413, f"{label}: the image has too many pixels (limit {self.max_image_pixels})")
        except Exception:  # not an image: Preprocessor.image says so below
            width = height = 0
        if width * height > self.max_image_pixels:
            raise Refusal(413, f"{label}: the image is {width}x{height} pixels, over the limit of {self.max_image_pixels} (--max-image-pixels)")
        try:
            return self.preprocess.image(data)
        except Exception as exc:  # whatever the decoder trips on, the input is at fault
            raise Refusal(415, f"{label}: {exc}")

    def token_ids(self, lists: list[list[int]]) -> list[dict]:
        """Model inputs for ready-made token ids (no special tokens added), padded to the model's length."""
        self.require("text")
        seq_len, tokenizer = self.preprocess.spec["seq_len"], self.preprocess.tokenizer
        vocabulary, pad = len(tokenizer), tokenizer.pad_token_id or 0
        examples = []
        for i, ids in enumerate(lists):
            if not ids:
                raise Refusal(400, f"input[{i}] is an empty token list")
            if len(ids) > seq_len:
                raise Refusal(400, f"input[{i}] has {len(ids)} tokens; model {self.name!r} takes at most {seq_len}")
            if min(ids) < 0 or max(ids) >= vocabulary:
                raise Refusal(400, f"input[{i}] has token ids outside 0..{vocabulary - 1}")
            input_ids = np.full((1, seq_len), pad, np.int64)
            input_ids[0, : len(ids)] = ids
            mask = np.zeros((1, seq_len), np.int64)
            mask[0, : len(ids)] = 1
            examples.append({"input_ids": input_ids, "attention_mask": mask})
        return examples


class ServedModels(dict):
    """Name -> ServedModel, with the per-request bounds shared by every route."""

    def __init__(self, models: dict, max_inputs: int):
        super().__init__(models)
        self.max_inputs = max_inputs
        self.last_responses = False  # shutting down, no longer listening: every response closes its connection

    def pick(self, name: str | None, missing_status: int = 404) -> ServedModel:
        if name is None:
            if len(self) == 1:
                return next(iter(self.values()))
            raise Refusal(400, f"several models are served ({', '.join(self)}); name one with 'model'")
        if name not in self:
            raise Refusal(missing_status, f"model {name!r} is not served here; served: {', '.join(self)}")
        return self[name]

    def check_count(self, count: int):
        if count > self.max_inputs:
            raise Refusal(413, f"{count} inputs in one request; the limit is {self.max_inputs} (--max-inputs)")

    @property
    def closing(self) -> bool:
        return any(model.batcher.closing for model in self.values())

    async def drain(self):
        await asyncio.gather(*(model.batcher.drain() for model in self.values()))


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        message = f"the request body is over {self.limit} bytes (--max-body-mb); send fewer or smaller inputs"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": message}, 413)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, counting_receive, send)


async def hold_refusal(status: int, hold_s: float):
    """Answer a refusal only after about `hold_s` (a second at most when shutting down), jittered so
    held clients do not come back in step: a client that ignores Retry-After then retries at most
    once per hold, and a flood of refused requests cannot take the CPU the batches need."""
    if hold_s and status in (429, 503):
        await asyncio.sleep((hold_s if status == 429 else min(hold_s, 1.0)) * random.uniform(0.75, 1.25))


MODEL_ROUTES = re.compile(r"^/(v1/embed/(texts|images)|v1/embeddings|v2/models/[^/]+(/versions/[^/]+)?/infer)$")


class FastPath:
    """ASGI middleware, outermost: answers /health and refuses a request that no served model could
    admit now, before routing, body parsing or validation, so refusing costs little beside serving
    and a flood of refused requests cannot starve the batches. The request's model is known only
    from its body: with several models, a request is refused here only when every one would refuse it."""

    def __init__(self, app, served: "ServedModels", health, counter, hold_s: float = 0.0):
        self.app, self.served, self.health, self.counter, self.hold = app, served, health, counter, hold_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._closing_at_the_end(send)
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            from fastapi.responses import JSONResponse

            body, status = self.health()
            return await JSONResponse(body, status)(scope, receive, send)
        if method == "POST" and MODEL_ROUTES.match(path):
            refusals = [model.batcher.refusal(1) for model in self.served.values()]
            if all(refusals):
                refusal = min(refusals, key=lambda r: r.status)  # 429 (retry soon) before 503
                self.counter.labels("refused-on-arrival", str(refusal.status)).inc()
                await hold_refusal(refusal.status, self.hold)
                return await refusal_response(path, refusal)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _closing_at_the_end(self, send):
        """Once the service has stopped listening (serve's shutdown), every response says
        Connection: close, so each client's last request on a connection is answered before the
        connection closes, and none is sent on a connection about to close (it would be cut off)."""
        async def closing_send(event):
            if event["type"] == "http.response.start" and self.served.last_responses:
                headers = [(k, v) for k, v in event.get("headers", []) if k.lower() != b"connection"]
                event = {**event, "headers": [*headers, (b"connection", b"close")]}
            await send(event)

        return closing_send


class CountRequests:
    """ASGI middleware: a Prometheus count of requests by route name and status, and the seconds
    each took (routed requests, from the first byte the app sees to the last it sends)."""

    def __init__(self, app, counter, seconds):
        self.app, self.counter, self.seconds = app, counter, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started = [], time.perf_counter()

        async def noting_send(event):
            if event["type"] == "http.response.start":
                status.append(event["status"])
            await send(event)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            if status and route is not None:
                self.counter.labels(route.name, str(status[0])).inc()
                self.seconds.labels(route.name, str(status[0])).observe(time.perf_counter() - started)


def refusal_response(path: str, refusal: Refusal):
    """A refusal in the error shape of the route's protocol, with its Retry-After."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
    return JSONResponse(refusal_body(path, refusal.message, refusal.status), refusal.status, headers=headers)


def refusal_body(path: str, message: str, status: int) -> dict:
    """The error shape each protocol's clients read."""
    if path.startswith("/v2"):
        return {"error": message}
    if path.startswith(("/v1/embeddings", "/v1/models")):
        return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "param": None, "code": status}}
    return {"detail": message}


def decode_image(item, index: int) -> bytes:
    """Bytes of a base64 string or a data: URL."""
    if not isinstance(item, str):
        raise Refusal(422, f"images[{index}] is not a string; give base64 or a data: URL")
    if item.startswith("data:"):
        header, comma, item = item.partition(",")
        if not comma or not header.endswith(";base64"):
            raise Refusal(422, f"images[{index}] is a data: URL without ';base64,'")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(422, f"images[{index}] is neither base64 nor a base64 data: URL")


IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}, "model": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string"}, "description": "base64 or data: URLs"}, "model": {"type": "string"}}}},
}}}


def create_app(models, *, max_batch: int = 32, max_delay_ms: float = 5.0, queue_size: int = 256,
               max_queue_delay_ms: float | None = 2000.0, max_inputs: int | None = None, max_body_mb: float = 16.0,
               max_image_pixels: int = 16_000_000, refusal_hold_ms: float | None = None, providers=None, threads=None, plugins=None):
    """The FastAPI application serving `models`: a path, or a list of paths and NAME=PATH (.onnx or .engine).
    `max_inputs` (inputs per request) defaults to 64 or `queue_size` if smaller."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, Field

    from .protocols import add_kserve_routes, add_openai_routes

    max_inputs = min(64, queue_size) if max_inputs is None else max_inputs
    if min(max_batch, queue_size, max_inputs, max_image_pixels) < 1 or min(max_delay_ms, max_queue_delay_ms or 0) < 0 or max_body_mb <= 0:
        raise UsageError("--max-batch, --queue-size, --max-inputs and --max-image-pixels must be >= 1, "
                         "--max-delay-ms and --max-queue-delay-ms >= 0, --max-body-mb > 0")
    if refusal_hold_ms is not None and refusal_hold_ms < 0:
        raise UsageError("--refusal-hold-ms must be >= 0")
    if max_inputs > queue_size:
        raise UsageError(f"--max-inputs {max_inputs} is over --queue-size {queue_size}: such a request could never be admitted")
    registry = CollectorRegistry()
    requests = Counter("tokenfuse_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry)
    batch_sizes = Histogram("tokenfuse_batch_size", "examples per model call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
    batch_seconds = Histogram("tokenfuse_batch_seconds", "model call latency", ["model"], registry=registry)
    request_seconds = Histogram("tokenfuse_request_seconds", "request latency by endpoint and status", ["endpoint", "status"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75,
                                         3, 3.5, 4, 5, 7.5, 10), registry=registry)
    queued = Gauge("tokenfuse_queue_depth", "examples waiting", ["model"], registry=registry)

    served = {}
    for name, path in model_files(models).items():
        def record(size, seconds, name=name):
            batch_sizes.labels(name).observe(size)
            batch_seconds.labels(name).observe(seconds)

        runner = load(path, providers=providers, threads=threads, plugins=plugins, spin=False)
        batcher = Batcher(runner, max_batch, max_delay_ms, queue_size, max_queue_delay_ms, on_batch=record)
        served[name] = ServedModel(name, runner, batcher, max_image_pixels)
        queued.labels(name).set_function(lambda batcher=batcher: batcher.depth)
    served = ServedModels(served, max_inputs)
    # a refused request's answer comes when it could usefully retry (its Retry-After), unless told otherwise
    hold_s = max(m.batcher.retry_after for m in served.values()) if refusal_hold_ms is None else refusal_hold_ms / 1000

    @asynccontextmanager
    async def lifespan(_app):
        for model in served.values():
            model.batcher.start()
        yield
        await served.drain()

    app = FastAPI(
        title="tokenfuse",
        description="; ".join(f"{m.name}: {m.method} merged, pooled outputs {', '.join(m.pooled)}" for m in served.values()),
        lifespan=lifespan,
    )
    app.state.models, app.state.refusal_hold_s = served, hold_s
    def health():
        models = {m.name: {"backend": m.runner.backend, "kind": m.kind, "queue": m.batcher.depth} for m in served.values()}
        return {"status": "shutting down" if served.closing else "ok", "models": models}, 503 if served.closing else 200

    app.add_middleware(CountRequests, counter=requests, seconds=request_seconds)
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 2**20))
    app.add_middleware(FastPath, served=served, health=health, counter=requests, hold_s=hold_s)  # added last: runs first

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal):
        if exc.retry_after:  # refused for load (429, or 503 late or shutting down), not for the request itself
            await hold_refusal(exc.status, hold_s)
        return refusal_response(request.url.path, exc)

    class TextRequest(BaseModel):
        texts: list[str] = Field(min_length=1, description="texts to embed")
        model: str | None = Field(None, description="the served model's name (needed when several are served)")

    async def answer(model: ServedModel, count: int, examples):
        results = await model.batcher.submit(count, examples)
        data = [{"index": i, **{name: result[name][0].tolist() for name in model.pooled}} for i, result in enumerate(results)]
        return JSONResponse({"model": model.name, "method": model.method, "data": data})

    @app.post("/v1/embed/images", name="images", summary="pooled outputs for PNG/JPEG images: multipart files, or JSON base64/data URLs",
              openapi_extra=IMAGES_BODY)
    async def embed_images(request: Request):
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=served.max_inputs + 1, max_fields=4)
            uploads = [u for u in form.getlist("files") if hasattr(u, "read")]
            name = form.get("model")
            served.check_count(len(uploads))
            blobs = [(upload.filename or f"files[{i}]", await upload.read()) for i, upload in enumerate(uploads)]
        elif content_type.startswith("application/json"):
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise Refusal(422, "the body is not valid JSON")
            if not isinstance(body, dict) or not isinstance(body.get("images"), list):
                raise Refusal(422, 'send {"images": ["<base64 or data: URL>", ...]}')
            name = body.get("model")
            served.check_count(len(body["images"]))
            blobs = [(f"images[{i}]", decode_image(item, i)) for i, item in enumerate(body["images"])]
        else:
            raise Refusal(422, 'send multipart/form-data with one or more "files", or JSON {"images": [...]}')
        if not blobs:
            raise Refusal(422, "no images in the request")
        model = served.pick(name if isinstance(name, str) else None)
        return await answer(model, len(blobs), model.images(blobs))

    @app.post("/v1/embed/texts", name="texts", summary="pooled outputs for one or more texts")
    async def embed_texts(body: TextRequest):
        model = served.pick(body.model)
        served.check_count(len(body.texts))
        return await answer(model, len(body.texts), model.texts(body.texts))

    add_openai_routes(app, served)
    add_kserve_routes(app, served)

    @app.get("/health", name="health", summary="service and queue state (answered by FastPath, before routing)")
    async def health_route():
        body, status = health()
        return JSONResponse(body, status_code=status)

    def metrics():
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @app.get("/metrics", name="metrics")
    async def metrics_route():
        payload, kind = metrics()
        return Response(payload, media_type=kind)

    app.state.health, app.state.metrics = health, metrics

    return app


def start_health_server(host: str, port: int, health, metrics):
    """GET /health and /metrics on their own port, answered by a thread of their own: probes get
    their answer within milliseconds however busy the service's event loop is."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                body, status = health()
                payload, kind = json.dumps(body).encode(), "application/json"
            elif self.path == "/metrics":
                (payload, kind), status = metrics(), 200
            else:
                status, payload, kind = 404, b'{"detail": "this port serves /health and /metrics only"}', "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):  # quiet, as the main server is
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise UsageError(f"--health-port {port}: {exc.strerror or exc}; choose a free port")
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tokenfuse-health", daemon=True).start()
    return server


def serve(models, *, host: str = "127.0.0.1", port: int = 8000, max_connections: int = 1000, health_port: int | None = None, **options):
    """Run the service until SIGTERM or Ctrl-C; then refuse new requests (503), answer every
    admitted one, and return (exit 0). A second signal stops at once."""
    import uvicorn

    if max_connections < 1:
        raise UsageError("--max-connections must be >= 1")

    app = create_app(models, **options)
    # What is loaded by now (modules, models, tokenizers: ~260k objects for MiniLM) lives as long as
    # the service: out of the cyclic collector's reach, whose full passes over it took 70-80 ms
    # each (measured) and stalled every request and health probe while they ran.
    gc.collect()
    gc.freeze()
    if health_port is not None:
        start_health_server(host, health_port, app.state.health, app.state.metrics)

    class DrainingServer(uvicorn.Server):
        draining = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            if self.draining is not None:
                self.should_exit = self.force_exit = True
                return
            self.draining = asyncio.run_coroutine_threadsafe(self._drain(), self.loop)

        async def _drain(self):
            """Finish admitted work (new requests get 503, on connections kept alive, so clients do
            not reconnect into the listen queue), stop listening, then answer one last request on
            every open connection with Connection: close; only then exit, so no request is cut off."""
            served = app.state.models
            await served.drain()
            for server in self.servers:
                server.close()
            served.last_responses = True
            # a refusal while shutting down is held at most 1.25 x min(hold, 1 s); an idle connection
            # (no request coming) is closed when the server exits
            ends = time.monotonic() + 1.25 * min(app.state.refusal_hold_s, 1.0) + 1.0
            while self.server_state.connections and time.monotonic() < ends:
                await asyncio.sleep(0.05)
            self.should_exit = True

    # keep-alive well past a client's usual idle time: a server that closes an idle connection races
    # the client's next request on it, which the client sees as a dropped connection
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                            limit_concurrency=max_connections, timeout_keep_alive=75, backlog=max(2048, max_connections))
    DrainingServer(config).run()
