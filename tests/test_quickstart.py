"""quickstart.sh runs the scripts with flags that still parse (the scripts change; the quickstart must follow), and
its stages fit together: the dataset it makes is the one CQL and fine-tuning read, fine-tuning reads CQL's agents."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "results"))


def python_commands(script: Path, variables: dict[str, str]) -> list[list[str]]:
    """The `python X.py ...` commands of a shell script, continuation lines joined and $VARIABLES filled in."""
    text = script.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"\bpython (\S+\.py)(.*)", line)
        if not match:
            continue
        arguments = match.group(2).split(">")[0].split("|")[0].split("&")[0]
        arguments = re.sub(r"\$\(\[[^)]*\)", "", arguments)
        for name, value in variables.items():
            arguments = arguments.replace(f"${{{name}}}", value).replace(f"${name}", value)
        commands.append([match.group(1).replace("${method}", variables["method"]), *shlex.split(arguments)])
    return commands


def parse(program: str, argv: list[str]):
    module = __import__(Path(program).stem)
    if program == "make_dataset.py" or program.endswith("plot.py"):
        return tyro.cli(module.Args, args=argv)
    return tyro.cli(tyro.conf.OmitArgPrefixes[module.Args], args=argv)


@pytest.mark.parametrize("method", ["off2on", "upq"])
def test_every_quickstart_command_parses(method):
    variables = {"DATA": "local/quickstart/inverteddoublependulum/medium-replay-v0", "CKPT": "checkpoints/quickstart",
                 "OUT": "runs/quickstart", "seed": "1", "method": method}
    commands = python_commands(REPO / "quickstart.sh", variables)
    programs = [program for program, *_ in commands]
    assert programs == ["make_dataset.py", "cql_pretrain.py", f"{method}_finetune.py", "results/plot.py"]
    parsed = {program: parse(program, argv) for program, *argv in commands}
    cql, finetune = parsed["cql_pretrain.py"], parsed[f"{method}_finetune.py"]
    made = parsed["make_dataset.py"]
    assert cql.run.env == finetune.run.env == made.dataset_id == variables["DATA"]
    assert made.env == "InvertedDoublePendulum-v5" and made.kind == "medium-replay"
    assert finetune.run.checkpoints == cql.run.save_dir
    assert parsed["results/plot.py"].ensemble_level and parsed["results/plot.py"].diagnostics
