"""Prometheus metrics, one registry per node so tests can run several nodes.

Label sets are bounded: transports, kinds, outcomes and error codes, never a
user, channel or tenant name.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


class Metrics:
    """The ``ara_`` metrics of one process."""

    def __init__(self) -> None:
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "ara_connections", "Open client connections", ["transport"], registry=r
        )
        self.connections_total = Counter(
            "ara_connections_opened", "Client connections accepted", ["transport"], registry=r
        )
        self.connections_rejected = Counter(
            "ara_connections_rejected", "Connections refused", ["reason"], registry=r
        )
        self.notifications = Counter(
            "ara_notifications", "Notifications accepted", ["target", "source"], registry=r
        )
        self.deliveries = Counter(
            "ara_deliveries", "Frames written to client outboxes", ["kind"], registry=r
        )
        self.queued = Counter("ara_queue_enqueued", "Notifications queued offline", registry=r)
        self.replayed = Counter(
            "ara_queue_replayed", "Queued notifications replayed on connect", registry=r
        )
        self.queue_depth = Gauge("ara_queue_depth", "Offline queue entries", registry=r)
        self.slow_consumers = Counter(
            "ara_slow_consumers", "Connections closed for a full outbox", registry=r
        )
        self.client_messages = Counter(
            "ara_client_messages", "Client frames received", ["type"], registry=r
        )
        self.client_errors = Counter(
            "ara_client_errors", "Error frames sent to clients", ["code"], registry=r
        )
        self.acks = Counter("ara_acks", "Acknowledgements", ["result"], registry=r)
        self.ack_latency = Histogram(
            "ara_ack_latency_seconds",
            "Time from notification creation to client ACK",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.http_requests = Counter(
            "ara_http_requests", "REST requests", ["route", "status"], registry=r
        )
        self.ratelimited = Counter(
            "ara_ratelimit_rejections", "Requests refused by rate limits", ["scope"], registry=r
        )
        self.backend_up = Gauge(
            "ara_backend_up", "Backend reachable (1) or not (0)", ["backend"], registry=r
        )
        self.router_lag = Gauge(
            "ara_router_partition_lag",
            "Entries waiting in a partition stream owned by this router",
            ["partition"],
            registry=r,
        )
        self.router_partitions = Gauge(
            "ara_router_partitions", "Partitions whose lease this router holds", registry=r
        )
        self.routed = Counter("ara_router_routed", "Notifications routed", registry=r)
        self.router_claimed = Counter(
            "ara_router_claimed",
            "Pending partition entries taken over from a router that read but did not route them",
            registry=r,
        )
        self.router_batch_seconds = Histogram(
            "ara_router_batch_seconds",
            "Time to route one batch read from a partition stream",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.router_batch_entries = Histogram(
            "ara_router_batch_entries",
            "Entries routed together in one batch (one mailbox write, one lookup, one append"
            " per gateway)",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256, 500),
            registry=r,
        )
        self.purged = Counter(
            "ara_purged",
            "Rows deleted by the periodic purge: expired mailbox rows, receipts past retention",
            ["store"],
            registry=r,
        )
        self.router_backlog = Gauge(
            "ara_router_mailbox_backlog",
            "Mailbox writes waiting for Postgres to come back",
            registry=r,
        )
        self.pubsub_dispatched = Counter(
            "ara_pubsub_dispatched", "Pub/Sub trigger messages dispatched", registry=r
        )
        self.gc_pauses = Histogram(
            "ara_gc_pause_seconds",
            "Pauses of this process's cyclic garbage collector",
            ["generation"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.pubsub_invalid = Counter(
            "ara_pubsub_invalid", "Pub/Sub trigger messages dropped as invalid", registry=r
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, kept: the per-request counters would otherwise
        pay the label validation and the lock of prometheus_client's ``labels`` on
        every increment. (Label values are bounded sets, see the module docstring.)"""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found
