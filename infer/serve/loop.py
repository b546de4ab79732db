"""The engine thread: the one place that touches the Engine while the server runs.

HTTP handlers never call the engine. They put commands (add a request, abort one, load or unload an
adapter) into a thread-safe inbox and await the answer; the engine thread runs every queued command
between two steps, then steps the engine, then hands each request's new text and token ids to its
asyncio queue with one `call_soon_threadsafe` per step. The queues are unbounded, so a slow client only
lets its own queue grow (by at most its max_tokens events) and never stalls the batch.

Unloading an adapter hides its name at once (new requests get 404) and removes it from the engine when
the last request using it finishes. The waiting line is bounded: past `max_waiting` requests not yet
admitted, `submit` answers 503 with Retry-After instead of queueing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infer.engine import Engine, Request
from infer.sampling import SamplingParams
from infer.serve.protocol import ServeError
from infer.text import TextStream

if TYPE_CHECKING:
    from model.peft import Adapter

log = logging.getLogger("infer.serve")
_STOP = object()


@dataclass
class Event:
    """What one engine step produced for one request. The last event has `finish_reason` and the totals."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    final_text: str = ""  # the request's whole text (authoritative; the pieces add up to it)
    output_ids: list[int] = field(default_factory=list)
    error: str | None = None  # the engine failed this request (answered as a 500 without a traceback)


class Handle:
    """One request as its handler sees it. The engine thread sets `req` and feeds `queue`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        self.prompt_ids, self.params, self.adapter = prompt_ids, params, adapter
        self.aloop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.req: Request | None = None
        self.done = False  # the handler saw the last event
        self._text: TextStream | None = None  # engine thread only
        self._sent = 0  # engine thread only: output ids already handed over

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to and including the last one."""
        while not self.done:
            ev = await self.queue.get()
            self.done = ev.finish_reason is not None or ev.error is not None
            yield ev

    def _poll(self) -> Event | None:
        """Engine thread, after a step: the new text and ids, or None when there is nothing new."""
        req = self.req
        text = self._text.poll()
        ids: list[int] = []
        if req.params.beams == 1 or req.finished:  # beams are known only at the end
            ids = req.output_ids[self._sent :]
            self._sent = len(req.output_ids)
        if not req.finished:
            return Event(text, ids) if text or ids else None
        return Event(text, ids, req.finish_reason, req.text, list(req.output_ids))


