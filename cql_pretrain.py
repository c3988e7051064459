"""Offline CQL(H) pre-training of N agents: the first stage of UPQ (Jang, Kim, Noh).

    python cql_pretrain.py --env hopper-medium-v2

trains N = 4 agents (seeds seed, seed + 1, ...) with Conservative Q-Learning (Kumar et al. 2020), Eq. (1) of the
UPQ paper, with the defaults of the official code (aviralkumar2907/CQL, "min_q_version 3"): SAC actor-critic with
twin critics, an importance-sampled logsumexp over 30 actions per state, and a behaviour-cloning warm-up. The
agents train side by side in one process: their weights live in ensemble-shaped tensors ([N, in, out]) so one
matmul serves all, but every agent draws its own minibatches and action noise from its own generator and has its
own loss, so agent k is what a separate run with seed + k would give.

Where each piece of Eq. (1) lives in this file:
    E_s[log sum_a exp Q(s, a)], importance sampled over 30 actions   cql_logsumexp
    alpha * (E_s[logsumexp] - E_(s,a)~D[Q(s, a)]), the conservative gap   conservative_gap
    the TD term to r + gamma (1 - d) min(Q1', Q2')(s', a')          bellman_target
    the SAC actor (behaviour cloning first) and temperature          policy_loss, temperature_loss_per_agent
    one gradient step of all N agents                                cql_losses, cql_update
    the training loop                                                main

Writes checkpoint.pt to --save-dir (default checkpoints/<env>__seed<seed>): the N agents stacked (agent k = actor
member k, critics 2k and 2k + 1) with the Adam moments and random streams that --resume continues; off2on_finetune.py
and upq_finetune.py start from it. <run-dir> (default
runs/<exp-name>__<env>__<seed>__<time>) holds eval.csv (every --eval-every steps each agent's score, and in the row
with agent `ensemble` the score of their ensemble pi^E, the policy fine-tuning starts from), metrics.csv, train.log
and config.json. SPEC.md section 1 gives every default and its source.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import tyro

import plumbing
from plumbing import CHECKPOINT, fail


@dataclass
class Algorithm:
    """The method (defaults: the official CQL code and the paper; SPEC.md section 1)"""

    num_agents: int = 4
    """N, the number of CQL agents; agent k uses seed `seed + k` (paper: 4)"""
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
    """if set, tune the conservative weight by dual gradient so the gap stays at this value;
    official: off for MuJoCo"""
    bc_steps: int = 40_000
    """behaviour-cloning warm-up: gradient steps with the BC policy loss (official CQL "policy_eval_start")"""
    target_entropy: Annotated[float | None, tyro.conf.arg(
        help_behavior_hint="(default: -|A|, official CQL)")] = None
    """SAC target entropy"""


@dataclass
class Run:
    """The run: data, seed, evaluation, checkpoints and folders"""

    env: str = "hopper-medium-v2"
    """dataset: a D4RL name (hopper-medium-v2, walker2d-medium-replay-v2, ...), a Minari id (mujoco/hopper/medium-v0,
    local/hopper/medium-v0 from make_dataset.py) or a path to a D4RL-layout .hdf5 file"""
    gym_env: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: the dataset's own; Hopper-v5 etc. for D4RL names)")] = None
    """gymnasium env used for evaluation"""
    seed: int = 1
    """base seed: agent k uses seed + k"""
    eval_every: int = 10_000
    """evaluate every this many gradient steps (and at the start and the end)"""
    eval_episodes: int = 5
    """deterministic evaluation episodes per agent, and for their ensemble pi^E"""
    save_every: int = 50_000
    """write the checkpoint every this many gradient steps (and at the end, and on Ctrl-C or SIGTERM)"""
    log_every: int = 1_000
    """a training line (and a metrics.csv row) every this many gradient steps, and at least every minute"""
    exp_name: str = "cql_pretrain"
    """prefix of the run folder's name, runs/<exp-name>__<env>__<seed>__<time> (CleanRL)"""
    save_dir: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: checkpoints/<env>__seed<seed>, where the fine-tuning scripts look)")] = None
    """where checkpoint.pt goes"""
    run_dir: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: runs/<exp-name>__<env>__<seed>__<time>; with --resume, the saved run's)")] = None
    """where eval.csv, metrics.csv, train.log and config.json go"""
    compile: bool = False
    """torch.compile the losses (fuses the elementwise work);
    on 2 CPU cores, N = 4: +30% updates/s after ~1 min of compilation"""
    cuda_graph: bool = True
    """on cuda, record the whole update (sampling, noise, losses, Adam, target update),
    once per phase, as a CUDA graph and replay it"""


