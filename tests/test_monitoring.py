"""Issue 15, operators' view: monitoring/ (Prometheus scrape config, alert rules, Grafana
dashboard) held to the coordinator's metrics; the playbook's optional provisioning of them; the
certificate expiry metric and the role's certificate renewal.

Every metric name an alert rule or a dashboard query uses must be one a CoordinatorMetrics
registry exports once it has seen a version, an evaluation, a federated evaluation, per-agent
messages and TLS files (sample names, so `_total`, `_bucket`, `_sum`, `_count` included), or
Prometheus' own `up`. With `promtool` installed (Debian: `apt-get install prometheus`; CI does)
the files are checked by it too: `check config`, `check rules`, the rules' unit tests
(monitoring/fleetfl-alerts.test.yml) and the dashboard's queries as recording rules.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_fleet import ANSIBLE, _ansible_tool, _env, recap

from fleetfl.coordinator.metrics import CoordinatorMetrics
from fleetfl.shared.core.messages import Kind

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
ALERTS = MONITORING / "fleetfl-alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS = MONITORING / "prometheus.yml"
JOB = "fleetfl-coordinator"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")


# -- the coordinator's names ------------------------------------------------------------------

def make_cert(path: Path, days: float, cn: str = "coordinator") -> dt.datetime:
    """A self-signed EC certificate valid for `days` from now, written as PEM; its notAfter."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    with open(path, "ab") as f:  # appending: a second call makes a bundle
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return not_after


def samples(metrics: CoordinatorMetrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(metrics.registry)
                                                         .decode())
            for s in family.samples}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """The sample names of a coordinator's registry that has seen everything it reports."""
    tmp = tmp_path_factory.mktemp("names")
    make_cert(tmp / "coordinator.crt", 30)
    make_cert(tmp / "ca.crt", 3650)
    m = CoordinatorMetrics(lambda: 2, {"run": "r", "algo": "dga", "aggregate": "mean"},
                           lambda: [("pi01", True), ("pi02", False)])
    m.certificates(str(tmp / "coordinator.crt"), str(tmp / "ca.crt"))
    m.received(Kind.HELLO, 50, "pi01")
    m.received(Kind.UPDATE, 100, "pi01", base_version=0, step_seconds=0.02)
    m.received(Kind.HELLO, 40, "pi02")
    m.refused("bad_signature", 10)
    m.published(Kind.AVG, 40)
    m.record({"version": 1, "time": 1.0, "contributors": ["pi01"], "staleness": {"pi01": 0},
              "accuracy": None, "loss": None})
    m.record({"version": 2, "time": 2.0, "contributors": ["pi01"], "staleness": {"pi01": 1},
              "accuracy": 0.5, "loss": 0.7})
    m.evaluated(0.6, 0.8)
    m.evaluated_federated(0.5, 0.75, 300)
    return {name for name, _ in samples(m)}


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                   "unless", "bool", "offset", "inf", "nan"}


def promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana's $variables allowed) selects: its
    identifiers other than functions (followed by "("), keywords, label names (in {...} and in
    by/without/on/ignoring/group_x lists), strings and durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors, [5m], [$__rate_interval]
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][\w:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match[0].lower() in PROMQL_KEYWORDS:
            continue
        names.add(match[0])
    return names


def test_promql_names_finds_metrics_not_functions_labels_or_durations():
    assert promql_names('sum by (job, reason) (rate(fleetfl_messages_rejected_total'
                        '{reason=~"bad_.*", instance="$instance"}[$__rate_interval])) > 0.1') \
        == {"fleetfl_messages_rejected_total"}
    assert promql_names("changes(fleetfl_version[15m]) == 0 and fleetfl_agents_online > 0 and "
                        "time() - process_start_time_seconds offset 5m > 9e2") \
        == {"fleetfl_version", "fleetfl_agents_online", "process_start_time_seconds"}
    assert promql_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / on (x) "
                        "group_left (y) b_count") == {"a_bucket", "b_count"}
    assert promql_names("fleetfl_tls_certificate_expiry_timestamp_seconds - time() "
                        "< 14 * 86400") == {"fleetfl_tls_certificate_expiry_timestamp_seconds"}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables' metric
    selectors (label_values(<selector>, <label>))."""
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert match, var
            queries.append(match[1])
    return queries


def test_rules_and_dashboard_use_only_what_the_coordinator_exports(exported):
    allowed = exported | {"up"}  # up: Prometheus' own series per target
    used_by_rules = {r["alert"]: promql_names(r["expr"]) for r in rules()}
    for alert, names in used_by_rules.items():
        assert names and names <= allowed, (alert, names - allowed)
    for query in dashboard_queries():
        names = promql_names(query)
        assert names and names <= allowed, (query, names - allowed)
    # what the issue asks for is there (and the check above is not vacuous)
    assert set(used_by_rules) == {"FleetflCoordinatorDown", "FleetflAgentOffline",
                                  "FleetflNoNewVersion", "FleetflRefusalsRising",
                                  "FleetflCertificateExpiresSoon"}
    on_board = set().union(*map(promql_names, dashboard_queries()))
    assert on_board >= {
        "fleetfl_version", "fleetfl_updates_accepted_total", "fleetfl_updates_averaged_total",
        "fleetfl_eval_accuracy", "fleetfl_federated_accuracy", "fleetfl_agents_online",
        "fleetfl_messages_rejected_total", "fleetfl_bytes_total",
        "fleetfl_round_seconds_bucket", "fleetfl_update_staleness_bucket",
        "fleetfl_agent_last_seen_seconds", "fleetfl_agent_staleness",
        "fleetfl_tls_certificate_expiry_timestamp_seconds", "process_resident_memory_bytes"}


def test_files_parse_and_hang_together():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [ALERTS.name]
    assert [job["job_name"] for job in config["scrape_configs"]] == [JOB]
    down = next(r for r in rules() if r["alert"] == "FleetflCoordinatorDown")
    assert f'job="{JOB}"' in down["expr"]  # the alert selects the scrape job by its name
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"], rule
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"]
    cells: set[tuple[int, int]] = set()  # panels do not overlap on Grafana's 24-column grid
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"]), p["title"]
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}


# -- promtool ---------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = MONITORING) -> str:
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_promtool
def test_promtool_checks_config_rules_and_the_rules_unit_tests():
    assert "SUCCESS" in promtool("check", "config", PROMETHEUS.name)  # and the rule file
    assert "5 rules found" in promtool("check", "rules", ALERTS.name)
    assert "SUCCESS" in promtool("test", "rules", "fleetfl-alerts.test.yml")


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query, Grafana's variables replaced by values, as a recording rule."""
    def concrete(query: str) -> str:
        return query.replace("$__rate_interval", "1m").replace("$instance", "server:9188")
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query{i}",
                                             "expr": concrete(q)}
                                            for i, q in enumerate(dashboard_queries())]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [group]}))
    out = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert f"{len(group['rules'])} rules found" in out


# -- the certificate expiry metric ------------------------------------------------------------

def test_certificate_expiry_is_exported_per_file(tmp_path):
    cert, bundle = tmp_path / "coordinator.crt", tmp_path / "ca.crt"
    not_after = make_cert(cert, 20)
    later = make_cert(bundle, 3650, "ca one")
    earlier = make_cert(bundle, 100, "ca two")  # a bundle: its earliest expiry
    (tmp_path / "broken.crt").write_text("not a certificate\n")
    m = CoordinatorMetrics(lambda: 0, {"run": "r"})
    m.certificates(str(cert), str(bundle), "", str(tmp_path / "broken.crt"),
                   str(tmp_path / "missing.crt"))
    got = {dict(labels)["file"]: value for (name, labels), value in samples(m).items()
           if name == "fleetfl_tls_certificate_expiry_timestamp_seconds"}
    assert got == {str(cert): not_after.timestamp(), str(bundle): earlier.timestamp()}
    assert earlier < later
    plain = CoordinatorMetrics(lambda: 0, {"run": "r"})  # no TLS: no series, no HELP/TYPE
    plain.certificates("", "")
    assert b"fleetfl_tls_certificate" not in generate_latest(plain.registry)


# -- the playbook ------------------------------------------------------------------------------

