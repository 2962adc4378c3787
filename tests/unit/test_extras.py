"""Optional extras: ``import producer`` is the client alone (no torch, aiohttp,
rq or matplotlib), every verb is listed without its extra, and a verb whose
extra is missing says in one line which one to install, before it starts
anything."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from common.cli import ENTRY_POINT_GROUP, main
from common.errors import MissingExtra
from common.extras import installed, require_extra
from tests.conftest import ROOT

# What the extras bring that a client-only install lacks.
OPTIONAL = (
    "torch",
    "aiohttp",
    "orjson",
    "prometheus_client",
    "rq",
    "tqdm",
    "safetensors",
    "matplotlib",
)
URL = "redis://127.0.0.1:1/0"  # never reached: the verbs stop before connecting
SCORE_FILES = ("--model", "mlp", "--input", "{tmp}/x.npy", "--output", "{tmp}/y.npy")


def _python(code: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_importing_the_client_imports_no_optional_package() -> None:
    result = _python(
        "import json, sys\n"
        "import producer\n"
        "from producer import AsyncClient, Client, Submission, outputs_of\n"
        "from producer import (TensorQError, QueueFull, RequestTimeout, InferenceError,\n"
        "    ProtocolError, InvalidInput, UnknownModel, RedisUnavailable, ConfigError)\n"
        f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))\n"
    )
    assert result == []


def test_every_verb_registers_without_the_extras() -> None:
    """With every optional package made unimportable, ``tensorq --help`` still
    lists every verb (registration imports none of them)."""
    result = _python(
        "import contextlib, io, json, sys\n"
        f"for name in {OPTIONAL!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "from common.cli import build_parser\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        "    parser = build_parser()\n"
        "verbs = parser._subparsers._group_actions[0].choices\n"
        "print(json.dumps({'verbs': sorted(verbs), 'stderr': err.getvalue()}))\n"
    )
    expected = sorted(e.name for e in entry_points(group=ENTRY_POINT_GROUP))
    assert result == {"verbs": expected, "stderr": ""}
    assert {"worker", "gateway", "score", "batch", "status", "bench", "up", "demo"} <= set(expected)


def _no_process(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a verb started a process before checking its extra: {args[:1]}")


@pytest.mark.parametrize(
    ("argv", "absent", "extra"),
    [
        (["worker", "--redis", URL], "torch", "worker"),
        (["models", "build-examples", "{tmp}"], "torch", "worker"),
        (["gateway", "--redis", URL], "aiohttp", "gateway"),
        (["gateway", "--redis", URL], "prometheus_client", "gateway"),
        (["up"], "torch", "worker,gateway"),
        (["up"], "aiohttp", "worker,gateway"),
        (["demo"], "torch", "worker"),
        (["score", "--redis", URL, *SCORE_FILES], "tqdm", "batch"),
        (["score", "--redis", "", "--no-progress", *SCORE_FILES], "torch", "worker"),
        (["batch", "status", "--redis", URL, "abc"], "rq", "batch"),
        (["batch", "wait", "--redis", URL, "abc"], "tqdm", "batch"),
        (["bench"], "torch", "bench"),
        (["bench", "--http"], "aiohttp", "bench"),
        (["bench", "--report", "{tmp}"], "matplotlib", "bench"),
        (["bench-score"], "torch", "bench"),
    ],
)
def test_a_verb_without_its_extra_says_which_to_install_in_one_line(
    argv: list[str],
    absent: str,
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, absent, None)  # what an uninstalled package looks like
    monkeypatch.setattr(subprocess, "Popen", _no_process)  # no redis-server, pool or gateway
    monkeypatch.delenv("TQ_REDIS_URL", raising=False)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tensorq {argv[0]}: needs {absent}, which is not installed: "
        f"pip install 'tensorq[{extra}]'\n"
    )
    assert not any(tmp_path.iterdir())  # --report wrote nothing: checked before the sweep


def test_require_extra_names_every_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    require_extra("gateway", "json", "asyncio")  # present: nothing happens
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    monkeypatch.setitem(sys.modules, "orjson", None)
    assert not installed("aiohttp") and installed("json")
    assert not installed("no_such_package.sub")
    with pytest.raises(MissingExtra) as caught:
        require_extra("gateway", "aiohttp", "orjson", "json")
    assert str(caught.value) == (
        "needs aiohttp and orjson, which are not installed: pip install 'tensorq[gateway]'"
    )
