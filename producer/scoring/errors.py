"""Errors of offline scoring, one class per outcome the user handles differently.

All derive from ``TensorQError``, so the ``tensorq`` console script prints
them as one line and exits non-zero; none carries a traceback to the user.
"""

from __future__ import annotations

from common.errors import TensorQError


class ScoringError(TensorQError):
    """A run that cannot start or go on: output path, checkpoint, resume or batch state."""

    code = "scoring_error"


class InputFileError(ScoringError):
    """An input file that cannot be read or does not fit the model. Raised
    before anything is enqueued."""

    code = "bad_input_file"


class ChunkFailed(ScoringError):
    """Rows the pool could not score under ``--on-error stop``; names the rows.

    ``start``/``stop`` are input-file rows, half-open like a Python slice;
    ``error_code`` is the worker's code (``model_error``, ``invalid_input``,
    ``timeout`` ...).
    """

    code = "chunk_failed"

    def __init__(
        self,
        message: str,
        *,
        start: int,
        stop: int,
        error_code: str,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.start = start
        self.stop = stop
        self.error_code = error_code
