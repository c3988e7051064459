"""Every command the wandb sweep files generate parses with the scripts' own command lines."""

import functools
import importlib
import itertools
from pathlib import Path

import pytest
import tyro
import yaml

import plumbing

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def sweep_commands(spec: dict) -> list[list[str]]:
    """The argument lists of a grid sweep, as wandb's ${args_no_boolean_flags} writes them."""
    names = list(spec["parameters"])
    choices = [p["values"] if "values" in p else [p["value"]] for p in spec["parameters"].values()]
    commands = []
    for combination in itertools.product(*choices):
        argv = []
        for name, value in zip(names, combination):
            if value is True:
                argv.append(f"--{name}")
            elif value is not False:
                argv.append(f"--{name}={value}")
        commands.append(argv)
    return commands


def test_there_are_sweeps_for_both_tables():
    assert {path.stem for path in SWEEPS} >= {"table1_cql", "table1_off2on", "table1_upq", "table2_beta"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_generated_command_parses(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "grid" and "${args_no_boolean_flags}" in spec["command"]
    module = importlib.import_module(Path(spec["program"]).stem)
    commands = sweep_commands(spec)
    assert len(commands) >= 9  # at least the paper's nine tasks
    parse = functools.partial(tyro.cli, tyro.conf.OmitArgPrefixes[module.Args])  # as the scripts parse
    parsed = [parse(args=argv) for argv in commands]
    for args in parsed:
        assert plumbing.D4RL_NAME.match(args.run.env), args.run.env
        assert args.common.track
    if path.stem == "table2_beta":
        assert {args.algorithm.beta for args in parsed} == {0.1, 0.01, 0.001, 0.0001}
    if hasattr(module, "run_name"):  # fine-tuning: every run of the sweep gets folders of its own by default
        names = {(module.run_name(args.algorithm, args.run, args.run.env), args.run.seed) for args in parsed}
        assert len(names) == len(commands)
