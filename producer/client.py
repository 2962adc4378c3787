"""AsyncClient and Client: submit tensors, wait for results by request id.

Requests are checked at submit against the metadata workers publish in
``tq:models`` (unknown model, wrong dtype/shape raise at once) and enqueued
with a Lua XADD that refuses past the model's ``max_queue_len``
(``QueueFull``). Every request names this client's inbox in ``reply_to``;
one reader task pops finished results from it in bulk (BLMPOP) and resolves
the waiting futures, so thousands of waiting requests need one connection
and no polling. Results stay fetchable by id from ``tq:r:<id>`` by anyone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import NoScriptError, RedisError

from common.codec import as_wire_array, bf16_bits_to_float32
from common.envelope import Request, Result, pack_request, unpack_result
from common.errors import (
    InferenceError,
    InvalidInput,
    QueueFull,
    RedisUnavailable,
    RequestTimeout,
    TensorQError,
    UnknownModel,
)
from common.keys import REQUEST_FIELD, Keys
from common.redis_conn import blocking_client, check_reachable, mask_url, pooled_client
from common.settings import RedisSettings, Settings
from common.spec import ModelSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0
_WAKE = b""  # pushed onto our own inbox to end a blocking pop at close

# XADD each payload (ARGV[3..]) while the stream (queued + in flight: acked
# entries are deleted) is below the limit ARGV[1]; false for each refused one.
# One call per model per submit_many, atomic.
_ENQUEUE_LUA = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local ids = {}
for i = 3, #ARGV do
  if i - 2 > room then
    ids[#ids + 1] = false
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
  end
end
return ids
"""


@dataclass(frozen=True)
class Submission:
    """One request for ``submit_many``."""

    model: str
    inputs: Mapping[str, Any]
    request_id: str | None = None
    timeout: float | None = None
    priority: int = 0


@dataclass(frozen=True)
class _Prepared:
    """A checked request, packed for its stream, and that stream's length limit."""

    request: Request
    limit: int
    payload: bytes


# How long a delivered result waits in memory for its wait() call.
UNCLAIMED_S = 60.0

# How long a wait that timed out still looks for a stored result.
STORED_LOOK_S = 1.0

# Longest timeout a request may carry: its deadline must stay a sane int64 of ms.
MAX_TIMEOUT_S = 10 * 365 * 24 * 3600.0


@dataclass
class _Inbox:
    key: str
    waiters: dict[str, asyncio.Future[Result]] = field(default_factory=dict)
    # (delivered at, id) of results no wait() has taken yet, oldest first
    unclaimed: deque[tuple[float, str]] = field(default_factory=deque)

    def forget_unclaimed(self, older_than_s: float) -> None:
        """Drop results delivered long ago that nobody waited for (submit
        and forget); a late wait() reads them from Redis by id instead."""
        horizon = time.monotonic() - older_than_s
        while self.unclaimed and self.unclaimed[0][0] <= horizon:
            _, request_id = self.unclaimed.popleft()
            future = self.waiters.get(request_id)
            if future is not None and future.done():
                del self.waiters[request_id]


