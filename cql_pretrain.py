"""Offline CQL(H) pre-training of N agents: the first stage of UPQ (Jang, Kim, Noh).

Conservative Q-Learning (Kumar et al. 2020), Eq. (1) of the UPQ paper, with the defaults of
the official code (aviralkumar2907/CQL, "min_q_version 3"): SAC actor-critic with twin critics,
an importance-sampled logsumexp over 30 actions per state, and a behaviour-cloning warm-up.
N agents with seeds seed, seed+1, ... are trained side by side in one process; their weights
live in ensemble-shaped tensors ([N, in, out]) so one matmul serves all agents, but every
agent draws its own minibatches and action noise from its own generator and has its own loss.

    python cql_pretrain.py --env hopper-medium-v2 --save-dir checkpoints/hopper-medium-v2

writes checkpoints/hopper-medium-v2/agent_0.pt ... agent_3.pt, read by off2on_finetune.py
and upq_finetune.py. See SPEC.md section 1 for every default and its source.
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

PROJECT_VERSION = "0.1.0"
CHECKPOINT_FORMAT = "upq-cql-agent-v1"
CUDA_GRAPH_WARMUP = 3  # eager updates at the start of each phase (BC warm-up, CQL) before its step is recorded as a CUDA graph


@dataclass
class Args:
    env: str = "hopper-medium-v2"
    """dataset: a D4RL name (hopper-medium-v2, walker2d-medium-replay-v2, ...), a Minari id (mujoco/hopper/medium-v0, local/hopper/medium-v0 from make_dataset.py) or a path to a D4RL-layout .hdf5 file"""
    gym_env: str | None = None
    """gymnasium env used for evaluation (default: the dataset's own; Hopper-v5 etc. for D4RL names)"""
    num_agents: int = 4
    """N, the number of CQL agents; agent k uses seed `seed + k` (paper: 4)"""
    seed: int = 1
    """base seed"""
    total_steps: int = 1_000_000
    """gradient steps per agent (paper: 1,000 epochs x 1,000 steps)"""
    batch_size: int = 256
    """minibatch size per agent (official CQL)"""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics (Off2OnRL's CQL checkpoints: 256 256; official CQL: 256 256 256)"""
    gamma: float = 0.99
    """discount (official CQL)"""
    tau: float = 5e-3
    """soft target update rate, every step (official CQL)"""
    critic_lr: float = 3e-4
    """critic learning rate, Adam (official CQL)"""
    policy_lr: float = 1e-4
    """actor and temperature learning rate, Adam (official CQL)"""
    min_q_weight: float = 5.0
    """weight of the conservative term, alpha in Eq. (1) (official README for MuJoCo: 5; 10 also reported)"""
    num_random: int = 10
    """actions per state for each of the three logsumexp groups (official CQL)"""
    cql_temperature: float = 1.0
    """temperature of the logsumexp (official CQL)"""
    lagrange_threshold: float | None = None
    """if set, tune the conservative weight by dual gradient so the gap stays at this value (official: off for MuJoCo)"""
    bc_steps: int = 40_000
    """behaviour-cloning warm-up: gradient steps with the BC policy loss (official CQL "policy_eval_start")"""
    target_entropy: float | None = None
    """SAC target entropy (default -|A|, official CQL)"""
    eval_every: int = 10_000
    """evaluate every this many gradient steps (and at the end)"""
    eval_episodes: int = 5
    """deterministic evaluation episodes per agent"""
    save_every: int = 50_000
    """write checkpoints every this many gradient steps (and at the end)"""
    log_every: int = 1_000
    """print a log line every this many gradient steps"""
    save_dir: str | None = None
    """where agent_0.pt ... agent_{N-1}.pt go (default checkpoints/<env>__seed<seed>)"""
    run_dir: str | None = None
    """where eval.csv goes (default runs/cql_pretrain__<env>__<seed>__<time>)"""
    resume: bool = False
    """continue from the checkpoints already in --save-dir"""
    overwrite: bool = False
    """replace the checkpoints already in --save-dir"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available"""
    compile: bool = False
    """torch.compile the losses (fuses the elementwise work; on 2 CPU cores, N = 4: +30% updates/s after ~1 min of compilation)"""
    cuda_graph: bool = True
    """on cuda, record the whole update (sampling, noise, losses, Adam, target update) once per phase as a CUDA graph and replay it"""
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


# ---------------------------------------------------------------------------------------------
# CQL math (Eq. 1): small pure functions, checked against hand computations in tests/
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


def action_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of given (dataset) actions, for the behaviour-cloning warm-up."""
    pre_tanh = torch.atanh(actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def cql_logsumexp(q_random, q_current, q_next, log_prob_current, log_prob_next, act_dim: int, temperature: float):
    """Importance-sampled logsumexp of CQL(H) ("min_q_version 3"), per state: [..., B].

    q_random [..., R, B]: Q(s, a ~ U[-1, 1]^|A|), density 0.5^|A|;
    q_current [..., R, B]: Q(s, a ~ pi(.|s)), log-density log_prob_current;
    q_next [..., R, B]: Q(s, a' ~ pi(.|s')), log-density log_prob_next (a' drawn at s', evaluated at s).
    """
    uniform_log_density = act_dim * math.log(0.5)
    stacked = torch.cat(
        [q_random - uniform_log_density, q_next - log_prob_next.detach(), q_current - log_prob_current.detach()], dim=-2
    )
    return temperature * torch.logsumexp(stacked / temperature, dim=-2)


def conservative_gap(logsumexp: torch.Tensor, q_data: torch.Tensor) -> torch.Tensor:
    """E_s[logsumexp_a Q(s, a)] - E_(s,a)~D[Q(s, a)], the bracket of Eq. (1): [...] over the batch axis."""
    return logsumexp.mean(-1) - q_data.mean(-1)


def bellman_target(rewards, terminals, next_q_min, gamma: float) -> torch.Tensor:
    """r + gamma (1 - terminal) min(Q1', Q2')(s', a'): the deterministic backup of official CQL."""
    return rewards + gamma * (1.0 - terminals) * next_q_min


def policy_loss(alpha, log_prob, q_policy, bc_log_prob, behaviour_cloning: bool) -> torch.Tensor:
    """alpha log pi(a~|s) - min Q(s, a~) after the warm-up; alpha log pi(a~|s) - log pi(a_data|s) during it."""
    target = bc_log_prob if behaviour_cloning else q_policy
    return (alpha * log_prob - target).mean(-1)


# ---------------------------------------------------------------------------------------------
# The update: all N agents in one graph, each with its own batch, noise and loss
# ---------------------------------------------------------------------------------------------
def cql_losses(actor, critic, target_critic, log_alpha, log_alpha_prime, batch, noise, args, act_dim,
               behaviour_cloning: bool):
    """Losses of one CQL step for N agents. batch tensors [N, B, ...]; noise from each agent's generator.

    Returns (total loss to backpropagate, dict of per-agent metrics [N]).
    The actor's loss sees the critics frozen, the critics' loss sees sampled actions detached, so one
    backward pass gives each network the gradient of its own objective (as the official code's
    separate optimisers do).
    """
    obs, actions, rewards, next_obs, terminals = batch
    num_agents, batch_size = rewards.shape
    num_random = args.num_random
    alpha = log_alpha.exp().detach()[:, None]  # [N, 1]

    def per_critic(x):  # [N, ...] -> [2N, ...]: each agent's input to both of its critics
        return x.repeat_interleave(2, dim=0)

    def twin(q):  # [2N, ...] -> [N, 2, ...]
        return q.view(num_agents, 2, *q.shape[1:])

    mean, log_std = actor(torch.cat([obs, next_obs], dim=1))  # [N, 2B, A]
    mean_s, mean_next = mean.split(batch_size, dim=1)
    log_std_s, log_std_next = log_std.split(batch_size, dim=1)

    # Actions at s for the policy loss (1) and the logsumexp (R); at s' for the target (1) and logsumexp (R)
    rep = 1 + num_random
    a_s, logp_s = tanh_gaussian_sample(mean_s.repeat(1, rep, 1), log_std_s.repeat(1, rep, 1), noise["s"])
    a_next, logp_next = tanh_gaussian_sample(mean_next.repeat(1, rep, 1), log_std_next.repeat(1, rep, 1), noise["next"])
    a_policy, logp_policy = a_s[:, :batch_size], logp_s[:, :batch_size]  # [N, B, A], [N, B]

    # Critic loss: TD to the deterministic backup + the conservative term
    with torch.no_grad():
        next_q = twin(target_critic(per_critic(next_obs), per_critic(a_next[:, :batch_size]))).min(1).values
        td_target = bellman_target(rewards, terminals, next_q, args.gamma)  # [N, B]
    cql_actions = torch.cat([noise["uniform"], a_s[:, batch_size:].detach(), a_next[:, batch_size:].detach()], dim=1)
    all_actions = torch.cat([actions, cql_actions], dim=1)  # [N, (1 + 3R) B, A]
    all_obs = torch.cat([obs, obs.repeat(1, 3 * num_random, 1)], dim=1)
    q_all = twin(critic(per_critic(all_obs), per_critic(all_actions)))  # [N, 2, (1 + 3R) B]
    q_data = q_all[..., :batch_size]  # [N, 2, B]
    q_random, q_current, q_next = q_all[..., batch_size:].unflatten(-1, (3, num_random, batch_size)).unbind(2)
    logsumexp = cql_logsumexp(
        q_random, q_current, q_next,
        logp_s[:, None, batch_size:].unflatten(-1, (num_random, batch_size)),
        logp_next[:, None, batch_size:].unflatten(-1, (num_random, batch_size)),
        act_dim, args.cql_temperature,
    )  # [N, 2, B]
    gap = conservative_gap(logsumexp, q_data)  # [N, 2]
    td_loss = ((q_data - td_target[:, None]) ** 2).mean(-1)  # [N, 2]
    if log_alpha_prime is None:
        conservative = args.min_q_weight * gap
        alpha_prime_loss = torch.zeros((), device=obs.device)
    else:  # dual gradient: alpha' grows while the gap exceeds the threshold
        alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)[:, None]  # [N, 1]
        conservative = alpha_prime.detach() * args.min_q_weight * (gap - args.lagrange_threshold)
        alpha_prime_loss = -(alpha_prime * args.min_q_weight * (gap.detach() - args.lagrange_threshold)).mean(1).sum()
    critic_loss = (td_loss + conservative).sum(1)  # [N]: Q1 + Q2 losses of each agent

    # Actor loss with the critics frozen, and SAC temperature loss
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    q_policy = twin(torch.func.functional_call(critic, frozen, (per_critic(obs), per_critic(a_policy)))).min(1).values
    bc_log_prob = action_log_prob(mean_s, log_std_s, actions)
    actor_loss = policy_loss(alpha, logp_policy, q_policy, bc_log_prob, behaviour_cloning)  # [N]
    alpha_loss = -(log_alpha[:, None] * (logp_policy.detach() + args.target_entropy)).mean(-1)  # [N]

    total = critic_loss.sum() + actor_loss.sum() + alpha_loss.sum() + alpha_prime_loss
    metrics = dict(
        critic_loss=critic_loss, actor_loss=actor_loss, alpha=alpha[:, 0], q_data=q_data.mean((1, 2)),
        cql_gap=gap.mean(1),
    )
    return total, metrics


def cql_update(actor, critic, target_critic, log_alpha, log_alpha_prime, optimizers, batch, noise, args, act_dim, step,
               losses=cql_losses):
    """One gradient step of all N agents: losses, one backward, Adam steps, soft target update (tau).

    `losses` is cql_losses, or torch.compile(cql_losses) with --compile.
    """
    behaviour_cloning = step < args.bc_steps
    loss, metrics = losses(actor, critic, target_critic, log_alpha, log_alpha_prime, batch, noise, args, act_dim,
                           behaviour_cloning)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), args.tau)
    # detached: a caller that keeps them must not keep this step's autograd graph alive (it breaks CUDA graph capture)
    return loss.detach(), {key: value.detach() for key, value in metrics.items()}


def cuda_graphed(step, generators):
    """Record one call of step() as a CUDA graph; returns a function that replays it and returns step()'s outputs.

    A replay launches the recorded kernels on the same tensors with no Python in between, so every state the step
    changes must change in place. The agents' generators are registered with the graph: each replay advances them
    exactly as an eager call would, so a graphed run draws the same numbers as an eager one.
    """
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        outputs = step()

    def replay():
        graph.replay()
        return outputs

    return replay


def draw_noise(generators, batch_size, act_dim, num_random, device):
    """Each agent's action noise for one step, from its own generator: dict of [N, R*B, A]."""
    rep = 1 + num_random
    gaussian = torch.stack([torch.randn(2 * rep * batch_size, act_dim, generator=g, device=device) for g in generators])
    uniform = torch.stack([torch.rand(num_random * batch_size, act_dim, generator=g, device=device) for g in generators])
    s_noise, next_noise = gaussian.split(rep * batch_size, dim=1)
    return {"s": s_noise, "next": next_noise, "uniform": 2.0 * uniform - 1.0}


def sample_batch(data: dict[str, torch.Tensor], generators, batch_size: int):
    """Each agent's minibatch, indices from its own generator: tensors [N, B, ...]."""
    size = data["rewards"].shape[0]
    device = data["rewards"].device
    index = torch.stack([torch.randint(size, (batch_size,), generator=g, device=device) for g in generators])
    return tuple(data[key][index] for key in ("observations", "actions", "rewards", "next_observations", "terminals"))


# ---------------------------------------------------------------------------------------------
# Evaluation: all agents' episodes in lockstep, one batched actor call per env step
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor: Actor, env_id: str, num_agents: int, episodes: int, seed: int, device) -> np.ndarray:
    """Undiscounted returns [N, episodes] of the deterministic policies tanh(mean)."""
    envs = [[gym.make(env_id) for _ in range(episodes)] for _ in range(num_agents)]
    obs = np.stack([[env.reset(seed=seed + e)[0] for e, env in enumerate(row)] for row in envs])
    returns = np.zeros((num_agents, episodes))
    running = np.ones((num_agents, episodes), dtype=bool)
    while running.any():
        mean, _ = actor(torch.as_tensor(obs, dtype=torch.float32, device=device))
        actions = torch.tanh(mean).cpu().numpy()
        for k, e in zip(*np.nonzero(running)):
            obs[k, e], reward, terminated, truncated, _ = envs[k][e].step(actions[k, e])
            returns[k, e] += reward
            running[k, e] = not (terminated or truncated)
    for row in envs:
        for env in row:
            env.close()
    return returns


