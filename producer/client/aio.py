"""AsyncClient: submit tensors, wait for results by request id.

Requests are checked at submit against the metadata workers publish in
``tq:models`` (unknown model, wrong dtype/shape raise at once) and enqueued
with a Lua XADD that refuses past the model's ``max_queue_len``
(``QueueFull``; ``client.enqueue``). Every request names this client's
inbox in ``reply_to``, where one reader task collects the results
(``client.inbox``). Results stay fetchable by id from ``tq:r:<id>`` by
anyone (``client.results``); once this client has handed a kept result to
its caller, that key lives ``collected_result_ttl_s`` more
(``client.collected``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from common.envelope import Result
from common.errors import (
    ConfigError,
    InvalidInput,
    QueueFull,
    RedisUnavailable,
    RequestTimeout,
    TensorQError,
    UnknownModel,
    UnknownRequest,
)
from common.ids import CLIENT_ID_RULE, REQUEST_ID_RULE, is_client_id, is_request_id
from common.keys import Keys
from common.redis_conn import check_reachable, pooled_client
from common.redis_url import check_url, mask_url
from common.settings import RedisSettings, Settings
from common.spec import ModelSpec
from producer.client.collected import Collected
from producer.client.enqueue import Enqueuer
from producer.client.inbox import Inbox, InboxReader
from producer.client.results import (
    DEFAULT_TIMEOUT_S,
    STORED_LOOK_S,
    get_stored,
    look_up,
    outputs_of,
    poll_stored,
)
from producer.client.submission import Prepared, Submission, prepare, wire_arrays

log = logging.getLogger(__name__)

T = TypeVar("T")

FITS_REMEMBERED = 4096  # input signatures whose check is remembered (see _check)


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
        pool); the inbox reader still opens its own blocking connection.

        A URL no client can be made from (``http://...``, a port that is no
        number) or a ``client_id`` outside the request id characters raises
        ``ConfigError`` here, before any connection."""
        if settings is None:
            settings = Settings(redis=RedisSettings(url=redis_url or ""))
        elif redis_url:
            settings = settings.replace(redis=settings.redis.with_url(redis_url))
        check_url(settings.redis.url, cluster=settings.redis.is_cluster)
        if client_id is not None and not is_client_id(client_id):
            raise ConfigError(
                f"client_id must be {CLIENT_ID_RULE} (it prefixes the ids the client makes),"
                f" got {client_id!r:.60}"
            )
        self.settings = settings
        self.keys = Keys.of(settings.redis)
        self.client_id = client_id or uuid.uuid4().hex[:16]
        # Ids are this client's random id plus a counter: unique, and cheaper
        # than a uuid4 (a getrandom syscall) per request.
        self._ids = itertools.count()
        self._inbox = Inbox(self.keys.inbox(self.client_id), settings.limits.codec())
        self._reader = InboxReader(
            self._inbox,
            settings.redis,
            self.keys,
            lambda: self.redis,
            inbox_block_s,
            name=f"inbox-{self.client_id}",
        )
        self._redis: aioredis.Redis | None = None
        self._given_redis = redis
        self._specs: dict[str, ModelSpec] = {}
        self._fits: dict[tuple[Any, ...], int] = {}  # see _check
        self._enqueuer = Enqueuer(
            self.keys, lambda: self.redis, self._call, self.client_id, settings.redis.result_ttl_s
        )
        self._collected = Collected(
            self.keys,
            lambda: self.redis,
            settings.redis.collected_result_ttl_s,
            settings.redis.result_ttl_s,
        )

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
        await self._reader.stop()
        await self._collected.close()
        self._inbox.clear()
        if self._given_redis is None:
            await self._redis.aclose()
        self._redis = None  # connect() again starts afresh

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
            raw: Any = await self._call(self.redis.hgetall(self.keys.models))
            specs = {}
            for name, text in raw.items():
                try:
                    specs[name.decode(errors="replace")] = ModelSpec.from_json(text)
                except (ValueError, KeyError, TypeError, TensorQError) as exc:
                    log.warning("ignoring the unreadable spec of %r in %s: %r",
                                name, self.keys.models, exc)  # fmt: skip
            self._specs = specs
            self._fits.clear()  # keyed by spec identity: no stale entry may match
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
        store: bool = True,
    ) -> str:
        """Enqueue one request; ``timeout`` becomes its deadline. Returns its id.

        ``store`` (default): its result is kept under ``tq:r:<id>`` for the
        result TTL, where any client can read it by id (``result(id)`` from
        elsewhere, the gateway's GET). False: only this client's inbox gets
        it (what ``infer`` does): nothing per request stays in Redis."""
        submission = Submission(model, inputs, request_id, timeout, priority, store)
        ids = await self.submit_many([submission])
        return ids[0]

    async def submit_many(self, submissions: Sequence[Submission]) -> list[str]:
        """Validate all, then enqueue all in one pipelined round trip (two
        for over twice EARLY_BYTES of input, producer/client/enqueue.py: the
        first share goes ahead, so workers start on it while the rest is sent).

        Each request is enqueued or refused on its own; if any was refused,
        QueueFull names the first refused id and lists the rest in
        ``.refused`` (the others are queued and can be waited for).
        """
        prepared = []
        for submission in submissions:  # no await per request while its model's spec is known
            spec = self._specs.get(submission.model) or await self.spec(submission.model)
            try:
                prepared.append(self._prepare(submission, spec))
            except InvalidInput:  # a hot reload may have changed the signature since we read it
                fresh = (await self.models(refresh=True)).get(submission.model)
                if fresh is None or fresh == spec:
                    raise
                prepared.append(self._prepare(submission, fresh))
        ids = [p.request.id for p in prepared]
        # DuplicateRequest if one is in flight here: nothing enqueued
        self._inbox.expect(ids, [p.request.store for p in prepared])
        self._reader.start()  # results of our own requests arrive in our inbox
        try:
            replies = await self._enqueuer.enqueue(prepared)
        except BaseException:  # not known to be queued: nobody will wait for these
            self._inbox.forget(ids)
            raise
        refused = [p for p, reply in zip(prepared, replies, strict=True) if not reply]
        if refused:
            self._inbox.forget(p.request.id for p in refused)
            first = refused[0]
            error = QueueFull(
                f"queue of model {first.request.model!r} is at max_queue_len {first.limit}; "
                f"{len(refused)} of {len(prepared)} request(s) refused",
                request_id=first.request.id,
            )
            error.refused = [p.request.id for p in refused]
            raise error
        return ids

    def _prepare(self, submission: Submission, spec: ModelSpec) -> Prepared:
        """Check one submission against ``spec``; what is wrong with it fails
        it alone, before it joins other submitters' round trip."""
        seq = None
        request_id = submission.request_id
        if request_id is None:
            seq = next(self._ids)
            request_id = f"{self.client_id}-{seq}"
        arrays = wire_arrays(submission.inputs)
        rows = self._check(spec, arrays, request_id)
        return prepare(submission, spec, request_id, arrays, rows, self._inbox.key, seq)

    def _check(
        self, spec: ModelSpec, arrays: dict[str, np.ndarray[Any, Any]], request_id: str
    ) -> int:
        """``spec.check_inputs``, remembered by the inputs' names, dtypes and
        shapes (all it depends on): requests of one shape are checked once."""
        signature = (id(spec), *((name, a.dtype, a.shape) for name, a in arrays.items()))
        rows = self._fits.get(signature)
        if rows is None:
            rows = spec.check_inputs(arrays, request_id=request_id)
            if len(self._fits) >= FITS_REMEMBERED:
                self._fits.clear()
            self._fits[signature] = rows
        return rows

    # -- results --------------------------------------------------------------

    async def wait(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S, *, keep: bool = False
    ) -> Result:
        """The full result envelope (status, outputs, timings) of a request,
        whatever its status: an error result is returned, not raised.

        The result of this client's own kept request (``submit``), once
        returned here, lives ``collected_result_ttl_s`` more under
        ``tq:r:<id>``; ``keep=True`` leaves it the whole ``result_ttl_s``
        (for a caller that hands the id on to readers by id, as the gateway
        does). Ids read by id (another client's) are never shortened.

        ``UnknownRequest`` at once for an id that no request has now: not
        submitted (or refused), or its result expired (see ``_wait_stored``);
        ``RequestTimeout`` when a known request has no result in time."""
        future = self._inbox.waiters.get(request_id)
        if future is None:  # not ours: only our own requests are pushed to our inbox
            return await self._wait_stored(request_id, timeout)
        try:
            if future.done():  # delivered already: no timer needed
                result = future.result()
            else:
                result = await self._delivery(future, request_id, timeout)
        finally:
            kept = self._inbox.release(request_id)
        if kept and not keep:
            self._collected.add(request_id)
        return result

    async def _delivery(
        self, future: asyncio.Future[Result], request_id: str, timeout: float | None
    ) -> Result:
        """The result the inbox resolves ``future`` with, or the stored one if
        none comes within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)  # a timeout leaves other waits on it be
        except TimeoutError:
            # an inbox push may have been lost: one last look, briefly
            stored = await get_stored(
                self.redis, self.keys.result(request_id), self._inbox.limits, STORED_LOOK_S
            )
            if stored is not None:
                return stored
            raise RequestTimeout(f"no result within {timeout}s", request_id=request_id) from None

    async def _wait_stored(self, request_id: str, timeout: float | None) -> Result:
        """Wait for a request this client is not waiting for (another
        client's, or its own whose delivered result it let go) by reading
        ``tq:r:<id>``. On a single Redis node every request the Python client
        enqueued is marked accepted for the result TTL (``client.enqueue``;
        the gateway marks its async requests too): no result and no mark
        means no such request now. On Redis Cluster there are no marks (they
        would lie in other slots than the stream), so an id without a result
        is polled until ``timeout``."""
        if not is_request_id(request_id):
            raise UnknownRequest(
                f"no request can have the id {request_id!r:.60}: ids are {REQUEST_ID_RULE}"
            )
        key, limits = self.keys.result(request_id), self._inbox.limits
        since = time.monotonic()  # the look below counts against the timeout
        if not self.keys.cluster:
            marks = [(self.keys.accepted(request_id), 0)]
            client_id, dash, n = request_id.rpartition("-")
            if dash and client_id and n.isdigit():  # maybe <client_id>-<n>, generated
                marks.append((self.keys.submitted(client_id), int(n)))
            look = STORED_LOOK_S if timeout is None else timeout
            stored, known = await look_up(self.redis, key, marks, limits, look)
            if stored is not None:
                return stored
            if not known:
                raise UnknownRequest(
                    "no such request: never submitted, refused, or its result expired",
                    request_id=request_id,
                )
        return await poll_stored(self.redis, key, limits, request_id, timeout, since=since)

    async def result(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S, *, keep: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Outputs as numpy arrays (bfloat16 widened to float32). Raises what a
        failed result stands for (``InferenceError``, ``RequestTimeout`` for an
        expired request), and what ``wait`` raises; ``keep`` as for ``wait``."""
        return outputs_of(await self.wait(request_id, timeout, keep=keep))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        priority: int = 0,
    ) -> dict[str, np.ndarray[Any, Any]]:
        # Only this call waits for the answer: nothing is kept under tq:r:<id>.
        request_id = await self.submit(
            model, inputs, timeout=timeout, priority=priority, store=False
        )
        return await self.result(request_id, timeout)

    async def cancel(self, request_id: str) -> None:
        """Ask workers to skip a request they have not started (result ``cancelled``)."""
        # The marker first (what a worker checks for entries it read before it
        # subscribed), then the news; two calls, as cluster pipelines refuse PUBLISH.
        ttl = self.settings.redis.result_ttl_s
        await self._call(self.redis.set(self.keys.cancelled(request_id), b"1", ex=ttl))
        await self._call(self.redis.publish(self.keys.cancel_channel, request_id))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        """One round trip: RedisError becomes RedisUnavailable (naming the URL,
        password masked); NoScriptError passes, for the script's reload."""
        try:
            return await awaitable
        except NoScriptError:
            raise
        except RedisError as exc:
            url = mask_url(self.settings.redis.url)
            raise RedisUnavailable(f"Redis at {url}: {exc}") from None
