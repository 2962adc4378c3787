"""The typed records tensorq keeps in Redis (heartbeat, control message,
dead letter) and the shared retry pacing: each value decodes to what was
encoded, readers refuse or skip what is malformed, and the liveness rule
is the one place it is written."""

from __future__ import annotations

import json

import pytest

from common.backoff import Backoff, Poll
from common.records import (
    LIVE_WITHIN_MS,
    RELOAD,
    ControlMessage,
    DeadLetter,
    WorkerHeartbeat,
    decode_heartbeats,
    live_workers,
)


def heartbeat(name: str = "w1", *, alive: bool = True, seen_ms: int = 1_000_000) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        name=name, pid=42, alive=alive, last_seen_ms=seen_ms, device="cpu:0",
        device_info={"device": "cpu:0", "threads": 2}, models=["mlp"], versions={"mlp": "abc"},
        batches=3, requests=7, rows=9, mean_batch_rows=3.0,
        last_minute={"mlp": {"rows_per_s": 1.0, "p50_ms": 2.0, "p99_ms": 3.0, "spark": [0] * 12}},
    )  # fmt: skip


def test_a_heartbeat_decodes_to_what_was_encoded() -> None:
    record = heartbeat()
    assert WorkerHeartbeat.decode(record.encode()) == record


def test_a_heartbeat_from_a_newer_worker_reads_without_its_new_fields() -> None:
    data = json.loads(heartbeat().encode())
    data["something_new"] = {"x": 1}
    assert WorkerHeartbeat.decode(json.dumps(data)) == heartbeat()


def test_liveness_is_recent_and_not_signed_off() -> None:
    seen = 1_000_000
    assert heartbeat(seen_ms=seen).is_live(seen + LIVE_WITHIN_MS - 1)
    assert not heartbeat(seen_ms=seen).is_live(seen + LIVE_WITHIN_MS)
    assert not heartbeat(alive=False, seen_ms=seen).is_live(seen)
    report = heartbeat(seen_ms=seen).as_report(seen + 2500)
    assert report["alive"] is True and report["last_seen_s_ago"] == 2.5
    assert report["threads"] == 2 and report["device"] == "cpu:0" and "device_info" not in report


def test_unreadable_heartbeat_fields_are_skipped() -> None:
    raw = {
        b"w2": heartbeat("w2").encode().encode(),
        b"junk": b"not json",
        b"list": b"[1, 2]",
        b"w1": heartbeat("w1", seen_ms=0).encode().encode(),
    }
    assert [r.name for r in decode_heartbeats(raw)] == ["w1", "w2"]
    assert [r.name for r in live_workers(raw, at_ms=1_000_000)] == ["w2"]


def test_control_messages_round_trip_and_malformed_ones_are_refused() -> None:
    message = ControlMessage(RELOAD, "mlp")
    assert ControlMessage.decode(message.encode()) == message
    for bad in (b"not json", b"[]", b'{"op": "reload"}', b'{"op": "reload", "model": ["mlp"]}'):
        with pytest.raises(ValueError):
            ControlMessage.decode(bad)


def test_a_dead_letter_round_trips_through_its_stream_fields() -> None:
    letter = DeadLetter(b"\x00raw", "delivered 3 times", b"1-2")
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in letter.fields().items()
    }
    assert DeadLetter.from_fields(fields) == letter


def test_poll_grows_to_its_cap_and_restarts() -> None:
    poll = Poll(first=0.01, cap=0.05)
    assert [poll.next() for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    poll.reset()
    assert poll.next() == 0.01


def test_backoff_stays_under_its_growing_bound() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    delays = [backoff.next_delay() for _ in range(10)]
    bounds = [min(1.0, 0.1 * 2**i) for i in range(10)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert backoff.attempts == 10
    backoff.reset()
    assert backoff.attempts == 0


def test_an_accepted_marker_round_trips_and_a_broken_one_still_marks() -> None:
    from common.records import AcceptedMarker

    marker = AcceptedMarker("mlp", {"names": ["y"], "binary": {}, "default": False})
    assert AcceptedMarker.decode(marker.encode()) == marker
    assert AcceptedMarker.decode(b"not json") == AcceptedMarker("")
    assert AcceptedMarker.decode(b'{"model": "m", "outputs": [1]}') == AcceptedMarker("m")
