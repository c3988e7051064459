"""Off2OnRL: online fine-tuning of N offline pre-trained CQL agents, the baseline of UPQ (Jang, Kim, Noh).

Off2OnRL (Lee et al. 2022) as the UPQ paper uses it, with the defaults of the official code
(shlee94/Off2OnRL). The N agents of cql_pretrain.py form one ensemble: Q^E, the mean of the members'
pessimistic critics min(Q1_i, Q2_i) (Eq. 2), and pi^E, one tanh-Gaussian with the pre-tanh mean and
variance of the mixture of the members' Gaussians (Eq. 3). Fine-tuning is SAC with an auto-tuned
temperature: every member regresses to its own target at one shared a' ~ pi^E (Eqs. 5-6 with beta = 0,
as in the official code), and all N actors learn jointly through pi^E (Eq. 7). Balanced replay draws
each batch from the offline data and the online buffer by priorities that a density-ratio network
w(s, a) learns to give near-on-policy transitions.

    python off2on_finetune.py --env hopper-medium-v2 --checkpoints checkpoints/hopper-medium-v2__seed1

reads agent_0.pt ... agent_{N-1}.pt written by cql_pretrain.py, runs 200 epochs of 1,000 env steps and
1,000 gradient steps (10,000 in epoch 0), evaluates at the start of every epoch (step 0 = the
pre-trained ensemble) into <run-dir>/eval.csv and saves the fine-tuned agents to --save-dir in the same
per-agent layout. upq_finetune.py is this file plus the uncertainty penalty. See SPEC.md
section 2 for every default and its source.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ALGORITHM = "off2on"
PROJECT_VERSION = "0.1.0"
CQL_FORMAT = "upq-cql-agent-v1"  # what cql_pretrain.py writes
FINETUNED_FORMAT = "upq-finetuned-agent-v1"  # what this script writes: the same per-agent layout
RUN_STATE_FORMAT = "upq-finetune-run-v1"  # replay, priorities, density-ratio net, RNG: what --resume needs
SUM_TREE_FANOUT = 64  # children per sum-tree node: 4 levels for ~1M transitions instead of 20
CUDA_GRAPH_WARMUP = 3  # eager updates at the start of every epoch before the step is recorded as a CUDA graph


@dataclass
class Args:
    env: str = "hopper-medium-v2"
    """offline dataset replayed beside the online data: a D4RL name, a Minari id or a D4RL-layout .hdf5 file (paper: D4RL v2)"""
    gym_env: str | None = None
    """gymnasium env to fine-tune and evaluate on (default: the dataset's own; Hopper-v5 etc. for D4RL names)"""
    checkpoints: tuple[str, ...] = ()
    """cql_pretrain.py checkpoints: folders (all their agent_*.pt) or files (default: checkpoints/<env>__seed1, cql_pretrain.py's default --save-dir)"""
    num_agents: int | None = None
    """N: use the first N checkpoints (default: all of them; paper: 4)"""
    seed: int = 1
    """seed of the density-ratio net, the batches, the action noise and the envs"""
    total_steps: int = 200_000
    """online env steps (paper: 200 epochs x 1,000 steps)"""
    steps_per_epoch: int = 1_000
    """env steps per epoch, followed by as many gradient steps (Off2OnRL official)"""
    first_epoch_multiplier: int = 10
    """epoch 0 does this many times --steps-per-epoch gradient steps (Off2OnRL official)"""
    batch_size: int = 256
    """RL batch, and each of the offline and online density-ratio batches (Off2OnRL official)"""
    gamma: float = 0.99
    """discount (Off2OnRL official)"""
    tau: float = 5e-3
    """soft target update rate, every gradient step (Off2OnRL official)"""
    policy_lr: float = 3e-4
    """Adam learning rate of the N actors (trained jointly through pi^E) and of the temperature (Off2OnRL official)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the 2N critics (Off2OnRL official)"""
    target_entropy: float | None = None
    """SAC target entropy (default -|A|, Off2OnRL official); log alpha starts at 0, not at the CQL value (SPEC)"""
    balanced_replay: bool = True
    """sample by density-ratio priorities (Off2OnRL official); --no-balanced-replay: uniform over offline + online (paper's Algorithm 1)"""
    online_buffer_size: int = 250_000
    """online transitions kept, the oldest overwritten beyond it (Off2OnRL official)"""
    init_online_fraction: float = 0.5
    """f, the online share of the batches right after epoch 0's data arrives; sets the first P_max (Off2OnRL official)"""
    priority_temperature: float = 5.0
    """T: a transition's priority is w^(1/T) over the offline mean of w^(1/T) (Off2OnRL official)"""
    density_ratio_lr: float = 3e-4
    """Adam learning rate of the density-ratio network w(s, a) (Off2OnRL official)"""
    density_ratio_hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layers of w(s, a) (Off2OnRL official)"""
    eval_episodes: int = 5
    """deterministic episodes of tanh(mean of pi^E) at the start of every epoch (Off2OnRL official: 5,000 steps)"""
    save_every: int = 10
    """save the fine-tuned agents every this many epochs (and at the end)"""
    save_dir: str | None = None
    """where agent_0.pt ... and run_state.pt go (default checkpoints/<algorithm>__<env>__seed<seed>)"""
    run_dir: str | None = None
    """where eval.csv goes (default runs/<algorithm>__<env>__<seed>__<time>)"""
    resume: bool = False
    """continue the run saved in --save-dir (its agents, replay, priorities and RNG; the training episode restarts)"""
    overwrite: bool = False
    """replace the checkpoints already in --save-dir"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available; the envs always step on the CPU"""
    cuda_graph: bool = True
    """on cuda, record each epoch's update step once as a CUDA graph and replay it (the same kernels, less overhead)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "upq"
    """wandb project name (with --track)"""


def fail(message: str) -> None:
    """Stop with one clear sentence on stderr and exit code 1."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Offline data: D4RL names, Minari ids, D4RL-layout .hdf5 files (the same block in every script)
# ---------------------------------------------------------------------------------------------
D4RL_REF_SCORES = {  # D4RL's reference returns (random, expert) per body
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
D4RL_GYM_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_NAME = re.compile(r"^(hopper|halfcheetah|walker2d)-(random|medium|medium-replay|medium-expert|expert)-v2$")
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"


@dataclass
class OfflineData:
    observations: np.ndarray  # [M, obs_dim] float32
    actions: np.ndarray  # [M, act_dim]
    rewards: np.ndarray  # [M]
    next_observations: np.ndarray  # [M, obs_dim]
    terminals: np.ndarray  # [M], 1.0 only for true termination (time-limit truncations bootstrap)
    dataset_id: str
    gym_env_id: str
    ref_min_score: float | None
    ref_max_score: float | None
    ref_source: str


def body_of(name: str) -> str | None:
    """'hopper' for hopper-medium-v2, Hopper-v5, local/hopper/medium-v0, .../hopper_medium-v2.hdf5."""
    lowered = name.lower()
    for body in ("halfcheetah", "walker2d", "hopper"):
        if body in lowered:
            return body
    return None


def normalized_score(returns, ref_min_score: float | None, ref_max_score: float | None):
    """D4RL normalised score, 100 * (return - random) / (expert - random); NaN without references."""
    returns = np.asarray(returns, dtype=np.float64)
    if ref_min_score is None or ref_max_score is None:
        return np.full_like(returns, np.nan)
    return 100.0 * (returns - ref_min_score) / (ref_max_score - ref_min_score)


def d4rl_file_name(name: str) -> str:
    """hopper-medium-replay-v2 -> hopper_medium_replay-v2.hdf5, as D4RL names its downloads."""
    body, level = D4RL_NAME.match(name).groups()
    return f"{body}_{level.replace('-', '_')}-v2.hdf5"


def read_d4rl_hdf5(path: Path) -> dict[str, np.ndarray]:
    """Transitions of a D4RL-layout file; timeouts bootstrap, terminals do not."""
    import h5py

    needed = ("observations", "actions", "rewards", "terminals")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in needed if key not in f]
            if missing:
                fail(f"{path} is not a D4RL-layout file: it lacks {', '.join(missing)}")
            data = {key: f[key][()] for key in (*needed, "timeouts", "next_observations") if key in f}
    except OSError as error:
        fail(f"cannot read {path} as HDF5 ({error})")
    size = len(data["rewards"])
    timeouts = data.get("timeouts", np.zeros(size, dtype=bool)).astype(bool)
    terminals = data["terminals"].astype(bool)
    if "next_observations" in data:
        keep = np.ones(size, dtype=bool)  # a timeout transition has its true next state: bootstrap
        next_observations = data["next_observations"]
    else:  # next state = next row, so the last row of every episode has none: drop it (d4rl.qlearning_dataset)
        keep = ~timeouts
        keep[-1] = False
        next_observations = np.concatenate([data["observations"][1:], data["observations"][-1:]])
    return dict(
        observations=data["observations"][keep],
        actions=data["actions"][keep],
        rewards=data["rewards"].reshape(-1)[keep],
        next_observations=next_observations[keep],
        terminals=terminals.reshape(-1)[keep],
    )


def fetch_d4rl(name: str) -> Path:
    """The D4RL v2 file from D4RL's cache folder, downloaded there when absent and reachable."""
    import urllib.request

    folder = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
    path = folder / d4rl_file_name(name)
    if path.exists():
        return path
    url = D4RL_URL + path.name
    body = body_of(name)
    level = D4RL_NAME.match(name).group(2)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        print(f"downloading {url} to {path}", flush=True)
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        partial.replace(path)
        return path
    except OSError as error:
        fail(
            f"D4RL dataset {name} is not at {path} and could not be downloaded ({error}); fetch {url} "
            f"into {folder}, or use the Minari dataset mujoco/{body}/{'medium' if 'medium' in level else level}-v0 "
            f"(a different level from D4RL's), or make one offline: "
            f"python make_dataset.py --env {D4RL_GYM_ENVS[body]} --kind {level}"
        )


def read_minari(dataset_id: str):
    """Transitions of a Minari dataset (local, or downloaded when absent and reachable)."""
    import minari

    try:
        dataset = minari.load_dataset(dataset_id)
    except FileNotFoundError:
        try:
            dataset = minari.load_dataset(dataset_id, download=True)
        except Exception as error:  # noqa: BLE001 -- any download failure gets the same advice
            body = body_of(dataset_id) or "hopper"
            fail(
                f"Minari dataset {dataset_id} is not in {minari.storage.get_dataset_path()} and could not be "
                f"downloaded ({type(error).__name__}); make one offline with "
                f"python make_dataset.py --env {D4RL_GYM_ENVS.get(body, 'Hopper-v5')} --kind medium"
            )
    columns = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for episode in dataset.iterate_episodes():
        columns["observations"].append(episode.observations[:-1])
        columns["next_observations"].append(episode.observations[1:])
        columns["actions"].append(episode.actions)
        columns["rewards"].append(episode.rewards)
        columns["terminals"].append(episode.terminations)
    data = {key: np.concatenate(value) for key, value in columns.items()}
    metadata = dataset.storage.metadata
    env_id = dataset.env_spec.id if dataset.env_spec is not None else None
    return data, env_id, metadata.get("ref_min_score"), metadata.get("ref_max_score")


def load_offline_data(name: str, gym_env: str | None = None) -> OfflineData:
    """Resolve --env into transitions, the gymnasium env to evaluate on and the score references."""
    ref_min = ref_max = None
    if D4RL_NAME.match(name):
        data, env_id = read_d4rl_hdf5(fetch_d4rl(name)), D4RL_GYM_ENVS[body_of(name)]
    elif name.endswith((".hdf5", ".h5")):
        if not Path(name).is_file():
            fail(f"dataset file {name} does not exist")
        body = body_of(Path(name).name)
        env_id = gym_env or D4RL_GYM_ENVS.get(body)
        if env_id is None:
            fail(f"cannot tell the environment of {name} from its name: pass --gym-env (e.g. Hopper-v5)")
        data = read_d4rl_hdf5(Path(name))
    elif "/" in name:
        data, env_id, ref_min, ref_max = read_minari(name)
    else:
        fail(
            f"unknown dataset {name!r}: expected a D4RL name such as hopper-medium-v2, a Minari id such as "
            f"local/hopper/medium-v0, or a path to a .hdf5 file"
        )
    env_id = gym_env or env_id
    if env_id is None:
        fail(f"dataset {name} records no environment: pass --gym-env")
    if ref_min is not None and ref_max is not None:
        ref_source = f"dataset metadata ({ref_min:.3f} / {ref_max:.3f})"
    elif body_of(env_id) in D4RL_REF_SCORES:
        ref_min, ref_max = D4RL_REF_SCORES[body_of(env_id)]
        ref_source = f"D4RL {body_of(env_id)} ({ref_min} / {ref_max})"
    else:
        ref_source = "none (normalised score is NaN)"
    try:
        env = gym.make(env_id)
    except gym.error.Error as error:
        fail(f"cannot make gymnasium env {env_id} ({error})")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    if data["observations"].shape[1:] != (obs_dim,) or data["actions"].shape[1:] != (act_dim,):
        fail(
            f"dataset {name} has observations {data['observations'].shape[1:]} and actions "
            f"{data['actions'].shape[1:]}, but {env_id} has ({obs_dim},) and ({act_dim},)"
        )
    arrays = {key: np.asarray(value, dtype=np.float32) for key, value in data.items()}
    return OfflineData(**arrays, dataset_id=name, gym_env_id=env_id, ref_min_score=ref_min,
                       ref_max_score=ref_max, ref_source=ref_source)


# ---------------------------------------------------------------------------------------------
# Networks: every weight has a leading ensemble axis E, so one batched matmul runs all members
# ---------------------------------------------------------------------------------------------
class VectorizedLinear(nn.Module):
    """E independent linear layers: x [E, B, in] -> [E, B, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        for member in range(ensemble_size):  # nn.Linear's default init, member by member
            bound = 1 / math.sqrt(in_features)
            nn.init.kaiming_uniform_(self.weight.data[member].T, a=math.sqrt(5))
            nn.init.uniform_(self.bias.data[member], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def vectorized_mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, ensemble_size: int) -> nn.Sequential:
    layers, width = [], in_dim
    for hidden in hidden_sizes:
        layers += [VectorizedLinear(width, hidden, ensemble_size), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, VectorizedLinear(width, out_dim, ensemble_size))


class Actor(nn.Module):
    """N tanh-Gaussian policies: obs [N, B, obs_dim] -> mean, log_std [N, B, act_dim] (pre-tanh)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], num_members: int):
        super().__init__()
        self.net = vectorized_mlp(obs_dim, hidden_sizes, 2 * act_dim, num_members)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)  # official CQL/SPEC: log-std in [-5, 2]


