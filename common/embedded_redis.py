"""A private redis-server for the embedded default (no Redis URL configured)
and for tests: unix socket in a temp dir, no persistence, stopped on exit.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common.errors import ConfigError, RedisUnavailable


class EmbeddedRedis:
    """``with EmbeddedRedis() as url: ...`` runs redis-server for the block."""

    def __init__(
        self,
        *,
        extra_args: Sequence[str] = (),
        directory: Path | None = None,
        port: int | None = None,
        password: str | None = None,
    ) -> None:
        """Unix socket by default; ``port`` listens on 127.0.0.1 instead.
        ``password`` is the one the server requires (``--requirepass`` /
        an ACL user in ``extra_args``), used for the readiness check."""
        self._extra_args = tuple(extra_args)
        self._given_dir = directory
        self.port = port
        self._password = password
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.socket: Path | None = None

    @property
    def url(self) -> str:
        if self.socket is None:
            raise RuntimeError("EmbeddedRedis is not started")
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "no Redis URL configured and no redis-server binary on PATH "
                "(install the Debian package redis-server, or set TQ_REDIS_URL)"
            )
        if self._given_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tensorq-redis-")
            directory = Path(self._tmp.name)
        else:
            directory = self._given_dir
        self.socket = directory / "redis.sock"
        args = [
            binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            *self._extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_for_socket(timeout_s)
        return self.url

    def _wait_for_socket(self, timeout_s: float) -> None:
        # redis-server has no readiness pipe; its socket file appears once it listens.
        import redis

        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RedisUnavailable(f"redis-server exited at start: {err.strip()[-500:]}")
            if self.socket is not None and self.socket.exists():
                try:
                    client = redis.Redis(unix_socket_path=str(self.socket), password=self._password)
                    try:
                        client.ping()
                    finally:
                        client.close()
                    return
                except redis.RedisError:
                    pass
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.stop()
        raise RedisUnavailable(f"redis-server did not come up within {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def redis_url_or_embedded(url: str) -> Iterator[str]:
    """Yield ``url``, or the URL of a private redis-server when it is empty."""
    if url:
        yield url
        return
    with EmbeddedRedis() as embedded_url:
        yield embedded_url
