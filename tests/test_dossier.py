"""`relayd dossier`: one dossier's story, checked against what the platform simulator received."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paramiko

from conftest import REAL_PACKAGE, wait_for

NUMERO = "A-9-X3UGO4V7"


def _push(sftp: dict, name: str) -> None:
    transport = paramiko.Transport((sftp["host"], sftp["port"]))
    try:
        transport.connect(username=sftp["username"], password=sftp["password"])
        client = paramiko.SFTPClient.from_transport(transport)
        client.put(str(REAL_PACKAGE), name)
    finally:
        transport.close()


def _relayd(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", *args[:1], "-c", config, *args[1:]],
                          capture_output=True, text=True, timeout=60)


def test_dossier_tells_the_story_the_platform_saw(demo):
    config, received = demo.info["config"], Path(demo.info["platform"]["received"])
    _push(demo.info["sftp"], "first.zip")
    wait_for(lambda: any(".AVL." in p.name for p in received.iterdir()), what="the ack at the platform")
    _push(demo.info["sftp"], "again.zip")  # the same bytes again: a duplicate, acked again
    result = _relayd(config, "return", NUMERO, "--state", "recu", "--comment", "Pris en charge")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: any(".Retour." in p.name for p in received.iterdir()), what="the reçu at the platform")
    wait_for(lambda: sum(".AVL." in p.name for p in received.iterdir()) == 2, what="the second ack")

    result = _relayd(config, "dossier", NUMERO, "--json")
    assert result.returncode == 0, result.stderr
    story = json.loads(result.stdout)
    assert [p["outcome"] for p in story["packages"]] == ["accepted", "duplicate"]
    assert [p["upload_name"] for p in story["packages"]] == ["first.zip", "again.zip"]
    replies = story["replies"]
    assert sorted((r["kind"], r["state"], r["status"]) for r in replies) == [
        ("AVL", None, "delivered"), ("AVL", None, "delivered"), ("Retour", "recu", "delivered")]
    assert all(r["queued_at"] and r["delivered_at"] for r in replies)
    # What the ledger says was delivered is what the platform holds, name for name.
    assert {r["remote_name"] for r in replies} == {p.name for p in received.iterdir() if not p.name.startswith(".")}
    dossier = story["dossier"]
    assert dossier["state"] == "recu" and dossier["demarche"] == "DAUA" and dossier["insee"] == "90017"
    assert 29.9 < dossier["days_left"] <= 30

    text = _relayd(config, "dossier", NUMERO)
    assert text.returncode == 0
    assert "state: recu (Dossier reçu par le service traitant)" in text.stdout
    assert "days left before the limit" in text.stdout
    assert "accepted" in text.stdout and "duplicate" in text.stdout and "Retour recu" in text.stdout

    unknown = _relayd(config, "dossier", "A-9-NOSUCH00")
    assert unknown.returncode == 1 and "no dossier A-9-NOSUCH00" in unknown.stderr

    # outbox list --all shows when each entry was queued and delivered.
    listing = subprocess.run([sys.executable, "-m", "relayd", "outbox", "list", "--all", "-c", config],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "queued (UTC)" in listing.stdout
    assert listing.stdout.count(dossier["received_at"][:10]) >= 6  # a queued and a delivered time per entry