# ---------------------------------------------------------------------------------------------
# Checkpoints: one file per agent, the agent's slice of the ensemble tensors
# ---------------------------------------------------------------------------------------------
def agent_slices(k: int) -> dict[str, slice]:
    return {"actor": slice(k, k + 1), "critic": slice(2 * k, 2 * k + 2), "scalar": slice(k, k + 1)}


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


def save_checkpoints(save_dir: Path, nets: dict, optimizers: dict, generators, meta: dict, scores) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    for k in range(len(generators)):
        rows = agent_slices(k)
        kind = {"actor": "actor", "critic": "critic", "target_critic": "critic", "log_alpha": "scalar",
                "log_alpha_prime": "scalar"}
        checkpoint = {
            name: {key: value[rows[kind[name]]].clone() for key, value in net.state_dict().items()}
            if isinstance(net, nn.Module) else net[rows[kind[name]]].detach().clone()
            for name, net in nets.items() if net is not None
        }
        opt_rows = {"actor": rows["actor"], "critic": rows["critic"], "alpha": rows["scalar"], "alpha_prime": rows["scalar"]}
        checkpoint["optimizers"] = {
            name: slice_optimizer_state(opt.state_dict(), opt_rows[name]) for name, opt in optimizers.items()
        }
        checkpoint["generator_state"] = generators[k].get_state()
        checkpoint["meta"] = {**meta, "agent": k, "seed": meta["args"]["seed"] + k,
                              "normalized_score": None if scores is None else float(scores[k])}
        atomic_save(checkpoint, save_dir / f"agent_{k}.pt")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file, or one clear sentence on why it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- truncated zip, pickle error, ...: all mean "corrupted"
        fail(f"checkpoint {path} is corrupted or not a checkpoint ({type(error).__name__}: {error})")
    if not isinstance(checkpoint, dict) or checkpoint.get("meta", {}).get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a cql_pretrain.py checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint


