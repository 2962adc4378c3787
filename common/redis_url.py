"""Redis URLs, checked and shown: ``check_url`` (the one validation of a
URL, wherever it becomes a client or a setting: one ``ConfigError`` line
naming what is wrong and the accepted forms) and ``mask_url`` (a URL with
its password hidden, for every message and log line). Imports no settings,
so both settings and connections use it."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import redis

from common.errors import ConfigError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host`` (cluster
    URLs with several ``host:port`` too; a URL without a scheme, or whose
    password holds ``/`` or ``@`` unescaped, is masked all the same)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, tail = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{tail}"


SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
URL_FORMS = (
    "redis://[user:password@]host[:port][/db], rediss://... (TLS), "
    "unix://[user:password@]/path/to/socket[?db=N], "
    "redis+cluster://[user:password@]host:port[,host:port...], rediss+cluster://... (TLS)"
)


def check_url(url: object, *, cluster: bool = False) -> str:
    """``url`` if a Redis client can be made from it, else ``ConfigError``:
    one line naming the URL (password masked), what is wrong with it and
    the accepted forms. Called wherever a URL becomes a client
    (``pooled_client``, ``blocking_client``, ``sync_client``,
    ``cluster_client``) and by the client constructors."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"no Redis URL given, got {url!r:.40}; accepted: {URL_FORMS}")
    problem = _url_problem(url, cluster)
    if problem is None:
        return url
    shown = mask_url(url)
    raise ConfigError(f"bad Redis URL {shown!r}: {_scrub(problem, url)}; accepted: {URL_FORMS}")


def _url_problem(url: str, cluster: bool) -> str | None:
    """What makes ``url`` unusable, or None (the checks redis-py makes when it
    builds a client, plus the ones it lets pass: a database that is no number)."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "it holds a space or a control character"
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "it has no scheme"
    if scheme not in SCHEMES:
        return f"unsupported scheme {scheme + '://'!r}"
    if scheme != "unix" and any(c in rest.rpartition("@")[0] for c in "/?#"):
        return "its user or password holds '/', '?' or '#': percent-encode them (%2F, %3F, %23)"
    if scheme in CLUSTER_SCHEMES or cluster:
        if scheme == "unix":
            return "a cluster is reached at host:port nodes, not a unix socket"
        return _cluster_problem(rest)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is no number 0-65535
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if scheme == "unix":
        if not parts.path:
            return "no socket path"
    elif parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
        return f"the database {parts.path.lstrip('/')!r:.30} is not a number"
    try:
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return str(exc)
    return None


def _cluster_problem(rest: str) -> str | None:
    """The ``host:port[,host:port...]`` list of a cluster URL, parsed as ``cluster_nodes`` does."""
    hosts = rest.partition("/")[0].rpartition("@")[2]
    if not hosts:
        return "it names no host:port node"
    for host_port in hosts.split(","):
        node = host_port.strip()
        try:
            parts = urlsplit(f"//{node}")
            parts.port  # noqa: B018
        except ValueError:
            return f"node {node!r:.60}: its port is not a number from 0 to 65535"
        if not parts.hostname:
            return f"node {node!r:.60} has no host" if node else "an empty node in the list"
    return None


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (raw and unescaped) masked, on one line."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    for secret in {password, unquote(password)}:
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())