def run_play(tmp_path: Path, name: str, play: list[dict]) -> dict:
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    proc = subprocess.run([_ansible_tool("ansible-playbook"), "-i", "localhost,",
                           str(tmp_path / f"{name}.yml")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return recap(proc.stdout)["localhost"]


def test_playbook_provisions_prometheus_files_when_asked(tmp_path):
    """roles/coordinator/tasks/monitoring.yml writes the rules and a scrape configuration of
    this coordinator into fleet_prometheus_dir, and the coordinator's config gets
    metrics_port; with fleet_monitoring false (the default) it has none."""
    coordinator = ANSIBLE / "roles" / "coordinator"
    config = {"src": str(coordinator / "templates" / "coordinator.yaml.j2"), "mode": "0644"}
    here = {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "fleet_root": str(tmp_path), "fleet_broker_url": "mqtt://server:8883",
            "fleet_monitoring_src": str(MONITORING),
            "fleet_coordinator_settings": {"min_agents": 2}}
    (tmp_path / "here.yml").write_text(yaml.safe_dump(here))
    play = [{"name": "Monitoring files", "hosts": "localhost", "connection": "local",
             "gather_facts": False,  # the last of vars_files wins (play vars would lose)
             "vars_files": [str(ANSIBLE / "roles" / "common" / "defaults" / "main.yml"),
                            str(coordinator / "defaults" / "main.yml"),
                            str(tmp_path / "here.yml")],
             "tasks": [
                 {"name": "Monitoring", "ansible.builtin.import_role":
                  {"name": "coordinator", "tasks_from": "monitoring"}},
                 {"name": "Config with monitoring", "ansible.builtin.template":
                  dict(config, dest=str(tmp_path / "on.yaml")),
                  "vars": {"fleet_monitoring": True}},
                 {"name": "Config without", "ansible.builtin.template":
                  dict(config, dest=str(tmp_path / "off.yaml"))}]}]
    assert run_play(tmp_path, "monitoring", play)["failed"] == 0
    folder = tmp_path / "etc" / "prometheus" / "fleetfl"
    assert (folder / "fleetfl-alerts.yml").read_bytes() == ALERTS.read_bytes()
    rendered = yaml.safe_load((folder / "prometheus.yml").read_text())
    assert rendered["rule_files"] == [str(folder / "fleetfl-alerts.yml")]
    assert rendered["scrape_configs"] == [{"job_name": JOB, "static_configs":
                                           [{"targets": ["localhost:9188"]}]}]
    assert yaml.safe_load((tmp_path / "on.yaml").read_text())["metrics_port"] == 9188
    assert "metrics_port" not in yaml.safe_load((tmp_path / "off.yaml").read_text())
    if PROMTOOL:
        assert "SUCCESS" in promtool("check", "config", str(folder / "prometheus.yml"))
    again = run_play(tmp_path, "monitoring", play)
    assert again["changed"] == 0, again


@pytest.mark.slow  # four applies: about 25 s
def test_certificates_due_for_renewal_are_issued_again(tmp_path):
    """roles/common/tasks/cert.yml: a certificate that expires within fleet_cert_renew_days is
    issued again by the next apply (new key), installed, and its service restarted (the
    handler); one that does not is left alone; fleet_cert_renew_days 0 never renews."""
    if os.geteuid() != 0:
        pytest.skip("the role installs the certificate as root")
    secrets, host = tmp_path / "secrets", tmp_path / "host"
    (secrets / "tls").mkdir(parents=True)
    host.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                    str(secrets / "tls/ca.key"), "-out", str(secrets / "tls/ca.crt"), "-days",
                    "30", "-subj", "/CN=test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)
    group = grp.getgrgid(os.getgid()).gr_name

    def apply(days: int, renew_days: int) -> tuple[dict, x509.Certificate]:
        play = [{"name": "A certificate", "hosts": "localhost", "connection": "local",
                 "gather_facts": False,
                 "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
                          "fleet_secrets_dir": str(secrets), "fleet_cert_days": days,
                          "fleet_cert_renew_days": renew_days, "fleet_cert_id": "agent-pi01",
                          "fleet_cert_cn": "pi01", "fleet_cert_sans": ["DNS:pi01"],
                          "fleet_cert_usage": "clientAuth",
                          "fleet_cert_dest": str(host / "agent-pi01"),
                          "fleet_cert_group": group,
                          "fleet_cert_notify": ["fleet service changed"]},
                 "tasks": [{"name": "Certificate", "ansible.builtin.import_role":
                            {"name": "common", "tasks_from": "cert"}}],
                 "handlers": [{"name": "Restart", "ansible.builtin.copy":
                               {"content": f"{days}\n", "dest": str(tmp_path / "restarted"),
                                "mode": "0644"},
                               "listen": "fleet service changed"}]}]
        result = run_play(tmp_path, "cert", play)
        cert = x509.load_pem_x509_certificate((host / "agent-pi01.crt").read_bytes())
        return result, cert

    _, short = apply(days=5, renew_days=0)  # issued; renewal off
    assert (tmp_path / "restarted").read_text() == "5\n"  # the handler: copied to the host
    result, same = apply(days=825, renew_days=0)
    assert same.serial_number == short.serial_number and result["changed"] == 0
    result, renewed = apply(days=825, renew_days=30)  # 5 days left < 30: issued again
    assert renewed.serial_number != short.serial_number and result["changed"] > 0
    assert (tmp_path / "restarted").read_text() == "825\n"
    left = renewed.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=824) < left <= dt.timedelta(days=825)
    key = serialization.load_pem_private_key((host / "agent-pi01.key").read_bytes(), None)
    assert key.public_key() == renewed.public_key()  # a new key with it
    result, kept = apply(days=825, renew_days=30)
    assert kept.serial_number == renewed.serial_number and result["changed"] == 0
