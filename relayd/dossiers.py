"""A dossier's states, their labels and the one move each allows (contract 6).

A dossier is ``transmis`` when relayd hands its package to the commune, ``recu`` once the
platform has been told the commune has it, and ``clos`` once the citizen has the answer::

    transmis ──Retour recu──▶ recu ──Retour clos──▶ clos (final)

The state moves when the Retour that carries it is *delivered*; until then the state queued is
the dossier's ``requested_state``. This module is the only place that knows the states, their
order, their labels and the moves: the ledger, the returns, the replies, the deadlines, the
metrics, retention and the CLI ask it.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: any state of a dossier
State = Literal["transmis", "recu", "clos"]
#: the states a Retour can set (``transmis`` is where every dossier starts)
ReturnState = Literal["recu", "clos"]

TRANSMIS: Final = "transmis"
RECU: Final = "recu"
CLOS: Final = "clos"

#: every state, in the order a dossier goes through them
STATES: Final[tuple[State, ...]] = get_args(State)
#: the states a Retour can carry, in order
RETURN_STATES: Final[tuple[ReturnState, ...]] = get_args(ReturnState)

#: each state's label: the platform's exact wording, which a Retour carries beside the code
LABELS: Final[dict[str, str]] = {
    TRANSMIS: "Dossier transmis au service traitant",
    RECU: "Dossier reçu par le service traitant",
    CLOS: "Dossier clos",
}

#: each state as a person writes it, in a table's heading
WORDS: Final[dict[str, str]] = {TRANSMIS: "transmis", RECU: "reçu", CLOS: "clos"}

_NEXT: Final[dict[str, ReturnState]] = {TRANSMIS: RECU, RECU: CLOS}


def label(state: str) -> str:
    """The platform's wording for ``state``; the code itself for a state relayd does not know."""
    return LABELS.get(state, state)


def next_state(state: str) -> ReturnState | None:
    """The one state that ``state`` can move to; None once the dossier is closed."""
    return _NEXT.get(state)


def can_move(current: str, wanted: str) -> bool:
    """Whether a dossier at ``current`` can take ``wanted`` next: one step forward, never back, never past ``clos``."""
    return next_state(current) == wanted


def skips_a_step(current: str, wanted: str) -> bool:
    """Whether ``wanted`` lies two steps ahead of ``current`` (``clos`` asked of a dossier still ``transmis``).

    Such a request is early rather than wrong when the step between is on its way: the
    returns wait for it instead of refusing.
    """
    step = next_state(current)
    return step is not None and next_state(step) == wanted


def is_final(state: str) -> bool:
    """Whether ``state`` takes no further move."""
    return state == CLOS


def is_later(state: str, than: str) -> bool:
    """Whether ``state`` comes after ``than`` in a dossier's life (both known states)."""
    return STATES.index(state) > STATES.index(than)


def heading(state: str, requested_state: str | None) -> str:
    """The state a dossier is headed to: the one queued for the platform if any, else the one it has."""
    return requested_state or state


def move_refusal(numero: str, current: str, wanted: str) -> str | None:
    """Why a dossier at ``current`` cannot take ``wanted``, for a person to read; None when it can."""
    if can_move(current, wanted):
        return None
    if is_final(current):
        return f"dossier {numero} is closed (\"{label(CLOS)}\"); it takes no further state."
    step = next_state(current)
    return (f"dossier {numero} is at \"{label(current)}\"; it can move only to "
            f"\"{label(step) if step else '?'}\", not to \"{label(wanted)}\".")
