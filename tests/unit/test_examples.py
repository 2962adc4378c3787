"""The example models against config/tensorq.toml: declared outputs, row
independence within a batch, padding invariance of ``seq``, and
byte-identical rebuilds (a model's version hashes the file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from common.settings import ModelConfig, Settings, load_settings
from common.spec import VARIABLE, TensorSpec
from worker.examples import build_examples

ROOT = Path(__file__).resolve().parents[2]
SETTINGS: Settings = load_settings(ROOT / "config" / "tensorq.toml", env={})
NAMES = [m.name for m in SETTINGS.models]


def _load(models_dir: Path, config: ModelConfig) -> Any:
    module = torch.jit.load(str(models_dir / config.path.name))  # type: ignore[no-untyped-call]
    module.eval()
    return module


def _outputs(config: ModelConfig, result: object) -> dict[str, torch.Tensor]:
    """Match a forward's return to the declared outputs, as DESIGN.md specifies."""
    names = [t.name for t in config.outputs]
    if isinstance(result, torch.Tensor):
        assert len(names) == 1, f"{config.name} returned one tensor for outputs {names}"
        return {names[0]: result}
    if isinstance(result, Mapping):
        assert sorted(result) == sorted(names)
        return dict(result)
    assert isinstance(result, tuple), f"{config.name} returned {type(result).__name__}"
    assert len(result) == len(names), f"{config.name} returned {len(result)} outputs"
    return dict(zip(names, result, strict=True))


def _random_input(spec: TensorSpec, rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    shape = (rows, *(length if d == VARIABLE else d for d in spec.shape))
    dtype = getattr(torch, spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(1, 1000, shape, generator=gen, dtype=dtype)


def _forward(
    module: Any, config: ModelConfig, inputs: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return _outputs(config, module(*inputs))


def test_build_writes_the_configured_files(models_dir: Path, tmp_path: Path) -> None:
    built = build_examples(tmp_path / "fresh")
    assert sorted(built) == sorted(NAMES)
    for config in SETTINGS.models:
        assert config.path == ROOT / "config" / "models" / f"{config.name}.pt"
        assert built[config.name] == tmp_path / "fresh" / config.path.name
        # Same seed, same bytes: the model version (a content hash) is stable across builds.
        assert built[config.name].read_bytes() == (models_dir / config.path.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(
        f"{n}.pt" for n in NAMES
    )


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_the_config(models_dir: Path, name: str) -> None:
    config = SETTINGS.model(name)
    module = _load(models_dir, config)
    gen = torch.Generator().manual_seed(0)
    rows, length = 3, 7
    inputs = [_random_input(s, rows, length, gen) for s in config.inputs]
    outputs = _forward(module, config, inputs)
    assert sorted(outputs) == sorted(t.name for t in config.outputs)
    for spec in config.outputs:
        tensor = outputs[spec.name]
        assert tensor.dtype == getattr(torch, spec.dtype), spec.name
        expected = [rows, *(length if d == VARIABLE else d for d in spec.shape)]
        assert list(tensor.shape) == expected, spec.name
        assert torch.isfinite(tensor).all(), spec.name
        assert not torch.equal(tensor[0], tensor[1]), f"{spec.name}: rows are not distinguished"


@pytest.mark.parametrize("name", NAMES)
def test_a_row_does_not_depend_on_its_batch(models_dir: Path, name: str) -> None:
    config = SETTINGS.model(name)
    module = _load(models_dir, config)
    gen = torch.Generator().manual_seed(1)
    inputs = [_random_input(s, 5, 9, gen) for s in config.inputs]
    batched = _forward(module, config, inputs)
    for row in range(5):
        alone = _forward(module, config, [t[row : row + 1] for t in inputs])
        for spec in config.outputs:
            assert torch.allclose(batched[spec.name][row], alone[spec.name][0], atol=1e-5), (
                f"{spec.name} row {row}"
            )


def test_seq_padding_changes_nothing_on_real_positions(models_dir: Path) -> None:
    config = SETTINGS.model("seq")
    (tokens_spec,) = config.inputs
    module = _load(models_dir, config)
    gen = torch.Generator().manual_seed(2)
    lengths = [1, 12, 5, 3, 12, 8]
    rows = [torch.randint(1, 1000, (n,), generator=gen) for n in lengths]
    padded = torch.full((len(rows), max(lengths)), int(tokens_spec.pad_value), dtype=torch.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    batched = _forward(module, config, [padded])
    for i, row in enumerate(rows):
        alone = _forward(module, config, [row.unsqueeze(0)])
        assert alone["scores"].shape == (1, len(row))
        assert torch.allclose(batched["pooled"][i], alone["pooled"][0], atol=1e-5), i
        assert torch.allclose(batched["scores"][i, : len(row)], alone["scores"][0], atol=1e-5), i


def test_seq_pooled_is_the_mean_over_real_tokens(models_dir: Path) -> None:
    config = SETTINGS.model("seq")
    module = _load(models_dir, config)
    tokens = torch.tensor([[5, 5, 0, 0], [5, 7, 0, 0], [0, 0, 0, 0]])
    out = _forward(module, config, [tokens])
    one = _forward(module, config, [torch.tensor([[5]])])["pooled"][0]
    assert torch.allclose(out["pooled"][0], one, atol=1e-6)  # pads are not averaged in
    seven = _forward(module, config, [torch.tensor([[7]])])["pooled"][0]
    assert torch.allclose(out["pooled"][1], (one + seven) / 2, atol=1e-6)
    assert not torch.allclose(one, seven)
    assert torch.equal(out["pooled"][2], torch.zeros(16))  # all padding: zeros, not NaN


def test_encoder_padding_changes_nothing_and_the_mask_decides(models_dir: Path) -> None:
    """Padded with pad_value 0 on both inputs (as the worker pads), each row's
    embedding equals the row alone; tokens the mask hides change nothing."""
    config = SETTINGS.model("encoder")
    assert [t.pad_value for t in config.inputs] == [0, 0]
    module = _load(models_dir, config)
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 40, 17, 1, 40]
    rows = [torch.randint(1, 8192, (n,), generator=gen) for n in lengths]
    ids = torch.zeros((len(rows), max(lengths)), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    batched = _forward(module, config, [ids, mask])["embedding"]
    assert batched.shape == (len(rows), 64)
    for i, row in enumerate(rows):
        alone = _forward(
            module, config, [row.unsqueeze(0), torch.ones((1, len(row)), dtype=torch.int64)]
        )
        assert torch.allclose(batched[i], alone["embedding"][0], atol=1e-5), i
    hidden = ids.clone()
    hidden[0, 3:] = 77  # not padding tokens any more, but masked out
    again = _forward(module, config, [hidden, mask])["embedding"]
    assert torch.allclose(again[0], batched[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[2], atol=1e-3)
    assert torch.isfinite(
        _forward(module, config, [ids[:1], torch.zeros_like(ids[:1])])["embedding"]
    ).all()
