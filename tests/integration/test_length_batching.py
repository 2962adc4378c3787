"""Length-aware batching on a real redis-server and a real worker: a
mixed-length backlog of the encoder (two inputs padded together) and of
``seq`` (a variable output cut back) gives every request the model's answer
for that request alone, and the worker reports the padding share it paid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.settings import load_settings
from producer import AsyncClient, Submission
from producer.ops.status import collect_status
from tests.conftest import PoolHandle, wait_until, write_config


def alone(models_dir: Path, name: str, *inputs: np.ndarray) -> object:
    module = torch.jit.load(str(models_dir / f"{name}.pt"))
    with torch.inference_mode():
        return module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))


async def test_mixed_lengths_grouped_answer_each_request_as_alone(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = write_config(tmp_path / "tensorq.toml", models_dir)
    assert load_settings(config, env={}).model("encoder").group_by_length  # the default
    pool = start_pool(config, redis_url, devices="cpu", workers=1)
    rng = np.random.default_rng(11)
    encoder: list[dict[str, np.ndarray]] = []
    for i in range(240):
        rows, length = 1 + i % 2, int(rng.integers(4, 97))
        ids = rng.integers(1, 8192, (rows, length)).astype(np.int64)
        mask = np.ones_like(ids)
        if i % 5 == 0:  # a request's own padding: the mask hides its tail
            cut = max(1, length // 2)
            ids[:, cut:], mask[:, cut:] = 0, 0
        encoder.append({"input_ids": ids, "attention_mask": mask})
    seq = [
        rng.integers(1, 1000, (1, int(rng.integers(1, 120)))).astype(np.int64) for _ in range(200)
    ]
    async with AsyncClient(redis_url) as client:
        # one burst each, so that the worker's backlog holds many lengths at once
        enc_ids = await client.submit_many([Submission("encoder", x) for x in encoder])
        seq_ids = await client.submit_many([Submission("seq", {"tokens": t}) for t in seq])
        enc_results = [await client.wait(i, timeout=120) for i in enc_ids]
        seq_results = [await client.wait(i, timeout=120) for i in seq_ids]
    for inputs, result in zip(encoder, enc_results, strict=True):
        assert result.status == "ok", result.error_message
        expected = alone(models_dir, "encoder", inputs["input_ids"], inputs["attention_mask"])
        assert isinstance(expected, torch.Tensor)
        np.testing.assert_allclose(result.outputs["embedding"], expected.numpy(), atol=2e-5)
    for tokens, result in zip(seq, seq_results, strict=True):
        assert result.status == "ok", result.error_message
        pooled, scores = alone(models_dir, "seq", tokens)  # type: ignore[misc]
        assert result.outputs["scores"].shape == tokens.shape  # cut back to its own length
        np.testing.assert_allclose(result.outputs["scores"], scores.numpy(), atol=1e-5)
        np.testing.assert_allclose(result.outputs["pooled"], pooled.numpy(), atol=1e-5)
    assert max(r.batch_size for r in enc_results) > 8  # requests really were batched together

    settings = load_settings(config, env={"TQ_REDIS_URL": redis_url})

    wait_until(
        lambda: sum(int(w["requests"]) for w in pool.live_workers()) == 440,  # type: ignore[call-overload]
        30,
        "a heartbeat counting every request",
    )
    models = (await collect_status(settings))["models"]
    share = models["encoder"]["padding_share_1m"]
    assert isinstance(share, float) and share >= 1.0
    assert models["mlp"]["padding_share_1m"] is None  # no variable axis
