"""Shared fixtures: tiny datasets made here (nothing is downloaded) and a runner for the scripts."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def run_script(tmp_path_factory):
    """Run a top-level script as a user would; returns the CompletedProcess (never raises on failure).

    Downloads fail fast (HF_HUB_OFFLINE, an empty D4RL cache) and Minari looks in a private folder
    unless the caller's env overrides them.
    """
    base = tmp_path_factory.mktemp("script_env")

    def run(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "D4RL_DATASET_DIR": str(base / "d4rl"),
            "MINARI_DATASETS_PATH": str(base / "minari"),
            "WANDB_MODE": "disabled",
            **(env or {}),
        }
        return subprocess.run(
            [sys.executable, str(REPO / script), *map(str, args)],
            capture_output=True, text=True, env=environment, timeout=timeout, cwd=base,
        )

    return run


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


@pytest.fixture(scope="session")
def tiny_hopper_hdf5(tmp_path_factory) -> Path:
    """1,500 random Hopper-v5 transitions in D4RL layout, episodes cut at 20 steps (so both flags occur)."""
    path = tmp_path_factory.mktemp("d4rl") / "hopper_tiny-v2.hdf5"
    write_random_hopper_hdf5(path, num_steps=1500, max_episode_steps=20)
    return path


@pytest.fixture(scope="session")
def tiny_cql_checkpoints(run_script, tiny_hopper_hdf5, tmp_path_factory) -> Path:
    """A folder with agent_0.pt .. agent_2.pt: three 50-step cql_pretrain.py agents (hidden 32 32) on tiny_hopper_hdf5."""
    root = tmp_path_factory.mktemp("cql_agents")
    result = run_script("cql_pretrain.py", "--env", tiny_hopper_hdf5, "--num-agents", "3", "--total-steps", "50",
                        "--hidden-sizes", "32", "32", "--batch-size", "32", "--eval-episodes", "1",
                        "--save-dir", root / "agents", "--run-dir", root / "run", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return root / "agents"
