"""The Grafana dashboards and Prometheus rules in deploy/, against what filch really exports.

promtool checks the rules, the scrape config and the rules' unit tests; every panel is
well-formed and every metric a dashboard or rule names is one node/core/metrics.py defines.
Then a real Prometheus scrapes a real 3-node cluster running real tasks, with the repo's
rules loaded: every dashboard expression must return data and every rule must evaluate
without error. A real Prometheus also parses the rule files for the static checks (the
project has no YAML library, and Prometheus is the parser that matters).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.metrics import MetricWrapperBase

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import metrics
from tests.e2e.cluster import Cluster, wait_for

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_FILES = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
PROMETHEUS_DIR = REPO / "deploy/prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = PROMETHEUS_DIR / "tests/filch.rules.test.yml"

PANEL_TYPES = {"timeseries", "stat", "gauge"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana would put in place of $__rate_interval with a 1 s scrape interval is 4 s;
# 15 s keeps a few scrapes in every window on a busy machine.
RATE_INTERVAL = "15s"

# The sample names each kind of collector exposes (prometheus_client drops a counter's
# `_total` from its family name and adds it back on the samples).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
            "info": ("_info",)}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")
# A filch series and its label matchers, e.g. filch_tasks{job="$job"} (label values hold
# no braces on these dashboards).
_SELECTOR = re.compile(r"\b(filch_\w+)\s*(\{[^}]*\})?")
# What picks one node on the node dashboard, in every query.
NODE_MATCHERS = '{job="$job", instance="$instance"}'


# -- helpers ---------------------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install the Debian package `prometheus` "
                    "(apt-get install --no-install-recommends prometheus)")
    return path


def exported_series() -> dict[str, str]:
    """Every sample name filch exports, mapped to its collector's family name."""
    names: dict[str, str] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            for family in collector.describe():
                assert family.type in SUFFIXES, f"{family.name}: new metric type {family.type}"
                for suffix in SUFFIXES[family.type]:
                    names[family.name + suffix] = family.name
    return names


