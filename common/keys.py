"""Every Redis key tensorq uses, built in one place.

Layout (``tq`` is the configurable prefix; ``<x>`` a placeholder):

    tq:q:<model>:high   the same for requests with priority > 0, served first
    tq:q:<model>        stream of requests, consumer group ``workers``; field ``req``
                        holds the msgpack request. Entries are XACKed and XDELed
                        only after their result is written.
    tq:qn:<model>[:high]  requests held by the stream (an entry holds one request or a
                        bundle of many): the queue limit counts these; reset when the
                        stream is empty, so a drifted count heals itself
    tq:r:<id>           the msgpack result, with a TTL (default 1 hour)
    tq:inbox:<client>   list a waiting producer pops results from (BLMPOP); each
                        element is a msgpack result; TTL renewed on each push
    tq:dead:<model>     stream of dead letters: fields ``req`` (raw bytes) and ``reason``
    tq:cancel:<id>      present (with a TTL) when a request was cancelled; the id is
                        also published on the channel ``tq:cancelled:db<n>`` so
                        workers need no round trip per batch to notice it
    tq:acc:<id>         JSON marker written by the gateway when it accepts an async request
                        (POST /v1/models/<m>/requests), and by the client's enqueue script
                        for an id its caller chose; TTL = the result TTL: tells
                        "pending" (202) from "unknown" (404) and refuses a reused id
    tq:sub:<client>     the highest n of the ids <client>-<n> a client generated and
                        enqueued (TTL = the result TTL): marks all of them accepted
    tq:control:db<n>    pub/sub channel of control messages to workers (model reloads,
                        ``common.records.ControlMessage``)
    tq:reply:<token>    list a control message's sender waits on: each worker that acted
                        on it pushes one JSON answer (``common.records.ReloadAnswer``);
                        TTL ``REPLY_TTL_S``
    tq:batch:<id>       JSON record of an offline batch (``common.records.BatchRecord``);
                        ``:jobs`` its RQ job ids
    tq:workers          hash: worker name -> JSON heartbeat and stats
                        (``common.records.WorkerHeartbeat``)
    tq:models           hash: model name -> JSON ModelSpec, written by workers

Pub/sub ignores the database number (a message published on db 1 reaches
subscribers on every database of the server), so the channel names carry
it: ``<n>`` is the database of the deployment's URL (``redis://h/1`` ->
``tq:control:db1``; 0 without one and on Redis Cluster, which has only
database 0). With the prefix, that scopes announcements to one deployment:
a pool never obeys another database's reloads or cancels.

On Redis Cluster (``Keys(cluster=True)``) the same names carry hash tags so
that no command spans two slots: a model's keys tag the model
(``tq:q:{mlp}``, ``tq:q:{mlp}:high``, ``tq:dead:{mlp}``: one slot per model,
so reading, dead-lettering and acking touch one node) and a request's keys
tag its id (``tq:r:{id}``, ``tq:cancel:{id}``, ``tq:acc:{id}``: spread over
the cluster by id, and the gateway's accept check stays one transaction).
On a single node the names stay exactly as above: the key builder decides,
the calling code is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.settings import RedisSettings

CONSUMER_GROUP = "workers"
NORMAL, HIGH = 0, 1  # request priorities: workers fill batches from HIGH first
REQUEST_FIELD = "req"


REPLY_TTL_S = 300  # how long a control message's answers wait for their reader


@dataclass(frozen=True)
class Keys:
    prefix: str = "tq"
    cluster: bool = False
    db: int = 0  # the database number, which scopes the pub/sub channels

    @classmethod
    def of(cls, redis: RedisSettings) -> Keys:
        """The key builder for a deployment's Redis settings (prefix, Cluster, database)."""
        return cls(redis.prefix, redis.is_cluster, redis.db)

    def _tag(self, part: str) -> str:
        return f"{{{part}}}" if self.cluster else part

    def queue(self, model: str, priority: int = NORMAL) -> str:
        """The model's stream; priority HIGH (any priority > 0) has its own."""
        stream = f"{self.prefix}:q:{self._tag(model)}"
        return f"{stream}:high" if priority > NORMAL else stream

    def queued(self, queue: str) -> str:
        """How many requests the stream ``queue`` holds (a bundle is many per
        entry): raised by the enqueue script, lowered by the worker's acks;
        in the stream's slot on a cluster."""
        return f"{self.prefix}:qn:" + queue.removeprefix(f"{self.prefix}:q:")

    def queues(self, model: str) -> tuple[str, str]:
        """Both of a model's streams, in the order workers serve them."""
        return self.queue(model, HIGH), self.queue(model, NORMAL)

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:r:{self._tag(request_id)}"

    def inbox(self, client_id: str) -> str:
        return f"{self.prefix}:inbox:{client_id}"

    def is_inbox(self, key: str) -> bool:
        """Whether ``key`` names an inbox (a request's ``reply_to`` must)."""
        empty = self.inbox("")
        return key.startswith(empty) and len(key) > len(empty)

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{self._tag(model)}"

    def accepted(self, request_id: str) -> str:
        """The gateway's marker of an accepted async request (see the layout above)."""
        return f"{self.prefix}:acc:{self._tag(request_id)}"

    def cancelled(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{self._tag(request_id)}"

    def batch(self, batch_id: str) -> str:
        """An offline batch's record (``tensorq batch submit``)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """The RQ job ids of a batch's shards, in shard order."""
        return f"{self.prefix}:batch:{batch_id}:jobs"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel carrying the ids of cancelled requests (of this database)."""
        return f"{self.prefix}:cancelled:db{self.db}"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel of JSON control messages to this database's workers
        (``{"op": "reload", ...}``)."""
        return f"{self.prefix}:control:db{self.db}"

    def reply(self, token: str) -> str:
        """The list a control message's answers are pushed to."""
        return f"{self.prefix}:reply:{token}"

    def is_reply(self, key: str) -> bool:
        """Whether ``key`` names a reply list (a control message's ``reply_to`` must)."""
        empty = self.reply("")
        return key.startswith(empty) and len(key) > len(empty)

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def submitted(self, client_id: str) -> str:
        """The highest counter ``<n>`` of the ids ``<client_id>-<n>`` a Python
        client generated and enqueued (TTL: the result TTL): with
        ``accepted(id)`` for the ids callers chose, what tells a request in
        flight from an unknown id (``producer/client/enqueue.py``). Single
        node only: on Cluster the enqueue script cannot reach it."""
        return f"{self.prefix}:sub:{client_id}"