class AsyncClient:
    """``async with AsyncClient(url) as c: out = await c.infer("mlp", {"x": x})``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        client_id: str | None = None,
        inbox_block_s: float = 1.0,
        redis: aioredis.Redis | None = None,
    ) -> None:
        """``redis`` shares an application's existing client (the gateway's
        pool); the inbox reader still opens its own blocking connection."""
        if settings is None:
            settings = Settings(redis=RedisSettings(url=redis_url or ""))
        elif redis_url:
            settings = settings.replace(redis=settings.redis.with_url(redis_url))
        if not settings.redis.url:
            raise TensorQError("AsyncClient needs a Redis URL")
        self.settings = settings
        self.keys = Keys.of(settings.redis)
        self.client_id = client_id or uuid.uuid4().hex[:16]
        # Ids are this client's random id plus a counter: unique, and cheaper
        # than a uuid4 (a getrandom syscall) per request.
        self._ids = itertools.count()
        self._inbox = _Inbox(self.keys.inbox(self.client_id))
        self._block_s = inbox_block_s
        self._redis: aioredis.Redis | None = None
        self._given_redis = redis
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._specs: dict[str, ModelSpec] = {}
        self._enqueue_sha = ""
        self._outbox: list[tuple[list[_Prepared], asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        redis = self._given_redis or pooled_client(self.settings.redis)
        try:
            await check_reachable(redis, self.settings.redis.url)
        except RedisUnavailable:
            if self._given_redis is None:
                await redis.aclose()
            raise
        self._redis = redis
        return self

    async def close(self) -> None:
        if self._redis is None:
            return
        self._closing = True
        if self._reader is not None:
            try:  # wake the blocking pop rather than cancel it mid-read
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.lpush(self._inbox.key, _WAKE)
                    pipe.expire(self._inbox.key, 60)
                    await pipe.execute()
                await asyncio.wait_for(asyncio.shield(self._reader), self._block_s + 5)
            except (RedisError, TimeoutError):
                self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self._inbox.waiters.values():
            future.cancel()
        self._inbox.waiters.clear()
        self._inbox.unclaimed.clear()
        if self._given_redis is None:
            await self._redis.aclose()
        self._redis = None
        self._reader = None  # connect() again starts afresh
        self._closing = False

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise TensorQError("client is not connected: use 'async with' or connect()")
        return self._redis

    # -- model metadata -------------------------------------------------------

    async def models(self, *, refresh: bool = False) -> dict[str, ModelSpec]:
        if refresh or not self._specs:
            raw = await self._call(self.redis.hgetall(self.keys.models))
            specs = {}
            for name, text in raw.items():
                try:
                    specs[name.decode(errors="replace")] = ModelSpec.from_json(text)
                except (ValueError, KeyError, TypeError, TensorQError) as exc:
                    log.warning("ignoring the unreadable spec of %r in %s: %r",
                                name, self.keys.models, exc)  # fmt: skip
            self._specs = specs
        return dict(self._specs)

    async def spec(self, model: str) -> ModelSpec:
        spec = self._specs.get(model) or (await self.models(refresh=True)).get(model)
        if spec is None:
            known = ", ".join(sorted(self._specs)) or "none"
            raise UnknownModel(f"no worker serves model {model!r} (served: {known})")
        return spec

    # -- submitting -------------------------------------------------------------

    async def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> str:
        """Enqueue one request; ``timeout`` becomes its deadline. Returns its id."""
        ids = await self.submit_many([Submission(model, inputs, request_id, timeout, priority)])
        return ids[0]

    async def submit_many(self, submissions: Sequence[Submission]) -> list[str]:
        """Validate all, then enqueue all in one pipelined round trip.

        Each request is enqueued or refused on its own; if any was refused,
        QueueFull names the first refused id and lists the rest in
        ``.refused`` (the others are queued and can be waited for).
        """
        prepared = [await self._prepare(s) for s in submissions]
        loop = asyncio.get_running_loop()
        for p in prepared:
            self._inbox.waiters[p.request.id] = loop.create_future()
        if self._reader is None:  # results of our own requests arrive in our inbox
            self._reader = asyncio.create_task(self._read_inbox(), name=f"inbox-{self.client_id}")
        try:
            replies = await self._enqueue_grouped(prepared)
        except BaseException:  # not known to be queued: nobody will wait for these
            for p in prepared:
                self._inbox.waiters.pop(p.request.id, None)
            raise
        refused = [p for p, reply in zip(prepared, replies, strict=True) if not reply]
        if refused:
            for p in refused:
                self._inbox.waiters.pop(p.request.id, None)
            first = refused[0]
            error = QueueFull(
                f"queue of model {first.request.model!r} is at max_queue_len {first.limit}; "
                f"{len(refused)} of {len(prepared)} request(s) refused",
                request_id=first.request.id,
            )
            error.refused = [p.request.id for p in refused]
            raise error
        return [p.request.id for p in prepared]

    async def _enqueue_grouped(self, prepared: list[_Prepared]) -> list[Any]:
        """Group commit: submits from concurrent tasks that arrive while an
        enqueue round trip is in flight go out together in the next one, so
        M concurrent producers cost one script call per model per round trip."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._outbox.append((prepared, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_outbox())
        return await future

    async def _flush_outbox(self) -> None:
        await asyncio.sleep(0)  # let submitters running in this same tick join
        while self._outbox:
            batch, self._outbox = self._outbox, []
            flat = [item for prepared, _ in batch for item in prepared]
            try:
                replies = await self._enqueue_with_script(flat)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            offset = 0
            for prepared, future in batch:
                if not future.done():
                    future.set_result(replies[offset : offset + len(prepared)])
                offset += len(prepared)

    async def _enqueue_with_script(self, prepared: Sequence[_Prepared]) -> list[Any]:
        if not self._enqueue_sha:
            self._enqueue_sha = await self._call(self.redis.script_load(_ENQUEUE_LUA))
        try:
            return await self._enqueue_all(prepared)
        except NoScriptError:  # Redis restarted and lost its script cache
            self._enqueue_sha = await self._call(self.redis.script_load(_ENQUEUE_LUA))
            return await self._enqueue_all(prepared)

    async def _enqueue_all(self, prepared: Sequence[_Prepared]) -> list[Any]:
        """One script call per stream, pipelined; the stream entry id (or None
        if refused) of each request, in order."""
        groups: dict[str, list[int]] = {}
        for index, p in enumerate(prepared):
            groups.setdefault(self.keys.queue(p.request.model, p.request.priority), []).append(
                index
            )
        calls = [
            (queue, prepared[indices[0]].limit, [prepared[i].payload for i in indices])
            for queue, indices in groups.items()
        ]
        if self.keys.cluster:  # cluster pipelines refuse EVALSHA: concurrent calls instead
            replies: list[Any] = await asyncio.gather(*(self._enqueue_one(*c) for c in calls))
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue, limit, payloads in calls:
                    pipe.evalsha(self._enqueue_sha, 1, queue, limit, REQUEST_FIELD, *payloads)
                replies = await self._call(pipe.execute())
        entry_ids: list[Any] = [None] * len(prepared)
        for indices, reply in zip(groups.values(), replies, strict=True):
            for index, entry_id in zip(indices, reply, strict=True):
                entry_ids[index] = entry_id
        return entry_ids

    async def _enqueue_one(self, queue: str, limit: int, payloads: list[bytes]) -> Any:
        """One stream's script call on Cluster; a node that lost its script
        cache gets it again here, without resending the other streams' calls."""
        try:
            return await self._call(
                self.redis.evalsha(self._enqueue_sha, 1, queue, limit, REQUEST_FIELD, *payloads)
            )
        except NoScriptError:
            self._enqueue_sha = await self._call(self.redis.script_load(_ENQUEUE_LUA))
            return await self._call(
                self.redis.evalsha(self._enqueue_sha, 1, queue, limit, REQUEST_FIELD, *payloads)
            )

    async def _prepare(self, submission: Submission) -> _Prepared:
        """Check and pack one submission; what is wrong with it fails it alone,
        before it joins other submitters' round trip."""
        spec = await self.spec(submission.model)
        request_id = submission.request_id or f"{self.client_id}-{next(self._ids)}"
        arrays = {
            name: as_wire_array(value, name=f"input {name!r}")
            for name, value in submission.inputs.items()
        }
        try:
            spec.check_inputs(arrays, request_id=request_id)
        except InvalidInput:  # a hot reload may have changed the signature since we read it
            fresh = (await self.models(refresh=True)).get(submission.model)
            if fresh is None or fresh == spec:
                raise
            spec = fresh
            spec.check_inputs(arrays, request_id=request_id)
        deadline = None
        if submission.timeout is not None:
            timeout = submission.timeout
            if not (isinstance(timeout, int | float) and 0 < timeout <= MAX_TIMEOUT_S):
                raise InvalidInput(
                    f"timeout must be seconds in (0, {MAX_TIMEOUT_S:.0f}], got {timeout!r:.40}",
                    request_id=request_id,
                )
            deadline = int(time.time() * 1000 + timeout * 1000)
        request = Request(
            request_id, submission.model, arrays, deadline, self._inbox.key, submission.priority
        )
        try:
            payload = pack_request(request)
        except (OverflowError, ValueError, TypeError) as exc:  # e.g. a priority past int64
            raise InvalidInput(f"request cannot be encoded: {exc}", request_id=request_id) from None
        return _Prepared(request, int(spec.extra.get("max_queue_len", 100_000)), payload)

    # -- results --------------------------------------------------------------

    async def wait(self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> Result:
        """The full result envelope (status, outputs, timings) of a request."""
        future = self._inbox.waiters.get(request_id)
        if future is None:
            return await self._fetch(request_id, timeout)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # an inbox push may have been lost: one last look, briefly
            stored = await self._get_stored(request_id, STORED_LOOK_S)
            if stored is not None:
                return stored
            raise RequestTimeout(f"no result within {timeout}s", request_id=request_id) from None
        finally:
            self._inbox.waiters.pop(request_id, None)

    async def result(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Outputs as numpy arrays (bfloat16 widened to float32); raises on failure."""
        return outputs_of(await self.wait(request_id, timeout))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        priority: int = 0,
    ) -> dict[str, np.ndarray[Any, Any]]:
        request_id = await self.submit(model, inputs, timeout=timeout, priority=priority)
        return await self.result(request_id, timeout)

    async def cancel(self, request_id: str) -> None:
        """Ask workers to skip a request they have not started (result ``cancelled``)."""
        # The marker first (what a worker checks for entries it read before it
        # subscribed), then the news; two calls, as cluster pipelines refuse PUBLISH.
        ttl = self.settings.redis.result_ttl_s
        await self._call(self.redis.set(self.keys.cancelled(request_id), b"1", ex=ttl))
        await self._call(self.redis.publish(self.keys.cancel_channel, request_id))

    async def _fetch(self, request_id: str, timeout: float | None) -> Result:
        """A request this client did not submit: read tq:r:<id>, polling with
        backoff (only our own requests are pushed to our inbox)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            stored = await self._get_stored(request_id, STORED_LOOK_S if left is None else left)
            if stored is not None:
                return stored
            if deadline is not None and time.monotonic() + delay > deadline:
                raise RequestTimeout(f"no result within {timeout}s", request_id=request_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _get_stored(self, request_id: str, within_s: float) -> Result | None:
        """The stored result, or None if there is none or Redis does not
        answer within ``within_s`` (a stalled Redis must not stretch a
        caller's timeout by the client's retries)."""
        try:
            async with asyncio.timeout(max(within_s, 0.05)):
                raw: Any = await self.redis.get(self.keys.result(request_id))
        except (RedisError, TimeoutError):
            return None
        return unpack_result(raw, self.settings.limits.codec()) if raw else None

    async def _read_inbox(self) -> None:
        conn = blocking_client(self.settings.redis, int(self._block_s * 1000))
        attempts = 0
        try:
            while not self._closing:
                try:
                    if attempts:  # a pop whose reply was lost took results with it
                        await self._sweep_stored()
                    reply: Any = await conn.blmpop(
                        self._block_s, 1, self._inbox.key, direction="RIGHT", count=1024
                    )
                    attempts = 0
                except RedisError as exc:
                    attempts += 1
                    delay = random.uniform(0, min(5.0, 0.05 * 2**attempts))
                    log.warning("inbox read failed (%s); retry in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                if reply:
                    self._deliver(reply[1])
        finally:
            await conn.aclose()

    async def _sweep_stored(self) -> None:
        """After a connection loss, resolve waiters whose results are stored."""
        waiting = [i for i, f in self._inbox.waiters.items() if not f.done()]
        for start in range(0, len(waiting), 500):
            chunk = waiting[start : start + 500]
            keys = [self.keys.result(i) for i in chunk]
            stored: Any = await (
                self.redis.mget_nonatomic(keys)  # type: ignore[attr-defined]
                if self.keys.cluster
                else self.redis.mget(keys)
            )
            self._deliver([blob for blob in stored if blob])

    def _deliver(self, blobs: Sequence[bytes]) -> None:
        for blob in blobs:
            if blob == _WAKE:
                continue
            try:
                result = unpack_result(blob, self.settings.limits.codec())
            except TensorQError as exc:
                log.warning("dropping unreadable inbox entry: %s", exc)
                continue
            future = self._inbox.waiters.get(result.id)
            if future is not None and not future.done():
                future.set_result(result)
                self._inbox.unclaimed.append((time.monotonic(), result.id))
        self._inbox.forget_unclaimed(UNCLAIMED_S)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except NoScriptError:
            raise
        except RedisError as exc:
            url = mask_url(self.settings.redis.url)
            raise RedisUnavailable(f"Redis at {url}: {exc}") from None


def outputs_of(result: Result) -> dict[str, np.ndarray[Any, Any]]:
    """A result's outputs for users, or the typed error it stands for."""
    if result.status == "ok":
        return {
            name: bf16_bits_to_float32(a) if a.dtype == np.uint16 else a
            for name, a in result.outputs.items()
        }
    if result.status == "expired":
        raise RequestTimeout(result.error_message or "request expired", request_id=result.id)
    raise InferenceError(
        result.error_message or result.status,
        code=result.error_code or result.status,
        request_id=result.id,
    )


class Client:
    """The blocking twin of AsyncClient, for scripts: the same calls, run on a
    private uvloop event loop in a background thread."""

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        self._async = AsyncClient(redis_url, **kwargs)  # bad arguments raise before a thread
        self._closed = False
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self._run(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise TensorQError("the client is closed")
        future: ThreadFuture[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except CancelledError:  # close() from another thread ended this call
            raise TensorQError("the client was closed while this call waited") from None

    def submit(self, model: str, inputs: Mapping[str, Any], **kwargs: Any) -> str:
        return self._run(self._async.submit(model, inputs, **kwargs))

    def submit_many(self, submissions: Sequence[Submission]) -> list[str]:
        return self._run(self._async.submit_many(submissions))

    def wait(self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> Result:
        return self._run(self._async.wait(request_id, timeout))

    def result(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> dict[str, np.ndarray[Any, Any]]:
        return self._run(self._async.result(request_id, timeout))

    def infer(
        self, model: str, inputs: Mapping[str, Any], **kwargs: Any
    ) -> dict[str, np.ndarray[Any, Any]]:
        return self._run(self._async.infer(model, inputs, **kwargs))

    def cancel(self, request_id: str) -> None:
        self._run(self._async.cancel(request_id))

    def models(self, *, refresh: bool = False) -> dict[str, ModelSpec]:
        return self._run(self._async.models(refresh=refresh))

    def close(self) -> None:
        """Close; calls other threads are still waiting in end with TensorQError."""
        if self._closed:
            return
        try:
            self._run(self._async.close())
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
