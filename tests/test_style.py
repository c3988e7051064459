"""Style the tools check: ruff (pyflakes, pycodestyle, import order; pyproject.toml) over the whole tree, lines at
most 120 columns."""

import subprocess
import sys

from conftest import REPO


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
