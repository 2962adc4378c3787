"""tensorq common: wire codec, envelopes, key schema, settings, errors.

Imported by both producer and worker; imports neither.
"""

from common.codec import CodecLimits, decode_tensor, encode_tensor
from common.envelope import (
    Request,
    Result,
    pack_request,
    pack_result,
    unpack_request,
    unpack_result,
)
from common.errors import (
    ConfigError,
    InferenceError,
    InvalidInput,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestTimeout,
    TensorQError,
    UnknownModel,
)
from common.keys import Keys
from common.settings import ModelConfig, Settings, load_settings
from common.spec import ModelSpec, TensorSpec

__all__ = [
    "CodecLimits",
    "ConfigError",
    "InferenceError",
    "InvalidInput",
    "Keys",
    "ModelConfig",
    "ModelSpec",
    "ProtocolError",
    "QueueFull",
    "RedisUnavailable",
    "Request",
    "RequestTimeout",
    "Result",
    "Settings",
    "TensorQError",
    "TensorSpec",
    "UnknownModel",
    "decode_tensor",
    "encode_tensor",
    "load_settings",
    "pack_request",
    "pack_result",
    "unpack_request",
    "unpack_result",
]
