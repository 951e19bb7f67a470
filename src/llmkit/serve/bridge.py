"""`EngineBridge`: the one thread that owns the engine, and the asyncio side's way to reach it.

The engine is not thread-safe and its steps are long, blocking torch calls, so it lives on a thread
of its own; the event loop only ever puts commands in a queue (add, cancel, drain) and reads outputs
from per-HTTP-request asyncio queues that the engine thread fills with `call_soon_threadsafe`.

`llmkit serve` runs the engine on the process's main thread (`run()`) and uvicorn on a second one:
torch's OpenMP pool answers a parallel region from the main thread in microseconds, but from
another thread it wakes sleeping workers every time, ~70 us per op on 2 cores - measured, a batch-1
decode step twice as slow. Tests run it on a background thread (`start()`), where only speed differs.

    loop thread                              engine thread
    await bridge.add(rid, ids, params, q) -> Add -> engine.add_request -> ack (or its ValueError)
    await q.get()                         <- (rid, RequestOutput) after every step that moved rid
    bridge.cancel(rid)                    -> Cancel -> engine.cancel + release (KV blocks freed)

Admission: at most `max_pending` engine requests in flight (queued or running); past that `add`
raises a 429 at once, so a full server answers instead of hanging. A step that raises fails every
request in it with a 500-type error and the thread goes on serving (the engine is reset by
cancelling them). `drain(grace)` (SIGTERM) refuses new requests with 503 and, when the grace period
is over, ends the ones still running with an error, so every stream gets a last chunk.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import APIError

log = logging.getLogger("llmkit.serve")


@dataclass
class _Add:
    request_id: str
    prompt: list[int]
    params: Any
    adapter: Optional[str]
    route: tuple                            # (the caller's event loop, its asyncio.Queue)
    acknowledge: Callable[[Optional[BaseException]], None]


@dataclass
class _Cancel:
    request_id: str


@dataclass
class _Drain:
    deadline: float


class EngineError(Exception):
    """The engine failed this request: a step raised (500), or the server is shutting down (503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def _put_all(batch) -> None:
    for queue_, item in batch:
        queue_.put_nowait(item)


class EngineBridge:
    def __init__(self, engine, *, max_pending: int = 128, rate_window_s: float = 10.0):
        self.engine = engine
        self.max_pending = max_pending
        self.commands: queue.Queue = queue.Queue()
        self.routes: dict[str, tuple] = {}                     # engine thread only: id -> (loop, queue)
        self._pending = 0                                       # guarded by _lock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.draining = False
        self._deadline: Optional[float] = None
        self.thread: Optional[threading.Thread] = None        # set by start(); run() uses the caller's
        self.running = False                                   # the loop is serving
        self.keep_going: Callable[[], bool] = lambda: True     # checked while idle: False ends run()
        self.finished = collections.Counter()                  # finish_reason -> requests (engine thread)
        self.rejected = collections.Counter()                  # why -> requests refused before the engine
        self.step_failures = 0
        self._window = collections.deque([(time.monotonic(), engine.stats["generated_tokens"])])  # for tokens/s
        self._rate_window_s = rate_window_s
        self.snapshot: dict = dict(engine.metrics(), pending=0)

    # ---- the loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine loop on a background thread."""
        self.thread = threading.Thread(target=self.run, name="llmkit-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Run the engine loop on this thread until stop() (or keep_going() turns False while idle)."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.commands.put(None)
        if self.thread is not None and self.thread is not threading.current_thread() and self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    async def add(self, request_id: str, prompt: list[int], params, adapter: Optional[str],
                  outputs: asyncio.Queue) -> None:
        """Hand one request to the engine; returns when it is queued there. Raises APIError 429 when
        `max_pending` requests are in flight, 503 while draining, or the engine's ValueError."""
        with self._lock:
            if self.draining:
                self.rejected["shutting_down"] += 1
                raise APIError(503, "the server is shutting down: expected a retry against another server",
                               retry=False)
            if self._pending >= self.max_pending:
                self.rejected["queue_full"] += 1
                raise APIError(429, f"the server is at capacity: {self._pending} requests in flight "
                                    f"(max_pending={self.max_pending}); expected a retry shortly", retry=True)
            self._pending += 1
        loop = asyncio.get_running_loop()
        ack: asyncio.Future = loop.create_future()

        def acknowledge(exc: Optional[BaseException]) -> None:
            def settle():
                if not ack.done():
                    ack.set_exception(exc) if exc is not None else ack.set_result(None)
            loop.call_soon_threadsafe(settle)

        self.commands.put(_Add(request_id, prompt, params, adapter, (loop, outputs), acknowledge))
        try:
            await ack
        except asyncio.CancelledError:      # the client left before the engine took it
            self.cancel(request_id)
            raise

    def cancel(self, request_id: str) -> None:
        """End a request (client gone); its KV blocks are freed by the engine thread."""
        self.commands.put(_Cancel(request_id))

    def drain(self, grace_s: float) -> None:
        """Stop admitting; after `grace_s` seconds end what still runs with an error."""
        with self._lock:
            self.draining = True
        self.commands.put(_Drain(time.monotonic() + grace_s))

    # ---- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            busy = engine.has_unfinished()
            if not busy and not self.keep_going():
                return
            timeout = 0.0 if busy else 1.0                 # idle: wake now and then to check keep_going
            if not busy and self._deadline is not None:
                timeout = min(timeout, max(0.0, self._deadline - time.monotonic()))
            self._take_commands(block=not busy, timeout=timeout)
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._fail_all("the server is shutting down: the request did not finish within the grace period",
                               status=503)
                self._deadline = None
            if not engine.has_unfinished():
                self._publish()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:                    # the whole step: fail its requests, keep serving
                log.exception("engine step failed")
                self.step_failures += 1
                self._fail_all(f"the engine failed while running this request ({type(exc).__name__}: {exc})")
                continue
            self._deliver([(out.request_id, out) for out in outputs])
            for out in outputs:
                if out.finished:
                    self._retire(out.request_id, [c.finish_reason for c in out.outputs])
            self._publish()

    def _take_commands(self, block: bool, timeout: Optional[float]) -> None:
        try:
            command = self.commands.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return
        while command is not None or not self.commands.empty():
            if command is not None:
                self._run_command(command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _run_command(self, command) -> None:
        engine = self.engine
        if isinstance(command, _Add):
            try:
                engine.add_request(command.prompt, command.params, request_id=command.request_id,
                                   adapter=command.adapter)
            except Exception as exc:                     # ValueError / KVBudgetError: the caller's 400
                self._release_slot()
                command.acknowledge(exc)
                return
            self.routes[command.request_id] = command.route
            command.acknowledge(None)
        elif isinstance(command, _Cancel):
            if command.request_id in self.routes:
                engine.release(command.request_id)
                self._retire(command.request_id, ["abort"], release=False)
        elif isinstance(command, _Drain):
            self._deadline = command.deadline

    def _deliver(self, items) -> None:
        """Hand (request id, output) pairs to their callers: one wake-up of each event loop per step,
        not one per request (each wake-up is a syscall and a loop iteration, on the same 2 cores)."""
        by_loop: dict = {}
        for request_id, item in items:
            route = self.routes.get(request_id)
            if route is not None:
                by_loop.setdefault(route[0], []).append((route[1], (request_id, item)))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _retire(self, request_id: str, reasons, release: bool = True) -> None:
        if release:
            self.engine.release(request_id)
        if self.routes.pop(request_id, None) is not None:
            self._release_slot()
            self.finished.update(r or "abort" for r in reasons)

    def _release_slot(self) -> None:
        with self._lock:
            self._pending -= 1

    def _fail_all(self, message: str, status: int = 500) -> None:
        self._deliver([(request_id, EngineError(message, status)) for request_id in self.routes])
        for request_id in list(self.routes):
            self.engine.release(request_id)
            self._retire(request_id, ["error"], release=False)

    def _publish(self) -> None:
        m = self.engine.metrics()
        now = time.monotonic()
        self._window.append((now, m["generated_tokens"]))
        while len(self._window) > 2 and now - self._window[1][0] > self._rate_window_s:
            self._window.popleft()             # keep one point at or before the window's start
        m["pending"] = self._pending
        self.snapshot = m

    def metrics(self) -> dict:
        """The last published engine metrics, plus generated tokens/s over the last window
        (computed now, so an idle server reads 0)."""
        points, now = list(self._window), time.monotonic()
        rate = 0.0
        if points:
            start = now - self._rate_window_s
            before = [p for p in points if p[0] <= start]
            t0, n0 = before[-1] if before else points[0]
            t0 = max(t0, start)
            rate = (points[-1][1] - n0) / (now - t0) if now > t0 else 0.0
        return dict(self.snapshot, tokens_per_s=rate)
