"""Admission and dynamic batching for one served model.

A request is admitted whole or not at all, on arrival: if all its examples fit in the queue they
are reserved places, otherwise it is refused (429) before anything is done for it, preprocessing
included. An admitted request that cannot start within `max_queue_delay_ms` of its arrival
(preprocessing counts) is withdrawn and answered 503, so answered requests wait at most about
that long; once any of its examples has started, all of them are computed. A request that would
find more work ahead of it than it may wait for (the call holding its last input expected to end
past the bound, each call costed at the recent time of calls its size) is refused (429) on arrival
instead of being admitted to expire.

Texts of a length-adaptive model are batched by length bucket: a model call takes the oldest
waiting example and up to `max_batch - 1` more of its bucket, so a call runs one bucket full
instead of several half-empty ones.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .runtime import Runner, fit_tokens


class Refusal(Exception):
    """A request answered with an HTTP error status instead of a result."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class CallTimes:
    """Recent model-call seconds by call size: a moving average per size class (1, 2, 4, ... up to
    max_batch). A size with no class at or above it observed yet is extrapolated linearly from the
    largest observed, so after light load the wait behind full calls is overestimated (until one
    runs), never underestimated; a small call is costed at its own size, not at a full call's."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    @staticmethod
    def _size_class(size: int) -> int:
        return 1 << max(size - 1, 0).bit_length()

    def observe(self, size: int, seconds: float):
        size_class = self._size_class(size)
        previous = self.seconds.get(size_class)
        self.seconds[size_class] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def estimate(self, size: int) -> float | None:
        """Seconds for a call of `size` examples (None before any call)."""
        if not self.seconds:
            return None
        above = [c for c in self.seconds if c >= self._size_class(size)]
        if above:
            return self.seconds[min(above)]
        largest = max(self.seconds)
        return self.seconds[largest] * size / largest


@dataclass(eq=False)
class _Request:
    deadline: float
    started: bool = False
    futures: list = field(default_factory=list)


@dataclass(eq=False)
class _Waiting:
    """One example in the queue: its request, inputs, result, group (length bucket) and arrival time."""
    request: _Request
    example: dict
    future: asyncio.Future
    group: object
    queued_at: float


class Batcher:
    """Gathers the examples of admitted requests into model calls of up to `max_batch`."""

    def __init__(self, runner: Runner, max_batch: int, max_delay_ms: float, queue_size: int,
                 max_queue_delay_ms: float | None = None, on_batch=None):
        self.runner, self.max_batch, self.max_delay = runner, max_batch, max_delay_ms / 1000
        self.queue_size = queue_size
        self.max_wait = max_queue_delay_ms / 1000 if max_queue_delay_ms else None
        self.retry_after = max(1, math.ceil(self.max_wait or 1))
        self.pending: deque[_Waiting] = deque()
        self.group_of = getattr(runner, "group_of", lambda example: None)  # a call takes examples of one group
        self.reserved = 0  # places of admitted requests still being preprocessed
        self.closing = False
        self.running = 0  # the size of the call running now (0: none)
        self.calls = CallTimes()
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tokenfuse-model")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self):
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @property
    def depth(self) -> int:
        return len(self.pending) + self.reserved

    def expected_finish(self, count: int = 1) -> float | None:
        """Seconds until the call holding the last of `count` examples arriving now would end: the
        running call (taken whole), then the queued examples and these in calls of max_batch, each at
        the recent time of a call its size (None before any call). Behind full calls, the last one is
        costed full too: later arrivals fill it before it runs. Length buckets are not told apart: a
        length-adaptive model's calls are counted as if one bucket's."""
        if self.calls.estimate(1) is None:
            return None
        full, rest = divmod(self.depth + count, self.max_batch)
        last = self.max_batch if full else rest
        calls = [self.running] * bool(self.running) + [self.max_batch] * full + [last] * bool(rest)
        return sum(self.calls.estimate(size) for size in calls)

    def _late(self) -> Refusal:
        return Refusal(503, f"the request could not start within {self.max_wait * 1000:.0f} ms (--max-queue-delay-ms); retry later",
                       self.retry_after)

    def refusal(self, count: int) -> Refusal | None:
        """Why a request of `count` examples arriving now would be refused (None: it would be admitted).
        Admission expects the call that holds the request's last input to end within the bound
        (expected_finish), so an answered request takes about the bound at most, while the model
        still has calls queued to run back to back. A request that would start at once is admitted."""
        if self.closing:
            return Refusal(503, "the service is shutting down; retry on another instance", self.retry_after)
        if self.depth + count > self.queue_size:
            return Refusal(429, f"the queue is full ({self.depth} of {self.queue_size} examples waiting); retry later", self.retry_after)
        finish = self.expected_finish(count) if self.max_wait and (self.running or self.depth) else None
        if finish is not None and finish > self.max_wait:
            return Refusal(429, f"its answer is expected in about {finish:.1f} s, past --max-queue-delay-ms with the work queued; "
                           "retry later", self.retry_after)
        return None

    async def submit(self, count: int, examples) -> list[dict[str, np.ndarray]]:
        """Every example's outputs, in order; raises Refusal when not admitted or not started in time.
        `examples` is the list of `count` model inputs, or an awaitable giving it (preprocessing,
        which then runs only once the request is admitted)."""
        refusal = self.refusal(count)
        if refusal:
            if inspect.iscoroutine(examples):
                examples.close()
            raise refusal
        loop = asyncio.get_running_loop()
        request = _Request(deadline=loop.time() + (self.max_wait or math.inf))
        self.reserved += count
        try:
            if inspect.isawaitable(examples):
                examples = await asyncio.wait_for(examples, self.max_wait)
        except asyncio.TimeoutError:
            raise self._late()
        finally:
            self.reserved -= count
        for example in examples:
            future = loop.create_future()
            request.futures.append(future)
            self.pending.append(_Waiting(request, example, future, self.group_of(example), loop.time()))
        self._wake.set()
        results = asyncio.gather(*request.futures)
        if self.max_wait is None:
            return await results
        try:
            return await asyncio.wait_for(asyncio.shield(results), max(0.0, request.deadline - loop.time()))
        except asyncio.TimeoutError:
            if request.started:
                return await results
            self.pending = deque(item for item in self.pending if item.request is not request)
            raise self._late()

    def _head_group(self) -> list[_Waiting]:
        """The oldest waiting example and up to max_batch - 1 more of its group, in order."""
        group = self.pending[0].group
        return [item for item in self.pending if item.group == group][: self.max_batch]

    async def _fill(self):
        """Wait for a full batch of the oldest example's group, until max_delay after it arrived."""
        while self.pending and len(self._head_group()) < self.max_batch:
            deadline = self.pending[0].queued_at + self.max_delay
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _serve(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            await self._fill()
            if not self.pending:  # everything waiting was withdrawn meanwhile
                continue
            batch = self._head_group()
            chosen = set(map(id, batch))
            self.pending = deque(item for item in self.pending if id(item) not in chosen)
            for item in batch:
                item.request.started = True
            feeds = {name: stack([item.example[name] for item in batch]) for name in batch[0].example}
            started = time.perf_counter()
            self.running = len(batch)
            try:
                outputs = await loop.run_in_executor(self._executor, self.runner.run, feeds)
            except Exception as exc:  # answer every waiter, keep serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.running = 0
            elapsed = time.perf_counter() - started
            self.calls.observe(len(batch), elapsed)
            self.on_batch(len(batch), elapsed)
            for i, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result({name: value[i : i + 1] for name, value in outputs.items()})

    async def drain(self):
        """Refuse new work, finish every admitted request, stop."""
        self.closing = True
        while self.pending or self.running or self.reserved:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=False)


def stack(rows: list[np.ndarray]) -> np.ndarray:
    """Examples as one batch; texts of a length-adaptive model come in their buckets' widths and
    are zero-padded to the widest (the runner splits them into their buckets again)."""
    if rows[0].ndim != 2:
        return np.concatenate(rows)
    width = max(row.shape[1] for row in rows)
    return np.concatenate([fit_tokens(row, width) for row in rows])
