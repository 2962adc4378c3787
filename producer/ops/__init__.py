"""Operator tools: what runs and inspects a deployment from the producer side.

cli     the verbs ``demo``, ``status`` and ``up``
status  ``tensorq status``: queues, workers, dead letters (also the gateway's status report)
stack   a local stack: Redis (private if no URL) + a ``tensorq worker`` pool subprocess
up      ``tensorq up``: the local stack plus the gateway, until Ctrl-C
"""
