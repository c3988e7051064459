"""Runs that cannot be lost or mixed: one checkpoint file renamed into place (a real run killed at every rename,
then resumed), signals from the first instant, one run per folder, checked bytes, a full disk, diverged weights,
unsafe names, and every bad flag or dataset refused in one sentence before anything is written."""

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro

import cql_pretrain as cql
import off2on_finetune as off2on
import plumbing
import upq_finetune as upq
from conftest import REPO, assert_refused, read_rows, rewrite_checkpoint, write_random_hopper_hdf5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CQL_TINY = ["--num-agents", "2", "--hidden-sizes", "8", "8", "--batch-size", "8", "--num-random", "2",
            "--eval-episodes", "1", "--bc-steps", "3", "--log-every", "4", "--eval-every", "4"]
UPQ_TINY = ["--num-agents", "2", "--steps-per-epoch", "10", "--first-epoch-multiplier", "2", "--batch-size", "8",
            "--density-ratio-hidden-sizes", "8", "8", "--eval-episodes", "1", "--beta", "0.1"]


def saved(folder):
    """The checkpoint in `folder`, its digest verified (as the scripts load it)."""
    return plumbing.load_checkpoint(folder, (cql.CQL_FORMAT, upq.FINETUNED_FORMAT))


def files(folder):
    """Every file in `folder` (recursively) and its bytes: what must stay as it was (.lock holds the pid of the
    last run that took the folder)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_same_networks(folder, expected):
    got = saved(folder)
    for net in ("actor", "critic", "target_critic"):
        assert all(torch.equal(got[net][key], value) for key, value in expected[net].items())


# --------------------------------------------------------------------------- a save is one rename
@pytest.mark.parametrize("script, flags, saves", [
    ("cql_pretrain.py", [*CQL_TINY, "--total-steps", "12", "--save-every", "6"], 2),
    ("upq_finetune.py", [*UPQ_TINY, "--total-steps", "20", "--save-every", "1"], 2),
], ids=["cql", "upq"])
def test_a_run_killed_at_every_rename_of_its_saves_resumes_to_the_uninterrupted_run(
        run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path, script, flags, saves):
    """SIGKILL before each rename into --save-dir: the folder holds the previous save (or none), and --resume (or a
    fresh start with --overwrite) ends exactly where the uninterrupted run ends. Fine-tuning collects every epoch
    from a fresh episode seeded by its first env step (Off2OnRL's collector), so its resume is exact too."""
    def args(name):
        agents = ["--checkpoints", tiny_cql_checkpoints] if script == "upq_finetune.py" else []
        return ["--env", tiny_hopper_hdf5, *flags, *agents, "--save-dir", tmp_path / name, "--run-dir",
                tmp_path / f"{name}_run"]

    straight = run_script(script, *args("straight"), kill_at_rename=(tmp_path / "straight", 0))
    assert straight.returncode == 0, straight.stderr
    assert int(re.search(r"renames: (\d+)", straight.stderr).group(1)) == saves  # one per save
    expected_eval, expected = (tmp_path / "straight_run" / "eval.csv").read_text(), saved(tmp_path / "straight")
    for k in range(1, saves + 1):
        killed = run_script(script, *args(f"k{k}"), kill_at_rename=(tmp_path / f"k{k}", k))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        before = files(tmp_path / f"k{k}")
        assert (k > 1) == ("checkpoint.pt" in before)  # the previous save, complete (its digest checked)
        result = run_script(script, *args(f"k{k}"), "--resume" if k > 1 else "--overwrite")
        assert result.returncode == 0, result.stderr  # the dead run's lock does not block
        assert (tmp_path / f"k{k}_run" / "eval.csv").read_text() == expected_eval
        assert_same_networks(tmp_path / f"k{k}", expected)
        assert sorted(files(tmp_path / f"k{k}")) == ["checkpoint.pt"]  # the temporary file renamed too


# --------------------------------------------------------------------------- signals
def handles_sighup(pid: int) -> bool:
    """Whether the process has installed its own handlers (it catches SIGHUP with SIGINT and SIGTERM)."""
    caught = re.search(r"SigCgt:\s*([0-9a-f]+)", open(f"/proc/{pid}/status").read()).group(1)
    return bool(int(caught, 16) >> (signal.SIGHUP - 1) & 1)


def interrupt(script, args, run_dir, marker, signum, script_env, delay=0.5):
    """Start a run, wait for `marker` in its train.log (None: for its signal handlers), wait `delay` seconds more,
    send `signum`; returns (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=script_env, cwd=script_env["CWD"])
    deadline = time.time() + 120
    logs = (run_dir / "train.log", run_dir / "train.log.pending")  # (a fresh run's, until its first save)
    while time.time() < deadline and not (handles_sighup(process.pid) if marker is None else any(
            log.exists() and marker in log.read_text() for log in logs)):
        time.sleep(0.1)
    time.sleep(delay)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "sighup"])
def test_a_signal_during_training_saves_and_the_run_resumes(run_script, script_env, tiny_hopper_hdf5, tmp_path,
                                                            signum):
    args = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    code, stdout, stderr = interrupt("cql_pretrain.py", [*args, "--total-steps", "1000000"], tmp_path / "run",
                                     "eval step 0", signum, script_env)
    assert code == 128 + signum and "Traceback" not in stderr, stderr
    assert f"{signal.Signals(signum).name} at gradient step" in stdout and "--resume" in stdout
    step = saved(tmp_path / "save")["meta"]["step"]
    assert step > 0
    finish = run_script("cql_pretrain.py", *args, "--total-steps", step + 6, "--resume")
    assert finish.returncode == 0, finish.stderr
    rows = read_rows(tmp_path / "run" / "eval.csv")
    assert len(rows) == len({(row["step"], row["agent"]) for row in rows})
    assert int(rows[-1]["step"]) == step + 6
    assert "resumed" in (tmp_path / "run" / "train.log").read_text()  # one console log, appended


def test_sigterm_in_the_middle_of_an_epoch_saves_and_the_resume_trains_the_rest(run_script, script_env,
                                                                                tiny_hopper_hdf5,
                                                                                tiny_cql_checkpoints, tmp_path):
    args = ["--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--total-steps", "20",
            "--first-epoch-multiplier", "100", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    code, stdout, stderr = interrupt("upq_finetune.py", args, tmp_path / "run", "env steps 0:", signal.SIGTERM,
                                     script_env)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert "SIGTERM at env step 10" in stdout
    meta = saved(tmp_path / "save")["meta"]
    assert meta["env_steps"] == 10 and 0 < meta["grad_steps"] < 1000  # (1,000 updates in epoch 0: a few seconds)
    assert [row["step"] for row in read_rows(tmp_path / "run" / "eval.csv")] == ["0"]
    finish = run_script("upq_finetune.py", *args, "--resume")
    assert finish.returncode == 0, finish.stderr
    assert [row["step"] for row in read_rows(tmp_path / "run" / "eval.csv")] == ["0", "10", "20"]
    assert saved(tmp_path / "save")["meta"]["grad_steps"] == 1000 + 10
    straight = run_script("upq_finetune.py", *args[:-4], "--save-dir", tmp_path / "straight", "--run-dir",
                          tmp_path / "straight_run")  # the same run, never stopped: the resume repeats it exactly
    assert straight.returncode == 0, straight.stderr
    assert (tmp_path / "run" / "eval.csv").read_text() == (tmp_path / "straight_run" / "eval.csv").read_text()
    assert_same_networks(tmp_path / "save", saved(tmp_path / "straight"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_before_training_ends_the_run_and_leaves_nothing_that_blocks_its_rerun(
        run_script, script_env, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path, signum):
    """While the data loads and the step-0 evaluation runs (here 300 episodes), a signal ends the run at once."""
    args = ["--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--total-steps", "10",
            "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    code, stdout, stderr = interrupt("upq_finetune.py", [*args, "--eval-episodes", "300"], tmp_path / "run", None,
                                     signum, script_env, delay=1)
    assert code == 128 + signum and "Traceback" not in stderr, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"{signal.Signals(signum).name} before training started: nothing was saved"
    assert not (tmp_path / "save").exists() and not (tmp_path / "run").exists()
    again = run_script("upq_finetune.py", *args)  # the same command, no --overwrite needed
    assert again.returncode == 0, again.stderr


# --------------------------------------------------------------------------- one run per folder
def test_a_second_run_on_a_folder_in_use_is_refused_and_changes_nothing(run_script, script_env, tiny_hopper_hdf5,
                                                                        tmp_path):
    args = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--save-every", "2"]
    first = subprocess.Popen([sys.executable, str(REPO / "cql_pretrain.py"), *map(str, args), "--total-steps",
                              "1000000", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "save" / "checkpoint.pt").exists():
            time.sleep(0.1)
        log = (tmp_path / "run" / "train.log").read_text()
        for flags, flag, folder in ((["--overwrite", "--run-dir", tmp_path / "other"], "--save-dir", "save"),
                                    (["--resume"], "--save-dir", "save"),
                                    (["--save-dir", tmp_path / "other", "--run-dir", tmp_path / "run", "--overwrite"],
                                     "--run-dir", "run")):
            second = run_script("cql_pretrain.py", *args, "--total-steps", "4", *flags,
                                *(["--save-dir", tmp_path / "save"] if folder == "save" else []))
            assert_refused(second, f"{flag} {tmp_path / folder} is in use by another run (process {first.pid})")
        assert (tmp_path / "run" / "train.log").read_text().startswith(log)  # not rewritten by the refused runs
        assert not (tmp_path / "other").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert saved(tmp_path / "save")["meta"]["run_id"] == json.loads((tmp_path / "run" / "config.json").read_text())[
        "run_id"]


@pytest.fixture(scope="module")
def cql_run(run_script, tiny_hopper_hdf5, tmp_path_factory):
    """Three CQL agents saved at step 8 (and their run folder)."""
    root = tmp_path_factory.mktemp("cql_run")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "8",
                        "--num-agents", "3", "--save-dir", root / "save", "--run-dir", root / "run")
    assert result.returncode == 0, result.stderr
    return root


def test_overwrite_and_refusals_never_delete_what_the_run_did_not_write(run_script, cql_run, tiny_hopper_hdf5,
                                                                         tmp_path):
    shutil.copytree(cql_run / "save", tmp_path / "save")
    (tmp_path / "save" / "agent_2.pt").write_bytes(b"a user's own file")
    (tmp_path / "save" / "notes.txt").write_text("mine")
    common = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    before = files(tmp_path / "save")
    for flags, message in ((["--num-agents", "3", "--total-steps", "4", "--resume"], "past --total-steps 4"),
                           (["--total-steps", "12", "--resume"], "holds 3 agents, not --num-agents 2"),
                           (["--total-steps", "4"], "already holds a checkpoint: pass --resume")):
        assert_refused(run_script("cql_pretrain.py", *common, *flags), message)
        assert files(tmp_path / "save") == before
    result = run_script("cql_pretrain.py", *common, "--total-steps", "4", "--overwrite")
    assert result.returncode == 0, result.stderr
    after = files(tmp_path / "save")
    assert {name: after[name] for name in ("agent_2.pt", "notes.txt")} == {"agent_2.pt": b"a user's own file",
                                                                           "notes.txt": b"mine"}
    assert after["checkpoint.pt"] != before["checkpoint.pt"] and saved(tmp_path / "save")["meta"]["num_agents"] == 2
    (tmp_path / "save" / "manifest.json").write_text("{}")  # beside the checkpoint: no longer an old-layout folder
    resumed = run_script("cql_pretrain.py", *common, "--total-steps", "8", "--resume")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("script", ["cql_pretrain.py", "upq_finetune.py"])
def test_resuming_a_finished_run_does_nothing_and_writes_nothing(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints,
                                                                 tmp_path, script):
    flags = (["--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "4"] if script == "cql_pretrain.py" else
             ["--env", tiny_hopper_hdf5, "--checkpoints", tiny_cql_checkpoints, *UPQ_TINY, "--total-steps", "20"])
    folders = ["--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    assert run_script(script, *flags, *folders).returncode == 0
    before = {folder: files(tmp_path / folder) for folder in ("save", "run")}
    result = run_script(script, *flags, *folders, "--resume")
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr
    assert {folder: files(tmp_path / folder) for folder in ("save", "run")} == before  # logs and config.json too


@pytest.mark.parametrize("flags, message", [
    (["--gamma", "0.5"], "--resume: the saved run has --gamma 0.99, this command 0.5; a resumed run keeps every flag"),
    (["--hidden-sizes", "16", "16"], "the saved run has --hidden-sizes [8, 8], this command [16, 16]"),
    (["--seed", "9"], "the saved run has --seed 1, this command 9"),
    (["--env", "other"], "this command "),
])
def test_a_resume_with_flags_that_change_the_numbers_is_refused(run_script, cql_run, tiny_hopper_hdf5, tmp_path,
                                                                  flags, message):
    shutil.copytree(cql_run / "save", tmp_path / "save")
    if flags[0] == "--env":  # the same data under another name: the dataset is a flag of the run too
        flags = ["--env", shutil.copy(tiny_hopper_hdf5, tmp_path / "hopper_copy-v2.hdf5")]
    before = files(tmp_path / "save")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", *flags, "--resume", "--save-dir", tmp_path / "save",
                        "--run-dir", tmp_path / "run")
    assert_refused(result, message)
    assert files(tmp_path / "save") == before


def test_a_finetuning_resume_with_another_beta_or_density_ratio_net_is_refused(run_script, tiny_hopper_hdf5,
                                                                               tiny_cql_checkpoints, tmp_path):
    args = ["--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--save-dir",
            tmp_path / "save", "--run-dir", tmp_path / "run"]
    assert run_script("upq_finetune.py", *args, "--total-steps", "10").returncode == 0
    for flags, message in ((["--beta", "0.5"], "the saved run has --beta 0.1, this command 0.5"),
                           (["--density-ratio-hidden-sizes", "16", "16"],
                            "the saved run has --density-ratio-hidden-sizes [8, 8], this command [16, 16]")):
        assert_refused(run_script("upq_finetune.py", *args, "--total-steps", "20", *flags, "--resume"), message)


def test_upq_runs_of_another_beta_get_default_folders_of_their_own(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints,
                                                                   script_env):
    """A beta sweep (sweeps/table2_beta.yaml) passes no folders: each beta's run saves and logs beside the others."""
    base = Path(script_env["CWD"])
    for beta in ("0.1", "0.01"):
        result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *UPQ_TINY, "--beta", beta, "--checkpoints",
                            tiny_cql_checkpoints, "--total-steps", "10", "--exp-name", "beta-sweep")
        assert result.returncode == 0, result.stderr
    for beta in ("0.1", "0.01"):
        saves = list(base.glob(f"checkpoints/beta-sweep__*__beta{beta}__seed1/checkpoint.pt"))
        logs = list(base.glob(f"runs/beta-sweep__*__beta{beta}__1__*/eval.csv"))
        assert len(saves) == len(logs) == 1
        assert torch.load(saves[0], weights_only=True)["meta"]["args"]["beta"] == float(beta)


