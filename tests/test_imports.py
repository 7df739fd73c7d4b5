"""Every module imports on its own in a fresh interpreter: no import cycles, no reliance on another
package having been imported first."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metrics", "probes", "lens")

# One interpreter preloads the third-party packages (slow to import, irrelevant to our cycles), then
# forks a child per module; each child imports that module first, before any other of ours.
FORK_EACH = """
import os, sys, importlib, traceback
import numpy, pandas, torch, transformers, plotly, scipy.stats, pyarrow, pandera.pandas
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException as error:
            print(f"{name}: {type(error).__name__}: {error}", flush=True)
            os._exit(1)
    os.waitpid(pid, 0)
"""


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        # __main__ runs the CLI when imported; it is exercised by the CLI tests instead.
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.") if not m.name.endswith("__main__")]
    return names


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = all_modules()
    assert len(modules) > 30
    result = subprocess.run([sys.executable, "-c", FORK_EACH, *modules], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout


@pytest.mark.parametrize("statement", ["import probes", "import metrics", "import lens; lens.census; lens.show_attention"])
def test_packages_import_alone(statement):
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=ROOT, timeout=300)
