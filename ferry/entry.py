"""The installed commands (``ferry``, ``ferry-agent``, ...): each part's ``main``, or one line.

Each part is an extra of the package (pyproject.toml): a source server installs
``ferry[agent]``, not the process server's storage SDKs. A bare ``pip install
ferry`` still installs every command, so each command imports its part here
and, when a library of that part is missing, says which extra to install
instead of a traceback. The part is imported by name only when the command
runs: ``import ferry`` loads no component.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from ferry.errors import Exit

OURS = {"ferry", "ferrycli", "agent", "processserver", "mastertarget"}
"""Ferry's own packages: one of these missing is a broken install, not a missing extra."""


def _run(command: str, module: str, extra: str) -> int:
    try:
        main: Callable[[], int] = importlib.import_module(module).main
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] in OURS:
            raise
        print(
            f"{command}: this install lacks {missing.name!r}, which the command needs: "
            f"install its part, pip install 'ferry[{extra}]' (pinned: -c requirements/{extra}.txt)",
            file=sys.stderr,
        )
        return Exit.PART_MISSING
    return main()


def ferry() -> int:
    return _run("ferry", "ferrycli.main", "cli")


def agent() -> int:
    return _run("ferry-agent", "agent.main", "agent")


def process_server() -> int:
    return _run("ferry-process-server", "processserver.main", "process-server")


def master_target() -> int:
    return _run("ferry-master-target", "mastertarget.main", "master-target")
