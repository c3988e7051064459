"""results/convert_set.py turns a CQL set of the older per-agent layout into the one checkpoint.pt; results/evidence/
final_eval.py scores fine-tuned runs as they evaluate themselves."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import cql_pretrain as cql
import plumbing
from conftest import REPO, assert_refused, read_rows


def load_module(name: str, folder: str):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


convert_set, final_eval = load_module("convert_set", "results"), load_module("final_eval", "results/evidence")
ROWS = {"actor": 1, "critic": 2, "target_critic": 2, "log_alpha": 1, "log_alpha_prime": 1,  # each agent's rows
        "alpha": 1, "alpha_prime": 1}


def write_old_set(state: dict, folder, weights_only: bool = False) -> None:
    """The older layout, as cql_pretrain.py saved it before d784d18: manifest.json and agent_k.pt, agent k holding its
    rows of every network, temperature and Adam moment (step counts and param_groups whole), its generator state and
    the meta with its own agent, seed and score."""
    meta, n = state["meta"], state["meta"]["num_agents"]

    def rows(value, k: int, name: str):
        if isinstance(value, dict):
            return {key: rows(entry, k, name) for key, entry in value.items()}
        if isinstance(value, torch.Tensor) and value.dim():
            return value[k * ROWS[name]: (k + 1) * ROWS[name]].clone()
        return value

    folder.mkdir()
    for k in range(n):
        agent = {name: rows(state[name], k, name) for name in ROWS if state.get(name) is not None}
        if not weights_only:
            agent["optimizers"] = {name: rows(opt, k, name) for name, opt in state["optimizers"].items()}
            agent["generator_state"] = state["generators"][k]
        agent["meta"] = {**{key: value for key, value in meta.items() if key != "seeds"}, "format": "upq-cql-agent-v2",
                         "agent": k, "seed": meta["seeds"][k], "grad_steps": meta["step"],
                         "normalized_score": meta["normalized_scores"] and meta["normalized_scores"][k]}
        torch.save(agent, folder / f"agent_{k}.pt")
    (folder / "manifest.json").write_text(json.dumps(
        {"format": "upq-checkpoint-set-v1", "script": "cql_pretrain", "run_id": meta["run_id"], "step": meta["step"],
         "run_dir": meta["run_dir"], **({"weights_only": True} if weights_only else {}),
         "files": [f"agent_{k}.pt" for k in range(n)]}))


@pytest.fixture
def saved(tiny_cql_checkpoints) -> dict:
    """The checkpoint of three tiny CQL agents as cql_pretrain.py wrote it, without its digest."""
    state = torch.load(tiny_cql_checkpoints / cql.CHECKPOINT, weights_only=True)
    del state["sha256"]
    return state


@pytest.mark.parametrize("lagrange", [False, True], ids=["fixed-alpha-prime", "lagrange"])
def test_convert_joins_the_agents_back_into_the_checkpoint_they_were_cut_from(saved, tmp_path, lagrange):
    if lagrange:  # the older set of a --lagrange-threshold run also held each agent's log alpha' and its Adam moments
        saved["log_alpha_prime"] = torch.randn(3)
        saved["optimizers"]["alpha_prime"] = {"state": {0: {"step": torch.tensor(50.0), "exp_avg": torch.randn(3),
                                                            "exp_avg_sq": torch.rand(3)}},
                                              "param_groups": saved["optimizers"]["alpha"]["param_groups"]}
    write_old_set(saved, tmp_path / "old")
    convert_set.convert(tmp_path / "old", tmp_path / "new")
    converted = plumbing.load_checkpoint(tmp_path / "new", (cql.CQL_FORMAT,))  # (its digest checked)
    assert converted["meta"] == saved["meta"]
    assert torch.equal(converted["critic"]["net.0.weight"][3], saved["critic"]["net.0.weight"][3])  # agent 1's 2nd
    assert plumbing.digest(converted) == plumbing.digest(saved)  # every key, value and tensor byte: the same checkpoint

    # a full set without what only resuming needs, and an older weights-only set, give the same weights-only file
    convert_set.convert(tmp_path / "old", tmp_path / "new_weights", weights_only=True)
    write_old_set(saved, tmp_path / "old_weights", weights_only=True)
    convert_set.convert(tmp_path / "old_weights", tmp_path / "new_from_weights")
    weights = {key: value for key, value in saved.items() if key not in ("optimizers", "generators")}
    # ... and so does the checkpoint.pt of the current layout, stripped (its meta and weights byte for byte)
    convert_set.convert(tmp_path / "new", tmp_path / "stripped", weights_only=True)
    convert_set.convert(tmp_path / "new" / cql.CHECKPOINT, tmp_path / "stripped_file", weights_only=True)  # the file
    for folder in ("new_weights", "new_from_weights", "stripped", "stripped_file"):
        loaded = plumbing.load_checkpoint(tmp_path / folder, (cql.CQL_FORMAT,))
        assert plumbing.digest(loaded) == plumbing.digest(weights)
    with pytest.raises(SystemExit, match="has the current layout already; --weights-only strips it"):
        convert_set.convert(tmp_path / "new", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_converted_weights_only_checkpoint_cannot_be_resumed_and_convert_refuses(run_script, saved, tiny_hopper_hdf5,
                                                                                 tmp_path):
    write_old_set(saved, tmp_path / "old")
    result = run_script("results/convert_set.py", tmp_path / "old", tmp_path / "new", "--weights-only")
    assert result.returncode == 0 and "without Adam moments" in result.stdout, result.stderr
    written = (tmp_path / "new" / cql.CHECKPOINT).read_bytes()
    # CQL cannot continue it (no Adam moments, no random streams) and says so; the file is untouched
    assert_refused(run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, "--num-agents", "3", "--total-steps",
                              "60", "--hidden-sizes", "32", "32", "--save-dir", tmp_path / "new", "--run-dir",
                              tmp_path / "cql_run", "--resume"), "weights only")
    assert_refused(run_script("results/convert_set.py", tmp_path / "old", tmp_path / "new"), "already holds")
    assert (tmp_path / "new" / cql.CHECKPOINT).read_bytes() == written

    for neither in (tmp_path, tmp_path / "missing"):  # a folder of neither layout, and no folder
        with pytest.raises(SystemExit, match="holds neither checkpoint.pt .* nor manifest.json"):
            convert_set.convert(neither, tmp_path / "elsewhere", weights_only=True)
    agent = torch.load(tmp_path / "old" / "agent_1.pt", weights_only=True)
    torch.save({**agent, "meta": {**agent["meta"], "step": 40}}, tmp_path / "old" / "agent_1.pt")
    with pytest.raises(SystemExit, match="not agents 0 to 2 of one run at one step"):
        convert_set.convert(tmp_path / "old", tmp_path / "elsewhere")
    fine_tuned = {**agent, "meta": {**agent["meta"], "format": "upq-finetuned-agent-v2"}}
    torch.save(fine_tuned, tmp_path / "old" / "agent_1.pt")
    with pytest.raises(SystemExit, match="only upq-cql-agent-v2 .CQL. agents convert"):
        convert_set.convert(tmp_path / "old", tmp_path / "elsewhere")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**manifest, "files": ["agent_0.pt", "run_state.pt"]}))
    with pytest.raises(SystemExit, match="only CQL sets"):  # a fine-tuning set of the older layout
        convert_set.convert(tmp_path / "old", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_final_eval_reproduces_each_runs_last_evaluation_and_tabulates_by_method(run_script, tiny_hopper_hdf5,
                                                                                  tiny_cql_checkpoints, tmp_path,
                                                                                  monkeypatch):
    flags = ["--env", tiny_hopper_hdf5, "--checkpoints", tiny_cql_checkpoints, "--steps-per-epoch", "10",
             "--total-steps", "20", "--batch-size", "32", "--eval-episodes", "3", "--seed", "4",
             "--density-ratio-hidden-sizes", "16", "16"]
    for script, extra in (("off2on_finetune.py", []), ("upq_finetune.py", ["--beta", "0.5"])):
        name = script.split("_")[0]
        result = run_script(script, *flags, *extra, "--save-dir", tmp_path / "sets" / name, "--run-dir",
                            tmp_path / f"run_{name}")
        assert result.returncode == 0, result.stderr
    # the runs' own evaluation seeds (--seed + 10,000 + e) and episode count give back their last eval.csv rows
    result = run_script("results/evidence/final_eval.py", "--sets", tmp_path / "sets" / "*", "--episodes", "3",
                        "--eval-seed", "10004", "--csv", tmp_path / "final.csv", "--table", tmp_path / "final.md")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "final.csv")
    assert [(row["method"], row["seed"], row["env_steps"]) for row in rows] == [("Off2OnRL", "4", "20"),
                                                                              ("UPQ beta = 0.5", "4", "20")]
    for row, name in zip(rows, ("off2on", "upq")):
        last = read_rows(tmp_path / f"run_{name}" / "eval.csv")[-1]
        assert (row["return_mean"], row["normalized_mean"]) == (last["return"], last["normalized_score"])
    # a row's spread: the sample std (ddof 1) of the episodes' normalised scores, here 10, 20 and 60 by construction
    low, high = 0.0, 100.0
    monkeypatch.setattr(final_eval, "env_and_references", lambda dataset_id, gym_env: ("Hopper-v5", low, high))
    monkeypatch.setattr(final_eval.ft, "evaluate_ensemble", lambda actor, env_id, episodes, seed, device:
                        torch.tensor([10.0, 20.0, 60.0]).numpy())
    row = final_eval.evaluate_set(tmp_path / "sets" / "upq", 3, 7)
    assert (row["normalized_mean"], row["normalized_std"]) == ("30.000", f"{700 ** 0.5:.3f}")  # sqrt(1400 / 2)
    table = (tmp_path / "final.md").read_text()
    for row in rows:  # one seed each: no spread; standard error = std over the 3 episodes / sqrt(3)
        error = float(row["normalized_std"]) / 3 ** 0.5
        assert f"| {row['method']} | 20 | 4 | {float(row['normalized_mean']):.1f} | {error:.1f} |" in table

    outputs = ["--csv", tmp_path / "other.csv", "--table", tmp_path / "other.md"]
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tiny_cql_checkpoints.parent / "run",
                              *outputs), "holds no checkpoint.pt")
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tiny_cql_checkpoints, *outputs),
                   "is not a upq-finetune-v3 checkpoint")
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tmp_path / "sets" / "*", "--episodes",
                              "0", *outputs), "--episodes must be >= 1")
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tmp_path / "sets" / "*", "--csv",
                              tmp_path / "other.csv"), "give --csv and --table")
    assert not (tmp_path / "other.csv").exists() and not (tmp_path / "other.md").exists()


def test_final_eval_table_is_mean_and_std_over_seeds_and_refuses_mixed_steps():
    def row(method, seed, mean, std, steps=1000):
        return dict(method=method, seed=seed, env_steps=steps, episodes=4, normalized_mean=mean, normalized_std=std)

    table = final_eval.method_table([row("Off2OnRL", 1, 10.0, 4.0), row("UPQ beta = 0.1", 1, 50.0, 2.0),
                                     row("Off2OnRL", 2, 20.0, 6.0)])
    # Off2OnRL: mean 15, std over seeds (ddof 0, as results/plot.py) of 10 and 20 = 5; standard errors 4 / 2 and
    # 6 / 2 (the std over 4 episodes / sqrt 4), mean 2.5
    assert "| Off2OnRL | 1,000 | 1, 2 | 15.0 ± 5.0 | 2.5 |" in table
    assert "| UPQ beta = 0.1 | 1,000 | 1 | 50.0 | 1.0 |" in table  # one seed: no std
    assert table.index("Off2OnRL") < table.index("UPQ")
    with pytest.raises(SystemExit, match="different env steps"):
        final_eval.method_table([row("Off2OnRL", 1, 10.0, 4.0), row("Off2OnRL", 2, 20.0, 6.0, steps=2000)])


def test_final_eval_takes_each_globs_folders_in_numeric_order(tmp_path):
    for name in ("off2on_seed10", "off2on_seed2", "off2on_seed1"):
        (tmp_path / name).mkdir()
    (tmp_path / "off2on_seed3.log").write_text("")  # a file beside the folders is not a set
    folders = final_eval.set_folders([str(tmp_path / "off2on_seed*")])
    assert [folder.name for folder in folders] == ["off2on_seed1", "off2on_seed2", "off2on_seed10"]


def test_run_sh_parses_and_its_inline_python_imports_names_that_exist():
    """STAGE=data once imported read_minari from cql_pretrain.py after it had moved to plumbing.py."""
    script = REPO / "results/evidence/run.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    imports = re.findall(r"^from (\w+) import (\w+)", script.read_text(), re.MULTILINE)
    assert ("plumbing", "read_minari") in imports
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    for name in re.findall(r"\$POLICIES/([\w.-]+)", script.read_text()):  # the committed behaviour policies
        assert (REPO / "results/medium_expert/policies" / name).is_file(), name


def test_run_sh_refuses_an_unknown_kind_before_anything_runs(tmp_path):
    result = subprocess.run(["bash", REPO / "results/evidence/run.sh"], capture_output=True, text=True,
                            env={**os.environ, "KIND": "medium", "STAGE": "analysis", "OUT": str(tmp_path / "out")})
    assert result.returncode == 2
    assert result.stderr == "error: KIND must be medium-replay or medium-expert, not medium\n"
    assert not (tmp_path / "out").exists()


def test_run_sh_analysis_scores_only_the_runs_that_reached_their_last_step(tmp_path):
    """A study stopped part-way: final_eval.py once got every checkpoint and refused the mix of env steps (after the
    figure and stats were written). It now gets the finished runs alone, seed2 before seed10, or none at all."""
    out, ckpt, log = tmp_path / "out", tmp_path / "ckpt", tmp_path / "calls"
    runs = {"off2on_seed1": 3000, "off2on_seed2": 2000, "off2on_seed10": 3000, "upq_beta0.1_seed1": 3000,
            "upq_beta0.01_seed1": 3000}  # each run's last logged env step
    for name, last in runs.items():
        (out / name).mkdir(parents=True)
        (out / name / "eval.csv").write_text("step,return,normalized_score\n" +
                                             "".join(f"{step},1.0,2.0\n" for step in range(0, last + 1, 1000)))
        if name != "upq_beta0.1_seed1":  # the one finished run whose checkpoint is not here
            (ckpt / name).mkdir(parents=True)
            (ckpt / name / "checkpoint.pt").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')  # each call's arguments, and no run
    (bin_dir / "python").chmod(0o755)

    def analysis(steps: int) -> tuple[str, list[str]]:
        log.unlink(missing_ok=True)
        result = subprocess.run(["bash", REPO / "results/evidence/run.sh"], capture_output=True, text=True, check=True,
                                env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STAGE": "analysis",
                                     "OUT": str(out), "CKPT": str(ckpt), "STEPS": str(steps),
                                     "PLOT_METHODS": "off2on upq:0.1"})
        return result.stdout, log.read_text().splitlines()

    stdout, calls = analysis(3000)
    assert [call.split()[0] for call in calls] == ["results/plot.py", "results/stats.py",
                                                   "results/evidence/final_eval.py"]
    assert calls[2].split(" --sets ")[1].split() == [str(ckpt / "off2on_seed1"), str(ckpt / "off2on_seed10")]
    stdout, calls = analysis(4000)
    assert [call.split()[0] for call in calls] == ["results/plot.py", "results/stats.py"]
    assert stdout == (f"no checkpoint in {ckpt}/ of a run at env step 4000: {out}/final_eval.csv / .md left as they "
                      f"are\n")
