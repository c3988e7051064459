"""Runs that cannot be lost or mixed: checkpoint sets saved as one unit (a real run killed at every rename of a save,
then resumed), Ctrl-C and SIGTERM, --overwrite and --resume that do not fit, unwritable folders, and every bad flag or
dataset refused in one sentence before anything is written."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import tyro

import cql_pretrain as cql
import off2on_finetune as off2on
import upq_finetune as upq
from conftest import REPO, assert_refused, read_rows, write_random_hopper_hdf5

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CQL_TINY = ["--num-agents", "2", "--hidden-sizes", "8", "8", "--batch-size", "8", "--num-random", "2",
            "--eval-episodes", "1", "--bc-steps", "3", "--log-every", "4", "--eval-every", "4"]
UPQ_TINY = ["--num-agents", "2", "--steps-per-epoch", "10", "--first-epoch-multiplier", "2", "--batch-size", "8",
            "--density-ratio-hidden-sizes", "8", "8", "--eval-episodes", "1", "--beta", "0.1"]


def set_on_disk(folder):
    """The checkpoint set a reader finds in `folder` right now: its manifest and every file's (run id, step)."""
    manifest, paths = cql.read_set(folder)
    metas = {name: torch.load(path, weights_only=True)["meta"] for name, path in paths.items()}
    return manifest, {name: (meta["run_id"], meta["step"]) for name, meta in metas.items()}


def assert_one_consistent_set(folder):
    """Whatever instant the process died, the folder holds one complete set: every file of one run and one step."""
    manifest, stamps = set_on_disk(folder)
    assert set(stamps.values()) == {(manifest["run_id"], manifest["step"])}
    assert sorted(stamps) == manifest["files"]


def parameters(folder):
    return {name: [torch.load(folder / name, weights_only=True)[net] for net in ("actor", "critic", "target_critic")]
            for name in sorted(p.name for p in folder.glob("agent_*.pt"))}


def resume_or_restart(run_script, script, args, save_dir):
    """What a user does after a crash: --resume when a set was saved, else start again with --overwrite."""
    saved = (save_dir / "manifest.json").exists() or (save_dir / "commit.json").exists()
    result = run_script(script, *args, "--resume" if saved else "--overwrite")
    assert result.returncode == 0, result.stderr
    return saved


# --------------------------------------------------------------------------- a save is atomic for the whole set
def test_cql_killed_at_every_rename_of_its_saves_resumes_to_the_uninterrupted_run(run_script, tiny_hopper_hdf5,
                                                                                    tmp_path):
    def args(name):
        return ["--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "12", "--save-every", "6",
                "--save-dir", tmp_path / name, "--run-dir", tmp_path / f"{name}_run"]

    straight = run_script("cql_pretrain.py", *args("straight"), kill_at_rename=(tmp_path / "straight", 0))
    assert straight.returncode == 0, straight.stderr
    renames = int(re.search(r"renames: (\d+)", straight.stderr).group(1))
    assert renames == 2 * (1 + 2 + 1)  # two saves: the commit point, the 2 agents' files, the manifest
    expected_eval, expected_parameters = (tmp_path / "straight_run" / "eval.csv").read_text(), parameters(
        tmp_path / "straight")
    resumed = []
    for k in range(1, renames + 1):
        killed = run_script("cql_pretrain.py", *args(f"k{k}"), kill_at_rename=(tmp_path / f"k{k}", k))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if (tmp_path / f"k{k}" / "manifest.json").exists() or (tmp_path / f"k{k}" / "commit.json").exists():
            assert_one_consistent_set(tmp_path / f"k{k}")
        resumed.append(resume_or_restart(run_script, "cql_pretrain.py", args(f"k{k}"), tmp_path / f"k{k}"))
        assert (tmp_path / f"k{k}_run" / "eval.csv").read_text() == expected_eval
        got = parameters(tmp_path / f"k{k}")
        assert got.keys() == expected_parameters.keys()
        for name in got:
            for mine, theirs in zip(got[name], expected_parameters[name]):
                assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
        assert sorted(p.name for p in (tmp_path / f"k{k}").iterdir()) == ["agent_0.pt", "agent_1.pt", "manifest.json"]
    assert resumed == [False, True, True, True, True, True, True, True]  # the first commit point is rename 1


