"""results/evidence/export_agents.py: the agents kept in git are the trained agents without what only resuming needs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_refused, read_rows

spec = importlib.util.spec_from_file_location("export_agents", REPO / "results" / "evidence" / "export_agents.py")
export_agents = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_agents)


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
