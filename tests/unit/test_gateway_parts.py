"""Gateway pieces without a server: the [gateway] settings section, OIP
conversions (BF16 rounding as torch does it), token matching, the marker key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.codec import CodecLimits
from common.errors import ConfigError, ProtocolError
from common.keys import Keys
from common.settings import load_settings
from producer.gateway.auth import _matches
from producer.gateway.oip import OutputRequest, float_to_bf16_bits, parse_infer_request


def test_gateway_settings_file_then_env_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "tensorq.toml"
    config.write_text('[gateway]\nport = 9000\ntokens = ["tok-a", "tok-b"]\nsync_timeout_s = 5\n')
    from_file = load_settings(config, env={}).gateway
    assert (from_file.port, from_file.tokens, from_file.sync_timeout_s) == (
        9000,
        ("tok-a", "tok-b"),
        5.0,
    )
    assert from_file.host == "127.0.0.1"
    env = {"TQ_GATEWAY_TOKENS": " x , y,, ", "TQ_GATEWAY_PORT": "9100"}
    from_env = load_settings(config, env=env).gateway
    assert (from_env.port, from_env.tokens) == (9100, ("x", "y"))
    overridden = load_settings(config, env=env, overrides={"gateway.port": 0}).gateway
    assert overridden.port == 0
    assert load_settings(config, env={"TQ_GATEWAY_TOKENS": ""}).gateway.tokens == ()
    assert "tok-a" not in repr(from_file)  # tokens stay out of logs
    config.write_text("[gateway]\ntokens = [1, 2]\n")
    with pytest.raises(ConfigError, match="list of strings"):
        load_settings(config, env={})


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 1e3,
            np.array([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -3.4e38, np.inf, -np.inf],
                     np.float32),  # ties to even, overflow to inf
        ]
    )  # fmt: skip
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(float_to_bf16_bits(values), expected)
    nan = float_to_bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy())[0]


def test_parse_json_and_binary_inputs_into_wire_storage() -> None:
    head = (
        b'{"id": "r1", "inputs": ['
        b'{"name": "a", "shape": [1, 2], "datatype": "BF16", "data": [1.5, -2.0]},'
        b'{"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}],'
        b'"outputs": [{"name": "y", "parameters": {"binary_data": true}}]}'
    )
    parsed = parse_infer_request(head + b"\x01\x00", str(len(head)), CodecLimits())
    assert parsed.id == "r1"
    assert parsed.inputs["a"].dtype == np.uint16  # BF16 bits, as tensorq carries them
    assert parsed.inputs["a"].tolist() == [[0x3FC0, 0xC000]]
    assert parsed.inputs["b"].tolist() == [True, False]
    assert parsed.outputs == OutputRequest(("y",), {"y": True}, False)
    assert parsed.outputs.wants_binary("y")
    assert OutputRequest.from_json(parsed.outputs.to_json()) == parsed.outputs
    with pytest.raises(ProtocolError, match="BOOL binary data must be bytes 0 or 1"):
        parse_infer_request(head + b"\x02\x00", str(len(head)), CodecLimits())


def test_limits_apply_before_any_array_is_built() -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1000000, 1000], "datatype": "FP64", "data": []}]}'
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parse_infer_request(body, None, CodecLimits(max_payload_bytes=1 << 20))
    deep = b'{"inputs": [{"name": "x", "shape": [1,1,1,1,1,1,1,1,1], "datatype": "FP32"}]}'
    with pytest.raises(ProtocolError, match="at most 8 allowed"):
        parse_infer_request(deep, None, CodecLimits())


def test_tokens_match_any_configured_one() -> None:
    secrets = [b"alpha", b"beta"]
    assert _matches(b"alpha", secrets) and _matches(b"beta", secrets)
    assert not _matches(b"alph", secrets) and not _matches(b"", secrets)


def test_accepted_marker_key() -> None:
    assert Keys().accepted("r1") == "tq:acc:r1"
    assert Keys("x").accepted("r1") == "x:acc:r1"