@dataclass
class Args:
    algorithm: Algorithm = field(default_factory=Algorithm)
    run: Run = field(default_factory=Run)
    common: plumbing.Common = field(default_factory=plumbing.Common)


FLAG_RANGES_OF = {  # allowed values of the numeric flags (check_flags)
    "algorithm": dict(num_agents=">= 1", total_steps=">= 1", batch_size=">= 1", hidden_sizes=">= 1",
                      gamma="in [0, 1)", tau="in (0, 1]", critic_lr="> 0", policy_lr="> 0", min_q_weight=">= 0",
                      num_random=">= 1", cql_temperature="> 0", bc_steps=">= 0"),
    "run": dict(seed="in [0, 2^32)", eval_every=">= 1", eval_episodes=">= 1", save_every=">= 1",
                log_every=">= 1"),
}


def check_cql_flags(alg: Algorithm, run: Run) -> None:
    plumbing.check_flags(alg, FLAG_RANGES_OF["algorithm"])
    plumbing.check_flags(run, FLAG_RANGES_OF["run"])
    for name in ("lagrange_threshold", "target_entropy"):
        if getattr(alg, name) is not None and not math.isfinite(getattr(alg, name)):
            fail(f"--{name.replace('_', '-')} must be a finite number, not {getattr(alg, name)}")


PROJECT_VERSION = "0.4.0"
CQL_FORMAT = "upq-cql-v3"  # what this script writes and the fine-tuning scripts read


# ---------------------------------------------------------------------------------------------------------------
# CQL(H), Eq. (1), and SAC's pieces: small pure functions, each checked against a hand computation in tests/
# ---------------------------------------------------------------------------------------------------------------
def cql_logsumexp(q_random, q_current, q_next, log_prob_current, log_prob_next, act_dim: int,
                  temperature: float) -> torch.Tensor:  # Eq. (1)
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


def conservative_gap(logsumexp: torch.Tensor, q_data: torch.Tensor) -> torch.Tensor:  # Eq. (1)
    """E_s[logsumexp_a Q(s, a)] - E_(s,a)~D[Q(s, a)], the bracket of Eq. (1): [...] over the batch axis."""
    return logsumexp.mean(-1) - q_data.mean(-1)


def bellman_target(rewards, terminals, next_q_min, gamma: float) -> torch.Tensor:  # Eq. (1), TD term
    """r + gamma (1 - terminal) min(Q1', Q2')(s', a'): the deterministic backup of official CQL."""
    return rewards + gamma * (1.0 - terminals) * next_q_min


def policy_loss(alpha, log_prob, q_policy, bc_log_prob, behaviour_cloning: bool) -> torch.Tensor:
    """alpha log pi(a~|s) - min Q(s, a~) after the warm-up; alpha log pi(a~|s) - log pi(a_data|s) during it."""
    target = bc_log_prob if behaviour_cloning else q_policy
    return (alpha * log_prob - target).mean(-1)


