"""A plain ``pip install tensorq`` is the client alone: in a fresh venv with
no extras, torch and aiohttp are absent, ``tensorq --help`` still lists every
verb, a verb that needs an extra names it in one line, and AsyncClient and
Client submit to and wait on a worker pool started from the full venv.

The distribution is built from a copy of the files it is made of (those
pyproject.toml names), so the build leaves nothing in the checkout (no
``build/`` whose stale modules a later wheel would pick up) and never sees
the checkout's ``.venv``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, PoolHandle, write_config

pytestmark = pytest.mark.timeout(900)

CLIENT_SCRIPT = """
import asyncio, json, sys
import numpy as np
import producer
from producer import AsyncClient, Client, RequestTimeout, Submission

url, inputs, outputs = sys.argv[1:4]
x = np.load(inputs)


async def with_async_client():
    async with AsyncClient(url) as client:
        ids = [await client.submit("mlp", {"x": x[i : i + 1]}, timeout=60) for i in range(4)]
        ids += await client.submit_many([Submission("mlp", {"x": x[4:6]}, timeout=60)])
        results = [await client.result(i, timeout=60) for i in ids[:4]]
        envelope = await client.wait(ids[4], timeout=60)
        assert envelope.status == "ok" and envelope.batch_size >= 2, envelope
        return np.concatenate([r["y"] for r in results] + [envelope.outputs["y"]])


first = asyncio.run(with_async_client())
with Client(url) as client:
    second = client.infer("mlp", {"x": x[6:]}, timeout=60)["y"]
np.save(outputs, np.concatenate([first, second]))
optional = ("torch", "aiohttp", "orjson", "prometheus_client", "rq", "tqdm", "matplotlib")
print(json.dumps({
    "producer": producer.__file__,
    "imported": [m for m in optional if m in sys.modules],
    "timeout_is_typed": issubclass(RequestTimeout, producer.TensorQError),
}))
"""


def _clean_env() -> dict[str, str]:
    """This environment without what would point the venv at the checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TQ_REDIS_URL", "TQ_CONFIG")
    }


def _distribution_files(destination: Path) -> Path:
    """Copy what the distribution is built from: pyproject.toml, the readme
    and the top-level packages its ``packages.find`` includes."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    destination.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", destination)
    shutil.copy2(ROOT / pyproject["project"]["readme"], destination)
    for package in sorted({name.split(".")[0] for name in include}):
        shutil.copytree(
            ROOT / package,
            destination / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return destination


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with ``pip install <tensorq>`` and no extras."""
    base = tmp_path_factory.mktemp("client-only")
    source = _distribution_files(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        cwd=base,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    yield venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,  # not the checkout: nothing there may be imported by accident
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_client_install_lacks_torch_and_aiohttp(client_venv: Path, tmp_path: Path) -> None:
    for module in ("torch", "aiohttp", "rq", "matplotlib"):
        done = _run(client_venv, "python", "-c", f"import {module}", cwd=tmp_path)
        assert done.returncode != 0, f"{module} is importable in a client-only install"
        assert "ModuleNotFoundError" in done.stderr


def test_every_verb_is_listed_and_a_missing_extra_is_one_line(
    client_venv: Path, tmp_path: Path
) -> None:
    done = _run(client_venv, "tensorq", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for verb in ("worker", "gateway", "score", "batch", "status", "bench", "up", "demo"):
        assert f"    {verb} " in done.stdout, f"{verb} missing from tensorq --help"

    done = _run(client_venv, "tensorq", "gateway", "--redis", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "tensorq gateway: needs aiohttp, orjson and prometheus_client, which are not installed: "
        "pip install 'tensorq[gateway]'\n"
    )
    done = _run(client_venv, "tensorq", "worker", "--redis", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.endswith("pip install 'tensorq[worker]'\n")
    assert done.stderr.count("\n") == 1


def test_async_and_sync_clients_serve_requests_from_a_client_only_install(
    client_venv: Path,
    tmp_path: Path,
    models_dir: Path,
    redis_url: str,
    start_pool: Callable[..., PoolHandle],
) -> None:
    start_pool(write_config(tmp_path / "t.toml", models_dir), redis_url, devices="cpu", workers=1)
    x = np.random.default_rng(7).standard_normal((8, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)

    done = _run(
        client_venv,
        "python",
        str(script),
        redis_url,
        str(tmp_path / "x.npy"),
        str(tmp_path / "y.npy"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["producer"]).is_relative_to(client_venv)  # the installed copy
    assert report["imported"] == []
    assert report["timeout_is_typed"]

    model = torch.jit.load(str(models_dir / "mlp.pt"))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
