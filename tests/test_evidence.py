"""results/evidence/: export_agents.py keeps the trained agents without what only resuming needs; final_eval.py scores
fine-tuned sets as their runs evaluate them."""

import importlib.util
import json
import sys

import pytest
import torch

from conftest import REPO, assert_refused, read_rows


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "results" / "evidence" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


export_agents, final_eval = load_module("export_agents"), load_module("final_eval")


def test_export_keeps_every_weight_and_fine_tuning_from_it_is_the_same_run(run_script, tiny_hopper_hdf5,
                                                                           tiny_cql_checkpoints, tmp_path):
    exported = tmp_path / "exported"
    export_agents.export(tiny_cql_checkpoints, exported)
    manifest = json.loads((exported / "manifest.json").read_text())
    source_manifest = json.loads((tiny_cql_checkpoints / "manifest.json").read_text())
    assert manifest["weights_only"] is True
    assert (manifest["run_id"], manifest["step"], manifest["files"]) == (source_manifest["run_id"],
                                                                         source_manifest["step"],
                                                                         source_manifest["files"])
    for name in manifest["files"]:
        full = torch.load(tiny_cql_checkpoints / name, weights_only=True)
        kept = torch.load(exported / name, weights_only=True)
        assert sorted(kept) == sorted(set(full) - {"optimizers", "generator_state"})
        assert kept["meta"] == full["meta"]
        for net in ("actor", "critic", "target_critic"):
            assert kept[net].keys() == full[net].keys()
            assert all(torch.equal(kept[net][key], full[net][key]) for key in full[net])
        assert torch.equal(kept["log_alpha"], full["log_alpha"])
        assert (exported / name).stat().st_size < 0.75 * (tiny_cql_checkpoints / name).stat().st_size

    # fine-tuning reads only weights: from the export it is the same run, evaluation for evaluation
    flags = ["--env", tiny_hopper_hdf5, "--steps-per-epoch", "10", "--total-steps", "20", "--batch-size", "32",
             "--eval-episodes", "1", "--density-ratio-hidden-sizes", "16", "16", "--beta", "0.1"]
    for name, agents in (("full", tiny_cql_checkpoints), ("exported", exported)):
        result = run_script("upq_finetune.py", *flags, "--checkpoints", agents, "--save-dir", tmp_path / f"ft_{name}",
                            "--run-dir", tmp_path / f"run_{name}")
        assert result.returncode == 0, result.stderr
    assert read_rows(tmp_path / "run_full" / "eval.csv") == read_rows(tmp_path / "run_exported" / "eval.csv")
    assert len(read_rows(tmp_path / "run_full" / "eval.csv")) == 3
    # and its step-0 score is the one cql_pretrain.py logged for the agents' ensemble (same --seed, same episodes)
    cql_rows = read_rows(tiny_cql_checkpoints.parent / "run" / "eval.csv")
    ensemble = [row for row in cql_rows if row["agent"] == "ensemble" and int(row["step"]) == manifest["step"]]
    assert read_rows(tmp_path / "run_full" / "eval.csv")[0]["return"] == ensemble[0]["return"]

    # CQL cannot continue an export (no Adam moments, no random streams), and says so; the export is untouched
    before = {path.name: path.read_bytes() for path in exported.iterdir()}
    assert_refused(run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, "--num-agents", "3", "--total-steps", "60",
                              "--hidden-sizes", "32", "32", "--save-dir", exported, "--run-dir", tmp_path / "cql_run",
                              "--resume"), "weights only")
    assert {path.name: path.read_bytes() for path in exported.iterdir()} == before


def test_export_refuses_a_folder_that_holds_a_set(tiny_cql_checkpoints):
    before = {path.name: path.read_bytes() for path in tiny_cql_checkpoints.iterdir()}
    with pytest.raises(SystemExit, match="already holds a checkpoint set"):
        export_agents.export(tiny_cql_checkpoints, tiny_cql_checkpoints)
    assert {path.name: path.read_bytes() for path in tiny_cql_checkpoints.iterdir()} == before


def test_final_eval_reproduces_each_runs_last_evaluation_and_tabulates_by_method(run_script, tiny_hopper_hdf5,
                                                                                  tiny_cql_checkpoints, tmp_path):
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
    table = (tmp_path / "final.md").read_text()
    for row in rows:  # one seed each: no spread; standard error = std over the 3 episodes / sqrt(3)
        error = float(row["normalized_std"]) / 3 ** 0.5
        assert f"| {row['method']} | 20 | 4 | {float(row['normalized_mean']):.1f} ± 0.0 | {error:.1f} |" in table

    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tiny_cql_checkpoints.parent / "run"),
                   "holds no checkpoint set")
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tiny_cql_checkpoints),
                   "is not a upq-finetuned-agent-v2 checkpoint")
    assert_refused(run_script("results/evidence/final_eval.py", "--sets", tmp_path / "sets" / "*", "--episodes",
                              "0"), "--episodes must be >= 1")


def test_final_eval_table_is_mean_and_std_over_seeds_and_refuses_mixed_steps():
    def row(method, seed, mean, std, steps=1000):
        return dict(method=method, seed=seed, env_steps=steps, episodes=4, normalized_mean=mean, normalized_std=std)

    table = final_eval.method_table([row("Off2OnRL", 1, 10.0, 4.0), row("UPQ beta = 0.1", 1, 50.0, 2.0),
                                     row("Off2OnRL", 2, 20.0, 6.0)])
    # Off2OnRL: mean 15, std over seeds (ddof 0, as results/plot.py) of 10 and 20 = 5; standard errors 4 / 2 and
    # 6 / 2 (the std over 4 episodes / sqrt 4), mean 2.5
    assert "| Off2OnRL | 1,000 | 1, 2 | 15.0 ± 5.0 | 2.5 |" in table
    assert "| UPQ beta = 0.1 | 1,000 | 1 | 50.0 ± 0.0 | 1.0 |" in table
    assert table.index("Off2OnRL") < table.index("UPQ")
    with pytest.raises(SystemExit, match="different env steps"):
        final_eval.method_table([row("Off2OnRL", 1, 10.0, 4.0), row("Off2OnRL", 2, 20.0, 6.0, steps=2000)])
