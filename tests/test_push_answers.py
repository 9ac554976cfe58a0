"""``relayd testkit push`` reports what the relay made of each file: a resend is a ``duplicate``."""

from __future__ import annotations

import json

import pytest

from test_testkit_cli import push, sample


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_a_resend_is_reported_as_duplicate(make_relay, tmp_path, style):
    [package] = sample(tmp_path / "p", "--count", "1", "--seed", "7")
    relay = make_relay()

    first = push(relay, "--style", style, "--json", package)
    again = push(relay, "--style", style, "--json", package)

    assert first.returncode == 0, first.stdout + first.stderr
    assert again.returncode == 0, again.stdout + again.stderr  # a resend is no failure
    assert [r["status"] for r in json.loads(first.stdout)] == ["accepted"]
    assert [r["status"] for r in json.loads(again.stdout)] == ["duplicate"]
    assert "0 accepted, 1 duplicate, 0 refused" in again.stderr
    # The relay agrees: one hand-over, then a resend.
    assert [r["outcome"] for r in relay.ledger_rows("SELECT outcome FROM packages ORDER BY id")] == \
        ["accepted", "duplicate"]


def test_the_text_report_names_a_duplicate(make_relay, tmp_path):
    [package] = sample(tmp_path / "p", "--count", "1", "--seed", "8")
    relay = make_relay()
    assert push(relay, package).returncode == 0
    again = push(relay, package)
    assert again.returncode == 0
    assert again.stdout.split() == ["duplicate", package.name]
