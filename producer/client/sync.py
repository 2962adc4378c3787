"""Client: the blocking twin of AsyncClient, for scripts. The same calls, run
on a private event loop (uvloop where installed) in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import Future as ThreadFuture
from typing import Any, TypeVar

import numpy as np

from common.aio import new_event_loop
from common.envelope import Result
from common.errors import TensorQError
from common.spec import ModelSpec
from producer.client.aio import AsyncClient
from producer.client.results import DEFAULT_TIMEOUT_S
from producer.client.submission import Submission

T = TypeVar("T")


class Client:
    """``with Client(url) as c: out = c.infer("mlp", {"x": x})``."""

    def __init__(self, redis_url: str | None = None, **kwargs: Any) -> None:
        self._async = AsyncClient(redis_url, **kwargs)  # bad arguments raise before a thread
        self._closed = False
        self._loop = new_event_loop()
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

    def wait(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S, *, keep: bool = False
    ) -> Result:
        return self._run(self._async.wait(request_id, timeout, keep=keep))

    def result(
        self, request_id: str, timeout: float | None = DEFAULT_TIMEOUT_S, *, keep: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]:
        return self._run(self._async.result(request_id, timeout, keep=keep))

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
