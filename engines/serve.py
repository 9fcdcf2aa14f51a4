"""`tokenfuse serve`: embeddings and logits over HTTP, with dynamic batching (FastAPI + uvicorn).

Requests queue one example each; a batcher gathers up to `max_batch` of them (waiting at most
`max_delay_ms` for more), runs them as one batch, and answers each. The queue is bounded: when it
is full the service answers 429, and once shutdown starts it answers 503 while the requests
already accepted finish.
"""


import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from .preprocess import Preprocessor
from .runtime import Runner, load


class Overloaded(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """Gathers single examples into batches for one runner."""

    def __init__(self, runner: Runner, max_batch: int, max_delay_ms: float, queue_size: int, on_batch=None):
        self.runner, self.max_batch, self.max_delay = runner, max_batch, max_delay_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=queue_size)
        self.closing = False
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._task: asyncio.Task | None = None

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def submit(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closing:
            raise Overloaded(503, "the service is shutting down")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((example, future))
        except asyncio.QueueFull:
            raise Overloaded(429, f"the queue is full ({self.queue.maxsize} waiting); retry later")
        return await future

    async def _serve(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            feeds = {name: np.concatenate([example[name] for example, _ in batch]) for name in batch[0][0]}
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(None, self.runner.run, feeds)
            except Exception as exc:  # answer every waiter, keep serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                for _ in batch:
                    self.queue.task_done()
            self.on_batch(len(batch), time.perf_counter() - started)
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result({name: value[i : i + 1] for name, value in outputs.items()})

    async def drain(self):
        """Refuse new work, finish what was accepted, stop."""
        self.closing = True
        await self.queue.join()
        if self._task:
            self._task.cancel()


def create_app(model: str | Path, *, max_batch: int = 32, max_delay_ms: float = 5.0, queue_size: int = 256, providers=None, threads=None, plugins=None):
    """The FastAPI application serving `model` (.onnx or .engine)."""
    from fastapi import FastAPI, File, HTTPException, UploadFile
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, Field

    runner = load(model, providers=providers, threads=threads, plugins=plugins)
    manifest = runner.manifest or {}
    preprocess = Preprocessor(manifest)
    if preprocess.kind is None:
        raise UsageError(f"{model}: no export manifest with preprocessing beside it; serve a model written by tokenfuse export")
    pooled = [o["name"] for o in runner.outputs if len(o["shape"]) == 2]
    registry = CollectorRegistry()
    requests = Counter("tokenfuse_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry)
    batch_sizes = Histogram("tokenfuse_batch_size", "examples per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
    batch_seconds = Histogram("tokenfuse_batch_seconds", "model call latency", registry=registry)
    queued = Gauge("tokenfuse_queue_depth", "examples waiting", registry=registry)

    def record(size, seconds):
        batch_sizes.observe(size)
        batch_seconds.observe(seconds)

    batcher = Batcher(runner, max_batch, max_delay_ms, queue_size, on_batch=record)
    queued.set_function(batcher.queue.qsize)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.drain()

    app = FastAPI(
        title="tokenfuse",
        description=f"{manifest.get('model')} merged with {manifest.get('method')}: pooled outputs {', '.join(pooled)}",
        lifespan=lifespan,
    )

    class TextRequest(BaseModel):
        texts: list[str] = Field(min_length=1, max_length=max_batch * 4, description="texts to embed")

    async def answer(endpoint: str, examples: list[dict]):
        try:
            results = await asyncio.gather(*(batcher.submit(example) for example in examples))
        except Overloaded as exc:
            requests.labels(endpoint, str(exc.status)).inc()
            raise HTTPException(exc.status, str(exc))
        requests.labels(endpoint, "200").inc()
        data = [{"index": i, **{name: result[name][0].tolist() for name in pooled}} for i, result in enumerate(results)]
        return {"model": manifest.get("model"), "method": manifest.get("method"), "data": data}

    def refuse(endpoint: str, status: int, message: str):
        requests.labels(endpoint, str(status)).inc()
        raise HTTPException(status, message)

    @app.post("/v1/embed/images", summary="pooled outputs for one or more PNG/JPEG images")
    async def embed_images(files: list[UploadFile] = File(...)):
        if preprocess.kind != "image":
            refuse("images", 400, "this model takes text; POST to /v1/embed/texts")
        examples = []
        for upload in files:
            try:
                examples.append(preprocess.image(await upload.read()))
            except ValueError as exc:
                refuse("images", 415, f"{upload.filename}: {exc}")
        return await answer("images", examples)

    @app.post("/v1/embed/texts", summary="pooled outputs for one or more texts")
    async def embed_texts(body: TextRequest):
        if preprocess.kind != "text":
            refuse("texts", 400, "this model takes images; POST files to /v1/embed/images")
        return await answer("texts", [preprocess.text(text) for text in body.texts])

    @app.get("/health")
    async def health():
        status = 503 if batcher.closing else 200
        body = {"status": "shutting down" if batcher.closing else "ok", "model": manifest.get("model"), "backend": runner.backend, "queue": batcher.queue.qsize()}
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, **options):
    import uvicorn

    app = create_app(model, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