def test_a_copied_save_dir_does_not_resume_into_the_original_runs_logs(run_script, cql_run, tiny_hopper_hdf5,
                                                                          tmp_path):
    shutil.copytree(cql_run / "save", tmp_path / "copy")
    logs = files(cql_run / "run")
    common = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3", "--total-steps", "12", "--resume",
              "--save-dir", tmp_path / "copy"]
    assert_refused(run_script("cql_pretrain.py", *common), f"--resume: {tmp_path / 'copy'} holds a copy of the run "
                                                           f"saved in {(cql_run / 'save').resolve()}")
    assert files(cql_run / "run") == logs
    result = run_script("cql_pretrain.py", *common, "--run-dir", tmp_path / "copy_run")
    assert result.returncode == 0, result.stderr
    assert files(cql_run / "run") == logs and saved(tmp_path / "copy")["meta"]["save_dir"] == str(tmp_path / "copy")


def test_a_folder_of_the_older_per_agent_layout_is_refused_naming_the_converter(run_script, tiny_hopper_hdf5,
                                                                                 tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text('{"format": "upq-checkpoint-set-v1", "files": ["agent_0.pt"]}')
    torch.save({"meta": {"format": "upq-cql-agent-v2"}}, tmp_path / "old" / "agent_0.pt")
    before = files(tmp_path / "old")
    result = run_script("off2on_finetune.py", "--env", tiny_hopper_hdf5, "--checkpoints", tmp_path / "old",
                        "--save-dir", tmp_path / "save")
    assert_refused(result, f"{tmp_path / 'old'} holds checkpoints of the older per-agent layout: convert a CQL set "
                           f"with python results/convert_set.py {tmp_path / 'old'} <new folder>; a fine-tuned one "
                           f"continues with the code of commit 53ee51c")
    assert files(tmp_path / "old") == before and not (tmp_path / "save").exists()


def test_resume_cuts_the_logs_back_to_the_checkpoint(run_script, cql_run, tiny_hopper_hdf5, tmp_path):
    """Rows written after the last save (here: forged ones) are dropped before a resumed run appends its own."""
    shutil.copytree(cql_run / "save", tmp_path / "save")
    shutil.copytree(cql_run / "run", tmp_path / "run")
    with open(tmp_path / "run" / "eval.csv", "a") as f:
        f.write("12,0,1.0,1.0\n16,0,1.0,1.0\n2")  # and a row cut in the middle
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save",
                        "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "run" / "eval.csv")
    assert [(row["step"], row["agent"]) for row in rows] == [(s, a) for s in ("0", "4", "8", "12")
                                                             for a in ("0", "1", "2", "ensemble")]
    assert rows[-1]["return"] != "1.0"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resumed"][0]["at_step"] == 8 and config["args"]["total_steps"] == 8


# --------------------------------------------------------------------------- a failed start owns nothing
def kept(folder):
    """The folder's files but those a run writes before it owns them: <name>.pending logs, a checkpoint.pt.tmp."""
    return {name: data for name, data in files(folder).items() if not name.endswith((".pending", ".tmp"))}


@pytest.mark.parametrize("script", ["cql_pretrain.py", "upq_finetune.py"], ids=["cql", "upq"])
@pytest.mark.parametrize("earlier", ["overwritten", "none"])
def test_a_run_killed_before_its_first_save_changes_nothing_and_its_command_runs_again(
        run_script, cql_run, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path, script, earlier):
    """Killed after its step-0 evaluation and its first updates, just before its first save: an --overwrite run
    leaves the earlier run's checkpoint and logs as they were, and the same command then runs (no --overwrite needed
    where nothing was there)."""
    if earlier == "overwritten":
        shutil.copytree(cql_run / "save", tmp_path / "save")
        shutil.copytree(cql_run / "run", tmp_path / "run")
    flags = [*CQL_TINY, "--total-steps", "8"] if script == "cql_pretrain.py" else \
        [*UPQ_TINY, "--total-steps", "20", "--checkpoints", tiny_cql_checkpoints]
    command = [script, "--env", tiny_hopper_hdf5, *flags, "--save-dir", tmp_path / "save", "--run-dir",
               tmp_path / "run", *(["--overwrite"] if earlier == "overwritten" else [])]
    before = (files(tmp_path / "save"), files(tmp_path / "run")) if earlier == "overwritten" else ({}, {})
    killed = run_script(*command, kill_at_rename=(tmp_path / "save", 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "run" / "eval.csv.pending").exists()  # the killed run had evaluated step 0
    assert (kept(tmp_path / "save"), kept(tmp_path / "run")) == before
    again = run_script(*command)
    assert again.returncode == 0, again.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run_id"] == saved(tmp_path / "save")["meta"]["run_id"] and "resumed" not in config
    assert read_rows(tmp_path / "run" / "eval.csv")[0]["step"] == "0" and not list((tmp_path / "run").glob("*.pending"))


def test_a_run_killed_between_its_first_save_and_its_logs_resumes_with_them(run_script, tiny_hopper_hdf5, tmp_path):
    common = ["cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "8", "--save-dir",
              tmp_path / "save", "--run-dir", tmp_path / "run"]
    straight = run_script(*common[:-4], "--save-dir", tmp_path / "straight", "--run-dir", tmp_path / "straight_run")
    assert straight.returncode == 0, straight.stderr
    # renames into the run dir: config.json, eval.csv and metrics.csv pending; then, after the checkpoint, the 5th
    # is eval.csv's into place (train.log's was the 4th)
    killed = run_script(*common, "--save-every", "4", kill_at_rename=(tmp_path / "run", 5))
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "run" / "eval.csv.pending").exists()
    metrics = (tmp_path / "run" / "metrics.csv.pending").read_text()
    (tmp_path / "run" / "metrics.csv.pending").write_text("step,something_else\n")  # a refused resume moves nothing
    before = files(tmp_path / "run")
    assert_refused(run_script(*common, "--resume"), "metrics.csv.pending has the columns ['step', 'something_else']")
    assert files(tmp_path / "run") == before
    (tmp_path / "run" / "metrics.csv.pending").write_text(metrics)
    resumed = run_script(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "eval.csv").read_text() == (tmp_path / "straight_run" / "eval.csv").read_text()


# --------------------------------------------------------------------------- a resume checks what it continues
def test_a_resume_into_another_runs_folder_is_refused_and_changes_nothing(run_script, cql_run, tiny_hopper_hdf5,
                                                                          tmp_path):
    other = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "4", "--seed", "2",
                       "--save-dir", tmp_path / "other", "--run-dir", tmp_path / "other_run")
    assert other.returncode == 0, other.stderr
    shutil.copytree(cql_run / "save", tmp_path / "save")
    before = files(tmp_path / "other_run")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save", "--run-dir",
                        tmp_path / "other_run")
    run_id = saved(tmp_path / "save")["meta"]["run_id"]
    assert_refused(result, f"--resume: {tmp_path / 'other_run'} holds the logs of run "
                           f"{saved(tmp_path / 'other')['meta']['run_id']}, not of run {run_id}")
    assert files(tmp_path / "other_run") == before


