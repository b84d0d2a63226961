"""The models a server holds: each with ONE engine, stepped by one background thread while requests are pending, so
every request to a model shares its continuous batch. The event loop talks to the thread through a command queue
(add, abort) and hears back through per-request asyncio queues (accepted, text pieces, the output, an error): the
engine is only ever touched from its own thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from qtool.core.errors import QtoolError
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams, engine_support
from qtool.runtime.engine_sizing import EngineSizing
from qtool.serve.stream_pacing import StreamPacer

logger = logging.getLogger(__name__)

# the sampling fields a model's generation_config.json may recommend (the rest come from the engine's defaults)
DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
RATE_WINDOW_S = 10.0  # output tokens/s is measured over this much recent time
_STOP = object()


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for a field it does not set: the model's generation_config.json where it ships the
    field, else the engine's default; `sources` says which, per field."""

    values: dict[str, float | int]
    sources: dict[str, str]

    @classmethod
    def from_model(cls, model: Any) -> "SamplingDefaults":
        engine = {f.name: f.default for f in fields(SamplingParams) if f.name in DEFAULT_FIELDS}
        config = getattr(model, "generation_config", None)
        # to_diff_dict: only what differs from transformers' own defaults, i.e. what the model's file set
        shipped = config.to_diff_dict() if config is not None else {}
        values, sources = {}, {}
        for name, default in engine.items():
            value = shipped.get(name)
            usable = value is not None and isinstance(value, (int, float)) and not isinstance(value, bool)
            values[name] = value if usable else default
            sources[name] = "generation_config.json" if usable else "engine default"
        return cls(values, sources)

    def to_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "sources": dict(self.sources)}


@dataclass
class WorkerSnapshot:
    """The engine's state as its thread last saw it (read by /metrics without touching the engine)."""

    waiting: int = 0
    running: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    output_tokens_per_s: float = 0.0  # over the last rate_window_s seconds (back to 0 within it once idle)
    busy_s: float = 0.0  # seconds spent in engine steps
    steps_failed: int = 0
    peak_running: int = 0  # the most sequences in the running batch at once, since start
    peak_waiting: int = 0


