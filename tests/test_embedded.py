"""The embedded default starts its daemons as a host runs them: from bytecode."""

from __future__ import annotations

import os
import subprocess
import sys

from devkit import embedded
from devkit.azurite import ROOT

# Counts the sources of Ferry's own packages that the interpreter compiles while it imports
# a daemon's entry point (the "compile" audit event fires for each source compiled).
PROBE = """
import sys
root, compiled = sys.argv[1], []
def hook(event, args):
    if event == "compile" and isinstance(args[1], str) and args[1].startswith(root):
        compiled.append(args[1])
sys.addaudithook(hook)
import agent.main, processserver.main, mastertarget.main
print(len(compiled))
"""


def test_daemons_start_from_bytecode_where_none_can_be_written():
    # Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE, as on this project's CI
    # machine, or a read-only checkout) a daemon would compile its sources at every start:
    # 0.07 CPU s of the agent's start, before its first read.
    embedded.compile_daemons.cache_clear()
    embedded.compile_daemons()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT) + os.sep], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["0"], out.stderr
