"""The Python client: ``AsyncClient`` and its blocking twin ``Client``.

aio         AsyncClient: model lookup, submit / submit_many, wait / result / infer, cancel
sync        Client: the same calls, blocking, on a private event loop thread
submission  Submission; the checks and packing that make a request's stream payload
enqueue     the Lua check-and-XADD script and the group commit of concurrent submits
inbox       the inbox a client's results arrive in, and the task reading it
results     outputs_of (result -> numpy outputs or typed error); reading tq:r:<id>
"""

from producer.client.aio import AsyncClient
from producer.client.results import outputs_of
from producer.client.submission import Submission
from producer.client.sync import Client

__all__ = ["AsyncClient", "Client", "Submission", "outputs_of"]