def test_finetuning_killed_at_every_rename_of_its_saves_resumes_to_the_uninterrupted_run(run_script, tiny_hopper_hdf5,
                                                                                        tiny_cql_checkpoints, tmp_path):
    """Every epoch collects from a fresh episode seeded by its first env step (as Off2OnRL's collector starts each
    epoch), so a resumed run repeats the uninterrupted one exactly."""
    def args(name):
        return ["--env", tiny_hopper_hdf5, *UPQ_TINY, "--checkpoints", tiny_cql_checkpoints, "--total-steps", "20",
                "--save-every", "1", "--save-dir", tmp_path / name, "--run-dir", tmp_path / f"{name}_run"]

    straight = run_script("upq_finetune.py", *args("straight"), kill_at_rename=(tmp_path / "straight", 0))
    assert straight.returncode == 0, straight.stderr
    renames = int(re.search(r"renames: (\d+)", straight.stderr).group(1))
    assert renames == 2 * (1 + 3 + 1)  # two saves: the commit point, 2 agents and run_state.pt, the manifest
    expected_eval, expected_parameters = (tmp_path / "straight_run" / "eval.csv").read_text(), parameters(
        tmp_path / "straight")
    for k in range(1, renames + 1):
        killed = run_script("upq_finetune.py", *args(f"k{k}"), kill_at_rename=(tmp_path / f"k{k}", k))
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if k > 1:
            assert_one_consistent_set(tmp_path / f"k{k}")
        resume_or_restart(run_script, "upq_finetune.py", args(f"k{k}"), tmp_path / f"k{k}")
        assert [row["step"] for row in read_rows(tmp_path / f"k{k}_run" / "eval.csv")] == ["0", "10", "20"]
        assert_one_consistent_set(tmp_path / f"k{k}")
        manifest = json.loads((tmp_path / f"k{k}" / "manifest.json").read_text())
        assert (manifest["env_steps"], manifest["grad_steps"]) == (20, 30)
        metrics = read_rows(tmp_path / f"k{k}_run" / "metrics.csv")
        assert [row["step"] for row in metrics] == ["10", "20"]
        assert (tmp_path / f"k{k}_run" / "eval.csv").read_text() == expected_eval
        got = parameters(tmp_path / f"k{k}")
        for name in expected_parameters:
            for mine, theirs in zip(got[name], expected_parameters[name]):
                assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_a_reader_of_a_save_cut_after_its_commit_point_gets_the_new_set(tmp_path):
    """The commit point is the line: before it the old set stands, after it the new one, renamed or not."""
    cql.save_set(tmp_path, {"agent_0.pt": {"meta": {"run_id": "a", "step": 1}},
                            "agent_1.pt": {"meta": {"run_id": "a", "step": 1}}}, {"run_id": "a", "step": 1})
    (tmp_path / "agent_1.pt.next").write_bytes(b"half a file of a save that died before its commit")
    assert set_on_disk(tmp_path)[1] == {"agent_0.pt": ("a", 1), "agent_1.pt": ("a", 1)}
    for name in ("agent_0.pt", "run_state.pt"):  # a committed save whose renames were cut: one file renamed
        torch.save({"meta": {"run_id": "b", "step": 2}}, tmp_path / f"{name}.next")
    cql.write_json(tmp_path / "commit.json", {"run_id": "b", "step": 2, "files": ["agent_0.pt", "run_state.pt"]})
    cql.os.replace(tmp_path / "agent_0.pt.next", tmp_path / "agent_0.pt")
    assert set_on_disk(tmp_path)[1] == {"agent_0.pt": ("b", 2), "run_state.pt": ("b", 2)}  # read-only
    assert (tmp_path / "commit.json").exists() and (tmp_path / "agent_1.pt").exists()
    cql.finish_set(tmp_path)  # a writer completes it: the earlier run's agent_1.pt and stray .next files go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent_0.pt", "manifest.json", "run_state.pt"]
    assert set_on_disk(tmp_path)[1] == {"agent_0.pt": ("b", 2), "run_state.pt": ("b", 2)}


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM
def interrupt(script, args, run_dir, marker, signum, script_env):
    """Start a run, wait for `marker` in its train.log, send `signum`; returns (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=script_env, cwd=script_env["CWD"])
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (run_dir / "train.log").exists() and marker in (run_dir / "train.log").read_text()):
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def test_ctrl_c_saves_a_complete_set_and_the_run_resumes(run_script, script_env, tiny_hopper_hdf5, tmp_path):
    args = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    code, stdout, stderr = interrupt("cql_pretrain.py", [*args, "--total-steps", "1000000"], tmp_path / "run",
                                     "eval step 0", signal.SIGINT, script_env)
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert "SIGINT at gradient step" in stdout and "--resume" in stdout
    assert_one_consistent_set(tmp_path / "save")
    step = json.loads((tmp_path / "save" / "manifest.json").read_text())["step"]
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
            "--first-epoch-multiplier", "300", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run"]
    code, stdout, stderr = interrupt("upq_finetune.py", args, tmp_path / "run", "env steps 0:", signal.SIGTERM,
                                     script_env)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert "SIGTERM at env step 10" in stdout
    assert_one_consistent_set(tmp_path / "save")
    manifest = json.loads((tmp_path / "save" / "manifest.json").read_text())
    assert manifest["env_steps"] == 10 and 0 < manifest["grad_steps"] < 3000
    assert [row["step"] for row in read_rows(tmp_path / "run" / "eval.csv")] == ["0"]
    finish = run_script("upq_finetune.py", *args, "--resume")
    assert finish.returncode == 0, finish.stderr
    assert [row["step"] for row in read_rows(tmp_path / "run" / "eval.csv")] == ["0", "10", "20"]
    assert json.loads((tmp_path / "save" / "manifest.json").read_text())["grad_steps"] == 3000 + 10


# --------------------------------------------------------------------------- runs that must not be mixed
@pytest.fixture(scope="module")
def two_runs(run_script, tiny_hopper_hdf5, tmp_path_factory):
    """Three CQL agents saved at step 8, then the same folder restarted with --overwrite and two agents."""
    root = tmp_path_factory.mktemp("two_runs")
    common = ["--env", tiny_hopper_hdf5, *CQL_TINY, "--total-steps", "8", "--save-dir", root / "save"]
    first = run_script("cql_pretrain.py", *common, "--num-agents", "3", "--run-dir", root / "first")
    shutil.copytree(root / "save", root / "three")
    second = run_script("cql_pretrain.py", *common, "--run-dir", root / "second", "--overwrite")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return root


def test_overwrite_leaves_no_file_of_the_earlier_run(two_runs):
    assert sorted(p.name for p in (two_runs / "save").iterdir()) == ["agent_0.pt", "agent_1.pt", "manifest.json"]
    first = json.loads((two_runs / "three" / "manifest.json").read_text())["run_id"]
    assert {run_id for run_id, _ in set_on_disk(two_runs / "save")[1].values()} != {first}


def test_agents_of_two_runs_do_not_form_one_ensemble(run_script, two_runs, tiny_hopper_hdf5, tmp_path):
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *UPQ_TINY[2:], "--total-steps", "10",
                        "--checkpoints", two_runs / "save" / "agent_0.pt", two_runs / "three" / "agent_2.pt",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert_refused(result, "come from different runs or steps and cannot form one ensemble")


@pytest.mark.parametrize("flags, message", [
    (["--num-agents", "1", "--total-steps", "12"], "holds 3 agents, not --num-agents 1"),
    (["--num-agents", "3", "--total-steps", "4"], "at step 8, past --total-steps 4"),
])
def test_a_resume_that_does_not_fit_the_saved_run_is_refused(run_script, two_runs, tiny_hopper_hdf5, tmp_path,
                                                             flags, message):
    shutil.copytree(two_runs / "three", tmp_path / "three")
    before = {p.name: p.read_bytes() for p in (tmp_path / "three").iterdir()}
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, *flags, "--resume",
                        "--save-dir", tmp_path / "three")
    assert_refused(result, message)
    assert {p.name: p.read_bytes() for p in (tmp_path / "three").iterdir()} == before


def test_a_folder_of_an_older_version_is_refused_in_one_sentence(run_script, two_runs, tiny_hopper_hdf5, tmp_path):
    (tmp_path / "old").mkdir()
    shutil.copy(two_runs / "three" / "agent_0.pt", tmp_path / "old" / "agent_0.pt")
    result = run_script("off2on_finetune.py", "--env", tiny_hopper_hdf5, "--checkpoints", tmp_path / "old",
                        "--save-dir", tmp_path / "save")
    assert_refused(result, "holds no complete checkpoint set (no manifest.json; its agent_0.pt come from an older")


def test_resume_cuts_the_logs_back_to_the_checkpoint(run_script, two_runs, tiny_hopper_hdf5, tmp_path):
    """Rows written after the last save (here: forged ones) are dropped before a resumed run appends its own."""
    shutil.copytree(two_runs / "three", tmp_path / "save")
    shutil.copytree(two_runs / "first", tmp_path / "run")
    with open(tmp_path / "run" / "eval.csv", "a") as f:
        f.write("12,0,1.0,1.0\n16,0,1.0,1.0\n2")  # and a row cut in the middle
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, *CQL_TINY, "--num-agents", "3",
                        "--total-steps", "12", "--resume", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "run" / "eval.csv")
    assert [(row["step"], row["agent"]) for row in rows] == [(s, a) for s in ("0", "4", "8", "12")
                                                             for a in ("0", "1", "2", "ensemble")]
    assert rows[-1]["return"] != "1.0"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resumed"][0]["at_step"] == 8 and config["args"]["total_steps"] == 8


# --------------------------------------------------------------------------- folders and flags, checked first
def test_an_unwritable_save_dir_is_found_before_the_data_is_read(run_script, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    for script in ("cql_pretrain.py", "upq_finetune.py"):
        result = run_script(script, "--env", tmp_path / "no_such_data.hdf5", "--save-dir", tmp_path / "file" / "sub",
                            "--run-dir", tmp_path / "run")
        assert_refused(result, f"--save-dir {tmp_path / 'file' / 'sub'} is not a writable folder")
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
])
def test_a_bad_number_is_refused_in_one_sentence_before_anything_is_written(script, flags, message, tmp_path):
    module = SCRIPTS[script]
    args = tyro.cli(tyro.conf.OmitArgPrefixes[module.Args],
                    args=[*flags, "--save-dir", str(tmp_path / "save"), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as refused:
        module.main(args)
    assert str(refused.value) == f"error: {message}" or message in str(refused.value)
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
        elif case == "nan":
            observations = f["observations"][()]
            observations[[3, 7], 2] = np.nan
            observations[9, 0] = np.inf
            f["observations"][...] = observations


@pytest.mark.parametrize("case, message", [
    ("lengths", "actions has 29 rows but rewards 30; every array needs one row per transition"),
    ("rank", "rewards has shape (30, 2), but it needs 1 axes"),
    ("empty", "holds no transitions"),
    ("nan", "observations has 3 rows with NaN or inf values (the first is row 3)"),
])
def test_a_broken_dataset_is_refused_in_one_sentence(tmp_path, case, message):
    broken_hdf5(tmp_path / "hopper_broken.hdf5", case)
    with pytest.raises(SystemExit) as refused:
        cql.load_offline_data(str(tmp_path / "hopper_broken.hdf5"))
    assert message in str(refused.value)


def test_a_local_minari_id_that_is_not_on_disk_fails_at_once(run_script, script_env):
    started = time.perf_counter()
    result = run_script("cql_pretrain.py", "--env", "local/hopper/medium-replay-v0", "--save-dir", "s", "--run-dir", "r")
    assert_refused(result, f"Minari dataset local/hopper/medium-replay-v0 is not in {script_env['MINARI_DATASETS_PATH']}")
    assert "python make_dataset.py --env Hopper-v5 --kind medium-replay" in result.stderr
    assert time.perf_counter() - started < 20  # no download retries (they took ~27 s)


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
    line = upq.progress(2000, 10_000, 500, 1000.0, "steps")
    assert line == "2,000/10,000 steps (20%), 1h02m elapsed, 0.4 steps/s, ETA 5h31m"  # 8000 / (1500 / 3725) s
    assert (upq.duration(59), upq.duration(61), upq.duration(7199)) == ("59s", "1m01s", "1h59m")


def test_track_with_resume_continues_the_same_wandb_run(tracked):
    root, _ = tracked
    run_id = json.loads((root / "save" / "manifest.json").read_text())["run_id"]
    runs = sorted(p.name for p in (root / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def renders_offscreen() -> bool:
    probe = "import gymnasium as gym; e = gym.make('InvertedPendulum-v5', render_mode='rgb_array'); e.reset(); e.render()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, env={"MUJOCO_GL": "egl", "PATH": ""})
    return result.returncode == 0


@pytest.mark.skipif(not renders_offscreen(), reason="MuJoCo cannot render offscreen here (no EGL): see the README")
def test_capture_video_records_the_last_evaluation(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path):
    result = run_script("off2on_finetune.py", "--env", tiny_hopper_hdf5, *UPQ_TINY[:-2], "--eval-episodes", "2",
                        "--checkpoints", tiny_cql_checkpoints, "--total-steps", "20", "--capture-video",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    videos = sorted(p.relative_to(tmp_path / "run" / "videos").as_posix()
                    for p in (tmp_path / "run" / "videos").rglob("*.mp4"))
    assert videos == ["step_20/eval0-episode-0.mp4", "step_20/eval1-episode-0.mp4"]
    assert all((tmp_path / "run" / "videos" / v).stat().st_size > 1000 for v in videos)
    assert "Overwriting" not in result.stderr


def test_capture_video_without_a_working_opengl_backend_is_one_sentence(run_script, tiny_hopper_hdf5,
                                                                        tiny_cql_checkpoints, tmp_path):
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, "--checkpoints", tiny_cql_checkpoints,
                        "--capture-video", "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run",
                        env={"MUJOCO_GL": "osmesa"})
    if result.returncode == 0 or "cannot render offscreen" not in result.stderr:
        pytest.skip("OSMesa renders here, so this machine cannot show the refusal")
    assert_refused(result, "--capture-video: MuJoCo cannot render offscreen with MUJOCO_GL=osmesa")
    assert "apt-get install libegl1" in result.stderr and not (tmp_path / "run" / "eval.csv").exists()


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