class Critic(nn.Module):
    """2N Q-functions, member 2k + j = critic j of agent k: [2N, B, obs+act] -> [2N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], num_members: int):
        super().__init__()
        self.net = vectorized_mlp(obs_dim + act_dim, hidden_sizes, 1, num_members)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


class DensityRatio(nn.Module):
    """w(s, a) >= 0, the online/offline density ratio of balanced replay: [B, obs+act] -> [B]."""

    def __init__(self, in_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = vectorized_mlp(in_dim, hidden_sizes, 1, 1)
        nn.init.constant_(self.net[-1].bias, 1.0)  # Off2OnRL official: w starts near 1

    def forward(self, state_action: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(state_action[None]))[0, :, 0]


# ---------------------------------------------------------------------------------------------
# The paper's equations: small pure functions, checked against hand computations in tests/
# ---------------------------------------------------------------------------------------------
def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor):
    """Reparameterised a = tanh(mean + std * noise) and log pi(a|s) with the tanh correction."""
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, std) - sum log(1 - tanh(u)^2), summed over action dims; stable softplus form."""
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    tanh_correction = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - tanh_correction).sum(-1)


def twin_min(q: torch.Tensor) -> torch.Tensor:
    """Each member's pessimistic value min(Q1_i, Q2_i): [2N, B] (member 2i + j = critic j of agent i) -> [N, B]."""
    return q.view(q.shape[0] // 2, 2, *q.shape[1:]).min(1).values


def ensemble_q_mean(q_members: torch.Tensor) -> torch.Tensor:  # Eq. (2)
    """Q^E = (1/N) sum_i min(Q1_i, Q2_i): [N, B] -> [B]."""
    return q_members.mean(0)


def ensemble_policy(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # Eq. (3)
    """pi^E: mean and log-std [B, A] of the pre-tanh Gaussian matching the moments of the N members' [N, B, A].

    mean = (1/N) sum_i mu_i,  var = (1/N) sum_i (sigma_i^2 + mu_i^2) - mean^2, written as
    (1/N) sum_i sigma_i^2 + (1/N) sum_i (mu_i - mean)^2 (the same number without cancellation);
    std clamped to [e^-20, e^2] (Off2OnRL official).
    """
    ensemble_mean = mean.mean(0)
    variance = (2.0 * log_std).exp().mean(0) + (mean - ensemble_mean).pow(2).mean(0)
    return ensemble_mean, (0.5 * variance.log()).clamp(-20.0, 2.0)


def soft_target(rewards, terminals, next_q, next_log_prob, alpha, gamma: float) -> torch.Tensor:  # Eq. (5), beta = 0
    """y_i = r + gamma (1 - terminal) [min(Q1_i, Q2_i)'(s', a') - alpha log pi^E(a'|s')]: next_q [N, B] -> [N, B]."""
    return rewards + gamma * (1.0 - terminals) * (next_q - alpha * next_log_prob)


def critic_td_loss(q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # Eq. (6)
    """sum over the 2N critics of mean_B (Q_k,i(s, a) - y_i)^2: q [2N, B], targets [N, B] -> scalar."""
    return (q - targets.repeat_interleave(2, dim=0)).pow(2).mean(1).sum()


def ensemble_actor_loss(alpha, log_prob: torch.Tensor, q_ensemble: torch.Tensor) -> torch.Tensor:  # Eq. (7)
    """mean_B [alpha log pi^E(a~|s) - Q^E(s, a~)], a~ ~ pi^E(.|s) reparameterised: [B], [B] -> scalar."""
    return (alpha * log_prob - q_ensemble).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's automatic temperature: -mean_B [log alpha (log pi^E(a~|s) + target entropy)], log_prob detached."""
    return -(log_alpha * (log_prob + target_entropy)).mean()


def density_ratio_loss(w_offline: torch.Tensor, w_online: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon f-divergence loss of w (Off2OnRL): mean_off[-log(2/(w+1))] - mean_on[log(2w/(w+1))]."""
    offline_term = -torch.log(2.0 / (w_offline + 1.0) + 1e-10)
    online_term = torch.log(2.0 * w_online / (w_online + 1.0) + 1e-10)
    return offline_term.mean() - online_term.mean()


def balanced_replay_priorities(w_batch: torch.Tensor, w_offline: torch.Tensor, temperature: float) -> torch.Tensor:
    """New priorities of the sampled batch: w^(1/T) / (mean_offline w^(1/T) + 1e-10), clamped to [1e-3, 1e3]."""
    normalizer = w_offline.pow(1.0 / temperature).mean() + 1e-10
    return (w_batch.pow(1.0 / temperature) / normalizer).clamp(1e-3, 1e3)


def initial_online_priority(offline_size: int, online_fraction: float, first_epoch_steps: int) -> float:
    """P_max before any update: the first epoch's online transitions then hold the fraction f of the total priority."""
    return offline_size * online_fraction / ((1.0 - online_fraction) * first_epoch_steps)


# ---------------------------------------------------------------------------------------------
# Replay: offline data and online buffer as rows of one tensor, sampled through one sum tree
# ---------------------------------------------------------------------------------------------
def pack(obs, actions, rewards, next_obs, terminals) -> np.ndarray:
    """Transitions as rows [obs | action | reward | next obs | terminal], float32 [M, 2 obs + act + 2]."""
    columns = (obs, actions, np.reshape(rewards, (-1, 1)), next_obs, np.reshape(terminals, (-1, 1)))
    return np.concatenate(columns, axis=1, dtype=np.float32)


def unpack(rows: torch.Tensor, obs_dim: int, act_dim: int):
    """Inverse of pack: obs [B, obs], actions [B, act], rewards [B], next obs [B, obs], terminals [B]."""
    obs, actions, rewards, next_obs, terminals = rows.split([obs_dim, act_dim, 1, obs_dim, 1], dim=1)
    return obs, actions, rewards[:, 0], next_obs, terminals[:, 0]


class SumTree:
    """Proportional sampler over `capacity` priorities: a tree of partial sums with SUM_TREE_FANOUT children a node.

    levels[0] holds the priorities (0 = empty slot), levels[d][j] the sum of levels[d - 1][F j : F (j + 1)], and the
    last level the total. Sampling walks all draws down together, one level at a time; an update rewrites the given
    leaves and then their ancestors, level by level. Everything stays on the device: no host round trip.
    """

    def __init__(self, capacity: int, device):
        sizes, size = [], capacity
        while size > 1:
            size = -(-size // SUM_TREE_FANOUT)  # nodes on the level above
            sizes.append(size * SUM_TREE_FANOUT)
        self.levels = [torch.zeros(s, dtype=torch.float64, device=device) for s in (*sizes, 1)]

    def fill(self, priorities: torch.Tensor) -> None:
        """Set the first len(priorities) leaves and recompute every sum (for the offline data, and on resume)."""
        self.levels[0][: len(priorities)] = priorities.to(torch.float64)
        for below, above in zip(self.levels[:-1], self.levels[1:]):
            above[: len(below) // SUM_TREE_FANOUT] = below.view(-1, SUM_TREE_FANOUT).sum(1)

    def update(self, index: torch.Tensor, priority: torch.Tensor) -> None:
        """Set the leaves `index` (repeats allowed) and re-sum their ancestors."""
        self.levels[0][index] = priority.to(torch.float64)
        for below, above in zip(self.levels[:-1], self.levels[1:]):
            index = index // SUM_TREE_FANOUT
            above[index] = below.view(-1, SUM_TREE_FANOUT)[index].sum(1)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Stratified proportional draws: one uniform in each of batch_size equal slices of the total -> leaves [B]."""
        device = self.levels[0].device
        strata = torch.arange(batch_size, dtype=torch.float64, device=device)
        mass = (strata + torch.rand(batch_size, dtype=torch.float64, generator=generator, device=device))
        mass = mass * (self.levels[-1] / batch_size)  # [B]
        node, zero = torch.zeros(batch_size, dtype=torch.long, device=device), torch.zeros_like(mass)
        for level in reversed(self.levels[:-1]):
            children = level.view(-1, SUM_TREE_FANOUT)[node]  # [B, F]
            cumulative = children.cumsum(1)
            # stay below the node's total despite rounding, so the walk never enters an empty subtree
            mass = torch.minimum(mass, torch.nextafter(cumulative[:, -1], zero))[:, None]  # [B, 1]
            child = torch.searchsorted(cumulative, mass, right=True)  # the first child whose running sum exceeds it
            mass = (mass - (cumulative - children).gather(1, child))[:, 0]
            node = node * SUM_TREE_FANOUT + child[:, 0]
        return node


class BalancedReplay:
    """The offline data and the online ring buffer as rows of one tensor on the device, sampled as one buffer.

    Rows 0 .. M-1 hold the offline transitions (priority 1), rows M .. M + capacity - 1 the online ones (priority
    P_max when written; P_max starts at initial_online_priority and rises to the largest priority ever written).
    balanced=False: no priorities, batches uniform over all rows written (the paper's Algorithm 1).
    """

    def __init__(self, offline_rows: torch.Tensor, online_capacity: int, balanced: bool, p_max: float):
        self.offline_size, self.online_capacity = len(offline_rows), online_capacity
        self.online_size = self.online_written = 0
        self.rows = offline_rows.new_zeros(self.offline_size + online_capacity, offline_rows.shape[1])
        self.rows[: self.offline_size] = offline_rows
        self.tree = SumTree(len(self.rows), offline_rows.device) if balanced else None
        if self.tree is not None:
            self.tree.fill(torch.ones(self.offline_size, device=offline_rows.device))
        self.p_max = torch.tensor(p_max, dtype=torch.float64, device=offline_rows.device)

    def add(self, rows: torch.Tensor) -> None:
        """Online transitions [n, width] into the ring (the oldest overwritten once full), each with priority P_max."""
        written = self.online_written + torch.arange(len(rows), device=rows.device)
        slots = self.offline_size + written % self.online_capacity
        self.rows[slots] = rows
        if self.tree is not None:
            self.tree.update(slots, self.p_max.expand(len(rows)))
        self.online_written += len(rows)
        self.online_size = min(self.online_written, self.online_capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Row indices: the RL batch [B] by priority, then uniform offline [B] and online [B] rows for w(s, a).

        Without priorities, only the RL batch, uniform over offline + online rows.
        """
        device = self.rows.device
        if self.tree is None:
            size = self.offline_size + self.online_size
            return torch.randint(size, (batch_size,), generator=generator, device=device)
        offline = torch.randint(self.offline_size, (batch_size,), generator=generator, device=device)
        online = self.offline_size + torch.randint(self.online_size, (batch_size,), generator=generator, device=device)
        return torch.cat([self.tree.sample(batch_size, generator), offline, online])

    def reprioritize(self, index: torch.Tensor, priorities: torch.Tensor) -> None:
        self.tree.update(index, priorities)
        torch.maximum(self.p_max, priorities.max(), out=self.p_max)  # in place: a CUDA graph replays it

    def state_dict(self) -> dict:
        """What --resume needs: the online rows, the priorities of all rows written, P_max, the ring position."""
        written = self.offline_size + self.online_size
        return dict(online_rows=self.rows[self.offline_size: written].clone().cpu(),
                    priorities=None if self.tree is None else self.tree.levels[0][:written].clone().cpu(),
                    p_max=float(self.p_max), online_size=self.online_size, online_written=self.online_written)

    def load_state_dict(self, state: dict) -> None:
        self.online_size, self.online_written = state["online_size"], state["online_written"]
        self.rows[self.offline_size: self.offline_size + self.online_size] = state["online_rows"].to(self.rows.device)
        if self.tree is not None:
            self.tree.fill(state["priorities"].to(self.rows.device))
        self.p_max.fill_(state["p_max"])


# ---------------------------------------------------------------------------------------------
# One gradient step: all members in one graph, one backward
# ---------------------------------------------------------------------------------------------
def finetune_losses(actor, critic, target_critic, density_ratio, log_alpha, rows, noise, args):
    """Losses of one fine-tuning step on one shared batch.

    rows: replay rows [B] of the RL batch, then (balanced replay) [B] uniform offline and [B] uniform online rows.
    noise [2B, A]: standard normal noise of the actions a~ at s and a' at s'.
    Returns (loss to backpropagate, new priorities of the RL batch or None, dict of scalar metrics).
    The actor's loss sees the critics frozen and the critics' targets see no graph, so one backward pass
    gives each network the gradient of its own objective (as the official code's separate optimisers do).
    """
    num_members, obs_dim, act_dim = actor.net[0].weight.shape[0], actor.net[0].weight.shape[1], noise.shape[1]
    batch_size = args.batch_size
    obs, actions, rewards, next_obs, terminals = unpack(rows[:batch_size], obs_dim, act_dim)
    alpha = log_alpha.exp().detach()

    def every_critic(x):  # [B, D] -> [2N, B, D]: all critics see the same batch
        return x.expand(2 * num_members, -1, -1)

    # Eq. (3): pi^E at s (trained through the actor loss) and at s' (for the target only: no graph), a sample each
    new_actions, new_log_prob = tanh_gaussian_sample(*ensemble_policy(*actor(obs.expand(num_members, -1, -1))),
                                                     noise[:batch_size])  # [B, A], [B]
    with torch.no_grad():
        next_actions, next_log_prob = tanh_gaussian_sample(
            *ensemble_policy(*actor(next_obs.expand(num_members, -1, -1))), noise[batch_size:])

    # Eqs. (5)-(6): every member regresses to its own target at the shared a' ~ pi^E(.|s')
    with torch.no_grad():
        next_q = twin_min(target_critic(every_critic(next_obs), every_critic(next_actions)))  # [N, B]
        targets = soft_target(rewards, terminals, next_q, next_log_prob, alpha, args.gamma)  # [N, B]
    q_data = critic(every_critic(obs), every_critic(actions))  # [2N, B]
    critic_loss = critic_td_loss(q_data, targets)

    # Eq. (7) with Eq. (2), the critics frozen; and the temperature
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    q_new = twin_min(torch.func.functional_call(critic, frozen, (every_critic(obs), every_critic(new_actions))))
    actor_loss = ensemble_actor_loss(alpha, new_log_prob, ensemble_q_mean(q_new))
    alpha_loss = temperature_loss(log_alpha, new_log_prob.detach(), args.target_entropy)
    total = critic_loss + actor_loss + alpha_loss

    priorities, ratio_loss = None, torch.zeros((), device=rows.device)
    if density_ratio is not None:  # balanced replay: w on the RL batch and the uniform offline/online batches
        w_batch, w_offline, w_online = density_ratio(rows[:, : obs_dim + act_dim]).split(batch_size)  # [B] each
        ratio_loss = density_ratio_loss(w_offline, w_online)
        priorities = balanced_replay_priorities(w_batch.detach(), w_offline.detach(), args.priority_temperature)
        total = total + ratio_loss
    metrics = dict(critic_loss=critic_loss.detach(), actor_loss=actor_loss.detach(), ratio_loss=ratio_loss.detach(),
                   q_mean=q_data.detach().mean(), alpha=alpha[0])
    return total, priorities, metrics


def finetune_update(nets: dict, optimizers: dict, replay: BalancedReplay, generator: torch.Generator, args) -> dict:
    """One gradient step: draw the batch, losses, one backward, Adam steps, soft target update (tau), new priorities."""
    index = replay.sample(args.batch_size, generator)
    act_dim = nets["actor"].net[-1].weight.shape[-1] // 2
    noise = torch.randn(2 * args.batch_size, act_dim, generator=generator, device=replay.rows.device)
    loss, priorities, metrics = finetune_losses(
        nets["actor"], nets["critic"], nets["target_critic"], nets["density_ratio"], nets["log_alpha"],
        replay.rows[index], noise, args)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(nets["target_critic"].parameters()), list(nets["critic"].parameters()), args.tau)
        if priorities is not None:
            replay.reprioritize(index[: args.batch_size], priorities)
    metrics["online_fraction"] = (index[: args.batch_size] >= replay.offline_size).float().mean()
    return metrics


def cuda_graphed(step):
    """Record one call of step() as a CUDA graph; returns a function that replays it and returns step()'s outputs.

    A replay launches the recorded kernels on the same tensors with no Python in between, so every state the step
    changes must change in place, and Python values it reads (the online buffer's size) are frozen at recording.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay():
        graph.replay()
        return outputs

    return replay


# ---------------------------------------------------------------------------------------------
# Acting and evaluation: the envs step on the CPU, pi^E runs on the device
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(env, obs: np.ndarray, actor: Actor, steps: int, generator, device) -> tuple[np.ndarray, np.ndarray]:
    """`steps` env steps with a ~ pi^E(.|s) (Eq. 3); returns the packed transitions and the observation reached.

    Episodes run across epochs; only termination stops bootstrapping, a time-limit truncation is reset.
    """
    num_members = actor.net[0].weight.shape[0]
    rows = []
    for _ in range(steps):
        state = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean, log_std = ensemble_policy(*actor(state.expand(num_members, 1, -1)))  # [1, A]
        noise = torch.randn(mean.shape, generator=generator, device=device)
        action = tanh_gaussian_sample(mean, log_std, noise)[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append(pack(obs[None], action[None], reward, next_obs[None], float(terminated)))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return np.concatenate(rows), obs


@torch.no_grad()
def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device) -> np.ndarray:
    """Undiscounted returns [episodes] of the deterministic ensemble policy tanh(mean of pi^E), in lockstep."""
    num_members = actor.net[0].weight.shape[0]
    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + e)[0] for e, env in enumerate(envs)])
    returns = np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    while running.any():
        states = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean, _ = ensemble_policy(*actor(states.expand(num_members, -1, -1)))  # [episodes, A]
        actions = torch.tanh(mean).cpu().numpy()
        for e in np.flatnonzero(running):
            obs[e], reward, terminated, truncated, _ = envs[e].step(actions[e])
            returns[e] += reward
            running[e] = not (terminated or truncated)
    for env in envs:
        env.close()
    return returns


# ---------------------------------------------------------------------------------------------
# Checkpoints: agent k's slice of the ensemble tensors in agent_k.pt, the run's state in run_state.pt
# ---------------------------------------------------------------------------------------------
def slice_optimizer_state(state: dict, rows: slice) -> dict:
    """An optimizer state_dict restricted to one agent's rows (Adam moments share the params' layout)."""
    return {
        "state": {
            index: {key: value if value.dim() == 0 else value[rows].clone() for key, value in entry.items()}
            for index, entry in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def concat_optimizer_states(states: list[dict]) -> dict:
    """Inverse of slice_optimizer_state over the agents, in order."""
    first = states[0]
    return {
        "state": {
            index: {
                key: value if value.dim() == 0 else torch.cat([s["state"][index][key] for s in states])
                for key, value in entry.items()
            }
            for index, entry in first["state"].items()
        },
        "param_groups": first["param_groups"],
    }


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees a half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, expected_format: str) -> dict:
    """A checkpoint file, or one clear sentence on why it cannot be used."""
    if not path.is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- truncated zip, pickle error, ...: all mean "corrupted"
        fail(f"checkpoint {path} is corrupted or not a checkpoint ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("meta", {}).get("format") != expected_format:
        fail(f"{path} is not a {expected_format} checkpoint")
    return checkpoint


def checkpoint_paths(sources: tuple[str, ...], default: Path, num_agents: int | None) -> list[Path]:
    """The agent files named by --checkpoints (folders give their agent_*.pt in agent order), the first N of them."""
    paths = []
    for source in map(Path, sources or (default,)):
        if source.is_dir():
            found = sorted(source.glob("agent_*.pt"), key=lambda p: (len(p.name), p.name))  # agent_2 before agent_10
            if not found:
                fail(f"{source} holds no agent_*.pt checkpoints")
            paths += found
        elif not sources:
            fail(f"no checkpoints at {source}: pre-train with python cql_pretrain.py --env <dataset> "
                 f"or pass --checkpoints")
        else:
            paths.append(source)
    if len({p.resolve() for p in paths}) != len(paths):
        fail(f"a checkpoint is listed twice in {', '.join(map(str, paths))}")
    if num_agents is not None:
        if not 1 <= num_agents <= len(paths):
            fail(f"--num-agents must lie between 1 and the {len(paths)} checkpoints given, not {num_agents}")
        paths = paths[:num_agents]
    return paths


def check_agents(paths: list[Path], checkpoints: list[dict], data: OfflineData, obs_dim: int, act_dim: int) -> tuple:
    """The members' common hidden sizes; fails unless all were made for this env and have one shape."""
    hidden = tuple(checkpoints[0]["meta"]["hidden_sizes"])
    for path, checkpoint in zip(paths, checkpoints):
        meta = checkpoint["meta"]
        if (meta["gym_env_id"], meta["obs_dim"], meta["act_dim"]) != (data.gym_env_id, obs_dim, act_dim):
            fail(f"{path} was trained for {meta['gym_env_id']} (obs {meta['obs_dim']}, actions {meta['act_dim']}) but "
                 f"--env {data.dataset_id} is {data.gym_env_id} (obs {obs_dim}, actions {act_dim})")
        if tuple(meta["hidden_sizes"]) != hidden:
            fail(f"{path} has hidden sizes {tuple(meta['hidden_sizes'])} but {paths[0]} has {hidden}: "
                 f"the members of one ensemble must have one shape")
    return hidden


def stack_members(module: nn.Module, checkpoints: list[dict], key: str) -> None:
    """Load the agents' `key` tensors, concatenated along the ensemble axis, into module."""
    try:
        module.load_state_dict({name: torch.cat([c[key][name] for c in checkpoints]) for name in module.state_dict()})
    except (KeyError, RuntimeError) as error:
        fail(f"the {key!r} tensors of the checkpoints do not fit the shapes their meta records "
             f"({type(error).__name__})")


def save_run(save_dir: Path, nets: dict, optimizers: dict, run_state: dict, meta: dict) -> None:
    """agent_k.pt: agent k's actor, critics, target critics, log alpha and Adam moments; run_state.pt: the rest."""
    save_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({**run_state, "meta": {**meta, "format": RUN_STATE_FORMAT}}, save_dir / "run_state.pt")
    for k in range(nets["actor"].net[0].weight.shape[0]):
        rows = {"actor": slice(k, k + 1), "critic": slice(2 * k, 2 * k + 2), "target_critic": slice(2 * k, 2 * k + 2)}
        checkpoint = {name: {key: value[rows[name]].clone() for key, value in nets[name].state_dict().items()}
                      for name in rows}
        checkpoint["log_alpha"] = nets["log_alpha"].detach().clone()
        checkpoint["optimizers"] = {name: slice_optimizer_state(optimizers[name].state_dict(), rows[name])
                                    for name in ("actor", "critic")}
        checkpoint["meta"] = {**meta, "format": FINETUNED_FORMAT, "agent": k}
        atomic_save(checkpoint, save_dir / f"agent_{k}.pt")


# ---------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    if args.total_steps < 1 or args.steps_per_epoch < 1 or args.total_steps % args.steps_per_epoch:
        fail("--total-steps must be a positive multiple of --steps-per-epoch")
    if args.batch_size < 1 or args.eval_episodes < 1 or args.first_epoch_multiplier < 1 or args.save_every < 1:
        fail("--batch-size, --eval-episodes, --first-epoch-multiplier and --save-every must be >= 1")
    if not 0.0 < args.init_online_fraction < 1.0:
        fail("--init-online-fraction must lie strictly between 0 and 1")
    if args.online_buffer_size < args.steps_per_epoch:
        fail("--online-buffer-size must hold at least one epoch (--steps-per-epoch) of transitions")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.env)
    save_dir = Path(args.save_dir or f"checkpoints/{ALGORITHM}__{slug}__seed{args.seed}")
    existing = sorted(save_dir.glob("agent_*.pt"), key=lambda p: (len(p.name), p.name))
    if args.resume and args.overwrite:
        fail("--resume and --overwrite exclude each other")
    if existing and not (args.resume or args.overwrite):
        fail(f"{save_dir} already holds {len(existing)} checkpoints: pass --resume to continue them or --overwrite")
    if args.resume and not existing:
        fail(f"--resume: no agent_*.pt in {save_dir}")

    data = load_offline_data(args.env, args.gym_env)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    offline_size = len(data.rewards)
    if args.target_entropy is None:
        args.target_entropy = -float(act_dim)
    if args.resume:  # the fine-tuned agents and the run's state, both from --save-dir
        paths = existing
        checkpoints = [load_checkpoint(p, FINETUNED_FORMAT) for p in paths]
        run_state = load_checkpoint(save_dir / "run_state.pt", RUN_STATE_FORMAT)
        stamps = {(c["meta"]["algorithm"], c["meta"]["env_steps"], c["meta"]["args"]["balanced_replay"])
                  for c in (*checkpoints, run_state)}
        if stamps != {(ALGORITHM, run_state["meta"]["env_steps"], args.balanced_replay)}:
            fail(f"{save_dir} does not hold one {ALGORITHM} run saved at one step with balanced_replay="
                 f"{args.balanced_replay}: its files say (algorithm, env steps, balanced replay) = {sorted(stamps)}")
        saved = (len(paths), run_state["meta"]["offline_size"], run_state["replay"]["online_size"])
        if args.num_agents not in (None, saved[0]) or saved[1] != offline_size or saved[2] > args.online_buffer_size:
            fail(f"{save_dir} holds {saved[0]} agents, {saved[1]:,} offline and {saved[2]:,} online transitions, which "
                 f"--num-agents {args.num_agents}, --env ({offline_size:,}) or --online-buffer-size do not fit")
    else:  # the pre-trained CQL agents
        paths = checkpoint_paths(args.checkpoints, Path(f"checkpoints/{slug}__seed1"), args.num_agents)
        checkpoints = [load_checkpoint(p, CQL_FORMAT) for p in paths]
    hidden = check_agents(paths, checkpoints, data, obs_dim, act_dim)
    if any(c["meta"]["dataset_id"] != data.dataset_id for c in checkpoints):
        print(f"note: the checkpoints were trained on {sorted({c['meta']['dataset_id'] for c in checkpoints})}, "
              f"the offline data here is {data.dataset_id}")
    n = len(paths)

    # The ensemble: actor member k = agent k's actor, critic member 2k + j = agent k's critic j
    torch.manual_seed(args.seed)
    actor = Actor(obs_dim, act_dim, hidden, n)
    critic = Critic(obs_dim, act_dim, hidden, 2 * n)
    target_critic = Critic(obs_dim, act_dim, hidden, 2 * n)
    stack_members(actor, checkpoints, "actor")
    stack_members(critic, checkpoints, "critic")
    stack_members(target_critic, checkpoints, "target_critic" if args.resume else "critic")  # SPEC: targets = critics
    actor, critic, target_critic = actor.to(device), critic.to(device), target_critic.to(device)
    target_critic.requires_grad_(False)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)  # fresh temperature, alpha = 1 (SPEC)
    density_ratio = None
    if args.balanced_replay:
        density_ratio = DensityRatio(obs_dim + act_dim, tuple(args.density_ratio_hidden_sizes)).to(device)
    adam = dict(fused=True, capturable=device.type == "cuda")  # capturable: its step count lives on the GPU
    optimizers = {  # stepped in this order: alpha, policy, critics, density ratio (Off2OnRL official)
        "alpha": torch.optim.Adam([log_alpha], lr=args.policy_lr, **adam),
        "actor": torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam),
        "critic": torch.optim.Adam(critic.parameters(), lr=args.critic_lr, **adam),
    }
    if density_ratio is not None:
        optimizers["density_ratio"] = torch.optim.Adam(density_ratio.parameters(), lr=args.density_ratio_lr, **adam)
    # one random stream for the batches and the action noise: the device's default one, which CUDA graphs can replay
    generator = (torch.default_generator if device.type == "cpu"
                 else torch.cuda.default_generators[torch.cuda.current_device()])
    generator.manual_seed(args.seed)
    nets = {"actor": actor, "critic": critic, "target_critic": target_critic, "log_alpha": log_alpha,
            "density_ratio": density_ratio}
    offline_rows = pack(data.observations, data.actions, data.rewards, data.next_observations, data.terminals)
    p_max = initial_online_priority(offline_size, args.init_online_fraction, args.steps_per_epoch)
    replay = BalancedReplay(torch.as_tensor(offline_rows, device=device), args.online_buffer_size,
                            args.balanced_replay, p_max)
    env_steps = grad_steps = 0

    if args.resume:
        for name, opt in optimizers.items():
            if name in ("actor", "critic"):
                opt.load_state_dict(concat_optimizer_states([c["optimizers"][name] for c in checkpoints]))
            else:
                opt.load_state_dict(run_state["optimizers"][name])
            for group in opt.param_groups:  # the saved run may have used the other device
                group["capturable"] = device.type == "cuda"
        with torch.no_grad():
            log_alpha.copy_(checkpoints[0]["log_alpha"])
        if density_ratio is not None:
            density_ratio.load_state_dict(run_state["density_ratio"])
        replay.load_state_dict(run_state["replay"])
        if run_state["generator_state"].numel() != generator.get_state().numel():  # CPU and CUDA states differ
            fail(f"the run in {save_dir} was saved on another kind of device: resume on that --device")
        generator.set_state(run_state["generator_state"])
        env_steps, grad_steps = run_state["meta"]["env_steps"], run_state["meta"]["grad_steps"]
        print(f"resumed {n} fine-tuned agents from {save_dir} at env step {env_steps:,}")

    run_dir = Path(args.run_dir or f"runs/{ALGORITHM}__{slug}__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_csv = run_dir / "eval.csv"
    if eval_csv.exists() and not (args.resume or args.overwrite):
        fail(f"{eval_csv} already exists: pass --resume to append to it, --overwrite to start it anew, or another --run-dir")
    new_csv = not (eval_csv.exists() and args.resume)
    csv_file = open(eval_csv, "a" if args.resume else "w", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(["step", "return", "normalized_score"])
    meta = dict(
        algorithm=ALGORITHM, version=PROJECT_VERSION, dataset_id=data.dataset_id, gym_env_id=data.gym_env_id,
        obs_dim=obs_dim, act_dim=act_dim, hidden_sizes=list(hidden), num_agents=n, offline_size=offline_size,
        pretrained=[str(p) for p in paths] if not args.resume else checkpoints[0]["meta"]["pretrained"],
        args={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()},
    )
    wandb = None
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, config=meta["args"], name=run_dir.name)
    print(f"dataset {data.dataset_id}: {offline_size:,} transitions, env {data.gym_env_id}, reference returns: "
          f"{data.ref_source}; ensemble of {n} agents (hidden {hidden}) on {device}; "
          f"{'balanced' if args.balanced_replay else 'uniform'} replay; run dir {run_dir}; checkpoints {save_dir}")

    def evaluate_and_log(step: int, train_log: str = "") -> None:
        returns = evaluate(actor, data.gym_env_id, args.eval_episodes, args.seed + 10_000, device)
        score = float(normalized_score(returns.mean(), data.ref_min_score, data.ref_max_score))
        writer.writerow([step, f"{returns.mean():.3f}", f"{score:.3f}"])
        csv_file.flush()
        print(f"env steps {step:,}: return {returns.mean():.1f} normalized {score:.1f}{train_log}", flush=True)
        if wandb:
            wandb.log({"eval/return": returns.mean(), "eval/normalized_score": score}, step=step)

    started = cycle_start = time.perf_counter()  # a cycle: evaluation, saving, collecting, training
    steps_at_start = env_steps
    if env_steps == 0:
        evaluate_and_log(0)  # the pre-trained ensemble, the first point of the paper's Fig. 2
    env = gym.make(data.gym_env_id)
    obs = env.reset(seed=args.seed + env_steps)[0]  # a resumed run starts a fresh training episode
    for epoch in range(env_steps // args.steps_per_epoch, args.total_steps // args.steps_per_epoch):
        # Collect: the epoch's transitions go into the online buffer with priority P_max
        rows, obs = collect(env, obs, actor, args.steps_per_epoch, generator, device)
        replay.add(torch.as_tensor(rows, device=device))
        env_steps += len(rows)

        # Train: --steps-per-epoch gradient steps (times --first-epoch-multiplier in epoch 0)
        num_updates = args.steps_per_epoch * (args.first_epoch_multiplier if epoch == 0 else 1)
        timer, sums = time.perf_counter(), 0
        step = functools.partial(finetune_update, nets, optimizers, replay, generator, args)
        for i in range(num_updates):
            if i == CUDA_GRAPH_WARMUP and args.cuda_graph and device.type == "cuda":
                step = cuda_graphed(step)  # recorded again every epoch: the online buffer's size changed
            metrics = step()
            sums = sums + torch.stack(list(metrics.values()))
        grad_steps += num_updates
        means = dict(zip(metrics, (sums / num_updates).tolist()))  # the epoch's only host-device sync
        speed = num_updates / (time.perf_counter() - timer)
        env_speed = len(rows) / (time.perf_counter() - cycle_start)  # everything since the last epoch's training
        cycle_start = time.perf_counter()
        if not all(math.isfinite(means[key]) for key in ("critic_loss", "actor_loss", "ratio_loss")):
            fail(f"a loss became non-finite in epoch {epoch} (critic {means['critic_loss']}, actor "
                 f"{means['actor_loss']}, density ratio {means['ratio_loss']}); the checkpoints in {save_dir} "
                 f"were left as they were")

        train_log = (f" | Q {means['q_mean']:.2f}"
                     f" | alpha {means['alpha']:.4f} | online fraction {means['online_fraction']:.3f}"
                     f" | {speed:.1f} updates/s | {env_speed:.1f} env steps/s")
        evaluate_and_log(env_steps, train_log)
        if wandb:
            speeds = {"updates_per_s": speed, "env_steps_per_s": env_speed}
            wandb.log({f"train/{key}": value for key, value in means.items()} | speeds, step=env_steps)
        if (epoch + 1) % args.save_every == 0 or env_steps == args.total_steps:
            run_state = dict(  # the per-agent files hold the actor's and critics' Adam moments
                optimizers={name: opt.state_dict() for name, opt in optimizers.items()
                            if name not in ("actor", "critic")},
                density_ratio=None if density_ratio is None else density_ratio.state_dict(),
                replay=replay.state_dict(), generator_state=generator.get_state(),
            )
            save_run(save_dir, nets, optimizers, run_state, {**meta, "env_steps": env_steps, "grad_steps": grad_steps})
    csv_file.close()
    env.close()
    minutes = (time.perf_counter() - started) / 60
    print(f"{env_steps - steps_at_start:,} env steps in {minutes:.1f} min; saved {n} fine-tuned agents to {save_dir}; "
          f"evaluations in {eval_csv}")


if __name__ == "__main__":
    main(tyro.cli(Args))
