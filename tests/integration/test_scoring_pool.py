"""Offline scoring end to end, on a real redis-server and a real two-process
worker pool (shared by this module's tests): outputs equal the model called
directly, a SIGKILLed run resumes to a byte-identical file, failed chunks
stop the run or are skipped and listed, and RQ batch jobs (run in-process
by rq's SimpleWorker in burst mode) retry a failed shard and collect to the
same result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import safetensors.numpy
import torch
from rq import Queue, SimpleWorker, get_current_job
from torch import Tensor, nn

from common.cli import main
from common.embedded_redis import EmbeddedRedis
from producer.scoring.batch import QUEUE, RETRIES, batch_status
from producer.scoring.jobs import record_failure, score_shard
from tests.conftest import ROOT, PoolHandle, wait_until


class Pair(nn.Module):
    """Two inputs, two outputs (float rows and an int per row); refuses any
    ``a`` above 1000, so a test can make the pool reject chosen rows."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.register_buffer("w", torch.randn(8, 8, generator=gen))

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if bool((a > 1000.0).any()):
            raise RuntimeError("pair: a value above 1000 in a")
        y = a @ self.w + b
        return y, torch.argmax(y, dim=1)


CONFIG = """
[[models]]
name = "mlp"
path = "{models}/mlp.pt"
max_batch_size = 128
max_delay_ms = 2
  [[models.inputs]]
  name = "x"
  dtype = "float32"
  shape = [256]
  [[models.outputs]]
  name = "y"
  dtype = "float32"
  shape = [10]

[[models]]
name = "pair"
path = "{pair}"
max_batch_size = 64
max_delay_ms = 2
  [[models.inputs]]
  name = "a"
  dtype = "float32"
  shape = [8]
  [[models.inputs]]
  name = "b"
  dtype = "float32"
  shape = [8]
  [[models.outputs]]
  name = "y"
  dtype = "float32"
  shape = [8]
  [[models.outputs]]
  name = "best"
  dtype = "int64"
  shape = []
"""


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[PoolHandle, Path]]:
    """One Redis and one pool for the module (their start-up dominates)."""
    tmp = tmp_path_factory.mktemp("scoring-pool")
    pair = tmp / "pair.pt"
    torch.jit.save(torch.jit.script(Pair().eval()), str(pair))
    config = tmp / "tensorq.toml"
    config.write_text(CONFIG.format(models=models_dir, pair=pair))
    with EmbeddedRedis() as url:
        log_path = tmp / "pool.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "--log-level", "info", "worker",
             "--config", str(config), "--redis", url, "--devices", "cpu*2"],
            cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        pool = PoolHandle(process, url, log_path, workers=2)
        try:
            pool.wait_ready()
            yield pool, config
        finally:
            pool.stop()


def _direct(models_dir: Path | None, model: Any, *inputs: np.ndarray) -> Any:
    if isinstance(model, str):
        model = torch.jit.load(str(models_dir / f"{model}.pt"))  # type: ignore[operator]
    with torch.inference_mode():
        return model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))


def _score(url: str, config: Path, *args: str) -> list[str]:
    return ["score", "--redis", url, "--config", str(config), "--no-progress", *args]


def _done_rows(checkpoint: Path) -> int:
    try:
        body = json.loads(checkpoint.read_text())  # replaced atomically: never half-written
    except FileNotFoundError:
        return 0
    return sum(stop - start for start, stop in body["done"])


