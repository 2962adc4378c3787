"""``early_first`` (producer/client/enqueue.py): how a big flush is cut into
its head (the first EARLY_BYTES of input) and the rest. The round trips
themselves are tested on a real redis-server in
tests/integration/test_client_contract.py."""

from __future__ import annotations

from typing import Any

import pytest

from producer.client import enqueue


class Sized:
    def __init__(self, n: int) -> None:
        self.input_bytes = n


@pytest.mark.parametrize(
    ("sizes", "head"),
    [
        ([1] * 40, 10),  # 40 bytes: over twice 10, the head the first 10
        ([1] * 20, None),  # exactly twice: one part
        ([25, 1], 1),  # the first request alone reaches it: it goes first
        ([5, 5, 5, 5, 5], 2),
        ([30], None),
        ([9, 2, 9, 2, 9, 2], 2),
    ],
)
def test_the_head_is_the_shortest_prefix_reaching_early_bytes(
    monkeypatch: pytest.MonkeyPatch, sizes: list[int], head: int | None
) -> None:
    monkeypatch.setattr(enqueue, "EARLY_BYTES", 10)
    items: Any = [Sized(n) for n in sizes]
    parts = enqueue.early_first(items)
    assert [x for part in parts for x in part] == items  # every request once, in order
    assert [len(p) for p in parts] == ([len(items)] if head is None else [head, len(items) - head])
