"""relayd.dossiers: the states, their labels and the moves, and that nothing else spells them."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

from relayd import dossiers

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT.parent / "shared" / "seed" / "demarches-en-ligne-ILE-RCO-2012.txt"

#: the moves contract 6 allows, written out here rather than derived from the module under test
ALLOWED = {("transmis", "recu"), ("recu", "clos")}


def test_the_states_are_the_guides_three_in_order() -> None:
    assert dossiers.STATES == ("transmis", "recu", "clos")
    assert dossiers.RETURN_STATES == ("recu", "clos")


def test_each_label_is_the_guides_wording_word_for_word() -> None:
    # The seed lists the three states as « label » : meaning, in the order a dossier takes them.
    quoted = re.findall(r"^- « (Dossier [^»]+?) » :", SEED.read_text(encoding="utf-8"), flags=re.M)
    assert quoted == [dossiers.LABELS[s] for s in dossiers.STATES]


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product([*dossiers.STATES, "perdu", ""], repeat=2)))
def test_only_one_step_forward_is_allowed(current: str, wanted: str) -> None:
    allowed = (current, wanted) in ALLOWED
    assert dossiers.can_move(current, wanted) is allowed
    refusal = dossiers.move_refusal("A-9-X3UGO4V7", current, wanted)
    assert (refusal is None) is allowed
    if refusal is not None:
        assert "A-9-X3UGO4V7" in refusal


def test_a_closed_dossier_says_it_is_closed_and_takes_nothing() -> None:
    assert dossiers.next_state("clos") is None and dossiers.is_final("clos")
    for wanted in dossiers.STATES:
        refusal = dossiers.move_refusal("A-9-X3UGO4V7", "clos", wanted)
        assert refusal is not None and "is closed" in refusal and "Dossier clos" in refusal


def test_a_refused_move_names_the_step_that_is_allowed() -> None:
    refusal = dossiers.move_refusal("A-9-X3UGO4V7", "transmis", "clos")
    assert refusal == ('dossier A-9-X3UGO4V7 is at "Dossier transmis au service traitant"; it can move only to '
                       '"Dossier reçu par le service traitant", not to "Dossier clos".')


def test_clos_before_recu_is_early_not_wrong_and_nothing_else_is() -> None:
    early = {(c, w) for c, w in itertools.product(dossiers.STATES, repeat=2) if dossiers.skips_a_step(c, w)}
    assert early == {("transmis", "clos")}


def test_heading_is_the_queued_state_when_there_is_one() -> None:
    assert dossiers.heading("transmis", None) == "transmis"
    assert dossiers.heading("transmis", "recu") == "recu"
    assert dossiers.is_later("clos", "recu") and not dossiers.is_later("recu", "recu")


def _spelled_states(path: Path) -> list[tuple[int, str]]:
    """String constants in ``path`` that are a state code, or hold one quoted as SQL does."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value
            if value in dossiers.STATES or any(f"'{s}'" in value for s in dossiers.STATES):
                found.append((node.lineno, value[:80]))
    return found


def test_no_module_but_dossiers_spells_a_state() -> None:
    # One owner: a new state, or a changed move, is made in relayd/dossiers.py and nowhere else.
    spelled = {str(p.relative_to(ROOT)): hits for p in sorted((ROOT / "relayd").rglob("*.py"))
               if p.name != "dossiers.py" and (hits := _spelled_states(p))}
    assert spelled == {}
