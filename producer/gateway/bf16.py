"""BF16 inputs through the AsyncClient, which takes bfloat16 only as torch
tensors (a numpy uint16 array is refused as "not a wire dtype").

The gateway holds BF16 as uint16 bits; for models with a bfloat16 input it
hands the client a zero-copy torch view of those bits. torch is imported
only then, in a thread, so the event loop never stalls on the import; a
gateway installed without torch answers such requests with a one-line
error naming the extra to install (``[worker]`` brings torch).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.extras import require_extra
from common.spec import ModelSpec


def takes_bf16(spec: ModelSpec) -> bool:
    return any(t.dtype == "bfloat16" for t in spec.inputs)


async def client_inputs(
    arrays: Mapping[str, np.ndarray[Any, Any]], spec: ModelSpec
) -> Mapping[str, Any]:
    """``arrays`` (wire storage, already checked against ``spec``) as the client takes them."""
    torch = await import_torch()
    converted: dict[str, Any] = dict(arrays)
    for tensor in spec.inputs:
        if tensor.dtype == "bfloat16":
            bits = arrays[tensor.name]
            if not bits.flags.writeable:  # torch warns on read-only buffers
                bits = bits.copy()
            converted[tensor.name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    return converted


async def import_torch() -> Any:
    module = sys.modules.get("torch")
    if module is None:
        require_extra("worker", "torch")
        module = await asyncio.to_thread(importlib.import_module, "torch")
    return module