def test_a_resume_refused_for_its_logs_writes_nothing(run_script, cql_run, tiny_hopper_hdf5, tmp_path):
    shutil.copytree(cql_run / "save", tmp_path / "save")
    shutil.copytree(cql_run / "run", tmp_path / "run")
    (tmp_path / "run" / "metrics.csv").write_text("step,something_else\n")
    before = files(tmp_path / "run")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save", "--run-dir",
                        tmp_path / "run")
    assert_refused(result, "metrics.csv has the columns ['step', 'something_else']")
    assert files(tmp_path / "run") == before


def regenerated(source: Path, target: Path) -> Path:
    """A copy of a D4RL-layout file with the same rows but other rewards: the dataset made again under its name."""
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        f["rewards"][...] = f["rewards"][()] + 1.0
    return target


@pytest.mark.parametrize("script", ["cql_pretrain.py", "upq_finetune.py"], ids=["cql", "upq"])
def test_a_resume_on_other_data_under_the_same_name_is_refused(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints,
                                                               tmp_path, script):
    data = Path(shutil.copy(tiny_hopper_hdf5, tmp_path / "hopper_tiny-v2.hdf5"))
    flags = [*CQL_TINY, "--total-steps"] if script == "cql_pretrain.py" else \
        [*UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--total-steps"]
    common = [script, "--env", data, *flags]
    folders = ["--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    assert run_script(*common, "10" if "upq" in script else "4", *folders).returncode == 0
    regenerated(tiny_hopper_hdf5, data)
    before = files(tmp_path / "save"), files(tmp_path / "run")
    assert_refused(run_script(*common, "20" if "upq" in script else "8", *folders, "--resume"),
                   f"--resume: the saved run trained on other offline data than --env {data} holds now")
    assert (files(tmp_path / "save"), files(tmp_path / "run")) == before


def test_a_checkpoint_from_before_the_data_digest_still_resumes(run_script, cql_run, tiny_hopper_hdf5, tmp_path):
    shutil.copytree(cql_run / "run", tmp_path / "run")
    (tmp_path / "save").mkdir()
    rewrite_checkpoint(cql_run / "save" / "checkpoint.pt", tmp_path / "save" / "checkpoint.pt",
                       lambda checkpoint: checkpoint["meta"].pop("data_sha256"))  # as version 0.3.0 wrote it
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save", "--run-dir",
                        tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert saved(tmp_path / "save")["meta"]["step"] == 12


def test_finetuning_agents_trained_on_other_data_says_so_first(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints,
                                                                 tmp_path):
    data = regenerated(tiny_hopper_hdf5, tmp_path / "hopper_other-v2.hdf5")  # the same env, other transitions
    result = run_script("upq_finetune.py", "--env", data, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints,
                        "--total-steps", "10", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    first = (tmp_path / "run" / "train.log").read_text().splitlines()[0]
    assert first.startswith(f"note: the agents were trained on other data ({tiny_hopper_hdf5}) than the offline data")


# --------------------------------------------------------------------------- bytes, disks and weights that fail
def flip_bytes(path, count=16):
    """Flip `count` bytes in the middle of the largest tensor stored in a torch checkpoint (a zip, stored)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26: entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2
    raw[start: start + count] = bytes(b ^ 0xFF for b in raw[start: start + count])
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_is_refused_naming_the_file(run_script, cql_run, tiny_hopper_hdf5, tmp_path):
    shutil.copytree(cql_run / "save", tmp_path / "cql")
    flip_bytes(tmp_path / "cql" / "checkpoint.pt")
    torch.load(tmp_path / "cql" / "checkpoint.pt", weights_only=True)  # torch itself reads it without complaint
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tmp_path / "cql",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert_refused(result, f"checkpoint {tmp_path / 'cql' / 'checkpoint.pt'} is corrupted: its contents do not "
                           f"match the digest saved with them")
    shutil.copytree(cql_run / "save", tmp_path / "resume")
    flip_bytes(tmp_path / "resume" / "checkpoint.pt")
    before = files(tmp_path / "resume")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "resume")
    assert_refused(result, "is corrupted: its contents do not match the digest")
    assert files(tmp_path / "resume") == before


@pytest.mark.parametrize("content, message", [({}, "is not a upq-cql-v3 checkpoint"),
                                              ([1, 2], "is not a upq-cql-v3 checkpoint"),
                                              ({"meta": {"format": "upq-cql-v3"}}, "do not match the digest"),
                                              ({"meta": {"format": "upq-cql-v3"}, "x": {1: 0, "a": 0}, "sha256": ""},
                                               "do not match the digest")])
def test_a_checkpoint_with_the_wrong_content_is_refused(run_script, tiny_hopper_hdf5, tmp_path, content, message):
    (tmp_path / "cql").mkdir()
    torch.save(content, tmp_path / "cql" / "checkpoint.pt")
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, "--checkpoints", tmp_path / "cql",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert_refused(result, message)


def test_a_full_disk_at_a_save_is_one_sentence_and_the_previous_checkpoint_stays(run_script, cql_run,
                                                                                 tiny_hopper_hdf5, tmp_path):
    """The save's temporary file is /dev/full, a real ENOSPC: the run stops in one sentence, removes it, and the
    checkpoint it continued from is unchanged."""
    shutil.copytree(cql_run / "save", tmp_path / "save")
    (tmp_path / "save" / "checkpoint.pt.tmp").symlink_to("/dev/full")
    before = (tmp_path / "save" / "checkpoint.pt").read_bytes()
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save",
                        "--run-dir", tmp_path / "run")
    assert_refused(result, f"cannot write {tmp_path / 'save' / 'checkpoint.pt'} (")
    assert "MB are free there); the previous checkpoint, if any, is unchanged" in result.stderr
    assert (tmp_path / "save" / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "save").iterdir()) == [".lock", "checkpoint.pt"]


def test_a_full_run_dir_still_shows_the_console(run_script, tiny_hopper_hdf5, tmp_path):
    """train.log is /dev/full: every line still reaches the terminal and the run ends normally."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").symlink_to("/dev/full")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "4",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "eval step 4:" in result.stdout and "saved 2 agents" in result.stdout


def test_diverged_weights_are_never_saved(run_script, tiny_hopper_hdf5, tmp_path):
    """Rewards of 1e30 (finite in float32) blow the critics up within a few steps, between two log lines: the save
    refuses the NaN weights and the folder keeps what it had (here: nothing)."""
    shutil.copy(tiny_hopper_hdf5, tmp_path / "hopper_huge-v2.hdf5")
    with h5py.File(tmp_path / "hopper_huge-v2.hdf5", "a") as f:
        f["rewards"][...] = 1e30
    result = run_script("cql_pretrain.py", "--env", tmp_path / "hopper_huge-v2.hdf5", *CQL_TINY, "--log-every",
                        "1000", "--total-steps", "20", "--save-every", "4", "--save-dir", tmp_path / "save",
                        "--run-dir", tmp_path / "run")
    assert_refused(result, "holds NaN or inf values: the run diverged and was not saved")
    assert not (tmp_path / "save").exists()


def test_values_that_overflow_float32_are_refused(tmp_path):
    write_random_hopper_hdf5(tmp_path / "hopper_big-v2.hdf5", num_steps=30, max_episode_steps=20)
    with h5py.File(tmp_path / "hopper_big-v2.hdf5", "a") as f:
        rewards = f["rewards"][()].astype(np.float64)
        rewards[[4, 9]] = 1e39  # finite as float64, inf as float32
        del f["rewards"]
        f["rewards"] = rewards
    with pytest.raises(SystemExit) as refused:
        plumbing.load_offline_data(str(tmp_path / "hopper_big-v2.hdf5"))
    assert "rewards has 2 rows with NaN or inf values as float32 (the first is row 4)" in str(refused.value)


def test_a_folder_given_as_the_dataset_is_refused_as_unknown(tmp_path):
    with pytest.raises(SystemExit) as refused:
        plumbing.load_offline_data(str(tmp_path))
    assert "Minari datasets are named by id, not folder" in str(refused.value)


@pytest.mark.parametrize("name", ["a/b", "..", "../up", "x\\y", "", "a b", "x\ny", "a" * 300])
def test_an_exp_name_that_is_a_path_is_refused(run_script, tiny_hopper_hdf5, script_env, name):
    def tree():
        return sorted(str(p) for p in Path(script_env["CWD"]).parent.rglob("*"))

    before = tree()
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, "--exp-name", name)
    assert_refused(result, f"--exp-name {name!r} must be a plain name: 1 to 100 letters, digits and ._+=,@- (no "
                           f"path separator, not . or ..)")
    assert tree() == before


# --------------------------------------------------------------------------- folders and flags, checked first
def test_an_unwritable_save_dir_is_found_before_the_data_is_read(run_script, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    for script in ("cql_pretrain.py", "upq_finetune.py"):
        result = run_script(script, "--env", tmp_path / "no_such_data.hdf5", "--save-dir", tmp_path / "file" / "sub",
                            "--run-dir", tmp_path / "run")
        assert_refused(result, f"--save-dir {tmp_path / 'file' / 'sub'} is not a writable folder (Not a directory)")
        assert not (tmp_path / "run").exists()
    result = run_script("cql_pretrain.py", "--env", tmp_path / "no_such_data.hdf5", "--save-dir", tmp_path / "save",
                        "--run-dir", tmp_path / "file")
    assert_refused(result, f"--run-dir {tmp_path / 'file'} is not a writable folder")
    result = run_script("cql_pretrain.py", "--env", tmp_path / "no_such_data.hdf5", "--save-dir", tmp_path / "a" / "b",
                        "--run-dir", tmp_path / "c" / "d")
    assert_refused(result, "dataset file")  # writable: the data is the first thing wrong, and no folder was made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


SCRIPTS = {"cql_pretrain.py": cql, "off2on_finetune.py": off2on, "upq_finetune.py": upq}


@pytest.mark.parametrize("script, flags, message", [
    ("cql_pretrain.py", ["--eval-every", "0"], "--eval-every must be >= 1, not 0"),
    ("cql_pretrain.py", ["--save-every", "0"], "--save-every must be >= 1, not 0"),
    ("cql_pretrain.py", ["--log-every", "0"], "--log-every must be >= 1, not 0"),
    ("cql_pretrain.py", ["--hidden-sizes", "0"], "--hidden-sizes must be >= 1 each, at least one value, not 0"),
    ("cql_pretrain.py", ["--hidden-sizes"], "--hidden-sizes must be >= 1 each, at least one value, not (nothing)"),
    ("cql_pretrain.py", ["--gamma", "1.5"], "--gamma must be in [0, 1), not 1.5"),
    ("cql_pretrain.py", ["--gamma", "-3"], "--gamma must be in [0, 1), not -3.0"),
    ("cql_pretrain.py", ["--bc-steps", "-10"], "--bc-steps must be >= 0, not -10"),
    ("cql_pretrain.py", ["--critic-lr", "-1"], "--critic-lr must be > 0, not -1.0"),
    ("cql_pretrain.py", ["--tau", "0"], "--tau must be in (0, 1], not 0.0"),
    ("cql_pretrain.py", ["--policy-lr", "nan"], "--policy-lr must be > 0, not nan"),
    ("cql_pretrain.py", ["--lagrange-threshold", "inf"], "--lagrange-threshold must be a finite number, not inf"),
    ("off2on_finetune.py", ["--priority-temperature", "0"], "--priority-temperature must be > 0, not 0.0"),
    ("off2on_finetune.py", ["--density-ratio-hidden-sizes", "0"], "--density-ratio-hidden-sizes must be >= 1 each"),
    ("off2on_finetune.py", ["--init-online-fraction", "1"], "--init-online-fraction must be in (0, 1), not 1.0"),
    ("upq_finetune.py", ["--critic-lr", "-1"], "--critic-lr must be > 0, not -1.0"),
    ("upq_finetune.py", ["--beta", "-0.1"], "--beta must be >= 0, not -0.1"),
    ("upq_finetune.py", ["--save-every", "0"], "--save-every must be >= 1, not 0"),
    ("upq_finetune.py", ["--total-steps", "15", "--steps-per-epoch", "10"], "must be a multiple of --steps-per-epoch"),
    *((script, ["--seed", str(2**64)], f"--seed must be in [0, 2^32), not {2**64}") for script in SCRIPTS),
    *((script, ["--video-every", "-1"], "--video-every must be >= 0, not -1") for script in SCRIPTS),  # plumbing's
])
def test_a_bad_number_is_refused_in_one_sentence_before_anything_is_written(script, flags, message, tmp_path):
    module = SCRIPTS[script]
    args = tyro.cli(tyro.conf.OmitArgPrefixes[module.Args],
                    args=[*flags, "--save-dir", str(tmp_path / "save"), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as refused:
        module.main(args)
    assert str(refused.value) == f"error: {message}" or message in str(refused.value)
    assert not any(tmp_path.iterdir())


def test_running_out_of_memory_is_one_sentence(run_script, tiny_hopper_hdf5, tmp_path):
    """100,000 agents of 100,000 units need 440 GB for their first layer, whose allocation fails at once: past the
    16 GiB address-space limit set here, whatever the machine's overcommit policy, before anything is written."""
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, "--num-agents", "100000", "--hidden-sizes",
                        "100000", "--device", "cpu", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run",
                        memory_limit=16 << 30, timeout=120)
    assert_refused(result, "out of memory (it tried to allocate 440000000000 bytes): pass a smaller --batch-size or "
                           "--num-agents")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- datasets, checked at load
def broken_hdf5(path, case):
    arrays = write_random_hopper_hdf5(path, num_steps=30, max_episode_steps=20)
    with h5py.File(path, "a") as f:
        if case == "lengths":
            del f["actions"]
            f["actions"] = arrays["actions"][:29]
        elif case == "rank":
            del f["rewards"]
            f["rewards"] = np.zeros((30, 2), np.float32)
        elif case == "empty":
            for key in list(f):
                data = f[key][()]
                del f[key]
                f[key] = data[:0]
        elif case == "action":
            actions = f["actions"][()]
            actions[[5, 6], 1] = 5.0
            f["actions"][...] = actions
        elif case == "terminals":
            del f["terminals"]
            f["terminals"] = np.where(np.arange(30) == 7, 0.5, 0.0)
        elif case == "0-d rewards":
            del f["rewards"]
            f["rewards"] = 1.0
        elif case == "group":
            del f["observations"]
            f.create_group("observations")["x"] = arrays["observations"]
        elif case == "nan":
            observations = f["observations"][()]
            observations[[3, 7], 2] = np.nan
            observations[9, 0] = np.inf
            f["observations"][...] = observations


@pytest.mark.parametrize("case, message", [
    ("lengths", "its arrays have different numbers of rows"),
    ("rank", "rewards has shape (30, 2), but Hopper-v5 needs (30,), one row per transition"),
    ("empty", "holds no transitions"),
    ("nan", "observations has 3 rows with NaN or inf values as float32 (the first is row 3)"),
    ("action", "2 actions lie outside Hopper-v5's action space [-1, 1] (the first in row 5)"),
    ("terminals", "terminals must be 0 or 1 (true termination), but 1 are not (row 7 holds 0.5)"),
    ("0-d rewards", "rewards must be arrays, one row per transition, not a group or a single value"),
    ("group", "observations must be arrays, one row per transition, not a group or a single value"),
])
def test_a_broken_dataset_is_refused_in_one_sentence(tmp_path, case, message):
    broken_hdf5(tmp_path / "hopper_broken.hdf5", case)
    with pytest.raises(SystemExit) as refused:
        plumbing.load_offline_data(str(tmp_path / "hopper_broken.hdf5"))
    assert message in str(refused.value)


def test_a_local_minari_id_that_is_not_on_disk_fails_at_once(run_script, script_env):
    started = time.perf_counter()
    result = run_script("cql_pretrain.py", "--env", "local/hopper/medium-replay-v0", "--save-dir", "s",
                        "--run-dir", "r")
    assert_refused(result, "Minari dataset local/hopper/medium-replay-v0 is not in "
                           f"{script_env['MINARI_DATASETS_PATH']}")
    assert "python make_dataset.py --env Hopper-v5 --kind medium-replay" in result.stderr
    assert time.perf_counter() - started < 20  # no download retries (they took ~27 s)


def test_a_local_minari_dataset_cut_short_by_a_killed_write_is_one_sentence(run_script, script_env):
    folder = Path(script_env["MINARI_DATASETS_PATH"]) / "local" / "hopper" / "cut-v0"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "metadata.json").write_text('{"dataset_id": "local/hopper/cut-v0", "total_episodes": 3')
    result = run_script("cql_pretrain.py", "--env", "local/hopper/cut-v0", "--save-dir", "s", "--run-dir", "r")
    assert_refused(result, f"Minari dataset local/hopper/cut-v0 at {folder} is incomplete (an interrupted write): "
                           f"make one offline with python make_dataset.py --env Hopper-v5 --kind medium --overwrite")


# --------------------------------------------------------------------------- the run folder, progress, wandb, video
@pytest.fixture(scope="module")
def tracked(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path_factory):
    """A fine-tuning run with --track in wandb's offline mode, stopped after 10 env steps and resumed to 20."""
    root = tmp_path_factory.mktemp("tracked")
    args = ["--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--track", "--save-dir",
            root / "save", "--exp-name", "mine"]
    first = run_script("upq_finetune.py", *args, "--total-steps", "10", "--run-dir", root / "run",
                       env={"WANDB_MODE": "offline"})
    second = run_script("upq_finetune.py", *args, "--total-steps", "20", "--resume", env={"WANDB_MODE": "offline"})
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return root, first.stdout + second.stdout


def test_the_run_folder_holds_config_console_log_and_training_metrics(tracked):
    root, stdout = tracked
    run_dir = root / "run"  # the resumed run found its folder in the checkpoint set
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["beta"] == 0.1 and config["args"]["total_steps"] == 10 and config["gym_env_id"] == "Hopper-v5"
    assert config["dataset_id"].endswith("hopper_tiny-v2.hdf5") and config["version"] == upq.PROJECT_VERSION
    assert config["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                              text=True).stdout.strip()
    assert config["resumed"][0]["at_step"] == 10 and config["resumed"][0]["args"]["total_steps"] == 20
    log = (run_dir / "train.log").read_text()
    for line in stdout.splitlines():
        if line.startswith(("env steps", "dataset")):
            assert line in log
    metrics = read_rows(run_dir / "metrics.csv")
    assert [row["step"] for row in metrics] == ["10", "20"] and [row["grad_steps"] for row in metrics] == ["20", "30"]
    assert set(metrics[0]) == {"step", "grad_steps", *upq.METRICS, "updates_per_s", "env_steps_per_s"}
    assert all(float(row["uncertainty"]) > 0 and 0 <= float(row["online_fraction"]) <= 1 for row in metrics)


def test_log_lines_say_where_the_run_is_its_speed_and_eta(tracked, run_script, tiny_hopper_hdf5, tmp_path):
    _, stdout = tracked
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("env steps 20:")]
    assert re.search(r"30/30 updates \(100%\), \d+s elapsed, [\d.]+ updates/s, ETA 0s", epoch_lines[0])
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "8",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and re.match(r"step 4/8 steps \(50%\), \d+s elapsed, [\d.]+ steps/s, ETA \d+s \|", lines[0])


def test_progress_and_duration_by_hand(monkeypatch):
    monkeypatch.setattr(upq.time, "perf_counter", lambda: 1000.0 + 3725.0)
    # 2,000 of 10,000 done since this session started at 500 done, 3,725 s ago: 1500 / 3725 = 0.4 steps/s
    line = plumbing.progress(2000, 10_000, 500, 1000.0, "steps")
    assert line == "2,000/10,000 steps (20%), 1h02m elapsed, 0.4 steps/s, ETA 5h31m"  # 8000 / (1500 / 3725) s
    assert plumbing.progress(500, 2000, 500, 1000.0, "steps").endswith("0.0 steps/s, ETA ?")  # nothing done yet
    assert [plumbing.duration(s) for s in (0, 12.9, 59, 61, 185, 7199, 36000)] == [
        "0s", "12s", "59s", "1m01s", "3m05s", "1h59m", "10h00m"]


@pytest.mark.parametrize("case", ["no login", "unwritable wandb folder"])
def test_track_without_wandb_login_or_a_writable_folder_is_one_sentence(run_script, tiny_hopper_hdf5, tmp_path, case):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path)}  # (HOME: no ~/.netrc)
    if case == "unwritable wandb folder":
        env = {"WANDB_MODE": "offline"}
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "wandb").write_text("a file where wandb makes its folder")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "4", "--track",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run", env=env)
    assert_refused(result, "--track: wandb could not start (")
    assert "run `wandb login`, or set WANDB_MODE=offline" in result.stderr
    assert "eval step 0" not in result.stdout  # refused before the step-0 evaluation
    assert sorted(path.name for path in tmp_path.iterdir()) == (["run"] if case == "unwritable wandb folder" else [])
    assert not list((tmp_path / "run").glob("*.pending"))  # the refused run's logs go with it