def make_agents(obs_dim: int, act_dim: int, hidden: tuple[int, ...], num_agents: int, seed: int):
    """Actor [N] and critics [2N] where agent k is initialised under seed + k, as in a run of its own."""
    actor, critic = Actor(obs_dim, act_dim, hidden, num_agents), Critic(obs_dim, act_dim, hidden, 2 * num_agents)
    with torch.no_grad():
        for k in range(num_agents):
            torch.manual_seed(seed + k)
            single_actor, single_critic = Actor(obs_dim, act_dim, hidden, 1), Critic(obs_dim, act_dim, hidden, 2)
            rows = agent_slices(k)
            for big, small, part in ((actor, single_actor, rows["actor"]), (critic, single_critic, rows["critic"])):
                for param, value in zip(big.parameters(), small.parameters()):
                    param[part] = value
    return actor, critic


# ---------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    if args.num_agents < 1 or args.batch_size < 1 or args.total_steps < 0 or args.eval_episodes < 1:
        fail("--num-agents, --batch-size and --eval-episodes must be >= 1 and --total-steps >= 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.env)
    save_dir = Path(args.save_dir or f"checkpoints/{slug}__seed{args.seed}")
    existing = sorted(save_dir.glob("agent_*.pt"))
    if existing and not (args.resume or args.overwrite):
        fail(f"{save_dir} already holds {len(existing)} checkpoints: pass --resume to continue them or --overwrite")
    if args.resume and args.overwrite:
        fail("--resume and --overwrite exclude each other")
    if args.resume and not existing:
        fail(f"--resume: no agent_*.pt in {save_dir}")

    data = load_offline_data(args.env, args.gym_env)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    if args.target_entropy is None:
        args.target_entropy = -float(act_dim)
    hidden = tuple(args.hidden_sizes)
    n = args.num_agents

    actor, critic = make_agents(obs_dim, act_dim, hidden, n, args.seed)
    actor, critic = actor.to(device), critic.to(device)
    target_critic = Critic(obs_dim, act_dim, hidden, 2 * n).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    log_alpha = torch.zeros(n, device=device, requires_grad=True)
    log_alpha_prime = None if args.lagrange_threshold is None else torch.zeros(n, device=device, requires_grad=True)
    adam = dict(fused=True, capturable=device.type == "cuda")  # capturable: its step count lives on the GPU
    optimizers = {
        "actor": torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam),
        "critic": torch.optim.Adam(critic.parameters(), lr=args.critic_lr, **adam),
        "alpha": torch.optim.Adam([log_alpha], lr=args.policy_lr, **adam),
    }
    if log_alpha_prime is not None:
        optimizers["alpha_prime"] = torch.optim.Adam([log_alpha_prime], lr=args.critic_lr, **adam)
    generators = [torch.Generator(device=device) for _ in range(n)]
    for k, g in enumerate(generators):
        g.manual_seed(args.seed + k)

    start_step = 0
    if args.resume:
        checkpoints = [load_checkpoint(save_dir / f"agent_{k}.pt") for k in range(n)]
        for k, ckpt in enumerate(checkpoints):
            meta = ckpt["meta"]
            if (meta["obs_dim"], meta["act_dim"], tuple(meta["hidden_sizes"])) != (obs_dim, act_dim, hidden):
                fail(f"{save_dir / f'agent_{k}.pt'} was made for other shapes ({meta['gym_env_id']}, hidden {meta['hidden_sizes']})")
        steps_done = {ckpt["meta"]["grad_steps"] for ckpt in checkpoints}
        if len(steps_done) != 1:
            fail(f"the checkpoints in {save_dir} are at different steps {sorted(steps_done)}")
        start_step = steps_done.pop()
        with torch.no_grad():
            for name, net in (("actor", actor), ("critic", critic), ("target_critic", target_critic)):
                net.load_state_dict({key: torch.cat([c[name][key] for c in checkpoints]) for key in checkpoints[0][name]})
            log_alpha.copy_(torch.cat([c["log_alpha"] for c in checkpoints]))
            if log_alpha_prime is not None:
                log_alpha_prime.copy_(torch.cat([c["log_alpha_prime"] for c in checkpoints]))
        for name, opt in optimizers.items():
            state = concat_optimizer_states([c["optimizers"][name] for c in checkpoints])
            for group in state["param_groups"]:  # this run's device settings, not the saving run's
                group.update(foreach=None, **adam)
            opt.load_state_dict(state)
        for g, ckpt in zip(generators, checkpoints):
            if ckpt["generator_state"].numel() != g.get_state().numel():  # a CPU and a CUDA generator's states differ
                fail(f"the checkpoints in {save_dir} were saved on another kind of device: resume on that --device")
            g.set_state(ckpt["generator_state"])
        print(f"resumed {n} agents from {save_dir} at step {start_step}")

    tensors = {key: torch.as_tensor(getattr(data, key), device=device)
               for key in ("observations", "actions", "rewards", "next_observations", "terminals")}
    run_dir = Path(args.run_dir or f"runs/cql_pretrain__{slug}__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_csv = run_dir / "eval.csv"
    if eval_csv.exists() and not (args.resume or args.overwrite):
        fail(f"{eval_csv} already exists: pass --resume to append to it, --overwrite to start it anew, or another --run-dir")
    new_csv = not (eval_csv.exists() and args.resume)
    csv_file = open(eval_csv, "a" if args.resume else "w", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(["step", "agent", "return", "normalized_score"])
    meta = dict(
        format=CHECKPOINT_FORMAT, version=PROJECT_VERSION, dataset_id=data.dataset_id, gym_env_id=data.gym_env_id,
        obs_dim=obs_dim, act_dim=act_dim, hidden_sizes=list(hidden), num_agents=n,
        args={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(args).items()},
    )
    wandb = None
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, config=meta["args"], name=run_dir.name)
    print(f"dataset {data.dataset_id}: {len(data.rewards):,} transitions, env {data.gym_env_id}, "
          f"reference returns: {data.ref_source}; {n} agents on {device}; run dir {run_dir}; checkpoints {save_dir}")

    nets = {"actor": actor, "critic": critic, "target_critic": target_critic, "log_alpha": log_alpha,
            "log_alpha_prime": log_alpha_prime}
    scores = None

    def evaluate_and_log(step: int):
        returns = evaluate(actor, data.gym_env_id, n, args.eval_episodes, args.seed + 10_000, device)
        per_agent = normalized_score(returns, data.ref_min_score, data.ref_max_score).mean(1)
        for k in range(n):
            writer.writerow([step, k, f"{returns[k].mean():.3f}", f"{per_agent[k]:.3f}"])
        csv_file.flush()
        print(f"eval step {step}: return {returns.mean():.1f} normalized {np.mean(per_agent):.1f} "
              f"(per agent {', '.join(f'{s:.1f}' for s in per_agent)})", flush=True)
        if wandb:
            wandb.log({"eval/return": returns.mean(), "eval/normalized_score": float(np.mean(per_agent))}, step=step)
        return per_agent

    losses = torch.compile(cql_losses) if args.compile else cql_losses

    def train_step(step: int):  # one update of all agents: their minibatches, action noise, losses and optimiser steps
        batch = sample_batch(tensors, generators, args.batch_size)
        noise = draw_noise(generators, args.batch_size, act_dim, args.num_random, device)
        return cql_update(actor, critic, target_critic, log_alpha, log_alpha_prime, optimizers, batch, noise, args,
                          act_dim, step, losses)

    graphs = {}  # behaviour cloning on/off -> the recorded update of that phase
    timer, timer_step = time.perf_counter(), start_step
    for step in range(start_step, args.total_steps):
        if step % args.eval_every == 0 and step > start_step or (step == 0 and start_step == 0):
            scores = evaluate_and_log(step)
            timer, timer_step = time.perf_counter(), step
        cloning = step < args.bc_steps
        phase_start = max(start_step, 0 if cloning else args.bc_steps)
        record = args.cuda_graph and device.type == "cuda" and step - phase_start == CUDA_GRAPH_WARMUP
        if record:  # the step's tensors stay allocated; the graph replays it from here to the phase's end
            graphs[cloning] = cuda_graphed(functools.partial(train_step, step), generators)
        loss, metrics = graphs[cloning]() if cloning in graphs else train_step(step)

        done = step + 1
        if done % args.log_every == 0 or done % args.save_every == 0 or done == args.total_steps:
            values = {key: value.detach().cpu().numpy() for key, value in metrics.items()}
            if not np.isfinite(loss.item()):
                fail(f"the loss became {loss.item()} at step {done}; checkpoints in {save_dir} were left as they were")
            speed = (done - timer_step) / (time.perf_counter() - timer)
            print(f"step {done}: critic loss {values['critic_loss'].mean():.3f} actor loss {values['actor_loss'].mean():.3f} "
                  f"Q {values['q_data'].mean():.2f} gap {values['cql_gap'].mean():.2f} alpha {values['alpha'].mean():.4f} "
                  f"{speed:.1f} updates/s", flush=True)
            if wandb:
                wandb.log({f"train/{key}": float(value.mean()) for key, value in values.items()} | {"updates_per_s": speed},
                          step=done)
        if done % args.save_every == 0 and done != args.total_steps:
            save_checkpoints(save_dir, nets, optimizers, generators, {**meta, "grad_steps": done}, scores)
    final = args.total_steps
    if final > start_step or not existing:
        scores = evaluate_and_log(final)
    save_checkpoints(save_dir, nets, optimizers, generators, {**meta, "grad_steps": final}, scores)
    csv_file.close()
    print(f"saved {n} checkpoints to {save_dir}; evaluations in {eval_csv}")


if __name__ == "__main__":
    main(tyro.cli(Args))
