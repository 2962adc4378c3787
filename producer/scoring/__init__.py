"""Offline scoring: ``tensorq score`` for one file, RQ batch jobs for big
sharded runs (``tensorq batch``), both streaming rows through the pool with
the engine in ``runner``.

    inputs      read .npy/.npz/.safetensors lazily; check them against the model
    outputs     write .npy/.safetensors by row ranges through a .partial file
    checkpoint  resume state: finished row ranges, skipped chunks
    ranges      row range sets and the fixed chunk grid
    formats     where arrays lie in each file format; headers we write
    runner      the streaming engine: bounded window, ordered output, errors
    score       the ``score`` verb (a private pool when no Redis URL is set)
    batch       RQ batch submit / status / wait
    collect     concatenate a batch's parts into one file
    jobs        the RQ job function that scores one shard
    cli         the verbs ``score`` and ``batch``
    errors      ScoringError, InputFileError, ChunkFailed

(``tensorq bench-score`` lives with the other benchmarks, in ``producer.bench``.)
"""

from producer.scoring.errors import ChunkFailed, InputFileError, ScoringError
from producer.scoring.inputs import InputSource, bind_inputs, open_inputs
from producer.scoring.runner import ScoreOptions, ScoreSummary, score_file

__all__ = [
    "ChunkFailed",
    "InputFileError",
    "InputSource",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringError",
    "bind_inputs",
    "open_inputs",
    "score_file",
]
