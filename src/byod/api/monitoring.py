"""``/metrics`` of ``byod serve``: this process's own counters (the runs it started and
their users and steps; see :mod:`byod.metrics`) and the fleet's gauges, read from the
control plane at each scrape (users per schema version and connection status, users
below head, runs under way)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from byod import commands
from byod.controlplane import RunStore
from byod.metrics import multiprocess_registry
from byod.workspace import Workspace

__all__ = ["CONTENT_TYPE", "FleetCollector", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector(Collector):
    """The fleet as the control plane records it, read at each scrape (aggregate
    queries only; no instance is contacted)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    def collect(self) -> Iterator[Metric]:
        status = commands.status(self.ws)
        users = GaugeMetricFamily(
            "byod_fleet_users", "Users per schema version (control plane).", labels=["version"]
        )
        for version, count in sorted(status.by_version.items()):
            users.add_metric([str(version)], count)
        yield users
        connections = GaugeMetricFamily(
            "byod_fleet_connections", "Users per connection status.", labels=["status"]
        )
        for state, count in sorted(status.by_connection.items()):
            connections.add_metric([state], count)
        yield connections
        yield GaugeMetricFamily(
            "byod_fleet_users_below_head",
            "Users a fleet run would take (connected or in error, below head).",
            value=status.outdated,
        )
        yield GaugeMetricFamily(
            "byod_fleet_head_version", "The migrations folder's head.", value=status.head
        )
        yield GaugeMetricFamily(
            "byod_runs_running",
            "Runs under way (any runner).",
            value=RunStore(self.ws.engine).running(),
        )


def exposition(ws: Workspace) -> bytes:
    """The text exposition: this process's metrics (all of its processes' where
    ``PROMETHEUS_MULTIPROC_DIR`` is set), then the fleet's."""
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(ws))
    own = multiprocess_registry() or REGISTRY
    return generate_latest(own) + generate_latest(fleet)
