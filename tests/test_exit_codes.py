"""One table of exit codes: every error's code is in it, each code means one thing, and
the operators' copy in docs/design.md says the same."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from ferry.errors import EXIT_CODES, Exit, FerryError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ferry", "ferrycli", "agent", "processserver", "mastertarget", "devkit")


def every_error_class() -> list[type[FerryError]]:
    """Every FerryError subclass defined in Ferry's packages (each module imported)."""
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    found, todo = [], [FerryError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.split(".")[0] in PACKAGES]


def documented() -> dict[int, tuple[str, str, set[str]]]:
    """docs/design.md's table: code -> (name, meaning, the error classes it names)."""
    text = (ROOT / "docs/design.md").read_text()
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            classes = set(re.findall(r"`(\w+)`", cells[3]))
            rows[int(cells[0])] = (cells[1].strip("`"), cells[2], classes)
    return rows


def test_every_error_class_takes_its_code_from_the_table():
    classes = every_error_class()
    assert len(classes) > 30, [c.__name__ for c in classes]
    for cls in classes:
        assert isinstance(cls.exit_code, Exit), f"{cls.__qualname__}: {cls.exit_code!r}"
        assert cls.exit_code in EXIT_CODES, cls


def test_each_code_means_one_thing():
    assert set(EXIT_CODES) == set(Exit), "every named code has a meaning, and only those"
    meanings = list(EXIT_CODES.values())
    assert len(set(meanings)) == len(meanings), "two codes share a meaning"
    # Retry loops and scripts read 75 as "try again": only retryable errors may use it.
    for cls in every_error_class():
        if cls.exit_code == Exit.RETRY_LATER:
            assert cls.retryable, cls


def test_the_operators_table_matches_the_code():
    rows = documented()
    assert sorted(rows) == sorted(int(c) for c in EXIT_CODES)
    raised: dict[int, set[str]] = {}
    for cls in every_error_class():
        raised.setdefault(int(cls.exit_code), set()).add(cls.__name__)
    for code, (name, meaning, classes) in rows.items():
        assert name == Exit(code).name, code
        assert meaning == EXIT_CODES[code], code
        # A new error class with an existing code must be added to that code's row,
        # where a reviewer sees whether it really means the same thing.
        assert classes == raised.get(code, set()), (code, raised.get(code))