def test_a_console_that_goes_away_leaves_the_run_and_its_log_going(script_env, tiny_hopper_hdf5, tmp_path):
    """As `python cql_pretrain.py ... | head -1`: the console goes, the run ends well and train.log is whole."""
    process = subprocess.Popen([sys.executable, str(REPO / "cql_pretrain.py"), "--env", tiny_hopper_hdf5, *CQL_TINY,
                                "--total-steps", "8", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=script_env, cwd=script_env["CWD"])
    process.stdout.close()
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert "8 steps in" in (tmp_path / "run" / "train.log").read_text()


def test_track_with_resume_continues_the_same_wandb_run(tracked):
    root, _ = tracked
    run_id = saved(root / "save")["meta"]["run_id"]
    runs = sorted(p.name for p in (root / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def renders_offscreen(backend: str = "egl") -> bool:
    probe = ("import gymnasium as gym; e = gym.make('InvertedPendulum-v5', render_mode='rgb_array'); e.reset(); "
             "e.render()")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, env={"MUJOCO_GL": backend, "PATH": ""})
    return result.returncode == 0


@pytest.mark.skipif(not renders_offscreen(), reason="MuJoCo cannot render offscreen here (no EGL): see the README")
def test_capture_video_records_the_last_evaluation(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path):
    result = run_script("off2on_finetune.py", "--env", tiny_hopper_hdf5, *UPQ_TINY[:-2], "--eval-episodes", "2",
                        "--checkpoints", tiny_cql_checkpoints, "--total-steps", "20", "--capture-video",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    videos = sorted(p.relative_to(tmp_path / "run" / "videos").as_posix()
                    for p in (tmp_path / "run" / "videos").rglob("*.mp4"))
    assert videos == ["step_20/episode0-episode-0.mp4", "step_20/episode1-episode-0.mp4"]
    assert all((tmp_path / "run" / "videos" / v).stat().st_size > 1000 for v in videos)
    assert "Overwriting" not in result.stderr


@pytest.mark.skipif(renders_offscreen("osmesa"), reason="OSMesa renders here, so this machine cannot show the refusal")
def test_capture_video_without_a_working_opengl_backend_is_one_sentence(run_script, tiny_hopper_hdf5,
                                                                        tiny_cql_checkpoints, tmp_path):
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, "--checkpoints", tiny_cql_checkpoints,
                        "--capture-video", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run",
                        env={"MUJOCO_GL": "osmesa"})
    assert_refused(result, "--capture-video needs moviepy (pip install moviepy) and offscreen MuJoCo rendering, "
                           "which failed with MUJOCO_GL=osmesa")
    assert "apt-get install libegl1" in result.stderr and not (tmp_path / "run" / "eval.csv").exists()


@pytest.mark.parametrize("script, backend", [
    *((script, "bogus") for script in [*SCRIPTS, "make_dataset.py"]),
    pytest.param("cql_pretrain.py", "osmesa", marks=pytest.mark.skipif(renders_offscreen("osmesa"),
                                                                       reason="OSMesa renders here")),
])
def test_an_opengl_backend_that_cannot_load_is_one_sentence_in_every_script(run_script, tiny_hopper_hdf5,
                                                                            tiny_cql_checkpoints, tmp_path, script,
                                                                            backend):
    """MuJoCo loads MUJOCO_GL's backend for every env, rendering or not (here without --capture-video)."""
    flags = ["--env", tiny_hopper_hdf5, "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    flags += ["--checkpoints", tiny_cql_checkpoints] if "finetune" in script else []
    result = run_script(script, *(["--kind", "random", "--num-steps", "10"] if script == "make_dataset.py" else flags),
                        env={"MUJOCO_GL": backend, "MINARI_DATASETS_PATH": str(tmp_path / "minari")})
    assert_refused(result, f"MuJoCo cannot load the OpenGL backend MUJOCO_GL={backend} (")
    assert "unset it or use MUJOCO_GL=egl, or install OSMesa (apt-get install libosmesa6) for osmesa" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("module", [cql, off2on, upq], ids=["cql", "off2on", "upq"])
def test_help_groups_the_flags_and_documents_every_one(module, capsys):
    with pytest.raises(SystemExit):
        tyro.cli(tyro.conf.OmitArgPrefixes[module.Args], args=["--help"])
    text = capsys.readouterr().out
    assert text.index("algorithm options") < text.index("run options")
    for group in (module.Algorithm, module.Run):
        for flag in group.__dataclass_fields__:
            assert f"--{flag.replace('_', '-')}" in text
    assert "--wandb-project-name" in text and "--torch-deterministic" in text and "--exp-name" in text
    if module is not cql:
        assert "(default: checkpoints/<env>__seed1" in " ".join(text.replace("│", " ").split())