def temperature_loss_per_agent(log_alpha: torch.Tensor, log_prob: torch.Tensor,
                               target_entropy: float) -> torch.Tensor:
    """SAC's automatic temperature per agent: -mean_B [log alpha_k (log pi_k(a~|s) + target entropy)]: [N]."""
    return -(log_alpha[:, None] * (log_prob.detach() + target_entropy)).mean(-1)


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor):
    """Reparameterised a = tanh(mean + std * noise) and log pi(a|s) with the tanh correction."""
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, std) - log(1 - tanh(u)^2 + 1e-6), summed over action dims: the official CQL code's form (rlkit's
    TanhNormal), whose 1e-6 bounds the correction where tanh(u) rounds to +-1 (the fine-tuning scripts use
    Off2OnRL's exact softplus form; they differ once actions saturate)."""
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return (gaussian - torch.log(1.0 - torch.tanh(pre_tanh) ** 2 + 1e-6)).sum(-1)


def action_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of given (dataset) actions, for the behaviour-cloning warm-up."""
    pre_tanh = torch.atanh(actions.clamp(-1.0 + 1e-6, 1.0 - 1e-6))
    return tanh_gaussian_log_prob(mean, log_std, pre_tanh)


# ---------------------------------------------------------------------------------------------------------------
# Networks: every weight has a leading ensemble axis E, so one batched matmul runs all members
# ---------------------------------------------------------------------------------------------------------------
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


def vectorized_mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, ensemble_size: int,
                   last_layer_bound: float, hidden_bias: float) -> nn.Sequential:
    """An MLP with ReLUs, initialised as rlkit's Mlp (the official CQL and Off2OnRL codes): hidden weights by rlkit's
    fanin_init, uniform within 1/sqrt(size[0]) of a torch Linear weight [out, in], i.e. 1/sqrt(the layer's output
    width); hidden biases `hidden_bias`; the last layer's weights and biases uniform within +-last_layer_bound."""
    layers, width = [], in_dim
    for hidden in hidden_sizes:
        layers += [VectorizedLinear(width, hidden, ensemble_size), nn.ReLU()]
        width = hidden
    mlp = nn.Sequential(*layers, VectorizedLinear(width, out_dim, ensemble_size))
    with torch.no_grad():
        for layer in mlp[:-1:2]:
            bound = 1.0 / math.sqrt(layer.weight.shape[-1])  # weight [E, in, out]: rlkit's size[0] of [out, in]
            layer.weight.uniform_(-bound, bound)
            layer.bias.fill_(hidden_bias)
        mlp[-1].weight.uniform_(-last_layer_bound, last_layer_bound)
        mlp[-1].bias.uniform_(-last_layer_bound, last_layer_bound)
    return mlp


class Actor(nn.Module):
    """ensemble_size tanh-Gaussian policies (N, one per agent): obs [N, B, obs] -> mean, log_std [N, B, A] (pre-tanh).

    Initialised as the official CQL code's TanhGaussianPolicy (hidden biases 0.1, mean and log-std heads within
    +-1e-3); log_std clamped to log_std_range."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], ensemble_size: int,
                 log_std_range: tuple[float, float] = (-5.0, 2.0)):
        super().__init__()
        self.net = vectorized_mlp(obs_dim, hidden_sizes, 2 * act_dim, ensemble_size, 1e-3, 0.1)
        self.log_std_range = log_std_range

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(*self.log_std_range)


class Critic(nn.Module):
    """ensemble_size Q-functions (2N: member 2k + j = critic j of agent k): [2N, B, obs], [2N, B, A] -> [2N, B].

    Initialised as the official CQL code's FlattenMlp (hidden biases 0.1, last layer within +-3e-3)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], ensemble_size: int):
        super().__init__()
        self.net = vectorized_mlp(obs_dim + act_dim, hidden_sizes, 1, ensemble_size, 3e-3, 0.1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# One gradient step: all N agents in one graph, each with its own batch, noise and loss
# ---------------------------------------------------------------------------------------------------------------
def twin_min(q: torch.Tensor) -> torch.Tensor:
    """Each member's pessimistic value min(Q1_i, Q2_i): [2N, B] (member 2i + j = critic j of agent i) -> [N, B]."""
    return q.view(q.shape[0] // 2, 2, *q.shape[1:]).min(1).values


def per_critic(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [2N, ...]: each agent's input to both of its critics."""
    return x.repeat_interleave(2, dim=0)


def cql_critic_loss(critic, target_critic, log_alpha_prime, obs, actions, rewards, next_obs, terminals, sampled,
                    gamma: float, min_q_weight: float, num_random: int, cql_temperature: float,
                    lagrange_threshold: float | None):
    """Eq. (1) for each agent's two critics: the TD loss to the deterministic backup plus the conservative term.

    sampled: (a_s [N, (1 + R) B, A], log pi(a_s) [N, (1 + R) B], a' likewise at s', uniform actions [N, R B, A]).
    Returns (critic loss [N], the alpha' loss of the Lagrange variant (0 without it), Q(s, a_data) [N, 2, B],
    gap [N, 2]).
    """
    num_agents, batch_size = rewards.shape
    a_s, logp_s, a_next, logp_next, uniform = sampled
    with torch.no_grad():
        next_q = twin_min(target_critic(per_critic(next_obs), per_critic(a_next[:, :batch_size])))  # [N, B]
        td_target = bellman_target(rewards, terminals, next_q, gamma)  # [N, B]
    cql_actions = torch.cat([uniform, a_s[:, batch_size:].detach(), a_next[:, batch_size:].detach()], dim=1)
    all_actions = torch.cat([actions, cql_actions], dim=1)  # [N, (1 + 3R) B, A]
    all_obs = torch.cat([obs, obs.repeat(1, 3 * num_random, 1)], dim=1)
    q_all = critic(per_critic(all_obs), per_critic(all_actions)).unflatten(0, (num_agents, 2))  # [N, 2, (1 + 3R) B]
    q_data = q_all[..., :batch_size]  # [N, 2, B]
    q_random, q_current, q_next = q_all[..., batch_size:].unflatten(-1, (3, num_random, batch_size)).unbind(2)
    logsumexp = cql_logsumexp(
        q_random, q_current, q_next,
        logp_s[:, None, batch_size:].unflatten(-1, (num_random, batch_size)),
        logp_next[:, None, batch_size:].unflatten(-1, (num_random, batch_size)),
        actions.shape[-1], cql_temperature,
    )  # [N, 2, B]
    gap = conservative_gap(logsumexp, q_data)  # [N, 2]
    td_loss = ((q_data - td_target[:, None]) ** 2).mean(-1)  # [N, 2]
    if log_alpha_prime is None:
        conservative = min_q_weight * gap
        alpha_prime_loss = torch.zeros((), device=obs.device)
    else:  # dual gradient (official CQL): alpha' (w gap - threshold); alpha' grows while w gap exceeds the threshold
        alpha_prime = log_alpha_prime.exp().clamp(0.0, 1e6)[:, None]  # [N, 1]
        conservative = alpha_prime.detach() * (min_q_weight * gap - lagrange_threshold)
        alpha_prime_loss = -(alpha_prime * (min_q_weight * gap.detach() - lagrange_threshold)).mean(1).sum()
    return (td_loss + conservative).sum(1), alpha_prime_loss, q_data, gap


METRICS = ["critic_loss", "actor_loss", "q_data", "cql_gap", "alpha"]


def cql_hyperparameters(alg: Algorithm) -> dict:
    """cql_losses' keyword arguments."""
    return dict(gamma=alg.gamma, min_q_weight=alg.min_q_weight, num_random=alg.num_random,
                cql_temperature=alg.cql_temperature, lagrange_threshold=alg.lagrange_threshold,
                target_entropy=alg.target_entropy)


def cql_losses(actor, critic, target_critic, log_alpha, log_alpha_prime, obs, actions, rewards, next_obs, terminals,
               noise: dict, behaviour_cloning: bool, gamma: float, min_q_weight: float, num_random: int,
               cql_temperature: float, lagrange_threshold: float | None, target_entropy: float):
    """Losses of one CQL step for N agents: obs [N, B, obs], actions [N, B, A], rewards [N, B], next_obs [N, B, obs],
    terminals [N, B] (each agent its own minibatch); noise: the agents' own action noise (draw_noise).

    Returns (total loss to backpropagate, dict of per-agent metrics [N]). The actor's loss sees the critics frozen,
    the critics' loss sees sampled actions detached, so one backward pass gives each network the gradient of its
    own objective (as the official code's separate optimisers do).
    """
    batch_size = rewards.shape[1]
    alpha = log_alpha.exp().detach()[:, None]  # [N, 1]
    mean, log_std = actor(torch.cat([obs, next_obs], dim=1))  # [N, 2B, A]
    mean_s, mean_next = mean.split(batch_size, dim=1)
    log_std_s, log_std_next = log_std.split(batch_size, dim=1)

    # Actions at s for the policy loss (1) and the logsumexp (R); at s' for the target (1) and logsumexp (R)
    rep = 1 + num_random
    a_s, logp_s = tanh_gaussian_sample(mean_s.repeat(1, rep, 1), log_std_s.repeat(1, rep, 1), noise["s"])
    a_next, logp_next = tanh_gaussian_sample(mean_next.repeat(1, rep, 1), log_std_next.repeat(1, rep, 1), noise["next"])
    critic_loss, alpha_prime_loss, q_data, gap = cql_critic_loss(
        critic, target_critic, log_alpha_prime, obs, actions, rewards, next_obs, terminals,
        (a_s, logp_s, a_next, logp_next, noise["uniform"]), gamma, min_q_weight, num_random, cql_temperature,
        lagrange_threshold)

    # Actor loss with the critics frozen (behaviour cloning during the warm-up), and SAC temperature loss
    a_policy, logp_policy = a_s[:, :batch_size], logp_s[:, :batch_size]  # [N, B, A], [N, B]
    frozen = {name: p.detach() for name, p in critic.named_parameters()}
    q_policy = twin_min(torch.func.functional_call(critic, frozen, (per_critic(obs), per_critic(a_policy))))
    bc_log_prob = action_log_prob(mean_s, log_std_s, actions)
    actor_loss = policy_loss(alpha, logp_policy, q_policy, bc_log_prob, behaviour_cloning)  # [N]
    alpha_loss = temperature_loss_per_agent(log_alpha, logp_policy, target_entropy)  # [N]

    total = critic_loss.sum() + actor_loss.sum() + alpha_loss.sum() + alpha_prime_loss
    metrics = dict(critic_loss=critic_loss, actor_loss=actor_loss, alpha=alpha[:, 0], q_data=q_data.mean((1, 2)),
                   cql_gap=gap.mean(1))
    return total, metrics


def cql_update(actor, critic, target_critic, log_alpha, log_alpha_prime, optimizers: dict, batch, noise: dict,
               behaviour_cloning: bool, tau: float, loss_args: dict, losses=cql_losses):
    """One gradient step of all N agents: losses, one backward, Adam steps, soft target update (tau).

    loss_args: cql_losses' hyperparameters (cql_hyperparameters); `losses` is cql_losses or torch.compile of it.
    """
    loss, metrics = losses(actor, critic, target_critic, log_alpha, log_alpha_prime, *batch, noise, behaviour_cloning,
                           **loss_args)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(target_critic.parameters()), list(critic.parameters()), tau)
    # detached: a caller that keeps them must not keep this step's autograd graph alive (it breaks CUDA graph capture)
    return loss.detach(), {key: value.detach() for key, value in metrics.items()}


def draw_noise(generators, batch_size, act_dim, num_random, device):
    """Each agent's action noise for one step, from its own generator: dict of [N, R*B, A]."""
    rep = 1 + num_random
    gaussian = torch.stack([torch.randn(2 * rep * batch_size, act_dim, generator=g, device=device) for g in generators])
    uniform = torch.stack([torch.rand(num_random * batch_size, act_dim, generator=g, device=device)
                           for g in generators])
    s_noise, next_noise = gaussian.split(rep * batch_size, dim=1)
    return {"s": s_noise, "next": next_noise, "uniform": 2.0 * uniform - 1.0}


def sample_batch(data: dict[str, torch.Tensor], generators, batch_size: int):
    """Each agent's minibatch, indices from its own generator: tensors [N, B, ...]."""
    size = data["rewards"].shape[0]
    device = data["rewards"].device
    index = torch.stack([torch.randint(size, (batch_size,), generator=g, device=device) for g in generators])
    return tuple(data[key][index] for key in ("observations", "actions", "rewards", "next_observations", "terminals"))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: all agents' episodes in lockstep, one batched actor call per env step; and the ensemble pi^E that
# fine-tuning starts from (UPQ Eq. (3), as off2on_finetune.py / upq_finetune.py evaluate it)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_agents(actor: Actor, env_id: str, num_agents: int, episodes: int, seed: int, device,
                    video_dir: Path | None = None) -> np.ndarray:
    """Undiscounted returns [N, episodes] of the deterministic policies tanh(mean); with video_dir, recorded there."""

    def act(obs: np.ndarray) -> np.ndarray:  # [N * episodes, obs] -> [N * episodes, A], agent k on its own rows
        states = torch.as_tensor(obs, dtype=torch.float32, device=device).view(num_agents, episodes, -1)
        return torch.tanh(actor(states)[0]).cpu().numpy().reshape(num_agents * episodes, -1)

    seeds = [seed + e for _ in range(num_agents) for e in range(episodes)]
    return plumbing.lockstep_returns(env_id, seeds, act, video_dir).reshape(num_agents, episodes)


def ensemble_policy(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # Eq. (3)
    """pi^E: mean and log-std [B, A] of the pre-tanh Gaussian matching the moments of the N members' [N, B, A].

    mean = (1/N) sum_i mu_i,  var = (1/N) sum_i (sigma_i^2 + mu_i^2) - mean^2, written as
    (1/N) sum_i sigma_i^2 + (1/N) sum_i (mu_i - mean)^2 (the same number without cancellation);
    std clamped to [e^-20, e^2] (Off2OnRL official).
    """
    ensemble_mean = mean.mean(0)
    variance = (2.0 * log_std).exp().mean(0) + (mean - ensemble_mean).pow(2).mean(0)
    return ensemble_mean, (0.5 * variance.log()).clamp(-20.0, 2.0)


@torch.no_grad()
def evaluate_ensemble(actor: Actor, env_id: str, episodes: int, seed: int, device,
                      video_dir: Path | None = None) -> np.ndarray:
    """Undiscounted returns [episodes] of the deterministic ensemble policy tanh(mean of pi^E), in lockstep; with
    video_dir, recorded there."""
    num_members = actor.net[0].weight.shape[0]

    def act(obs: np.ndarray) -> np.ndarray:
        states = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean, _ = ensemble_policy(*actor(states.expand(num_members, -1, -1)))  # [episodes, A]
        return torch.tanh(mean).cpu().numpy()

    return plumbing.lockstep_returns(env_id, [seed + e for e in range(episodes)], act, video_dir)


def normalized_score(returns, ref_min_score: float | None, ref_max_score: float | None):
    """D4RL normalised score, 100 * (return - random) / (expert - random); NaN without references."""
    returns = np.asarray(returns, dtype=np.float64)
    if ref_min_score is None or ref_max_score is None:
        return np.full_like(returns, np.nan)
    return 100.0 * (returns - ref_min_score) / (ref_max_score - ref_min_score)


def evaluate(r: SimpleNamespace, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Each agent's returns [N, episodes] and their ensemble pi^E's [episodes], from the seeds seed + 10,000 on."""
    alg, run = r.args.algorithm, r.args.run
    last = step == alg.total_steps
    videos = plumbing.video_folder(r.args.common, r.run_dir, -(-step // run.eval_every), step, last)
    return (evaluate_agents(r.nets["actor"], r.data.gym_env_id, alg.num_agents, run.eval_episodes, run.seed + 10_000,
                            r.device, videos),
            evaluate_ensemble(r.nets["actor"], r.data.gym_env_id, run.eval_episodes, run.seed + 10_000, r.device))


# ---------------------------------------------------------------------------------------------------------------
# The N agents: agent k initialised under seed + k, as in a run of its own; each phase graphed on CUDA
# ---------------------------------------------------------------------------------------------------------------
def make_agents(obs_dim: int, act_dim: int, hidden: tuple[int, ...], num_agents: int, seed: int):
    """Actor [N] and critics [2N] where agent k is initialised under seed + k, as in a run of its own."""
    actor, critic = Actor(obs_dim, act_dim, hidden, num_agents), Critic(obs_dim, act_dim, hidden, 2 * num_agents)
    with torch.no_grad():
        for k in range(num_agents):
            torch.manual_seed(seed + k)
            single_actor, single_critic = Actor(obs_dim, act_dim, hidden, 1), Critic(obs_dim, act_dim, hidden, 2)
            for big, small, rows in ((actor, single_actor, slice(k, k + 1)), (critic, single_critic,
                                                                             slice(2 * k, 2 * k + 2))):
                for param, value in zip(big.parameters(), small.parameters()):
                    param[rows] = value
    return actor, critic


def build_agents(alg: Algorithm, run: Run, data: plumbing.OfflineData, device, saved: dict | None):
    """The N agents' networks, temperatures, optimisers and generators: fresh, or as the resumed run saved them."""
    n, hidden = alg.num_agents, tuple(alg.hidden_sizes)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    actor, critic = make_agents(obs_dim, act_dim, hidden, n, run.seed)
    target_critic = Critic(obs_dim, act_dim, hidden, 2 * n)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    nets = {"actor": actor.to(device), "critic": critic.to(device), "target_critic": target_critic.to(device),
            "log_alpha": torch.zeros(n, device=device, requires_grad=True),
            "log_alpha_prime": None if alg.lagrange_threshold is None else
            torch.zeros(n, device=device, requires_grad=True)}
    adam = dict(fused=True, capturable=device.type == "cuda")  # capturable: its step count lives on the GPU
    optimizers = {
        "actor": torch.optim.Adam(nets["actor"].parameters(), lr=alg.policy_lr, **adam),
        "critic": torch.optim.Adam(nets["critic"].parameters(), lr=alg.critic_lr, **adam),
        "alpha": torch.optim.Adam([nets["log_alpha"]], lr=alg.policy_lr, **adam),
    }
    if nets["log_alpha_prime"] is not None:
        optimizers["alpha_prime"] = torch.optim.Adam([nets["log_alpha_prime"]], lr=alg.critic_lr, **adam)
    generators = [torch.Generator(device=device).manual_seed(run.seed + k) for k in range(n)]
    if saved is not None:  # the resumed agents' networks, temperatures, Adam moments and random streams
        if (saved["meta"]["gym_env_id"], saved["meta"]["obs_dim"]) != (data.gym_env_id, obs_dim):
            fail(f"the saved agents were made for {saved['meta']['gym_env_id']}, not for {data.gym_env_id} of --env")
        with torch.no_grad():
            for name, net in nets.items():
                if isinstance(net, nn.Module):
                    net.load_state_dict(saved[name])
                elif net is not None:
                    net.copy_(saved[name])
        plumbing.restore_optimizers(optimizers, saved["optimizers"], device)
        plumbing.restore_generators(generators, saved["generators"])
    return nets, optimizers, generators


def check_cql_resumable(alg: Algorithm, saved: dict, save_dir: Path) -> bool:
    """Refuse a resume that does not fit the saved run; True when it has nothing left to do."""
    meta = saved["meta"]
    if "optimizers" not in saved:
        fail(f"--resume: {save_dir} holds weights only (as results/convert_set.py --weights-only writes them), "
             f"without the Adam moments and random streams a resume needs; resume from the checkpoint the run "
             f"itself saved, or fine-tune from these agents")
    if meta["num_agents"] != alg.num_agents:
        fail(f"--resume: {save_dir} holds {meta['num_agents']} agents, not --num-agents {alg.num_agents}; all agents "
             f"of a run continue together")
    if alg.total_steps < meta["step"]:
        fail(f"--resume: the agents in {save_dir} are at step {meta['step']:,}, past --total-steps "
             f"{alg.total_steps:,}; pass a larger --total-steps to train on")
    if alg.total_steps == meta["step"]:
        print(f"the agents in {save_dir} are already at step {meta['step']:,} = --total-steps: nothing to do")
        return True
    return False


def graphed_phases(train_step, start_step: int, bc_steps: int, cuda_graph: bool, generators):
    """train_step(step) as the loop calls it. With cuda_graph each phase (behaviour cloning, then CQL) runs
    plumbing.CUDA_GRAPH_WARMUP eager steps, is then recorded once as a CUDA graph and replayed to its end."""
    graphs = {}  # behaviour cloning on/off -> the recorded update of that phase

    def update(step: int):
        cloning = step < bc_steps
        if cuda_graph and step - max(start_step, 0 if cloning else bc_steps) == plumbing.CUDA_GRAPH_WARMUP:
            graphs[cloning] = plumbing.cuda_graphed(functools.partial(train_step, step), generators)
        return graphs[cloning]() if cloning in graphs else train_step(step)

    return update


# ---------------------------------------------------------------------------------------------------------------
# The training loop: N agents, each step an update of all, evaluations and saves along the way
# ---------------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    alg, run = args.algorithm, args.run
    r = start_run(args)  # folders, offline data, the N agents (fresh or the saved run), logs, step-0 evaluation
    nets, generators, device, start_step = r.nets, r.generators, r.device, r.meta.get("step", 0)
    tensors = {key: torch.as_tensor(getattr(r.data, key), device=device) for key in plumbing.TRANSITION_KEYS}
    losses, loss_args = torch.compile(cql_losses) if run.compile else cql_losses, cql_hyperparameters(alg)

    def train_step(step: int):  # one update of all agents: their minibatches, action noise, losses and optimiser steps
        batch = sample_batch(tensors, generators, alg.batch_size)
        noise = draw_noise(generators, alg.batch_size, r.data.actions.shape[1], alg.num_random, device)
        return cql_update(nets["actor"], nets["critic"], nets["target_critic"], nets["log_alpha"],
                          nets["log_alpha_prime"], r.optimizers, batch, noise, step < alg.bc_steps, alg.tau, loss_args,
                          losses)

    update = graphed_phases(train_step, start_step, alg.bc_steps, r.cuda_graph, generators)
    started, last_line = time.perf_counter(), (time.perf_counter(), start_step)
    for step in range(start_step, alg.total_steps):
        loss, metrics = update(step)  # Eq. (1) for all N agents (behaviour cloning for the first --bc-steps)
        done = step + 1
        if done % run.log_every == 0 or done == alg.total_steps or time.perf_counter() - last_line[0] > 60:
            log_training(r, loss, metrics, done, last_line,
                         plumbing.progress(done, alg.total_steps, start_step, started, "steps"))
            last_line = (time.perf_counter(), done)
        if done % run.eval_every == 0 or done == alg.total_steps:
            log_evaluation(r, done, *evaluate(r, done))
        if done % run.save_every == 0 or done == alg.total_steps or r.stop["signal"]:
            save_agents(r, done)
        if r.stop["signal"]:
            plumbing.exit_stopped(r.stop, f"gradient step {done:,}", r.save_dir)
    plumbing.finish_run(r, f"{alg.total_steps - start_step:,} steps in "
                           f"{plumbing.duration(time.perf_counter() - started)}; saved {alg.num_agents} agents to "
                           f"{r.save_dir / CHECKPOINT}")


# =============================================================================================================
# Setting the run up, logging it and saving it (the plumbing itself is plumbing.py)
# =============================================================================================================
def start_run(args: Args) -> SimpleNamespace:
    """Everything before the first step: flags, folders (locked), offline data, the N agents (fresh, or the resumed
    run as saved), the logs (pending until the first save), wandb and the step-0 evaluation. A resumed run already at
    --total-steps ends here."""
    alg, run = args.algorithm, args.run
    check_cql_flags(alg, run)
    device = plumbing.pick_device(args.common)
    stop = plumbing.catch_stop_signals()  # until it is armed, a signal ends the run at once with nothing written
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run.env)
    save_dir, run_dir, saved, locks = plumbing.prepare_folders(
        args, f"checkpoints/{slug}__seed{run.seed}", f"{run.exp_name}__{slug}__{run.seed}", (CQL_FORMAT,))
    if saved and check_cql_resumable(alg, saved, save_dir):
        raise SystemExit(0)
    plumbing.check_video(args.common)
    data = plumbing.load_offline_data(run.env, run.gym_env)
    alg.target_entropy = -float(data.actions.shape[1]) if alg.target_entropy is None else alg.target_entropy
    plumbing.check_resumed(args, saved, data)
    nets, optimizers, generators = build_agents(alg, run, data, device, saved)
    meta = plumbing.run_meta(args, data, run_dir, save_dir, saved, format=CQL_FORMAT, version=PROJECT_VERSION,
                             hidden_sizes=list(alg.hidden_sizes), num_agents=alg.num_agents,
                             seeds=[run.seed + k for k in range(alg.num_agents)])
    r = SimpleNamespace(args=args, device=device, stop=stop, save_dir=save_dir, run_dir=run_dir, locks=locks,
                        data=data, meta=meta, nets=nets, optimizers=optimizers, generators=generators,
                        scores=saved["meta"]["normalized_scores"] if saved else None,
                        cuda_graph=run.cuda_graph and device.type == "cuda")
    r.logs = plumbing.open_run_logs(  # a fresh run's logs are pending until its first save
        run_dir, {"eval": ["step", "agent", "return", "normalized_score"],
                  "metrics": ["step", *METRICS, "updates_per_s"]}, meta.get("step"), meta)
    r.wandb = plumbing.start_wandb(args.common, meta)
    print(f"dataset {data.dataset_id}: {len(data.rewards):,} transitions, env {data.gym_env_id}, reference returns "
          f"{data.ref_source}; {alg.num_agents} agents on {device}; run dir {run_dir}; checkpoint {save_dir}"
          + (f"; resumed at step {meta['step']:,}" if saved else ""))
    if not saved:
        log_evaluation(r, 0, *evaluate(r, 0))
    stop["armed"] = True  # from here a signal saves the agents and stops the run
    return r


def log_evaluation(r: SimpleNamespace, step: int, returns: np.ndarray, ensemble: np.ndarray) -> None:
    """Each agent's and the ensemble's scores in eval.csv, a line and wandb; r.scores keeps the agents' scores."""
    data, n = r.data, len(returns)
    per_agent = normalized_score(returns, data.ref_min_score, data.ref_max_score).mean(1)
    ensemble_score = float(normalized_score(ensemble.mean(), data.ref_min_score, data.ref_max_score))
    for k in range(n):
        r.logs["eval"].write([step, k, f"{returns[k].mean():.3f}", f"{per_agent[k]:.3f}"])
    r.logs["eval"].write([step, "ensemble", f"{ensemble.mean():.3f}", f"{ensemble_score:.3f}"])
    print(f"eval step {step:,}: return {returns.mean():.1f} normalized {np.mean(per_agent):.1f} "
          f"(per agent {', '.join(f'{s:.1f}' for s in per_agent)}; ensemble pi^E {ensemble_score:.1f})", flush=True)
    if r.wandb:
        r.wandb.log({"eval/return": returns.mean(), "eval/normalized_score": float(np.mean(per_agent)),
                     "eval/ensemble_normalized_score": ensemble_score}, step=step)
    r.scores = [float(score) for score in per_agent]


def log_training(r: SimpleNamespace, loss, metrics: dict, done: int, last_line, where: str) -> None:
    """The training line, a metrics.csv row and wandb; stops the run if the loss is no longer finite."""
    values = {key: value.detach().cpu().numpy() for key, value in metrics.items()}
    plumbing.check_finite({"loss": loss.item()}, ("loss",), f"at step {done:,}", r.save_dir)
    speed = (done - last_line[1]) / (time.perf_counter() - last_line[0])
    print(f"step {where} | critic loss {values['critic_loss'].mean():.3f} actor loss {values['actor_loss'].mean():.3f} "
          f"Q {values['q_data'].mean():.2f} gap {values['cql_gap'].mean():.2f} alpha {values['alpha'].mean():.4f} "
          f"| {speed:.1f} updates/s", flush=True)
    plumbing.log_metrics(r, [done, *(f"{values[key].mean():.6g}" for key in METRICS), f"{speed:.2f}"],
                         {key: float(value.mean()) for key, value in values.items()} | {"updates_per_s": speed})


def save_agents(r: SimpleNamespace, step: int) -> None:
    """All N agents as one file: networks (agent k = actor member k, critics 2k and 2k + 1), temperatures, Adam
    moments and each agent's generator; meta["normalized_scores"] holds their last evaluation. Then the logs of a
    fresh run take their place."""
    weights = {name: net.state_dict() if isinstance(net, nn.Module) else None if net is None else net.detach()
               for name, net in r.nets.items()}  # log_alpha_prime: None without the Lagrange variant
    plumbing.save_checkpoint(r.save_dir / CHECKPOINT, dict(
        meta={**r.meta, "step": step, "normalized_scores": r.scores}, **weights,
        optimizers={name: opt.state_dict() for name, opt in r.optimizers.items()},
        generators=[generator.get_state() for generator in r.generators]))
    r.logs.commit()


if __name__ == "__main__":
    with plumbing.errors_in_one_sentence():
        main(tyro.cli(tyro.conf.OmitArgPrefixes[Args]))
