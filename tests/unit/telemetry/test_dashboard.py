"""The Grafana dashboard charts the metrics the code exports, and only those."""

import json
import re
from pathlib import Path

from serve_app.telemetry.catalog import METRICS

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "serve-gpt2.json"


def queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_every_query_names_a_metric_the_code_defines():
    exported = set().union(*(m.exported for m in METRICS))
    named = {name for expr in queries() for name in re.findall(r"ray_gpt2serve_\w+", expr)}
    assert named and named <= exported, named - exported


def test_every_metric_is_charted():
    text = " ".join(queries())
    missing = [m.name for m in METRICS if not any(s in text for s in m.exported)]
    assert missing == []


def test_metric_names_follow_prometheus_conventions():
    for m in METRICS:
        assert re.fullmatch(r"gpt2serve_[a-z0-9_]+", m.name), m.name
        assert not m.name.endswith("_total"), "Ray adds _total to counters"
        if m.kind == "histogram" and "seconds" not in m.name:
            assert m.name.endswith(("_size", "_per_commit")), m.name
        assert not {"prompt", "user", "user_id", "key"} & set(m.labels), m.name