def metric_names(expr: str) -> set[str]:
    """The filch series (and recording rules) a PromQL expression reads."""
    code = _STRING.sub('""', expr)       # label values are not metric names
    return {token for token in _IDENTIFIER.findall(code) if "filch_" in token}


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every panel."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def row_panels(board: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels under the row titled `title`, up to the next row (in board order)."""
    panels: list[dict[str, Any]] = []
    inside = False
    for panel in board["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == title
        elif inside:
            panels.append(panel)
    return panels


def variable_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(variable name, label_values(...) query) for every query variable."""
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield variable["name"], query["query"] if isinstance(query, dict) else query


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's $var / ${var} / ${var:format} the way Grafana would."""
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"{expr}: unknown variable ${name}"
        return values[name]
    return _VARIABLE.sub(replace, expr)


def scrape_job() -> str:
    """The job name deploy/prometheus/prometheus.yml gives filch nodes."""
    match = re.search(r"^\s*- job_name:\s*\"?([\w-]+)", (PROMETHEUS_DIR / "prometheus.yml")
                      .read_text(), re.MULTILINE)
    assert match, "deploy/prometheus/prometheus.yml has no scrape job"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """A real Prometheus server with the repo's rules, scraping the given targets every 1 s."""

    def __init__(self, root: Path, targets: list[str], job: str = "filch") -> None:
        self.root = root
        self.port = _free_port()
        self.log_file = root / "prometheus.log"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}]
            if targets else [],
        }
        # JSON is YAML: no YAML library needed to write the configuration.
        (root / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [_tool("prometheus"), f"--config.file={self.root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            wait_for("Prometheus to be ready", self._ready, timeout=30, interval=0.2)
        except AssertionError:
            self.__exit__()
            raise AssertionError(f"Prometheus did not start:\n{self.log_tail()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Prometheus exited:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, else AssertionError."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:      # 400/422: a bad query, with the reason
            body = json.load(exc)
        assert body["status"] == "success", f"{path} {params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: a {data['resultType']}"
        return list(data["result"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture(scope="module")
def loaded_rules(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rule as Prometheus itself parsed it from deploy/prometheus/rules/."""
    with Prometheus(tmp_path_factory.mktemp("rules"), targets=[]) as prometheus:
        return prometheus.rules()


# -- promtool --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["check", "rules", *map(str, RULE_FILES)],
    ["check", "config", "prometheus.yml"],
    ["test", "rules", str(RULE_TESTS.relative_to(PROMETHEUS_DIR))],
], ids=["check-rules", "check-config", "test-rules"])
def test_promtool(args: list[str]) -> None:
    result = subprocess.run([_tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test(loaded_rules: list[dict[str, Any]]
                                                        ) -> None:
    cases = re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", RULE_TESTS
                       .read_text())
    for alert in {rule["name"] for rule in loaded_rules if rule["type"] == "alerting"}:
        outcomes = {quiet == "[]" for name, quiet in cases if name == alert}
        assert outcomes == {True, False}, f"{alert}: needs a firing and a quiet case"


def test_alerts_tell_the_operator_what_to_do(loaded_rules: list[dict[str, Any]]) -> None:
    alerts = [rule for rule in loaded_rules if rule["type"] == "alerting"]
    assert {rule["name"] for rule in alerts} >= {
        "FilchQueueStuck", "FilchNodeLost", "FilchEtcdNearQuota", "FilchEtcdNoSpace",
        "FilchSelfFenced", "FilchFencedWrites", "FilchNoEtcdLeader", "FilchLeaseRenewalFailing"}
    for rule in alerts:
        assert rule["labels"].get("severity") in ("critical", "warning"), rule["name"]
        assert rule["annotations"].get("summary"), rule["name"]
        assert len(rule["annotations"].get("description", "")) > 80, rule["name"]


# -- dashboards ------------------------------------------------------------------------------

def test_dashboards_are_well_formed() -> None:
    boards = load_dashboards()
    assert {board["uid"] for board in boards.values()} == {"filch-cluster", "filch-node"}
    for file, board in boards.items():
        assert board["schemaVersion"] >= 36, file
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", file
        assert variables["datasource"]["query"] == "prometheus", file
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            where = f"{file}: panel {panel.get('title')!r}"
            if panel["type"] == "row":
                # A section heading across the board, expanded so its panels stay on the
                # top level (a collapsed row would hide them from these checks).
                assert (panel["collapsed"], panel["panels"]) == (False, []), where
                assert (panel["gridPos"]["w"], panel["gridPos"]["x"]) == (24, 0), where
                assert "targets" not in panel, where
            else:
                assert panel["type"] in PANEL_TYPES, where
                assert panel["datasource"] == DATASOURCE, where
                assert panel["targets"], f"{where} has no query"
            targets = panel.get("targets", [])
            assert len({target["refId"] for target in targets}) == len(targets)
            for target in targets:
                assert target["datasource"] == DATASOURCE, where
                assert target["expr"].strip(), where
                for name in _VARIABLE.findall(target["expr"]):
                    used = name[0] or name[1]
                    assert used in variables or used == "__rate_interval", f"{where}: ${used}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, where
            mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                    for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not cells & mine, f"{where} overlaps another panel"
            cells |= mine
    node = {v["name"]: v for v in boards["filch-node.json"]["templating"]["list"]}
    assert node["instance"]["type"] == "query"


def test_node_dashboard_shows_one_node() -> None:
    """Every query picks the selected node, and the cluster's Batch work row is there too."""
    boards = load_dashboards()
    node = boards["filch-node.json"]
    for title, target in dashboard_queries(node):
        selectors = _SELECTOR.findall(target["expr"])
        assert selectors, f"{title!r}: no filch series in {target['expr']}"
        for name, matchers in selectors:
            assert matchers == NODE_MATCHERS, f"{title!r}: {name}{matchers} is not this node's"

    def batch_metrics(file: str) -> set[str]:
        panels = row_panels(boards[file], "Batch work")
        assert panels, f"{file}: no Batch work row"
        for panel in panels:
            assert len(panel.get("description", "")) > 60, f"{file}: {panel['title']!r}"
        return {name for panel in panels for target in panel["targets"]
                for name in metric_names(target["expr"])}
    assert batch_metrics("filch-node.json") == batch_metrics("filch-cluster.json")


def test_dashboards_show_exactly_the_exported_metrics() -> None:
    exported = exported_series()
    used: set[str] = set()
    for file, board in load_dashboards().items():
        # Dashboards read raw series only, so they work where the rules are not loaded.
        queries = [target["expr"] for _, target in dashboard_queries(board)]
        queries += [query for _, query in variable_queries(board)]
        for expr in queries:
            unknown = metric_names(expr) - exported.keys()
            assert not unknown, f"{file}: {sorted(unknown)} not exported, in {expr}"
            used |= metric_names(expr)
    unseen = set(exported.values()) - {exported[name] for name in used}
    assert not unseen, f"exported but on no dashboard: {sorted(unseen)}"


def test_rules_name_only_exported_metrics(loaded_rules: list[dict[str, Any]]) -> None:
    exported = exported_series()
    records = {rule["name"] for rule in loaded_rules if rule["type"] == "recording"}
    for rule in loaded_rules:
        unknown = metric_names(rule["query"]) - exported.keys() - records
        assert not unknown, f"rule {rule['name']}: {sorted(unknown)} not exported or recorded"
    for record in records:       # the level:metric:operations convention
        assert re.fullmatch(r"[a-z_]+:filch_[a-z_]+:[a-z0-9_]+", record), record


# -- live ------------------------------------------------------------------------------------

@pytest.fixture
def prometheus_installed() -> None:
    """Skip before a cluster is started for nothing."""
    _tool("prometheus")


def test_dashboards_and_rules_against_a_live_cluster(prometheus_installed: None,
                                                     fresh_three_nodes: Cluster,
                                                     tmp_path: Path) -> None:
    started = time.monotonic()
    cluster = fresh_three_nodes
    job = scrape_job()
    targets = [urllib.parse.urlsplit(node.metrics_url).netloc for node in cluster.nodes]
    with Prometheus(tmp_path / "prometheus", targets, job=job) as prometheus:
        wait_for("Prometheus to scrape all three nodes", lambda: sorted(
            float(s["value"][1]) for s in prometheus.query(f'up{{job="{job}"}}')) == [1, 1, 1],
            timeout=30, interval=0.5)

        # Work for every panel: short tasks on every node, some that run a while, and
        # requests that fail (INVALID_ARGUMENT) on every node.
        workload_started = time.monotonic()
        ids = [cluster.submit("true", index=i % 3) for i in range(30)]
        ids += [cluster.submit("sleep", "1", index=i % 3) for i in range(6)]
        for index in range(3):
            with pytest.raises(grpc.RpcError):
                cluster.stub(index).GetTask(pb.GetTaskRequest(id="nope"), timeout=5)
        cluster.wait_finished(ids, timeout=90)
        wait_for("Prometheus to scrape the finished tasks", lambda: prometheus.query(
            f'sum(filch_tasks_finished_total{{job="{job}"}}) >= {len(ids)}'), timeout=15,
            interval=0.5)

        def rules_evaluated() -> bool:
            rules = prometheus.rules()
            broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] == "err"]
            assert not broken, f"rules that fail to evaluate: {broken}"
            return all(rule["health"] == "ok" for rule in rules)
        wait_for("every rule to be evaluated", rules_evaluated, timeout=20, interval=0.5)

        instance = targets[0]       # node 0 answers the harness's polling: API data for sure
        values = {"__rate_interval": RATE_INTERVAL, "job": job, "instance": instance}
        checked, nan = 0, []
        for file, board in load_dashboards().items():
            for variable, query in variable_queries(board):
                match = _LABEL_VALUES.match(substitute(query, values))
                assert match, f"{file}: variable {variable}: {query}"
                found = {s["metric"].get(match.group(2)) for s in prometheus.query(match.group(1))}
                assert values[variable] in found, f"{file}: ${variable} offers {found}"
                checked += 1
            for title, target in dashboard_queries(board):
                expr = substitute(target["expr"], values)
                result = prometheus.query(expr)
                where = f"{file}: {title!r} {expr}"
                assert result, f"{where} returned nothing"
                for label in _LEGEND_LABEL.findall(target.get("legendFormat", "")):
                    assert all(label in s["metric"] for s in result), f"{where}: no {label}"
                if all(math.isnan(float(s["value"][1])) for s in result):
                    nan.append(f"{title} / {target.get('legendFormat')}")
                checked += 1

        # What the workload must show, over a window that covers all of it however slow
        # the machine was: tasks went through, and started after some latency.
        window = f"{math.ceil(time.monotonic() - workload_started) + 10}s"
        throughput = prometheus.query(f'sum(rate(filch_tasks_finished_total{{job="{job}"}}'
                                      f"[{window}]))")
        assert float(throughput[0]["value"][1]) > 0
        latency = prometheus.query("histogram_quantile(0.5, sum by (le) (rate("
                                   f'filch_task_start_latency_seconds_bucket{{job="{job}"}}'
                                   f"[{window}])))")
        assert 0 < float(latency[0]["value"][1]) < 60

        rules = prometheus.rules()
        for rule in rules:
            if rule["type"] == "recording":
                assert prometheus.query(rule["name"]), f"recording rule {rule['name']}: no data"
        firing = [alert["labels"] for alert in prometheus.api("alerts")["alerts"]
                  if alert["state"] == "firing"]
        assert not firing, f"a healthy cluster raised alerts: {firing}"

    print(f"\nchecked live: {checked} dashboard queries and variables, {len(rules)} rules "
          f"(all health ok), in {time.monotonic() - started:.0f}s"
          + (f"; NaN (no observation in the last {RATE_INTERVAL}): {nan}" if nan else ""))
