"""The client's typed errors, on fakeredis: every error is exported from
``producer``; request ids follow one rule (common/ids.py) in the client and
the gateway; inputs that are no mapping, ids in flight, unknown ids and
Redis URLs no client can be made from each get their own typed error, one
line, before anything is enqueued."""

from __future__ import annotations

import inspect
import uuid

import fakeredis
import numpy as np
import pytest

import common.errors
import producer
from common.codec import DEFAULT_LIMITS
from common.errors import (
    ConfigError,
    DuplicateRequest,
    InvalidInput,
    RequestTimeout,
    TensorQError,
    UnknownRequest,
)
from common.ids import MAX_REQUEST_ID_LEN, check_request_id, is_request_id
from common.keys import Keys
from common.redis_url import check_url, mask_url
from common.spec import ModelSpec, TensorSpec
from producer import AsyncClient, Client, Submission
from producer.client.inbox import Inbox

KEYS = Keys()
SPEC = ModelSpec("toy", inputs=(TensorSpec("x", "float32", (4,)),),
                 outputs=(TensorSpec("y", "float32", (4,)),), max_batch_size=8)  # fmt: skip
X = np.zeros((1, 4), np.float32)


# -- item 6: every typed error is reachable from producer ------------------------------


def test_every_typed_error_is_exported_from_producer() -> None:
    errors = {
        name
        for name, value in vars(common.errors).items()
        if inspect.isclass(value) and issubclass(value, TensorQError)
    }
    assert {"DuplicateRequest", "UnknownRequest", "MissingExtra"} <= errors
    assert errors <= set(producer.__all__)
    assert all(getattr(producer, name) is getattr(common.errors, name) for name in errors)


def test_new_errors_have_their_codes_and_http_statuses() -> None:
    assert (DuplicateRequest.code, DuplicateRequest.http_status) == ("duplicate_request", 409)
    assert (UnknownRequest.code, UnknownRequest.http_status) == ("unknown_request", 404)
    assert issubclass(DuplicateRequest, TensorQError) and issubclass(UnknownRequest, TensorQError)


@pytest.mark.parametrize("inputs", [X, [X], "x", None])
async def test_inputs_that_are_no_mapping_are_invalid_input(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis, inputs: object
) -> None:
    for call in (
        client.infer("toy", inputs),  # type: ignore[arg-type]
        client.submit("toy", inputs, request_id="r-1"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput, match=r"inputs must be a mapping of input name -> array"):
            await call
    with pytest.raises(InvalidInput, match=type(inputs).__name__):
        Submission("toy", inputs)  # type: ignore[arg-type]
    assert await fake.exists(KEYS.queue("toy")) == 0
    assert client._inbox.waiters == {}


# -- item 4: the request id rule, and ids in flight ------------------------------------

GOOD_IDS = ["row-7", "a", uuid.uuid4().hex, str(uuid.uuid4()), "job:42_x.y", "z" * 128]
BAD_IDS = ["", "a{b}", "{tag}", "a b", "line\nbreak", "tab\t", "nul\x00", "x/y", "q?", "é",
           "z" * (MAX_REQUEST_ID_LEN + 1)]  # fmt: skip


@pytest.mark.parametrize("request_id", GOOD_IDS)
def test_ids_the_protocol_allows(request_id: str) -> None:
    assert is_request_id(request_id) and check_request_id(request_id) == request_id


@pytest.mark.parametrize("request_id", BAD_IDS, ids=[repr(i)[:20] for i in BAD_IDS])
async def test_ids_the_protocol_forbids_are_invalid_input_before_anything_is_enqueued(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis, request_id: str
) -> None:
    assert not is_request_id(request_id)
    with pytest.raises(InvalidInput, match=r"request id must be 1 to 128 characters") as caught:
        await client.submit("toy", {"x": X}, request_id=request_id)
    assert "\n" not in str(caught.value)  # one line, whatever the id holds
    with pytest.raises(InvalidInput, match="request id must be"):
        Submission("toy", {"x": X}, request_id=request_id)
    assert await fake.exists(KEYS.queue("toy")) == 0
    assert client._inbox.waiters == {}


def test_non_string_ids_are_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="got 7"):
        Submission("toy", {"x": X}, request_id=7)  # type: ignore[arg-type]


async def test_an_id_in_flight_in_this_client_is_refused_until_its_result_arrives() -> None:
    inbox = Inbox("tq:inbox:c", DEFAULT_LIMITS)
    inbox.expect(["a", "b"])
    with pytest.raises(DuplicateRequest, match=r"'a' is already in flight") as caught:
        inbox.expect(["c", "a"])
    assert caught.value.request_id == "a"
    assert set(inbox.waiters) == {"a", "b"}  # nothing half-registered: no "c"
    with pytest.raises(DuplicateRequest, match=r"'d' is named twice"):
        inbox.expect(["d", "e", "d"])
    assert set(inbox.waiters) == {"a", "b"}
    first = inbox.waiters["a"]
    first.set_result(None)  # type: ignore[arg-type]  # its result arrived
    inbox.expect(["a"])  # an id whose result arrived may be used again
    assert inbox.waiters["a"] is not first and not inbox.waiters["a"].done()


# -- item 5: unknown ids ---------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["never-submitted", "a{b}", "x" * 500, "new\nline"])
async def test_waiting_for_an_unknown_id_raises_at_once(
    client: AsyncClient, request_id: str
) -> None:
    # a timeout far past the test's: only an immediate answer passes
    with pytest.raises(UnknownRequest, match=r"no such request|no request can have the id"):
        await client.wait(request_id, timeout=600)
    with pytest.raises(UnknownRequest):
        await client.result(request_id, timeout=600)


