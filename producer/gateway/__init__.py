"""The tensorq HTTP gateway: the Open Inference Protocol (KServe v2) over
tensorq's Redis queues, async submission with polling by id, and /metrics.

``create_app(settings)`` builds the aiohttp application; ``start`` serves it
on a socket (tests, embedding); ``tensorq gateway`` runs it on uvloop.
"""

from producer.gateway.app import create_app
from producer.gateway.server import RunningGateway, serve, start

__all__ = ["RunningGateway", "create_app", "serve", "start"]
