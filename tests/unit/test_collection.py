"""Every test file runs: a plain `pytest` run collects each tests/**/test_*.py.

pytest silently skips whole folders (its default norecursedirs holds `dist`, `build`, `venv`, ...),
so a folder of multi-rank tests named `dist` once never ran while the suite reported success.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_every_test_file_is_collected():
    files = {str(p.relative_to(REPO_ROOT)) for p in Path(REPO_ROOT, "tests").rglob("test_*.py")}
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            check=False, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert files - collected == set(), "test files a plain `pytest` run does not collect"
    assert "tests/multirank/test_parity.py" in collected  # the layout-parity matrix
