"""Work the agent does on a clock of its own: app-consistent tags and verifies every N seconds.

The schedule lives at the agent, not at the configuration server: the agent
owns the freeze, the hooks and the read passes these need, and a point
taken on its own clock arrives on time whether or not the control plane is
reachable, in server mode and in settings-file mode alike (docs/design.md,
"Scheduled points and verifies").  An interval of 0 turns the work off.
"""

from __future__ import annotations

import logging

from agent.tracker import mono

log = logging.getLogger("ferry.agent")


class Every:
    """Something due every ``interval`` seconds (0: never), first one interval after start."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = mono()

    def due(self) -> bool:
        """True once ``interval`` seconds passed since the last :meth:`done` (or the start)."""
        return self.interval > 0 and mono() - self.last >= self.interval

    def done(self) -> None:
        """The work was done (or tried): the next is due one interval from now."""
        self.last = mono()
