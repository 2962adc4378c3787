"""Benchmarks: tensorq measured against references in the same run, on the
same machine, printed as ratios (``tensorq bench``, ``tensorq bench-score``).
Anything that needs the model called in-process runs as a subprocess, so the
producer imports only common.

    cli                the verbs ``bench`` and ``bench-score``
    pool               ``tensorq bench``: the pool end to end against in-process and bare Redis
    http               ``tensorq bench --http``: the gateway against a bare aiohttp floor
    report             ``tensorq bench --report DIR``: offered-load sweep, CSV and PNG
    scoring            ``tensorq bench-score``: ``tensorq score`` against its references
    reference          the in-process and bare-transport references (run as processes)
    scoring_reference  ``bench-score``'s in-process reference over a file (run as a process)
    loadgen            closed- and open-loop load generation, random inputs for a model
    cpu_account        CPU time of this process and its children, by role, from /proc
"""
