"""Named kill points in the apply path: a test hook for the fault campaign, nothing else.

``FERRY_FAULT_KILL_AT=<step>:<n>`` in the master target's environment makes
it SIGKILL itself the ``n``-th time it reaches ``step`` (``n`` defaults to 1):
a crash at an exact place in the write and delete ordering (docs/design.md,
"Master target"), where a kill from outside lands wherever the scheduler
puts it.  ``bench/faults.py`` (scenario ``mt-steps``) and the tests use it.

The variable is read once, at import; unset (as deployed), :func:`reached`
is one comparison.  Each call site in ``mastertarget.worker`` is one line,
so the hooks stay out of the way of whoever edits the apply path.
"""

from __future__ import annotations

import os
import signal

ENV = "FERRY_FAULT_KILL_AT"
"""The environment variable naming the step and the how-manieth time to die there."""

STEPS = (
    "staged",  # a segment staged (fsync'ed), its notice not yet deleted
    "marked",  # applying.json written, before the first write of a group
    "written",  # one batch of a group written to the target, not fsync'ed
    "synced",  # the target fsync'ed, the cursor not yet saved
    "cursor",  # the cursor saved, nothing of the group deleted yet
    "blob-deleted",  # a passed segment's blob deleted, its staged file not yet
    "discarded",  # every passed blob and staged file deleted, applying.json still there
)
"""The named steps, in the order one segment meets them."""


def _parse(text: str) -> tuple[str, int]:
    step, _, count = text.partition(":")
    if step not in STEPS or not (count or "1").isdigit():
        raise SystemExit(f"master-target: error: {ENV}={text!r}: want <step>:<n>, step one of "
                         f"{', '.join(STEPS)}")  # fmt: skip
    return step, int(count or 1)


_STEP, _LEFT = _parse(os.environ[ENV]) if os.environ.get(ENV) else ("", 0)


def reached(step: str) -> None:
    """Die here (SIGKILL, no clean-up at all) if this is the step and the time named."""
    global _LEFT
    if step != _STEP:
        return
    _LEFT -= 1
    if _LEFT <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
