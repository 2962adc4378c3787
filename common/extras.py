"""Optional dependencies: ``require_extra`` checks, before a verb starts any
work, that the packages of the extra it needs are installed, and says in
one line which extra to install when they are not.

``pip install tensorq`` is the client alone (redis, msgpack, numpy); the
extras add the rest:

    worker    torch, prometheus-client       the worker pool
    gateway   aiohttp, orjson, prometheus-client   the HTTP gateway
    batch     rq, tqdm, safetensors          offline scoring: RQ jobs, progress bars
    bench     matplotlib, and worker + gateway (a benchmark starts both)
    all       everything above
"""

from __future__ import annotations

import importlib.util

from common.errors import MissingExtra

# What the processes a verb starts import: a worker pool (``[worker]``) and
# the HTTP gateway (``[gateway]``).
POOL_MODULES = ("torch",)
GATEWAY_MODULES = ("aiohttp", "orjson", "prometheus_client")


def installed(module: str) -> bool:
    """True if ``module`` can be imported (found, not marked absent), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False
    except ValueError:  # imported already, by a route that left it no spec
        return True


def require_extra(extra: str, *modules: str) -> None:
    """Raise ``MissingExtra`` naming the absent modules and ``pip install 'tensorq[extra]'``."""
    missing = [m for m in modules if not installed(m)]
    if not missing:
        return
    names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
    verb = "is" if len(missing) == 1 else "are"
    raise MissingExtra(f"needs {names}, which {verb} not installed: pip install 'tensorq[{extra}]'")
