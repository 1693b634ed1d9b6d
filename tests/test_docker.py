"""docker/ cannot be built here (no engine); check what can be checked without one."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics

DOCKER = Path(__file__).parents[1] / "docker"


def exposed_names() -> set[str]:
    metrics = Metrics("USD")
    metrics.add_gauges(lambda: {}, {name: "" for name in GAUGES})
    names = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.update(sample.name for sample in family.samples)
    return names


GAUGES = (
    "vlcache_entries",
    "vlcache_entries_bytes",
    "vlcache_index_vectors",
    "vlcache_embed_queue_depth",
    "vlcache_memory_tier_bytes",
)


def test_the_grafana_dashboard_queries_only_metrics_vlcache_exposes() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "vlcache.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"vlcache_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= exposed_names(), queried - exposed_names()
    assert {"Hit rate", "Tokens saved per second"} <= {p["title"] for p in dashboard["panels"]}


def test_the_image_runs_as_a_non_root_user_with_a_health_check() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert 'VOLUME ["/var/lib/vlcache/data", "/var/lib/vlcache/models"]' in dockerfile
    # Prometheus scrapes the admin listener with the same token the proxy requires.
    prometheus = (DOCKER / "prometheus" / "prometheus.yml").read_text()
    assert (
        "vlcache:8081" in prometheus and "credentials_file: /run/secrets/admin_token" in prometheus
    )
