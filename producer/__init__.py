"""tensorq producer: clients that enqueue requests and wait for results."""

from producer.client import AsyncClient, Client, Submission, outputs_of

__all__ = ["AsyncClient", "Client", "Submission", "outputs_of"]
