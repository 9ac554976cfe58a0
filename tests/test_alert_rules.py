"""config/relayd.rules.yml: valid for Prometheus, each alert fires when it should, on metrics relayd really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from conftest import REPO, wait_for

RULES = REPO / "config" / "relayd.rules.yml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; scripts/test installs it (Debian: prometheus)")
    return path


def test_promtool_checks_the_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_each_alert_fires_when_it_should():
    result = subprocess.run([_promtool(), "test", "rules", "relayd.rules.test.yml"], cwd=REPO / "tests",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_use_metrics_relayd_exports(make_relay):
    relay = make_relay(metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": 0}})
    wait_for(lambda: any(e.get("event") == "metrics.listening" for e in relay.events()), what="the metrics endpoint")
    port = next(e["port"] for e in relay.events() if e.get("event") == "metrics.listening")
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", exposition, flags=re.M))
    names = {name for name, _ in exported} | {f"{name}_total" for name, kind in exported if kind == "counter"}
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"RelaydDeadLetters", "RelaydDossiersOverdue", "RelaydDiskLow",
                                           "RelaydHostKeyMismatch", "RelaydOutboxWedged"}
    used = {m for r in rules for m in re.findall(r"\b(relayd_[a-z_]+)", r["expr"])}
    assert used and used <= names, used - names
