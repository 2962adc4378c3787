"""The control side of a worker: the deployment's broadcast feed and model
reloads.

``ControlFeed`` subscribes to ``tq:cancelled:db<n>`` (ids of cancelled
requests, kept in memory so the scheduler drops one without a Redis round
trip) and ``tq:control:db<n>`` (``ControlMessage``: model reloads, handed to
a callback); ``<n>`` is the deployment's database, so a pool hears only its
own database's announcements (common/keys.py).
Entries enqueued before the subscription was (re)established may have been
cancelled while nobody listened; ``listening_since_ms`` (Redis server time)
tells the reader which entries still need a key lookup.

``ModelReloader`` loads a new version beside the old one (in a loader
thread, warmed up), then switches ``ServedModels``: the running batch
finishes on the old module, the next one runs on the new; requests are
never dropped. With ``watch_models`` it also reloads a model whose file
changed. A reload asked for with a ``reply_to`` list is answered there
(``ReloadAnswer``: reloaded, unchanged or failed, and why) after the
heartbeat that shows its outcome; a worker that does not serve the model
stays silent (``tensorq models reload`` knows from the heartbeats whom to
wait for).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.aio import wait_any
from common.backoff import Backoff
from common.keys import Keys
from common.records import FAILED, RELOAD, RELOADED, UNCHANGED, ControlMessage, ReloadAnswer
from worker.registry import LoadedModel
from worker.served import ServedModels

log = logging.getLogger(__name__)

CANCEL_MEMORY_S = 3600.0  # as long as a cancel key lives


class ControlFeed:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        poll_s: float,
        on_control: Callable[[ControlMessage], None],
    ) -> None:
        self._on_control = on_control
        self._redis = redis
        self._keys = keys
        self._poll_s = poll_s
        self._cancelled: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()  # in insertion = expiry order
        self.listening_since_ms = float("inf")

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def cancelled_among(self, request_ids: Iterable[str]) -> set[str]:
        """Which of these are cancelled (one set operation for a whole bundle)."""
        return self._cancelled.intersection(request_ids) if self._cancelled else set()

    def add_cancelled(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        self._expiry.append((time.monotonic() + CANCEL_MEMORY_S, request_id))

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe until ``stop``, resubscribing with backoff on connection loss."""
        backoff = Backoff()
        while not stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel, self._keys.control_channel)
                seconds, micros = await self._redis.time()
                self.listening_since_ms = seconds * 1000 + micros / 1000
                backoff.reset()
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=self._poll_s)
                    if message is None:
                        pass
                    elif message["channel"].decode() == self._keys.control_channel:
                        self._control(message["data"])
                    else:
                        self.add_cancelled(message["data"].decode(errors="replace"))
                    self._forget_expired()
            except RedisError as exc:
                # Until resubscribed, every entry counts as possibly cancelled.
                self.listening_since_ms = float("inf")
                await backoff.wait("control feed subscription", exc, stop)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _control(self, data: bytes) -> None:
        try:
            message = ControlMessage.decode(data)
        except ValueError as exc:
            log.warning("ignoring unreadable control message %r: %s", data[:100], exc)
            return
        if message.reply_to and not self._keys.is_reply(message.reply_to):
            log.warning("control message asks for answers at %r, not a reply list: not answering",
                        message.reply_to[:100])  # fmt: skip
            message = ControlMessage(message.op, message.model)
        self._on_control(message)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] < now:
            self._cancelled.discard(self._expiry.popleft()[1])


Loader = Callable[[LoadedModel], LoadedModel]  # old version -> new version (blocking)
Reply = tuple[str, ReloadAnswer]  # (the reply list, the answer without the worker's name)
ERROR_CHARS = 300  # an answer's error: its first line, cut to this


class Announce(Protocol):
    """Publish this worker's state after a reload (the heartbeat: models and
    versions), then push ``reply``'s answer, signed with the worker's name."""

    def __call__(self, *, reply: Reply | None = None) -> Awaitable[None]: ...


class ModelReloader:
    """``request(name)`` queues a reload; ``run`` carries them out until ``finishing``."""

    def __init__(
        self,
        served: ServedModels,
        load: Loader,
        on_switch: Announce,
        *,
        watch: bool,
    ) -> None:
        self._served = served
        self._load = load
        self._on_switch = on_switch  # republish the models (the heartbeat does), answer
        self._watch = watch
        self._requests: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (model, reply_to)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")

    def on_control(self, message: ControlMessage) -> None:
        """A reload of a model this worker serves; others' are not ours to answer."""
        if message.op == RELOAD and message.model in self._served:
            self.request(message.model, message.reply_to)

    def request(self, name: str, reply_to: str = "") -> None:
        self._requests.put_nowait((name, reply_to))

    async def run(self, finishing: asyncio.Event) -> None:
        loops = [asyncio.create_task(self._reload_loop(), name="reload")]
        if self._watch:
            loops.append(asyncio.create_task(self._watch_loop(finishing), name="model watch"))
        try:
            await finishing.wait()
            self._requests.put_nowait(("", ""))  # ends the reload loop
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()
            self._loader.shutdown(wait=True)

    async def _reload_loop(self) -> None:
        while True:
            name, reply_to = await self._requests.get()
            if not name:
                return
            answer, switched = await self._reload(name)
            if switched or reply_to:
                await self._on_switch(reply=(reply_to, answer) if reply_to else None)

    async def _reload(self, name: str) -> tuple[ReloadAnswer, bool]:
        """Load ``name`` again and switch to it if its version changed: the
        answer, and whether it switched. A bad file keeps the old version."""
        old = self._served[name]
        was = old.spec.version
        try:
            new = await asyncio.get_running_loop().run_in_executor(self._loader, self._load, old)
        except Exception as exc:  # a bad file must not take the old model down
            log.error("reload of %s failed, keeping version %s: %s", name, was, exc)
            return ReloadAnswer(name, FAILED, was, was, _first_line(exc)), False
        if new.spec.version == was:
            log.info("reload of %s: version %s unchanged", name, was)
            return ReloadAnswer(name, UNCHANGED, was, was), False
        self._served.replace(new)
        log.info("model reloaded: %s version %s -> %s", name, was, new.spec.version)
        return ReloadAnswer(name, RELOADED, new.spec.version, was), True

    async def _watch_loop(self, finishing: asyncio.Event) -> None:
        seen = {m.name: _file_stamp(m.config.path) for m in self._served.all()}
        while not finishing.is_set():
            await wait_any(finishing, timeout=1.0)
            for model in self._served.all():
                now = _file_stamp(model.config.path)
                if now != seen[model.name] and now != (0.0, 0):
                    seen[model.name] = now
                    self.request(model.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 3] + "..."


def _file_stamp(path: Path) -> tuple[float, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0.0, 0)
    return (stat.st_mtime, stat.st_size)