class Completion:
    """One request (its n choices) as the event loop sees it: events arrive in `events` as (choice index, kind,
    payload) with kind "accepted" (engine id), "text" (a piece), "logprobs" (a step's TokenLogprobs, before its
    text; only for `stream_logprobs`: a whole reply reads them from the output), "done" (RequestOutput),
    "refused" (the engine would not take it: a QtoolError) or "failed" (a step failed or the server stops: an
    exception). A plain list and one future per wait, not an asyncio.Queue: a step's events for a request are
    appended together and wake its reader once (a Queue wakes a getter per event, and waiting on it beside the
    client's disconnect took a task and asyncio.wait per token)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int = 1, stream_logprobs: bool = False,
                 pacer: StreamPacer | None = None):
        self.loop = loop
        self.n = n
        self.stream_logprobs = stream_logprobs
        self.pacer = pacer  # None: every step's text wakes the reader
        self.events: list[tuple[int, str, Any]] = []
        self.gone = False  # the client disconnected
        self._waiter: asyncio.Future | None = None
        self.woke_at = 0  # the pacer's delivery count when the reader last got text
        self._texted = False  # the reader got text already (the first text is never held)

    def push(self, events: list[tuple[int, str, Any]]) -> None:
        """On the event loop: events for this request (in order), waking its reader unless the pacer holds text
        back (then they wait in `events` and go out with a later step's)."""
        self.events += events
        if self._waiter is None:  # the reader is busy: it takes them when it waits next
            return
        pacer = self.pacer
        if pacer is not None and self._texted and not pacer.due(self.woke_at) \
                and all(event[1] in ("text", "logprobs") for event in events):
            pacer.held.add(self)
            return
        if pacer is not None:
            self.woke_at = pacer.steps
            self._texted = self._texted or any(event[1] == "text" for event in self.events)
        self._wake()

    def leave(self) -> None:
        """On the event loop: the client went away; its reader wakes to abort."""
        self.gone = True
        self._wake()

    async def wait(self) -> None:
        """Until an event is there or the client left (at once when so already)."""
        if self.events or self.gone:
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> list[tuple[int, str, Any]]:
        """The events that came since the last take, in order."""
        events, self.events = self.events, []
        return events

    def release(self) -> None:
        """On the event loop: wake the reader for text the pacer held (its time came without a newer event)."""
        self.woke_at = self.pacer.steps
        self._wake()

    def _wake(self) -> None:
        if self.pacer is not None:
            self.pacer.held.discard(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _deliver(batches: dict[Completion, list]) -> None:
    """On the event loop: a round of the engine thread's events (the loop's clocks read once for the pacers)."""
    deliver(batches, time.perf_counter(), time.thread_time())


def deliver(batches: dict[Completion, list], now: float, cpu: float) -> None:
    """On the event loop: each request's events of a round in one push, after the pacers of their streams counted
    the round (`now`: the wall clock, `cpu`: the loop thread's CPU clock)."""
    for pacer in {completion.pacer for completion in batches if completion.pacer is not None}:
        pacer.tick(now, cpu)
        # text held for a stream that this round brought nothing new (a preempted sequence) still goes out
        for completion in [c for c in pacer.held if c not in batches and pacer.due(c.woke_at)]:
            completion.release()
    for completion, events in batches.items():
        completion.push(events)


class EngineWorker:
    """The one thread that owns an engine: applies queued adds and aborts between steps, steps while anything is
    unfinished, sleeps on the command queue when idle."""

    def __init__(self, engine: Engine, name: str, rate_window_s: float = RATE_WINDOW_S):
        self.engine = engine
        self.name = name
        self.rate_window_s = rate_window_s
        self.snapshot = WorkerSnapshot()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, tuple[Completion, int]] = {}  # engine id -> (its completion, choice index)
        self._rate: deque[tuple[float, int]] = deque()
        self._outbox: list[tuple[Completion, tuple]] = []  # events of this round, handed over in one call per loop
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._take_snapshot()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"qtool-engine-{self.name}", daemon=True)
                self._thread.start()

    @property
    def pending(self) -> int:
        """Requests (choices) handed to the engine and not finished, failed or aborted yet."""
        return len(self._active)

    @property
    def alive(self) -> bool:
        """Its thread runs (started by the first request or the app's start-up, ended by stop())."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort what is left and end the thread."""
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None and thread.is_alive():
            self._commands.put(_STOP)
            thread.join(timeout)

    def submit(self, completion: Completion, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self.start()
        self._commands.put(("add", completion, index, prompt_ids, params))

    def abort(self, completion: Completion) -> None:
        """Free every choice of `completion` still in the engine (before its next step)."""
        self._commands.put(("abort", completion))

    # ---- the engine's thread ----

    def _run(self) -> None:
        while True:
            try:
                if not self._round():
                    return
            except Exception as exc:  # a bug outside a step: fail what is in flight, keep the thread serving
                logger.exception("the engine thread of model %s failed", self.name)
                self._abort_all(exc)
                self._flush()

    def _round(self) -> bool:
        """Apply the queued commands (waiting for one when idle), then one step; False once told to stop."""
        busy = self.engine.has_unfinished()
        # idle: sleep until a command comes, waking a few times per window while the recent rate is not 0 yet
        recent = self.snapshot.output_tokens_per_s > 0
        try:
            command = self._commands.get(block=not busy, timeout=self.rate_window_s / 4 if recent else None)
        except queue.Empty:
            command = None
        while command is not None:
            if command is _STOP:
                self._abort_all(QtoolError("the server is shutting down", "send the request again later"))
                self._flush()
                self._take_snapshot()
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if self.engine.has_unfinished():
            self._step()
        self._flush()
        self._take_snapshot()
        return True

    def _emit(self, completion: Completion, index: int, kind: str, payload: Any) -> None:
        self._outbox.append((completion, (index, kind, payload)))

    def _flush(self) -> None:
        """Hand this round's events to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, dict[Completion, list]] = {}
        for completion, event in self._outbox:
            by_loop.setdefault(completion.loop, {}).setdefault(completion, []).append(event)
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the loop closed: nobody listens any more
                pass

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, completion, index, prompt_ids, params = command
            try:
                on_logprobs = (lambda entries: self._emit(completion, index, "logprobs", entries)) \
                    if completion.stream_logprobs and params.logprobs is not None else None
                request_id = self.engine.add_request(
                    prompt_ids, params, on_text=lambda piece: self._emit(completion, index, "text", piece),
                    on_logprobs=on_logprobs)
            except Exception as exc:  # refused before the engine changed: this request alone fails
                if not isinstance(exc, QtoolError):
                    logger.exception("model %s could not take a request", self.name)
                self._emit(completion, index, "refused", exc)
                return
            self._active[request_id] = (completion, index)
            self._emit(completion, index, "accepted", request_id)
        else:
            _, completion = command
            for request_id in [rid for rid, (c, _) in self._active.items() if c is completion]:
                self.engine.abort_request(request_id)
                del self._active[request_id]

    def _step(self) -> None:
        began = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step fails the requests in it; the server and the other models go on
            logger.exception("engine step of model %s failed", self.name)
            self.snapshot.steps_failed += 1
            self._abort_all(exc)
            return
        finally:
            self.snapshot.busy_s += time.perf_counter() - began
        for output in outputs:
            completion, index = self._active.pop(output.request_id, (None, 0))
            if completion is not None:
                self._emit(completion, index, "done", output)

    def _abort_all(self, exc: BaseException) -> None:
        for request_id, (completion, index) in list(self._active.items()):
            self.engine.abort_request(request_id)
            self._emit(completion, index, "failed", exc)
        self._active.clear()

    def _take_snapshot(self) -> None:
        stats = self.engine.stats()
        now = time.perf_counter()
        self._rate.append((now, stats.generated_tokens))
        while len(self._rate) > 2 and self._rate[1][0] < now - self.rate_window_s:
            self._rate.popleft()
        first_time, first_tokens = self._rate[0]
        span = now - first_time
        rate = (stats.generated_tokens - first_tokens) / span if span > 0 else 0.0
        scheduler = self.engine.scheduler
        old = self.snapshot
        waiting, running = len(scheduler.waiting), len(scheduler.running)
        self.snapshot = WorkerSnapshot(waiting=waiting, running=running, stats=stats.to_dict(),
                                       output_tokens_per_s=rate, busy_s=old.busy_s, steps_failed=old.steps_failed,
                                       peak_running=max(old.peak_running, running),
                                       peak_waiting=max(old.peak_waiting, waiting))


class ServedModel:
    """A loaded model under a name: its tokenizer, its sampling defaults, and its engine with the thread driving it."""

    def __init__(self, name: str, model: Any, tokenizer: Any, engine_config: EngineConfig = EngineConfig(),
                 source: str | None = None):
        if tokenizer is None:
            raise QtoolError(f"model '{name}' has no tokenizer", "the model directory needs its tokenizer files")
        reason = engine_support(model)
        if reason is not None:
            raise QtoolError(f"model '{name}' cannot be served: {reason}",
                             "qtool serve runs every model on the engine; `qtool run` falls back to generate")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.source = source or name
        self.defaults = SamplingDefaults.from_model(model)
        self.created = int(time.time())
        self.engine = Engine(model, tokenizer, engine_config)
        self.worker = EngineWorker(self.engine, name)

    @property
    def context_length(self) -> int | None:
        return self.engine.max_context

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()


def load_served_models(specs: Sequence[str], names: Sequence[str] | None = None,
                       engine_config: EngineConfig = EngineConfig(), sizing: EngineSizing = EngineSizing(),
                       device: str = "auto", dtype: str | None = None, backend: str = "auto") -> list[ServedModel]:
    """Load each model spec (directory, GGUF, Hub id or alias) and give it an engine sized by `sizing`. `names`
    (one per spec) are what requests' `model` field routes by; default: the spec as given. Names must differ."""
    from qtool.checkpoints.sources import load_model, resolve_device

    names = list(names) if names else list(specs)
    if len(names) != len(specs):
        raise QtoolError(f"{len(names)} --name for {len(specs)} models", "give one --name per model, or none")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise QtoolError(f"model name {repeated[0]!r} is given twice", "give each model its own --name")
    sizing.check(resolve_device(device))
    served = []
    for spec, name in zip(specs, names):
        loaded = load_model(spec, device=device, dtype=dtype, backend=backend, for_generation=True)
        served.append(ServedModel(name, loaded.model, loaded.tokenizer, sizing.engine_config(loaded.model, engine_config),
                                  source=str(spec)))
    return served
