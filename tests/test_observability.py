"""What operators look at: the Grafana dashboard's queries against a live worker's /metrics, the
real Prometheus scraping that worker with deploy/prometheus.yml, `promtool check metrics`, and
a docker-compose.yml whose every image is pinned and every mounted file exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from coalmine import simulator
from coalmine.broker import free_port
from coalmine.config import load_config
from coalmine.launch import wait_until

yaml = pytest.importorskip("yaml", reason="pyyaml parses the compose and provisioning files")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "coalmine.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
RATE = 300


def dashboard_metrics() -> set[str]:
    """Every metric name any panel's PromQL queries (histogram series by their sample names)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(panels) >= 10 and all(exprs)
    return {name for e in exprs for name in re.findall(r"\bcoalmine_[a-z_]+", e)}


def declared(text: str) -> set[str]:
    """Metric names a /metrics page declares (# TYPE), with a histogram's sample names."""
    out = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        out.add(name)
        if kind == "histogram":
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            out.add(f"{name}_total" if not name.endswith("_total") else name)
    return out


def sampled(text: str) -> set[str]:
    return set(re.findall(r"^(coalmine_[a-z_]+)[{ ]", text, re.M))


def test_the_dashboard_queries_only_metrics_a_live_worker_serves_and_prometheus_scrapes_them(
    namespace, start_worker, shuttle_config, tmp_path
):
    worker = start_worker(shuttle_config)
    scenario = simulator.Scenario(
        n_events=6_000, rate_per_s=RATE, drift_at=3_000, drift_size=1.0, bad_event_every=250
    )
    namespace.publish(simulator.generate(scenario))
    wait_until(
        lambda: worker.metric("coalmine_evaluations_total") >= 6_000 / RATE - 4,
        90,
        "the worker's evaluations",
        interval=0.5,
    )
    late = next(e for k, e in simulator.generate(scenario) if k == "prediction")
    namespace.publish([("prediction", {**late, "event_id": "late-1"})])  # far behind: late
    wanted = dashboard_metrics()
    # commands need a rollout, which this traffic has none of: declared is all they can be
    expected = wanted - {"coalmine_commands_total", "coalmine_canary_weight_percent"}

    # stage 1 reports its gauges (consumer lag, label join) once a second
    def complete() -> str | None:
        text = worker.get("/metrics")
        return text if expected <= sampled(text) else None

    try:
        text = wait_until(complete, 30, "samples of every metric the dashboard queries")
    except TimeoutError:
        missing = expected - sampled(worker.get("/metrics"))
        raise AssertionError(f"no samples of {sorted(missing)} on /metrics") from None
    assert isinstance(text, str)

    assert not wanted - declared(text), "panels query metrics the worker does not declare"
    assert re.search(r'^coalmine_consumer_lag_messages\{partition="\d+",topic="', text, re.M)
    assert re.search(r'^coalmine_label_join_entries\{kind="predictions"\}', text, re.M)
    # a poll of a few series (Prometheus' name[]) gets those alone, as the whole page has them
    few = worker.get("/metrics?name[]=coalmine_evaluations_total&name[]=coalmine_check_statistic")
    assert sampled(few) == {"coalmine_evaluations_total", "coalmine_check_statistic"}
    assert few.count("\ncoalmine_check_statistic{") >= text.count("\ncoalmine_check_statistic{")

    if PROMTOOL is None:
        pytest.skip("no promtool (Debian: apt-get install prometheus)")
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr

    with Prometheus(tmp_path, f"127.0.0.1:{worker.web_port}") as prom:
        up = wait_until(
            lambda: prom.query('up{job="coalmine"} == 1'), 60, "Prometheus to scrape the worker"
        )
        assert up
        series = wait_until(
            lambda: prom.query("coalmine_check_statistic"), 30, "coalmine metrics in Prometheus"
        )
        assert {s["metric"]["check"] for s in series} >= {"drift", "prediction_drift"}
        for name in ("coalmine_events_total", "coalmine_consumer_lag_messages"):
            assert prom.query(name), name


