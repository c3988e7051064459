"""Style the tools check: ruff (pyflakes, pycodestyle, import order; pyproject.toml) over the whole tree, lines at
most 120 columns, and --help text that tyro shows as written."""

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPTS


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


TOOLS = ("results/plot.py", "results/stats.py", "results/convert_set.py", "results/evidence/final_eval.py",
         "benchmarks/bench_updates.py")


def flag_helps(script: str) -> list[tuple[str, str]]:
    """(field name, docstring) of every dataclass field with a docstring in script: what tyro shows as its --help."""
    tree = ast.parse((REPO / script).read_text())
    return [(field.target.id, doc.value.value)
            for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))
            for field, doc in zip(cls.body, cls.body[1:])
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)]


@pytest.mark.parametrize("script", SCRIPTS + TOOLS)
def test_every_flag_help_breaks_lines_between_clauses(script):
    # tyro (1.0.16) keeps every line break of a flag's docstring in --help: it joins lines only where a line starts
    # with a letter, and looks before removing the class body's indentation. So each line but the last ends a clause
    # (",", ";", ":" or "."), and --help shows "... as Eq. (5) is printed," / "instead of ...", never "... Eq. (6)
    # is" / "printed".
    for name, doc in flag_helps(script):
        for line in doc.splitlines()[:-1]:
            assert line.rstrip().endswith((",", ";", ":", ".")), f"{script}, --{name}: {line!r}"


@pytest.mark.parametrize("script", SCRIPTS + TOOLS)
def test_a_flag_states_its_default_once(script):
    # tyro appends "(default: <the value>)" to every help; a flag whose default is a rule rather than a value (None
    # standing for "the dataset's own env") says the rule in tyro.conf.arg(help_behavior_hint=...), not in its
    # docstring, where tyro would follow it with a contradicting "(default: None)"
    for name, doc in flag_helps(script):
        assert not re.search(r"(^|[(;,]\s*)(default|required)\b", " ".join(doc.split())), f"{script}, --{name}: {doc!r}"
