"""Assemble the folder that is deployed to Azure Functions.

    python -m functions.package build/functionapp

The Functions host indexes ``function_app.py`` at the root of the deployed
folder, next to ``host.json`` and ``requirements.txt``.  The app's modules
import ``functions.*`` and ``ferry.*`` as packages, so the folder holds::

    host.json  requirements.txt  function_app.py   (copied from functions/)
    functions/                                      (this package)
    ferry/                                          (the shared library)

Publish it with ``func azure functionapp publish <app> --python`` from inside
the folder, or zip it for ``az functionapp deployment source config-zip``
(remote build installs ``requirements.txt``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ferry.errors import UsageError
from ferry.process import run_main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROOT_FILES = ("host.json", "requirements.txt", "function_app.py")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "local.settings.json", "local.py")


def assemble(out: Path) -> Path:
    """Write the deployment folder at ``out`` (replacing it) and return it."""
    if out.resolve() in (ROOT, HERE) or ROOT.is_relative_to(out.resolve()):
        raise UsageError(detail=f"refusing to replace {out}: choose an empty build folder")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ROOT_FILES:
        shutil.copy2(HERE / name, out / name)
    shutil.copytree(HERE, out / "functions", ignore=SKIP)
    shutil.copytree(ROOT / "ferry", out / "ferry", ignore=SKIP)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m functions.package``."""
    parser = argparse.ArgumentParser(prog="python -m functions.package", description=__doc__)
    parser.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    args = parser.parse_args(argv)

    def body() -> int:
        print(assemble(args.out))
        return 0

    return run_main("functions.package", body)


if __name__ == "__main__":
    sys.exit(main())