class Prometheus:
    """The real Prometheus binary on a free port with deploy/prometheus.yml, its worker
    discovery (DNS of the compose service) replaced by the test worker's address; stopped on
    exit."""

    def __init__(self, tmp_path: Path, target: str):
        if PROMETHEUS is None:
            pytest.skip("no prometheus (Debian: apt-get install prometheus)")
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        job = config["scrape_configs"][0]
        assert job["job_name"] == "coalmine" and job["dns_sd_configs"][0]["names"] == ["worker"]
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": [target]}]
        config["global"]["scrape_interval"] = "1s"  # a test's patience, not production's
        self.dir = Path(tempfile.mkdtemp(dir=tmp_path, prefix="prometheus-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        assert PROMETHEUS is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self.ready, 60, "Prometheus to be ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_grafana_provisioning_points_the_dashboard_at_the_provisioned_prometheus():
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    assert sources[0]["url"] == "http://prometheus:9090"
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} <= uids
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/coalmine.yml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_file_pins_images_mounts_existing_files_and_runs_workers_unprivileged():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "topics", "worker", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service:
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            assert tag and tag != "latest", f"{name}: pin the image version ({image!r})"
        for volume in service.get("volumes", []):
            host, inside = volume.split(":")[:2]
            assert (ROOT / host).exists(), f"{name} mounts {host}, which does not exist"
            if inside == "/config":  # the worker's --config and the reference it names
                assert load_config(ROOT / host / "monitor.toml").models
    worker = services["worker"]["command"]
    assert worker[worker.index("--config") + 1] == "/config/monitor.toml"
    port = worker[worker.index("--web-port") + 1]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["dns_sd_configs"][0] == {"names": ["worker"], "type": "A", "port": int(port)}
    assert services["topics"]["command"][:2] == ["topics", "create"]
    assert services["worker"]["depends_on"]["topics"]["condition"] == (
        "service_completed_successfully"
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0"), "the worker image runs as a non-root user"
    assert re.search(r"^FROM \S+:\d", dockerfile, re.M), "pinned base image"


def test_per_check_gauges_read_back_as_prometheus_client_writes_them():
    """The per-check gauges are written out by hand (prometheus_client takes ~30 us a series):
    Prometheus' own parser must read the same samples as from prometheus_client's gauge,
    hostile label values (quotes, backslashes, newlines) and non-finite values included."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from coalmine.agents.metrics import SeriesGauge

    labels = ("model", "variant", "check", "feature", "statistic")
    ours = SeriesGauge("x_statistic", 'help with "quotes" \\ and\nnewline', labels)
    registry = CollectorRegistry()
    theirs = Gauge("x_statistic", 'help with "quotes" \\ and\nnewline', labels, registry=registry)
    series = [
        (("m", "champion", "drift", "x0", "ks"), 0.125),
        (("m", "canary", "drift", 'a "quoted"\\ name\nwith a newline', "ks"), 1e-300),
        (("m", "champion", "drift", "f\u00e9", "cusum"), float("inf")),
        (("m", "champion", "drift", "", "psi"), float("-inf")),
        (("m", "shadow", "performance", "", "surprise"), float("nan")),
        (("m", "champion", "drift", "x0", "ks"), 0.25),  # a series set again: its last value
    ]
    for key, value in series:
        ours.set(key, value)
        theirs.labels(*key).set(value)

    def samples(text: str) -> dict:
        (family,) = text_string_to_metric_families(text)
        assert (family.name, family.type) == ("x_statistic", "gauge")
        return {tuple(sorted(s.labels.items())): repr(s.value) for s in family.samples}

    text = generate_latest(registry).decode()
    assert samples(ours.exposition()) == samples(text)
    assert len(samples(text)) == 5
    # and the very lines: other scrapers may want ``+Inf`` and ``NaN`` as Prometheus writes them
    assert sorted(ours.exposition().splitlines()) == sorted(text.splitlines())
