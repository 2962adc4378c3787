"""The in-process side of ``tensorq bench --model <variable-length>``
(producer/bench/lengths.py): the three orders it times, the padding share
each reports, and the padded batches it builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.settings import load_settings
from producer.bench.lengths import mixed_lengths, mixed_payloads, padded_batch, run_orders

ROOT = Path(__file__).resolve().parents[2]
ENCODER = load_settings(ROOT / "config" / "tensorq.toml", env={}).model("encoder")


def test_padded_batch_pads_each_input_with_its_pad_value() -> None:
    spec = ENCODER.spec()
    payloads = mixed_payloads(spec.inputs, [3, 5])
    ids, mask = padded_batch(spec, payloads)
    assert ids.shape == mask.shape == (2, 5)
    assert (ids[0, 3:] == 0).all() and (mask[0, 3:] == 0).all()
    np.testing.assert_array_equal(ids[1], payloads[1]["input_ids"][0])


def test_the_orders_and_their_padding(models_dir: Path) -> None:
    spec = ENCODER.spec()
    lengths = mixed_lengths(96, 8, 64)
    formed = [[i for i in range(96) if lengths[i] <= 36], [i for i in range(96) if lengths[i] > 36]]
    figures = run_orders(
        str(models_dir / ENCODER.path.name), spec.to_json(), lengths, 1, "cpu", formed
    )
    assert set(figures) == {"arrival", "sorted", "tensorq"}
    by_size = sorted(lengths)
    sorted_share = sum(len(b) * max(b) for b in (by_size[i : i + 32] for i in range(0, 96, 32)))
    assert figures["sorted"]["padding_share"] == sorted_share / sum(lengths)
    shares = [figures[o]["padding_share"] for o in ("sorted", "tensorq", "arrival")]
    assert 1.0 <= shares[0] < shares[1] < shares[2]  # sorted < two halves < arrival
    assert all(f["items_per_s"] > 0 for f in figures.values())
