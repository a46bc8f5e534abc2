"""The Grafana dashboard shipped in docs/ queries only what a real host exports: a host is started
with its metrics port, answers a purchase and a decline, is scraped, and every metric name in
every panel's query must be a metric family of the scrape; and every family the host exports has
a panel."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from tests.host.conftest import ROOT, free_port, send

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"


def _queries() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p["targets"]]
    assert exprs and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in data["panels"])
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    return exprs


def test_every_metric_the_dashboard_queries_is_exported(spawn: Any, tmp_path: Path) -> None:
    metrics = free_port()
    host = spawn("--db", str(tmp_path / "data" / "h.db"), "--metrics-port", str(metrics))
    assert send(host.port, "--pan", "4111111111111111", "--amount", "1.00")["39"] == "00"
    assert send(host.port, "--pan", "5105105105105100", "--amount", "500.00")["39"] == "51"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
        scrape = resp.read().decode()
    families = set(re.findall(r"^# TYPE (isopace_[a-z_]+) ", scrape, re.M))
    assert 'isopace_transactions_total{outcome="aborted",code="51"} 1' in scrape, scrape
    queried = {name for e in _queries() for name in re.findall(r"\bisopace_[a-z_]+", e)}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert shown - families == set(), "the dashboard queries metrics the host does not export"
    assert families - shown == set(), "the host exports metrics no panel shows"
