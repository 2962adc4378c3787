"""``tensorq batch collect``: concatenate a batch's parts, in shard order,
into one .npy or .safetensors file, through a ``.partial`` file renamed on
success. Parts are memory-mapped and copied a block at a time, so memory
stays bounded; the parts' errors files (``--on-error skip``) are merged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from common.records import BatchRecord
from producer.scoring.batch import batch_status, load_record, part_path
from producer.scoring.checkpoint import ScorePaths
from producer.scoring.errors import ScoringError
from producer.scoring.inputs import Column, open_inputs
from producer.scoring.outputs import (
    OutputField,
    OutputFile,
    OutputLayout,
    commit,
    output_format,
    write_jsonl_atomic,
)

_COPY_BYTES = 8 * 1024 * 1024  # per block


@dataclass(frozen=True)
class CollectSummary:
    output: Path
    rows: int
    parts: int
    failed_rows: int
    errors_file: Path | None


def collect_batch(
    connection: redis.Redis,
    prefix: str,
    batch_id: str,
    output: Path,
    *,
    overwrite: bool = False,
) -> CollectSummary:
    """Concatenate the parts, in shard order, into one .npy/.safetensors file
    (through a ``.partial`` file; parts are read a block at a time)."""
    record = load_record(connection, prefix, batch_id)
    fmt = output_format(output)
    paths = ScorePaths.for_output(output)
    if output.exists() and not overwrite:
        raise ScoringError(f"{output} already exists (--overwrite replaces it)")
    missing = [i for i in range(record.shards) if not part_path(record, i).exists()]
    if missing:
        status = batch_status(connection, prefix, batch_id)
        states = ", ".join(f"{i} ({status.shards[i].state})" for i in missing[:10])
        raise ScoringError(
            f"batch {batch_id}: {len(missing)} shard(s) have no part yet: {states}"
            f"{' ...' if len(missing) > 10 else ''}; see tensorq batch status {batch_id}"
        )
    first = _part_columns(record, 0)
    layout = OutputLayout(
        tuple(
            OutputField(name, first[name].location.dtype, first[name].location.shape[1:])
            for name in record.outputs
        )
    )
    if fmt == "npy" and len(layout.fields) != 1:
        raise ScoringError(
            f"the batch has outputs {list(record.outputs)}; a .npy file holds one: "
            "collect into .safetensors"
        )
    for column in first.values():
        column.close()
    writer = OutputFile.create(paths.partial, fmt, layout, record.rows)
    failures: list[dict[str, Any]] = []
    try:
        for shard in range(record.shards):
            start, stop = record.shard_range(shard)
            columns = _part_columns(record, shard)
            try:
                _copy_part(columns, layout, shard, start, stop, writer)
            finally:
                for column in columns.values():
                    column.close()
            errors = ScorePaths.for_output(part_path(record, shard)).errors
            if errors.exists():
                failures += [json.loads(line) for line in errors.read_text().splitlines() if line]
        writer.sync()
    except BaseException:
        writer.close()
        paths.partial.unlink(missing_ok=True)
        raise
    writer.close()
    errors_file = None
    if failures:
        write_jsonl_atomic(paths.errors, sorted(failures, key=lambda f: int(f["start"])))
        errors_file = paths.errors
    else:
        paths.errors.unlink(missing_ok=True)
    commit(paths.partial, output)
    failed_rows = sum(int(f["stop"]) - int(f["start"]) for f in failures)
    return CollectSummary(output, record.rows, record.shards, failed_rows, errors_file)


def _copy_part(
    columns: dict[str, Column],
    layout: OutputLayout,
    shard: int,
    start: int,
    stop: int,
    writer: OutputFile,
) -> None:
    for field in layout.fields:
        loc = columns[field.name].location
        if loc.shape != (stop - start, *field.row_shape) or loc.dtype != field.dtype:
            raise ScoringError(
                f"part of shard {shard}: output {field.name!r} is {loc.dtype} "
                f"{list(loc.shape)}, expected {field.dtype} {[stop - start, *field.row_shape]}"
            )
    row_bytes = max(1, sum(f.row_bytes for f in layout.fields))
    block = max(1, _COPY_BYTES // row_bytes)
    for a in range(0, stop - start, block):
        b = min(a + block, stop - start)
        writer.write(start + a, {name: c.rows(a, b) for name, c in columns.items()})
        for column in columns.values():
            column.release(a, b)


def _part_columns(record: BatchRecord, shard: int) -> dict[str, Column]:
    path = part_path(record, shard)
    source = open_inputs([str(path)])
    columns = dict(source.columns)
    if record.part_format == "npy":  # a bare .npy: its one array is the one output
        columns = {record.outputs[0]: next(iter(columns.values()))}
    absent = [n for n in record.outputs if n not in columns]
    if absent:
        source.close()
        raise ScoringError(f"{path}: has no output(s) {absent}")
    return {n: columns[n] for n in record.outputs}
