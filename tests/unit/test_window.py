"""The batch-window policies: the adaptive rule's decisions (pure); a pool
serving with ``batch_policy = "adaptive"`` is in tests/integration/test_serving.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import load_settings
from tests.conftest import write_config
from worker.window import WindowModel


def fitted(overhead: float = 2.0, per_row: float = 0.1) -> WindowModel:
    window = WindowModel()
    for rows in (1, 8, 16, 32, 64):
        window.record_batch(rows, overhead + per_row * rows)
    return window


def test_the_fit_recovers_the_fixed_overhead() -> None:
    assert fitted().overhead_ms() == pytest.approx(2.0)
    same_size = WindowModel()
    for _ in range(10):
        same_size.record_batch(32, 5.0)
    assert same_size.overhead_ms() == 0.0  # cannot separate overhead from per-row cost


def test_an_idle_lane_never_waits() -> None:
    window = fitted()
    assert not window.worth_waiting(1, now=100.0)


def test_waits_only_while_fewer_rows_are_ready_than_arrive_per_overhead() -> None:
    window = fitted(overhead=2.0)
    for i in range(1000):  # 10 rows/ms over the last second
        window.record_arrival(10, now=99.0 + i / 1000)
    # a * lam = 2 ms * 10 rows/ms = 20 rows
    assert window.worth_waiting(5, now=100.0)
    assert not window.worth_waiting(25, now=100.0)
    assert not window.worth_waiting(5, now=102.0)  # the burst is over: no more waiting


def test_unknown_policy_is_a_config_error(tmp_path: Path, models_dir: Path) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    text = config.read_text().replace('name = "mlp"', 'name = "mlp"\nbatch_policy = "greedy"', 1)
    config.write_text(text)
    with pytest.raises(ConfigError, match="batch_policy"):
        load_settings(config)


def test_a_lone_forward_is_expected_from_the_latest_scaled_up_by_size() -> None:
    window = WindowModel()
    assert window.lone_ms(100) is None
    window.record_batch(1, 2.0, 100)
    window.record_batch(4, 9.0, 400)  # not one row: not a lone forward
    assert (window.lone_ms(50), window.lone_ms(100), window.lone_ms(300)) == (2.0, 2.0, 6.0)
    window.record_batch(1, 1.0, 200)
    assert window.lone_ms(400) == 2.0
