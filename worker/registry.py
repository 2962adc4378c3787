"""Model registry: load each configured TorchScript file onto the worker's
device, check its outputs against the config by a warm-up forward (their
structure, rows and declared axes: a model that already breaks them there is
not served), and give it a version (config entry + file content hash) for
``tq:models``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.codec import WIRE_DTYPES
from common.errors import ConfigError
from common.settings import ModelConfig
from common.spec import ModelSpec, TensorSpec
from worker.batching import OutputMismatch, check_output

log = logging.getLogger(__name__)

# The warm-up request: one row, each variable axis this long.
EXAMPLE_LENGTH = 1

# (model, one request's inputs) -> its outputs, in the calling thread
WarmUp = Callable[
    ["LoadedModel", Mapping[str, np.ndarray[Any, Any]]], Mapping[str, np.ndarray[Any, Any]]
]


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    spec: ModelSpec
    module: Any  # torch.jit.ScriptModule

    @property
    def name(self) -> str:
        return self.config.name


def model_version(config: ModelConfig) -> str:
    digest = hashlib.sha256(config.path.read_bytes())
    digest.update(repr(config.spec()).encode())
    return digest.hexdigest()[:12]


def load_model(config: ModelConfig, device: str, warm_up: WarmUp) -> LoadedModel:
    """Load, run one example request through ``warm_up`` (the executor's), and
    check the outputs against the config."""
    if not config.path.exists():
        raise ConfigError(f"model {config.name!r}: file {config.path} does not exist")
    try:
        module = torch.jit.load(str(config.path), map_location=device)  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises RuntimeError/ValueError variants
        raise ConfigError(f"model {config.name!r}: cannot load {config.path}: {exc}") from None
    module.eval()
    loaded = LoadedModel(config, config.spec(model_version(config)), module)
    example = {t.name: _example_input(t) for t in config.inputs}
    try:
        outputs = warm_up(loaded, example)
        for tensor in config.outputs:  # as split per request: one row, variable axes cut to 1
            check_output(config.name, tensor, outputs[tensor.name].shape, 1, EXAMPLE_LENGTH)
    except OutputMismatch as exc:
        raise ConfigError(
            f"{exc}, on a warm-up request of one row (variable axes of length "
            f"{EXAMPLE_LENGTH}): fix the model's forward or the output's shape in its "
            f"[[models.outputs]] entry ({config.path})"
        ) from None
    except Exception as exc:
        raise ConfigError(f"model {config.name!r}: warm-up forward failed: {exc}") from None
    log.info("model loaded: %s version %s on %s", config.name, loaded.spec.version, device)
    return loaded


def _example_input(tensor: TensorSpec) -> np.ndarray[Any, Any]:
    shape = tuple(EXAMPLE_LENGTH if d < 0 else d for d in tensor.shape)
    fill = 1 if tensor.dtype not in ("float32", "float16", "bfloat16", "float64") else 0
    return np.full((1, *shape), fill, dtype=WIRE_DTYPES[tensor.dtype])