async def test_an_accepted_id_is_waited_for_not_unknown(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    await fake.set(KEYS.accepted("pending-1"), b'{"model": "toy"}')
    with pytest.raises(RequestTimeout, match="pending-1"):
        await client.wait("pending-1", timeout=0.05)


async def test_a_generated_id_is_known_up_to_its_clients_high_water_mark(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    await fake.set(KEYS.submitted("other-client"), b"5")  # ids -0 .. -5 were enqueued
    for pending in ("other-client-0", "other-client-5"):
        with pytest.raises(RequestTimeout, match=pending):
            await client.wait(pending, timeout=0.05)
    for unknown in ("other-client-6", "nobody-3", "other-client-x"):
        with pytest.raises(UnknownRequest, match=unknown):
            await client.wait(unknown, timeout=600)


def test_which_marks_vouch_for_a_request() -> None:
    from producer.client.results import known

    assert not known(None, 0) and not known(None, 3)
    assert known(b"{}", 0) and known(b"3", 3) and known(b"9", 3)
    assert not known(b"2", 3)
    assert known(b"garbage", 3)  # unreadable: not known to be unknown


# -- item 8: Redis URLs ----------------------------------------------------------------

BAD_URLS = [
    ("http://foo", "unsupported scheme 'http://'"),
    ("redis://:hunter2@h:notaport/0", "port is not a number"),
    ("redis://:hunter2@h:70000/0", "port is not a number"),
    ("redis://app:hunter2@h/abc", "database 'abc' is not a number"),
    ("localhost:6379", "no scheme"),
    (":hunter2@localhost:6379", "no scheme"),
    ("redis://h:6379/0\n", "space or a control character"),
    ("redis://app:hun/ter2@h:1/0", "percent-encode"),
    ("unix://", "no socket path"),
    ("redis+cluster://app:hunter2@a:1,b:x", "node 'b:x': its port is not a number"),
    ("rediss+cluster://app:hunter2@", "no host:port node"),
    ("redis+cluster://a:1,,b:2", "an empty node"),
    ("redis://h:1/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
]


@pytest.mark.parametrize(("url", "fragment"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_a_bad_redis_url_is_one_config_error_line_without_the_password(
    url: str, fragment: str
) -> None:
    for make in (check_url, AsyncClient, Client):
        with pytest.raises(ConfigError) as caught:
            make(url)
        message = str(caught.value)
        assert fragment in message
        assert "\n" not in message and "hunter2" not in message and "hun/ter2" not in message
        assert all(s in message for s in ("redis://", "rediss://", "unix://", "redis+cluster://",
                                          "rediss+cluster://"))  # fmt: skip


def test_no_url_is_a_config_error() -> None:
    for make in (AsyncClient, Client):
        with pytest.raises(ConfigError, match="no Redis URL given"):
            make()


@pytest.mark.parametrize(
    "url",
    ["redis://h:6379/0", "redis://", "rediss://u:p%2Fw@h:6380/2", "unix:///tmp/r.sock?db=1",
     "redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7000", "rediss+cluster://[::1]:7000"],
)  # fmt: skip
def test_good_redis_urls_pass(url: str) -> None:
    assert check_url(url) == url
    assert AsyncClient(url).settings.redis.url == url  # no connection is made


def test_a_plain_url_with_cluster_on_is_checked_as_a_node_list() -> None:
    assert check_url("redis://h:7000", cluster=True)
    with pytest.raises(ConfigError, match="not a unix socket"):
        check_url("unix:///tmp/r.sock", cluster=True)


def test_mask_url_hides_the_password_in_every_form() -> None:
    assert mask_url("redis://app:s3cret@h:1/0") == "redis://app:***@h:1/0"
    assert mask_url(":s3cret@localhost:6379") == ":***@localhost:6379"
    assert "s3cret" not in mask_url("redis://app:s3/cret@h:1/0")
    assert "s3cret" not in mask_url("redis://app:s3@cret@h:1/0")
    assert mask_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize("client_id", ["", "a{b}", "a b", "x" * 108])
def test_a_client_id_outside_the_id_rule_is_a_config_error(client_id: str) -> None:
    with pytest.raises(ConfigError, match="client_id must be 1 to 107 characters"):
        AsyncClient("redis://h", client_id=client_id)


def test_generated_ids_follow_the_rule() -> None:
    a = AsyncClient("redis://h", client_id="x" * 107)
    assert is_request_id(f"{a.client_id}-{2**64 - 1}")


@pytest.mark.parametrize(
    "request_id", GOOD_IDS + BAD_IDS, ids=[repr(i)[:20] for i in GOOD_IDS + BAD_IDS]
)
def test_the_gateway_parses_ids_by_the_same_rule(request_id: str) -> None:
    from common.errors import ProtocolError
    from producer.gateway.oip import check_request_id as gateway_check

    if request_id == "":  # over HTTP an empty id means: generate one
        assert gateway_check(request_id) is None
    elif is_request_id(request_id):
        assert gateway_check(request_id) == request_id
    else:
        with pytest.raises(ProtocolError):
            gateway_check(request_id)


async def test_the_gateway_checks_a_client_given_id_before_claiming_its_marker() -> None:
    from producer.gateway.oip import OutputRequest
    from producer.gateway.state import Gateway

    # no Redis at all: the id is refused before any call could claim tq:acc:<id>
    gateway = Gateway.__new__(Gateway)
    gateway.settings = AsyncClient("redis://fake").settings
    with pytest.raises(InvalidInput, match="request id must be"):
        await gateway.accept(SPEC, {"x": X}, request_id="a{b}", timeout=None, priority=0,
                             wanted=OutputRequest())  # fmt: skip
