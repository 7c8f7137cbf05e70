"""Prometheus metrics, one registry per app so several apps can live in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _CountedElsewhere:
    """A counter whose value another object keeps (read when the metrics are scraped)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.read: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("gateway_open_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter("gateway_connections_total", "Accepted WebSocket connections", registry=r)
        self.active_generations = Gauge("gateway_active_generations", "Generations running now", registry=r)
        self.generations_total = Counter(
            "gateway_generations_total", "Finished generations by outcome and transport (ws, http)",
            ["outcome", "transport"], registry=r
        )
        self.tokens_sent = Counter("gateway_tokens_sent_total", "Tokens delivered to clients", registry=r)
        self.frames_sent = Counter("gateway_frames_sent_total", "Frames written to clients", registry=r)
        self.coalesced_tokens = Counter(
            "gateway_coalesced_tokens_total",
            "Tokens that rode in a frame together with an earlier token (frames saved by coalescing)",
            registry=r,
        )
        self.closes = Counter(
            "gateway_closes_total", "Connections closed by the server, by reason", ["reason"], registry=r
        )
        self.auth_failures = Counter(
            "gateway_auth_failures_total", "Rejected credentials by reason", ["reason"], registry=r
        )
        self.frames_rate_limited = Counter(
            "gateway_frames_rate_limited_total", "Inbound frames dropped by the per-connection frame rate", registry=r
        )
        self.presence_dropped = Counter(
            "gateway_presence_dropped_total", "Presence frames dropped for a member whose send queue was full",
            registry=r,
        )
        # What this process sent and received over the backplane, by audience (node, room,
        # broadcast): a process receives only its own node's messages, its rooms' and the
        # broadcasts.
        self.backplane_received = Counter(
            "gateway_backplane_received_total", "Backplane messages this process received, by purpose", ["purpose"],
            registry=r,
        )
        self.backplane_published = Counter(
            "gateway_backplane_published_total", "Backplane messages this process published, by purpose", ["purpose"],
            registry=r,
        )
        self.errors = Counter("gateway_errors_total", "Error frames sent, by code", ["code"], registry=r)
        self.http_requests = Counter(
            "gateway_http_requests_total", "OpenAI-compatible HTTP API requests, by endpoint and status",
            ["endpoint", "status"], registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From an accepted generate to its first token being queued, by transport (ws, http)",
            ["transport"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        pause_buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 50 ms: a stall of every connection at once",
            buckets=pause_buckets, registry=r,
        )
        self.gc_pause = Histogram(
            "gateway_gc_pause_seconds", "Garbage collections, by generation, and how long each stopped the process",
            ["generation"], buckets=pause_buckets, registry=r,
        )
        self.gc_collected = Counter(
            "gateway_gc_collected_objects_total", "Unreachable objects the garbage collector freed, by generation",
            ["generation"], registry=r,
        )
        # process_open_fds, process_resident_memory_bytes, process_cpu_seconds_total, …
        ProcessCollector(registry=r)
        self.tasks = Gauge("gateway_event_loop_tasks", "Tasks on the event loop, counted when /metrics is read",
                           registry=r)
        self.store_evictions = _CountedElsewhere(
            "gateway_store_evictions", "Streams the memory store dropped before their TTL to stay within its budget")
        r.register(self.store_evictions)
        self.draining = Gauge("gateway_draining", "1 while the server drains for shutdown", registry=r)
        self.cluster_up = Gauge("gateway_cluster_up", "1 while the cluster store answers (always 1 for memory://)",
                                registry=r)
        # The same gauge under its name from before GATEWAY_CLUSTER_URL; kept for dashboards.
        self.redis_up = Gauge("gateway_redis_up", "Deprecated: gateway_cluster_up", registry=r)
        self.set_cluster_up(True)
        # Routes (gateway/backends/router.py): each deployment's health, by route and deployment.
        by_deployment = ["route", "deployment"]
        self.route_requests = Counter(
            "gateway_route_requests_total",
            "Attempts on a deployment by outcome (ok, error, timeout, rate_limited, rejected, midstream_error)",
            [*by_deployment, "outcome"], registry=r)
        self.route_in_flight = Gauge("gateway_route_in_flight", "Generations in flight on a deployment",
                                     by_deployment, registry=r)
        self.route_cooldown = Gauge(
            "gateway_route_cooldown", "A deployment's state: 0 healthy, 1 cooling down, 2 waiting for its probe",
            by_deployment, registry=r)
        # The OpenTelemetry GenAI server metrics, gen_ai.server.time_to_first_token and
        # gen_ai.server.time_per_output_token, with the gateway's labels.
        self.route_ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds", "From the request to a deployment to its first token",
            by_deployment, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=r)
        self.route_tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds", "Time per output token after the first, per attempt",
            by_deployment, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        # Called before each rendering, by parts whose figures change with time alone.
        self.before_render: list[Callable[[], None]] = []

    def set_cluster_up(self, up: bool) -> None:
        self.cluster_up.set(1 if up else 0)
        self.redis_up.set(1 if up else 0)

    def render(self) -> bytes:
        for refresh in self.before_render:
            refresh()
        return bytes(generate_latest(self.registry))
