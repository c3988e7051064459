"""Shared fixtures and helpers: tiny datasets made here (nothing is downloaded), a runner for the scripts (also one
that kills a run at a chosen file rename), the checks every bad-input test makes, and reading and editing the
scripts' checkpoint files. Under pytest-xdist (-n 2) the two tiny session fixtures are made once for both workers,
and the tests that share a module's training run go to one worker (xdist_group; pyproject.toml sets --dist
loadgroup), which makes that run once."""

import csv
import fcntl
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("cql_pretrain.py", "off2on_finetune.py", "upq_finetune.py", "make_dataset.py")  # the top-level scripts
sys.path.insert(0, str(REPO))


# Runs a script, counting the renames into one folder and killing itself (SIGKILL) at the k-th, before it happens;
# at exit it prints "renames: <count>" on stderr. Arguments: folder, k (0: never), script, the script's arguments.
KILL_AT_RENAME = """
import atexit, os, runpy, signal, sys
folder, kill_at, script = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
renames, real_replace = [0], os.replace
def replace(source, target, *args, **kwargs):
    if os.path.dirname(os.path.abspath(target)) == folder:
        renames[0] += 1
        if renames[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target, *args, **kwargs)
os.replace = replace
atexit.register(lambda: print(f"renames: {renames[0]}", file=sys.stderr))
sys.argv = [script, *sys.argv[4:]]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="session")
def script_env(tmp_path_factory) -> dict:
    """The environment the scripts run in: downloads fail fast (HF_HUB_OFFLINE, an empty D4RL cache), Minari looks in
    a private folder, wandb is off, one thread per process (2 shared cores)."""
    base = tmp_path_factory.mktemp("script_env")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "D4RL_DATASET_DIR": str(base / "d4rl"),
            "MINARI_DATASETS_PATH": str(base / "minari"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "CWD": str(base)}


@pytest.fixture(scope="session")
def run_script(script_env):
    """Run a top-level script as a user would; returns the CompletedProcess (never raises on failure).

    kill_at_rename=(folder, k) runs it under KILL_AT_RENAME. `env` entries override script_env's. memory_limit caps
    its address space (RLIMIT_AS, bytes): an allocation past it fails at once, without using this machine's memory.
    """

    def run(script: str, *args: str, env: dict | None = None, timeout: float = 300,
            kill_at_rename: tuple[Path, int] | None = None, memory_limit: int | None = None):
        command = [sys.executable, str(REPO / script), *map(str, args)]
        if kill_at_rename is not None:
            folder, k = kill_at_rename
            command[1:1] = ["-c", KILL_AT_RENAME, str(folder), str(k)]
        limit = memory_limit and (lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit)))
        return subprocess.run(command, capture_output=True, text=True, env={**script_env, **(env or {})},
                              timeout=timeout, cwd=script_env["CWD"], preexec_fn=limit or None)

    return run


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """A bad input: non-zero exit, the message in one sentence, the last line on stderr, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()  # (before it, at most a library's warning, e.g. MuJoCo's)
    assert message in lines[-1] and lines[-1].startswith("error: ") and "error: " not in "".join(lines[:-1])


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV log (eval.csv, metrics.csv) as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def members(state_dict: dict, rows: slice) -> dict:
    """Members `rows` of an ensemble's state dict (every tensor has the member axis first): agent k of a checkpoint
    is actor rows k:k+1 and critic rows 2k:2k+2."""
    return {key: value[rows] for key, value in state_dict.items()}


def flat_tensors(value, name: str = "") -> dict:
    """Every tensor in nested dicts and lists (a checkpoint's networks, Adam moments, random streams...), by name."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    named = ((f"{name}.{part}" if name else str(part), item) for part, item in items)
    return {key: tensor for part_name, item in named for key, tensor in flat_tensors(item, part_name).items()}


def assert_same_tensors(first: dict, second: dict) -> None:
    """Two checkpoints hold the same tensors, bit for bit (meta and digest aside)."""
    ours, theirs = (flat_tensors({key: value for key, value in checkpoint.items() if key not in ("meta", "sha256")})
                    for checkpoint in (first, second))
    assert ours.keys() == theirs.keys() and "actor.net.0.weight" in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def rewrite_checkpoint(source: Path, target: Path, edit, keep_digest: bool = False) -> Path:
    """A copy of checkpoint.pt `source` at `target`, changed in place by edit(checkpoint), with the digest of its
    new contents (so that only the edit can be refused), or with keep_digest the old, now wrong, one."""
    from plumbing import digest

    checkpoint = torch.load(source, weights_only=True)
    old_digest = checkpoint.pop("sha256")
    edit(checkpoint)
    torch.save({**checkpoint, "sha256": old_digest if keep_digest else digest(checkpoint)}, target)
    return target


def write_random_hopper_hdf5(path: Path, num_steps: int, max_episode_steps: int, seed: int = 0) -> dict:
    """A D4RL-layout file of uniform-random Hopper-v5 transitions; returns the arrays written."""
    env = gym.make("Hopper-v5", max_episode_steps=max_episode_steps)
    rng = np.random.default_rng(seed)
    columns = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    obs, _ = env.reset(seed=seed)
    for _ in range(num_steps):
        action = rng.uniform(-1, 1, size=3).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(columns, (obs, action, reward, next_obs, terminated, truncated)):
            columns[key].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    arrays = {key: np.asarray(value) for key, value in columns.items()}
    arrays["observations"] = arrays["observations"].astype(np.float32)
    arrays["next_observations"] = arrays["next_observations"].astype(np.float32)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return arrays


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name` of this test session, filled by make(folder) once: under pytest-xdist every worker gets the
    same folder, the first to ask makes it and the others wait for it (a test must not change what it holds)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # (the parent: this session's, shared)
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # (what a failed make left)
            folder.mkdir()
            make(folder)
            (root / f"{name}.made").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_hopper_hdf5(tmp_path_factory) -> Path:
    """1,500 random Hopper-v5 transitions in D4RL layout, episodes cut at 20 steps (so both flags occur)."""
    name = "hopper_tiny-v2.hdf5"
    return made_once(tmp_path_factory, "d4rl", lambda folder: write_random_hopper_hdf5(
        folder / name, num_steps=1500, max_episode_steps=20)) / name


@pytest.fixture(scope="session")
def tiny_cql_checkpoints(run_script, tiny_hopper_hdf5, tmp_path_factory) -> Path:
    """The --save-dir of a 50-step cql_pretrain.py run of three agents (hidden 32 32) on tiny_hopper_hdf5: a folder
    holding its checkpoint.pt (its run dir, with eval.csv, is the folder's sibling `run`)."""

    def train(root: Path) -> None:
        result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, "--num-agents", "3", "--total-steps", "50",
                            "--hidden-sizes", "32", "32", "--batch-size", "32", "--eval-episodes", "1",
                            "--save-dir", root / "agents", "--run-dir", root / "run")
        assert result.returncode == 0, result.stderr

    return made_once(tmp_path_factory, "cql_agents", train) / "agents"


SHARED_RUNS = ("trained", "finetuned", "cql_run", "tracked", "old_and_new", "random_dataset")  # module fixtures


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items) -> None:
    """Each test that uses one of the SHARED_RUNS (a module-scoped fixture that trains or makes data) joins its
    xdist_group, so that under -n 2 one worker makes the run, once."""
    for item in items:
        if shared := [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
