"""A worker's Prometheus metrics in tests: the config that serves them, and a scrape
read back as samples (tests/test_metrics.py, tests/test_one_clock.py)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families


def metrics_config(tmp_path: Path, name: str, port: int | None) -> dict:
    """Worker env whose config file serves metrics at port (db/amqp URLs still from env)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"metrics_address": f"127.0.0.1:{port}" if port else ""}))
    return {"MOLTENIRON_CONFIG": str(path)}


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples
