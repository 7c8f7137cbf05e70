"""The cluster parts (stream store, limits, backplane, node liveness), chosen by the
scheme of ``GATEWAY_CLUSTER_URL``: ``memory://`` (the default: one process) or
``redis://`` / ``rediss://`` (any number of processes). Only the chosen implementation's
module is imported, so its client library stays an optional dependency."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from config import Settings
from gateway.cluster.base import Cluster

# scheme -> (module, the extra that installs its dependency)
IMPLEMENTATIONS: dict[str, tuple[str, str | None]] = {
    "memory": ("gateway.cluster.memory", None),
    "redis": ("gateway.cluster.redis", "redis"),
    "rediss": ("gateway.cluster.redis", "redis"),
}


class ClusterConfigError(RuntimeError):
    pass


def cluster_scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def build_cluster(settings: Settings) -> Cluster:
    url = settings.cluster_url
    scheme = cluster_scheme(url)
    if scheme not in IMPLEMENTATIONS:
        raise ClusterConfigError(f"GATEWAY_CLUSTER_URL: unknown scheme {scheme!r}; known: "
                                 + ", ".join(f"{known}://" for known in IMPLEMENTATIONS))
    module_name, extra = IMPLEMENTATIONS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None:
            raise
        raise ClusterConfigError(f"GATEWAY_CLUSTER_URL is {scheme}:// but its client is not installed "
                                 f"({exc.name}): pip install 'token-gateway[{extra}]'") from None
    cluster: Cluster = module.build(settings, url)
    return cluster
