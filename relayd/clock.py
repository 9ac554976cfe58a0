"""The time, as relayd reads it: one seam so that tests and `relayd status --now` can move it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """The system clock, in UTC. ``offset`` moves it (tests: "31 days later")."""

    def __init__(self, offset: timedelta = timedelta(0)):
        self.offset = offset

    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        return datetime.now(UTC) + self.offset

    @classmethod
    def at(cls, moment: datetime) -> Clock:
        """A clock that reads ``moment`` now and runs on from there."""
        if moment.tzinfo is None:
            moment = moment.astimezone()  # a naive time is the operator's local time
        return cls(moment - datetime.now(UTC))


SYSTEM_CLOCK = Clock()