def test_score_20000_row_npy_equals_the_model_called_directly(
    stack: tuple[PoolHandle, Path], models_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pool, config = stack
    x = np.random.default_rng(0).standard_normal((20_000, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    code = main(_score(pool.redis_url, config, "--model", "mlp", "--input",
                       str(tmp_path / "x.npy"), "--output", str(out)))  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "scored 20,000 rows with mlp" in printed and "errors: 0 rows" in printed
    y = np.load(out)
    assert y.shape == (20_000, 10) and y.dtype == np.float32
    np.testing.assert_allclose(y, _direct(models_dir, "mlp", x).numpy(), rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]  # no leftovers


def test_sigkill_midway_then_resume_gives_a_byte_identical_file(
    stack: tuple[PoolHandle, Path], tmp_path: Path
) -> None:
    pool, config = stack
    x = np.random.default_rng(1).standard_normal((20_000, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # one request in flight, so every batch is exactly one chunk in both runs
    flags = ["--model", "mlp", "--input", str(tmp_path / "x.npy"), "--rows-per-request", "32",
             "--window", "1", "--checkpoint-every", "0"]  # fmt: skip
    whole, killed = tmp_path / "whole.npy", tmp_path / "killed.npy"
    assert main(_score(pool.redis_url, config, *flags, "--output", str(whole))) == 0

    cmd = [sys.executable, "-m", "common.cli", *_score(pool.redis_url, config, *flags,
                                                       "--output", str(killed))]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed.npy.checkpoint.json"
    try:
        wait_until(lambda: _done_rows(checkpoint) >= 5_000, 120, "a quarter of the rows")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = _done_rows(checkpoint)
    assert 5_000 <= done < 20_000
    assert not killed.exists()  # a half-written output never looks finished
    assert (tmp_path / "killed.npy.partial").exists()

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done:,} rows resumed from the checkpoint" in resumed.stdout
    assert f"scored {20_000 - done:,} rows" in resumed.stdout
    assert killed.read_bytes() == whole.read_bytes()
    assert not checkpoint.exists() and not (tmp_path / "killed.npy.partial").exists()


def test_two_input_safetensors_equals_the_model_called_directly(
    stack: tuple[PoolHandle, Path], tmp_path: Path
) -> None:
    pool, config = stack
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3_000, 8)).astype(np.float32)
    b = rng.standard_normal((3_000, 8)).astype(np.float32)
    safetensors.numpy.save_file(
        {"a": a, "b": b, "label": np.arange(3_000)}, str(tmp_path / "in.safetensors")
    )
    out = tmp_path / "out.safetensors"
    code = main(_score(pool.redis_url, config, "--model", "pair", "--input",
                       str(tmp_path / "in.safetensors"), "--output", str(out)))  # fmt: skip
    assert code == 0
    got = safetensors.numpy.load_file(str(out))
    y, best = _direct(None, Pair().eval(), a, b)
    assert sorted(got) == ["best", "y"]
    np.testing.assert_allclose(got["y"], y.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["best"], best.numpy())
    assert got["best"].dtype == np.int64


def test_failed_chunk_stops_the_run_or_is_skipped_and_listed(
    stack: tuple[PoolHandle, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, config = stack
    rng = np.random.default_rng(3)
    a = rng.standard_normal((1_000, 8)).astype(np.float32)
    b = rng.standard_normal((1_000, 8)).astype(np.float32)
    a[300, 2] = 5_000.0  # the model refuses the chunk holding row 300: rows 256-319
    np.savez(tmp_path / "in.npz", a=a, b=b)
    out = tmp_path / "out.safetensors"
    args = _score(pool.redis_url, config, "--model", "pair", "--input", str(tmp_path / "in.npz"),
                  "--output", str(out))  # fmt: skip

    assert main(args) == 2  # default --on-error stop
    err = capsys.readouterr().err.strip()
    assert "rows 256-319 failed: model_error" in err and "a value above 1000" in err
    assert "rerun with --resume once the cause is fixed" in err
    assert "\n" not in err
    assert not out.exists()
    assert (tmp_path / "out.safetensors.checkpoint.json").exists()  # fixable, then --resume

    assert main([*args, "--on-error", "skip", "--overwrite"]) == 0
    assert "errors: 64 rows in 1 chunk(s)" in capsys.readouterr().out
    got = safetensors.numpy.load_file(str(out))
    y, best = _direct(None, Pair().eval(), np.r_[a[:256], a[320:]], np.r_[b[:256], b[320:]])
    np.testing.assert_allclose(np.r_[got["y"][:256], got["y"][320:]], y.numpy(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(np.r_[got["best"][:256], got["best"][320:]], best.numpy())
    assert np.isnan(got["y"][256:320]).all()  # float outputs: NaN
    assert (got["best"][256:320] == 0).all()  # integer outputs: zero
    lines = (tmp_path / "out.safetensors.errors.jsonl").read_text().splitlines()
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert (error["start"], error["stop"], error["rows"], error["code"]) == (
        256, 320, 64, "model_error"
    )  # fmt: skip
    assert "a value above 1000" in error["message"] and error["request_id"]


class InjectedFault(RuntimeError):
    """What the test's batch job raises on shard 3's first attempt."""


def score_shard_failing_shard_3_once(**kwargs: Any) -> dict[str, Any]:
    """The batch job with a fault injected (enqueued in place of
    ``score_shard``): shard 3's first attempt fails, recorded like any failed
    attempt, so RQ retries it once."""
    job = get_current_job()
    if kwargs["shard"] == 3 and job is not None and job.retries_left == RETRIES:
        fault = InjectedFault("injected fault: shard 3, first attempt")
        record_failure(job, fault)
        raise fault
    return score_shard(**kwargs)


def _run_rq_jobs(url: str) -> None:
    """Run every queued batch job (and its retries) in this process, then return."""
    connection = redis.Redis.from_url(url)
    try:
        worker = SimpleWorker([Queue(QUEUE, connection=connection)], connection=connection)
        worker.work(burst=True)
    finally:
        connection.close()


def test_batch_of_8_shards_retries_the_failed_one_and_collects_what_direct_scoring_gives(
    stack: tuple[PoolHandle, Path], models_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    pool, config = stack
    url = pool.redis_url
    # shard 3 fails once: its jobs run the wrapper instead of score_shard
    monkeypatch.setattr(
        "producer.scoring.batch.JOB_FUNCTION", f"{__name__}.score_shard_failing_shard_3_once"
    )
    x = np.random.default_rng(4).standard_normal((8_000, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    parts = tmp_path / "parts"
    code = main(["batch", "submit", "--redis", url, "--config", str(config), "--model", "mlp",
                 "--input", str(tmp_path / "x.npy"), "--output-dir", str(parts),
                 "--shard-rows", "1000"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    batch_id = captured.out.strip()
    connection = redis.Redis.from_url(url)
    assert connection.llen(f"rq:queue:{QUEUE}") == 8

    _run_rq_jobs(url)

    status = batch_status(connection, "tq", batch_id)
    connection.close()
    assert [s.state for s in status.shards] == ["finished"] * 8
    assert status.rows_done == 8_000
    assert [s.retries for s in status.shards] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert "InjectedFault" in status.shards[3].failures[0]
    assert main(["batch", "status", "--redis", url, batch_id]) == 0
    table = capsys.readouterr().out
    assert "8,000/8,000 rows (100.0%)" in table and "InjectedFault" in table
    assert main(["batch", "wait", "--redis", url, batch_id, "--no-progress"]) == 0
    assert "8/8 shard(s) finished" in capsys.readouterr().out

    collected = tmp_path / "all.npy"
    assert main(["batch", "collect", "--redis", url, batch_id, "--output", str(collected)]) == 0
    assert "collected 8,000 rows from 8 part(s)" in capsys.readouterr().out
    expected = _direct(models_dir, "mlp", x).numpy()
    np.testing.assert_allclose(np.load(collected), expected, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in parts.glob("part-*")) == [f"part-{i:05d}.npy" for i in range(8)]


def test_batch_wait_fails_when_a_shard_fails_for_good(
    stack: tuple[PoolHandle, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, config = stack
    url = pool.redis_url
    rng = np.random.default_rng(5)
    a = rng.standard_normal((200, 8)).astype(np.float32)
    a[150, 0] = 9_999.0  # the second shard always fails: 1 attempt + 3 retries
    safetensors.numpy.save_file({"a": a, "b": np.zeros_like(a)}, str(tmp_path / "in.safetensors"))
    code = main(["batch", "submit", "--redis", url, "--config", str(config), "--model", "pair",
                 "--input", str(tmp_path / "in.safetensors"), "--output-dir",
                 str(tmp_path / "parts"), "--shard-rows", "100"])  # fmt: skip
    batch_id = capsys.readouterr().out.strip()
    assert code == 0

    _run_rq_jobs(url)

    assert main(["batch", "wait", "--redis", url, batch_id, "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "1/2 shard(s) finished" in captured.out
    assert "shard 1 (rows 100-199) failed: ChunkFailed: rows 100-163 failed" in captured.err
    connection = redis.Redis.from_url(url)
    status = batch_status(connection, "tq", batch_id)
    connection.close()
    assert [s.state for s in status.shards] == ["finished", "failed"]
    assert status.shards[1].retries == 3 and len(status.shards[1].failures) == 4
    assert main(["batch", "collect", "--redis", url, batch_id, "--output",
                 str(tmp_path / "all.safetensors")]) == 2  # fmt: skip
    assert "1 shard(s) have no part yet: 1 (failed)" in capsys.readouterr().err
    assert not (tmp_path / "parts" / "part-00001.safetensors").exists()