class EngineLoop:
    """Owns `engine` on one background thread; the async methods are for the event loop's handlers."""

    def __init__(self, engine: Engine, model_name: str, max_waiting: int = 256) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.finish_counts: Counter[str] = Counter()  # finish reasons so far ("abort" included)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _queued and _visible (read by handler threads)
        self._queued = 0  # add commands in the inbox, not yet in engine.waiting
        self._visible = set(engine.adapters)  # adapter names new requests may use
        self._users: Counter[str] = Counter()  # engine thread: unfinished requests per adapter
        self._retiring: set[str] = set()  # unloaded names still used by running requests
        self._handles: dict[int, Handle] = {}  # engine thread: request id -> handle
        self._thread = threading.Thread(target=self._run, name="parallama-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left and end the thread."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the handlers' side --------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._visible)

    @property
    def in_flight(self) -> int:
        """Requests the engine thread still tracks (admitted or waiting, not yet handed their last event)."""
        return len(self._handles)

    def waiting(self) -> int:
        """Requests accepted but not yet admitted into the batch."""
        return self._queued + len(self.engine.waiting)

    async def submit(self, prompt_ids: list[int], params: SamplingParams, model: str) -> Handle:
        """Queue a request for `model` (the base model's name or an adapter's). ServeError: 503 when the
        waiting line is full, 404 for an unknown model, 400 for what the engine refuses (context, pool)."""
        with self._lock:
            if self.waiting() >= self.max_waiting:
                raise ServeError(
                    503,
                    f"the server is overloaded ({self.max_waiting} requests waiting); retry later",
                    code="overloaded",
                    headers={"Retry-After": "1"},
                )
            self._queued += 1
        handle = Handle(prompt_ids, params, None if model == self.model_name else model)
        try:
            await self._call(lambda: self._add(handle, model))
        except asyncio.CancelledError:
            self.abort(handle)  # queued after the add: the engine thread drops it
            raise
        return handle

    def abort(self, handle: Handle) -> None:
        """Stop a request whose client is gone: its blocks are freed before the next step."""
        if not handle.done:
            self._inbox.put(lambda: self._abort(handle))

    async def load_adapter(self, name: str, adapter: Adapter) -> None:
        await self._call(lambda: self._load(name, adapter))

    async def unload_adapter(self, name: str) -> int:
        """Hide `name` now; returns how many unfinished requests still use it (it goes when they finish)."""
        return await self._call(lambda: self._unload(name))

    def exists(self, name: str) -> bool:
        with self._lock:
            return name == self.model_name or name in self._visible or name in self.engine.adapters

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps; its result or exception comes back here."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # the caller re-raises it; the thread goes on
                fut.set_exception(e)

        if not self._thread.is_alive():
            raise ServeError(503, "the engine is not running", code="engine_stopped")
        self._inbox.put(run)
        return await asyncio.wrap_future(fut)

    # ---- the engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._tick():
                    return
            except Exception:  # the thread must outlive any bug: every handler waits on it
                log.exception("engine loop failed; the requests in flight are answered with an error")
                try:
                    self._fail_all("the engine failed while generating this request")
                except Exception:
                    log.exception("could not fail the requests in flight")

    def _tick(self) -> bool:
        """Run the queued commands, then one engine step and its hand-over; True after the stop command."""
        try:  # idle: sleep until a command arrives; busy: take what is there and step
            cmd = self._inbox.get(block=not self.engine.has_unfinished())
        except queue.Empty:
            cmd = None
        while cmd is not None:
            if cmd is _STOP:
                self._shutdown()
                return True
            try:
                cmd()
            except Exception:  # _call's commands report their own errors; an abort should never raise
                log.exception("engine loop command failed")
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                cmd = None
        if self.engine.has_unfinished():
            self.engine.step()
            self._publish()
        return False

    def _add(self, h: Handle, model: str) -> None:
        try:
            if h.adapter is not None and h.adapter not in self._visible:
                raise ServeError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
            try:
                req = self.engine.add_request(h.prompt_ids, h.params, h.adapter)
            except ValueError as e:
                msg = str(e)
                code = "context_length_exceeded" if "exceeds the context" in msg else None
                raise ServeError(400, msg, code=code) from None
        finally:
            with self._lock:
                self._queued -= 1
        h.req, h._text = req, self.engine.text_stream(req)
        self._handles[req.id] = h
        if h.adapter is not None:
            self._users[h.adapter] += 1

    def _abort(self, h: Handle) -> None:
        if h.req is None or h.req.id not in self._handles:
            return  # refused, or already finished and handed over
        self.engine.abort(h.req)
        self._release(h)

    def _release(self, h: Handle) -> None:
        """A request left the engine: count it, and retire its adapter if it was the last user of an unloaded one."""
        del self._handles[h.req.id]
        self.finish_counts[h.req.finish_reason or "error"] += 1
        name = h.adapter
        if name is None:
            return
        self._users[name] -= 1
        if self._users[name] == 0:
            del self._users[name]
            if name in self._retiring:
                self._retiring.discard(name)
                self.engine.remove_adapter(name)

    def _publish(self) -> None:
        out: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]] = {}
        for h in list(self._handles.values()):
            ev = h._poll()
            if ev is not None:
                out.setdefault(h.aloop, []).append((h, ev))
            if h.req.finished:
                self._release(h)
        _send(out)

    def _fail_all(self, message: str) -> None:
        out: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]] = {}
        for h in list(self._handles.values()):
            try:
                self.engine.abort(h.req)
            except Exception:  # the engine is in a bad state; the request is dropped from it anyway
                log.exception("abort after a failed step")
                self.engine.running = [r for r in self.engine.running if r is not h.req]
            out.setdefault(h.aloop, []).append((h, Event("", [], error=message)))
            h.req.finish_reason = h.req.finish_reason or "error"
            self._release(h)
        _send(out)

    def _load(self, name: str, adapter: Adapter) -> None:
        with self._lock:
            if name == self.model_name or name in self.engine.adapters:
                what = "is being unloaded" if name in self._retiring else "exists"
                raise ServeError(409, f"a model named {name!r} {what}", param="name", code="model_exists")
        try:
            self.engine.add_adapter(name, adapter)
        except ValueError as e:  # shapes that do not fit this model (the loader checked the file)
            raise ServeError(422, str(e), param="path", code="adapter_mismatch") from None
        with self._lock:
            self._visible.add(name)

    def _unload(self, name: str) -> int:
        with self._lock:
            if name not in self._visible:
                raise ServeError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
            self._visible.discard(name)
        users = self._users.get(name, 0)
        if users:
            self._retiring.add(name)
        else:
            self.engine.remove_adapter(name)
        return users

    def _shutdown(self) -> None:
        out: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]] = {}
        for h in list(self._handles.values()):
            self.engine.abort(h.req)
            out.setdefault(h.aloop, []).append((h, Event("", [], error="the server is shutting down")))
            self._release(h)
        _send(out)


def _send(out: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]]) -> None:
    for aloop, items in out.items():
        try:
            aloop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that event loop is closed: nobody is listening
            pass


def _deliver(items: list[tuple[Handle, Event]]) -> None:
    """On the event loop: one wake-up per engine step for all of its requests."""
    for h, ev in items:
        h.queue.put_nowait(ev)
