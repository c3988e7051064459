"""Style the tools check: ruff (pyflakes, pycodestyle, import order; pyproject.toml) over the whole tree, lines at
most 120 columns, and --help text that tyro shows as written."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPTS


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_help_reads_as_one_paragraph(script):
    # tyro joins a flag docstring's lines with spaces, but keeps the break before a line that does not start with a
    # letter ("(paper: 4)", "5,000 steps"): the --help would show a line cut in the middle of a sentence
    tree = ast.parse((REPO / script).read_text())
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        for field, doc in zip(cls.body, cls.body[1:]):
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                for line in doc.value.value.splitlines()[1:]:
                    assert line.strip()[:1].isalpha(), f"{script}, --{field.target.id}: {line.strip()!r}"
