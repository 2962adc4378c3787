"""Offline scoring without a worker pool: the file formats read and written,
the chunk grid, and bad input files, each refused with a one-line error
before anything is enqueued (checked on a real redis-server that holds the
served model signatures, but no worker)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import safetensors.numpy

from common.cli import main
from common.keys import Keys
from common.spec import ModelSpec, TensorSpec
from producer.scoring.errors import InputFileError
from producer.scoring.inputs import bind_inputs, open_inputs
from producer.scoring.outputs import OutputField, OutputFile, OutputLayout
from producer.scoring.ranges import RangeSet, chunk_grid

KEYS = Keys()
MLP = ModelSpec(
    "mlp",
    (TensorSpec("x", "float32", (256,)),),
    (TensorSpec("y", "float32", (10,)),),
    max_batch_size=128,
)
PAIR = ModelSpec(
    "pair",
    (TensorSpec("a", "float32", (8,)), TensorSpec("b", "float32", (8,))),
    (TensorSpec("y", "float32", (8,)), TensorSpec("best", "int64", ())),
    max_batch_size=64,
)
SEQ = ModelSpec(
    "seq",
    (TensorSpec("tokens", "int64", (-1,)),),
    (TensorSpec("pooled", "float32", (16,)),),
    max_batch_size=64,
)


def test_range_set_merges_and_the_grid_is_fixed() -> None:
    done = RangeSet()
    for start, stop in [(64, 96), (0, 32), (32, 64), (128, 160)]:
        done.add(start, stop)
    assert done.ranges == [(0, 96), (128, 160)]
    assert done.total() == 128
    assert done.gaps(0, 200) == [(96, 128), (160, 200)]
    # chunks lie on the grid of the original run, whatever is missing
    assert list(chunk_grid(done.gaps(0, 200), origin=0, size=32)) == [
        (96, 128),
        (160, 192),
        (192, 200),
    ]
    assert list(chunk_grid([(1005, 1100)], origin=1000, size=40)) == [
        (1005, 1040),
        (1040, 1080),
        (1080, 1100),
    ]


def test_every_input_format_reads_the_same_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 8)).astype(np.float32)
    b = rng.standard_normal((300, 8)).astype(np.float32)
    np.savez(tmp_path / "stored.npz", a=a, b=b, label=np.arange(300))
    np.savez_compressed(tmp_path / "packed.npz", a=a, b=b)
    safetensors.numpy.save_file({"a": a, "b": b}, str(tmp_path / "pair.safetensors"))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b_big_endian.npy", b.astype(">f4"))
    for specs in (
        ["stored.npz"],
        ["packed.npz"],
        ["pair.safetensors"],
        ["a=a.npy", "b=b_big_endian.npy"],
    ):
        source = open_inputs([str(tmp_path / s) if "=" not in s else _named(tmp_path, s)
                              for s in specs])  # fmt: skip
        try:
            bound = bind_inputs(source, PAIR, rows_per_request=64)
            assert bound.rows == 300
            for start, stop in [(0, 64), (250, 300), (64, 128)]:  # out of order, too
                chunk = bound.chunk(start, stop)
                np.testing.assert_array_equal(chunk["a"], a[start:stop])
                np.testing.assert_array_equal(chunk["b"], b[start:stop])
                assert chunk["b"].dtype == np.dtype("<f4")
                bound.release(start, stop)
        finally:
            source.close()
    stored = open_inputs([str(tmp_path / "stored.npz")])
    assert type(stored.columns["a"]).__name__ == "MappedColumn"  # mapped inside the zip
    stored.close()


def _named(tmp_path: Path, spec: str) -> str:
    name, _, file = spec.partition("=")
    return f"{name}={tmp_path / file}"


def test_output_files_read_back_with_numpy_and_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.standard_normal((100, 8)).astype(np.float32)
    best = rng.integers(0, 8, 100)
    npy = OutputFile.create(tmp_path / "y.npy", "npy", _layout(("y", "<f4", (8,))), 100)
    for start in (96, 0, 32, 64):  # any order lands in input order
        npy.write(start, {"y": y[start : start + 32]})
    npy.close()
    np.save(tmp_path / "ref.npy", y)
    assert (tmp_path / "y.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()

    layout = _layout(("best", "<i8", ()), ("y", "<f4", (8,)))
    st = OutputFile.create(tmp_path / "out.safetensors", "safetensors", layout, 100)
    st.write(0, {"y": y[:50], "best": best[:50]})
    st.fill(50, 30)  # a failed chunk: NaN for floats, zero for integers
    st.write(80, {"y": y[80:], "best": best[80:]})
    st.close()
    loaded = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
    np.testing.assert_array_equal(loaded["y"][:50], y[:50])
    np.testing.assert_array_equal(loaded["y"][80:], y[80:])
    assert np.isnan(loaded["y"][50:80]).all()
    np.testing.assert_array_equal(loaded["best"], np.r_[best[:50], np.zeros(30, int), best[80:]])


def _layout(*fields: tuple[str, str, tuple[int, ...]]) -> OutputLayout:
    return OutputLayout(tuple(OutputField(n, np.dtype(d), s) for n, d, s in fields))


# -- bad input files: clear one-line errors, nothing enqueued -------------------------


@pytest.fixture
def served(sync_redis: redis.Redis) -> redis.Redis:
    """Redis holding the signatures workers would publish (no worker needed:
    bad files must be refused before anything reaches a queue)."""
    sync_redis.hset(KEYS.models, mapping={s.name: s.to_json() for s in (MLP, PAIR, SEQ)})
    return sync_redis


def _bad_files(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(model, --input arguments, expected words of the error)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 256)).astype(np.float32)
    np.save(tmp / "f64.npy", x.astype(np.float64))
    np.save(tmp / "narrow.npy", x[:, :255])
    np.save(tmp / "flat.npy", x[:, 0])
    np.save(tmp / "empty.npy", x[:0])
    np.save(tmp / "good.npy", x)
    (tmp / "garbage.npy").write_bytes(b"definitely not numpy" * 10)
    (tmp / "truncated.npy").write_bytes((tmp / "good.npy").read_bytes()[:5000])
    (tmp / "rows.csv").write_text("1,2,3\n")
    (tmp / "adir.npy").mkdir()
    a = rng.standard_normal((40, 8)).astype(np.float32)
    safetensors.numpy.save_file({"a": a, "b": a[:39]}, str(tmp / "uneven.safetensors"))
    safetensors.numpy.save_file({"a": a, "c": a}, str(tmp / "no_b.safetensors"))
    safetensors.numpy.save_file({"a": a, "b": a.astype(np.float16)}, str(tmp / "f16.safetensors"))
    (tmp / "broken.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with zipfile.ZipFile(tmp / "bad.npz", "w") as archive:
        archive.writestr("a.npy", b"nope")
    (tmp / "notzip.npz").write_bytes(b"PK nothing")
    np.save(tmp / "a.npy", a)
    np.save(tmp / "b.npy", a[:30])
    return [
        ("mlp", ["f64.npy"], "'x' is float64, model 'mlp' wants float32"),
        ("mlp", ["narrow.npy"], "shape [50, 255], model 'mlp' wants [rows, 256]"),
        ("mlp", ["flat.npy"], "shape [50], model 'mlp' wants [rows, 256]"),
        ("mlp", ["empty.npy"], "has no rows"),
        ("mlp", ["garbage.npy"], "not a readable .npy file"),
        ("mlp", ["truncated.npy"], "truncated"),
        ("mlp", ["missing.npy"], "cannot open"),
        ("mlp", ["adir.npy"], "is a directory"),
        ("mlp", ["rows.csv"], "unsupported input format '.csv'"),
        ("pair", ["uneven.safetensors"], "disagree on the number of rows: 'a' has 40, 'b' has 39"),
        ("pair", ["no_b.safetensors"], "no array named 'b' for model 'pair'"),
        ("pair", ["f16.safetensors"], "'b' is float16, model 'pair' wants float32"),
        ("pair", ["broken.safetensors"], "not a readable .safetensors file"),
        ("pair", ["notzip.npz"], "not a readable .npz file"),
        ("pair", ["bad.npz"], "bad.npz[a.npy]: not a readable .npy file"),
        ("pair", ["a.npy"], "one array, but model 'pair' has inputs 'a', 'b'"),
        ("pair", ["a=a.npy", "b=b.npy"], "'a' has 40, 'b' has 30"),
        ("mlp", ["good.npy", "--rows-per-request", "129"], "exceeds model 'mlp' max_batch_size"),
    ]


def test_bad_input_files_get_one_line_errors_and_enqueue_nothing(
    tmp_path: Path,
    redis_url: str,
    served: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cases = _bad_files(tmp_path)
    for model, inputs, expected in cases:
        args = []
        for item in inputs:
            if item.startswith("--") or item.isdigit():
                args.append(item)
            else:
                args += ["--input", _named(tmp_path, item) if "=" in item else str(tmp_path / item)]
        out = tmp_path / "out.npy"
        code = main(["score", "--redis", redis_url, "--model", model, *args,
                     "--output", str(out), "--outputs", "y", "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2, (inputs, err)
        assert err.startswith("tensorq score: ") and "\n" not in err, err
        assert expected in err, (inputs, err)
        assert not list(tmp_path.glob("out.npy*")), inputs  # no output, partial or checkpoint
    assert served.xlen(KEYS.queue("mlp")) == 0
    assert served.xlen(KEYS.queue("pair")) == 0
    assert not served.keys(f"{KEYS.prefix}:q:*")

    # batch submit checks the same way and enqueues no job
    code = main(["batch", "submit", "--redis", redis_url, "--model", "mlp", "--input",
                 str(tmp_path / "f64.npy"), "--output-dir", str(tmp_path / "parts"),
                 "--shard-rows", "10"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'x' is float64" in err
    assert served.llen("rq:queue:tensorq-batch") == 0
    assert not (tmp_path / "parts").exists()


def test_existing_output_and_checkpoint_need_a_flag(
    tmp_path: Path, redis_url: str, served: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 256), np.float32))
    out = tmp_path / "out.npy"
    run: Callable[..., int] = lambda *flags: main(  # noqa: E731
        ["score", "--redis", redis_url, "--model", "mlp", "--input", str(tmp_path / "x.npy"),
         "--output", str(out), "--no-progress", *flags]
    )  # fmt: skip
    out.write_bytes(b"an earlier result")
    assert run() == 2
    assert "already exists (--overwrite replaces it)" in capsys.readouterr().err
    assert run("--resume") == 0  # a finished output: nothing to do
    assert "already complete" in capsys.readouterr().out
    out.unlink()
    (tmp_path / "out.npy.checkpoint.json").write_text(json.dumps({"version": 1}))
    assert run() == 2
    assert "holds an interrupted run: continue it with --resume" in capsys.readouterr().err
    assert run("--resume") == 2
    assert "not a usable checkpoint" in capsys.readouterr().err
    assert served.xlen(KEYS.queue("mlp")) == 0


def test_unknown_output_name_and_npy_for_two_outputs_are_refused(tmp_path: Path) -> None:
    from producer.scoring.errors import ScoringError

    with pytest.raises(ScoringError, match=r"a \.npy file holds one array"):
        OutputLayout.from_spec(PAIR, None, "npy")
    with pytest.raises(ScoringError, match=r"no output\(s\) \['z'\]"):
        OutputLayout.from_spec(PAIR, ["z"], "safetensors")
    np.save(tmp_path / "t.npy", np.zeros((5, 0), np.int64))
    source = open_inputs([str(tmp_path / "t.npy")])
    with pytest.raises(InputFileError, match="wants \\[rows, any\\]"):
        bind_inputs(source, SEQ)
    source.close()


def test_rq_jobs_find_the_pool_through_the_rq_connection() -> None:
    from producer.scoring.jobs import redis_url_of

    for client, url in [
        (redis.Redis(host="10.0.0.5", port=6380, db=2), "redis://10.0.0.5:6380/2"),
        (redis.Redis(unix_socket_path="/run/r.sock", db=1), "unix:///run/r.sock?db=1"),
        (redis.Redis(host="h", username="u", password="p@ss:w"), "redis://u:p%40ss%3Aw@h:6379/0"),
    ]:
        assert redis_url_of(client) == url
        kwargs = redis.Redis.from_url(url).connection_pool.connection_kwargs
        assert kwargs.get("password") == client.connection_pool.connection_kwargs.get("password")
        assert kwargs.get("db", 0) == client.connection_pool.connection_kwargs.get("db", 0)
