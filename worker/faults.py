"""Fault injection for tests and drills, kept out of the production path:
the service builder wraps the executor in ``CrashOnRequest`` only when
``[worker] crash_on_request_prefix`` is set, so a normal worker never
checks for it."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence

from common.envelope import Arrays
from worker.batching import Assembled
from worker.executor import BatchRun, Executor
from worker.work import Batch

log = logging.getLogger(__name__)


class CrashOnRequest(Executor):
    """Dies like a segfault (SIGKILL) when a request whose id starts with
    ``prefix`` is computed."""

    def __init__(self, device: str, prefix: str) -> None:
        super().__init__(device)
        self.prefix = prefix

    def compute(self, batch: Batch, parts: Sequence[Arrays], assembled: Assembled) -> BatchRun:
        if any(i.startswith(self.prefix) for item in batch.items for i in item.ids):
            log.error("fault hook: killing this worker on a marked request")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(batch, parts, assembled)
