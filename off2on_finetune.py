"""Off2OnRL: online fine-tuning of N offline pre-trained CQL agents, the baseline of UPQ (Jang, Kim, Noh).

    python off2on_finetune.py --env hopper-medium-v2 --checkpoints checkpoints/hopper-medium-v2__seed1

Off2OnRL (Lee et al. 2022) as the UPQ paper uses it, with the defaults of the official code (shlee94/Off2OnRL). The
N agents that cql_pretrain.py wrote (--checkpoints, default checkpoints/<env>__seed1) become one ensemble that is
fine-tuned online with SAC, an auto-tuned temperature and balanced replay of offline and online data.
upq_finetune.py is this file plus the uncertainty penalty (Eqs. 4-5 with beta > 0).

Where each equation of the UPQ paper lives in this file:
    Eq. (2)  Q^E = (1/N) sum_i min(Q1_i, Q2_i)                            ensemble_q_mean, twin_min
    Eq. (3)  pi^E: one Gaussian with the mixture's mean and variance       ensemble_policy
    Eq. (4)  U(s', a'), the members' spread: measured, not used           uncertainty_std
    Eq. (5)  y_i = r + gamma (1 - d) [Q_i' - alpha log pi^E], beta = 0     soft_target
             Q_i' is member i's own min(Q1_i, Q2_i)' (official Off2OnRL); Eq. (5) as printed, Q^E' for every
             member, is upq_finetune.py's --ensemble-mean-target (this script has no such flag)
    Eq. (6)  sum over the 2N critics of (Q_k,i - y_i)^2                   critic_td_loss
    Eq. (7)  mean [alpha log pi^E(a~|s) - Q^E(s, a~)]                     ensemble_actor_loss
    SAC's temperature; balanced replay's density ratio and priorities     temperature_loss, density_ratio_loss,
                                                                          balanced_replay_priorities
    one gradient step: Eqs. (2)-(7) on plain batch tensors                finetune_losses, finetune_update
    Algorithm 1: collect, train, evaluate, save                           main

<run-dir> (default runs/<exp-name>__<env>__<seed>__<time>) holds eval.csv (the score before fine-tuning, step 0,
and after every epoch), metrics.csv (the training metrics of every epoch), train.log and config.json.
--save-dir holds checkpoint.pt: the fine-tuned agents in cql_pretrain.py's layout, with the replay, the optimisers and
the random stream that --resume continues. SPEC.md section 2 gives every default and its source.
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

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import plumbing
from plumbing import CHECKPOINT, fail


@dataclass
class Algorithm:
    """The method (defaults: the official Off2OnRL code; SPEC.md section 2)"""

    num_agents: Annotated[int | None, tyro.conf.arg(
        help_behavior_hint="(default: all of them; paper: 4)")] = None
    """N: fine-tune the first N agents of the checkpoint"""
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
    target_entropy: Annotated[float | None, tyro.conf.arg(
        help_behavior_hint="(default: -|A|, Off2OnRL official)")] = None
    """SAC target entropy; log alpha starts at 0, not at the CQL value (SPEC)"""
    balanced_replay: bool = True
    """sample by density-ratio priorities (Off2OnRL official);
    --no-balanced-replay: uniform over offline and online data (paper's Algorithm 1)"""
    online_buffer_size: int = 250_000
    """online transitions kept, the oldest overwritten beyond it (Off2OnRL official)"""
    init_online_fraction: float = 0.5
    """f, the online share of the batches right after epoch 0's data arrives;
    sets the first P_max (Off2OnRL official)"""
    priority_temperature: float = 5.0
    """T: a transition's priority is w^(1/T) over the offline mean of w^(1/T) (Off2OnRL official)"""
    density_ratio_lr: float = 3e-4
    """Adam learning rate of the density-ratio network w(s, a) (Off2OnRL official)"""
    density_ratio_hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layers of w(s, a) (Off2OnRL official)"""


@dataclass
class Run:
    """The run: data, seed, evaluation, checkpoints and folders"""

    env: str = "hopper-medium-v2"
    """offline dataset replayed beside the online data:
    a D4RL name, a Minari id or a D4RL-layout .hdf5 file (paper: D4RL v2)"""
    gym_env: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: the dataset's own; Hopper-v5 etc. for D4RL names)")] = None
    """gymnasium env to fine-tune and evaluate on"""
    checkpoints: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: checkpoints/<env>__seed1, cql_pretrain.py's default --save-dir)")] = None
    """cql_pretrain.py's agents: its --save-dir or the checkpoint.pt in it, e.g. checkpoints/hopper-medium-v2__seed1"""
    seed: int = 1
    """seed of the density-ratio net, the batches, the action noise and the envs"""
    eval_episodes: int = 5
    """deterministic episodes of tanh(mean of pi^E) before fine-tuning and after every epoch;
    Off2OnRL official: 5,000 steps"""
    save_every: int = 10
    """save the fine-tuned agents every this many epochs (and at the end, and on Ctrl-C or SIGTERM)"""
    exp_name: str = "off2on"
    """prefix of the run's name (CleanRL):
    runs/<exp-name>__<env>__<seed>__<time> and checkpoints/<exp-name>__<env>__seed<seed>"""
    save_dir: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: checkpoints/<exp-name>__<env>__seed<seed>)")] = None
    """where checkpoint.pt goes: the fine-tuned agents and all --resume needs"""
    run_dir: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(default: runs/<exp-name>__<env>__<seed>__<time>; with --resume, the saved run's)")] = None
    """where eval.csv, metrics.csv, train.log and config.json go"""
    cuda_graph: bool = True
    """on cuda, record each epoch's update step once as a CUDA graph and replay it (the same kernels, less overhead)"""


@dataclass
class Args:
    algorithm: Algorithm = field(default_factory=Algorithm)
    run: Run = field(default_factory=Run)
    common: plumbing.Common = field(default_factory=plumbing.Common)


FLAG_RANGES_OF = {  # allowed values of the numeric flags (check_flags)
    "algorithm": dict(num_agents=">= 1", total_steps=">= 1", steps_per_epoch=">= 1",
                      first_epoch_multiplier=">= 1", batch_size=">= 1", gamma="in [0, 1)", tau="in (0, 1]",
                      policy_lr="> 0", critic_lr="> 0", online_buffer_size=">= 1", init_online_fraction="in (0, 1)",
                      priority_temperature="> 0", density_ratio_lr="> 0", density_ratio_hidden_sizes=">= 1"),
    "run": dict(seed="in [0, 2^32)", eval_episodes=">= 1", save_every=">= 1"),
}


def check_finetune_flags(alg: Algorithm, run: Run) -> None:
    plumbing.check_flags(alg, FLAG_RANGES_OF["algorithm"])
    plumbing.check_flags(run, FLAG_RANGES_OF["run"])
    if alg.target_entropy is not None and not math.isfinite(alg.target_entropy):
        fail(f"--target-entropy must be a finite number, not {alg.target_entropy}")
    if alg.total_steps % alg.steps_per_epoch:
        fail(f"--total-steps ({alg.total_steps:,}) must be a multiple of --steps-per-epoch ({alg.steps_per_epoch:,})")
    if alg.online_buffer_size < alg.steps_per_epoch:
        fail("--online-buffer-size must hold at least one epoch (--steps-per-epoch) of transitions")


def run_name(alg: Algorithm, run: Run, slug: str) -> str:
    """The runs' name: --exp-name and the dataset (slug)."""
    return f"{run.exp_name}__{slug}"


ALGORITHM = "off2on"
PROJECT_VERSION = "0.4.0"
CQL_FORMAT = "upq-cql-v3"  # what cql_pretrain.py writes
FINETUNED_FORMAT = "upq-finetune-v3"  # what this script writes: the fine-tuned agents and all --resume needs
SUM_TREE_FANOUT = 64  # children per sum-tree node: 4 levels for ~1M transitions instead of 20
LOG_STD_RANGE = (-20.0, 2.0)  # each member's log-std clamp while fine-tuning (Off2OnRL official; CQL: [-5, 2])


# ---------------------------------------------------------------------------------------------------------------
# The paper's equations: small pure functions, each checked against a hand computation in tests/, and the losses
# of one step built from them (finetune_losses). From >>> to <<< is the block another codebase copies whole
# (tests/test_update_block.py runs it alone, on foreign networks).
# ---------------------------------------------------------------------------------------------------------------
# >>> Off2OnRL update: copy from here to '<<< Off2OnRL update'; it needs only `import math`, `import torch` and
#     `import torch.nn.functional as F`. finetune_losses, at its end, states what it takes and what stays with you.
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


def uncertainty_std(next_q_members: torch.Tensor) -> torch.Tensor:  # Eq. (4)
    """U(s', a') = sqrt((1/N) sum_i (Q_i - Q^E)^2), the population std over the members: [N, B] -> [B]."""
    return next_q_members.std(0, correction=0)


def soft_target(rewards, terminals, next_q_members, next_log_prob, alpha,
                gamma: float) -> torch.Tensor:  # Eq. (5) with beta = 0
    """y_i = r + gamma (1 - terminal) [min(Q1_i, Q2_i)'(s', a') - alpha log pi^E(a'|s')]: [N, B]."""
    return rewards + gamma * (1.0 - terminals) * (next_q_members - alpha * next_log_prob)


def critic_td_loss(q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # Eq. (6)
    """sum over the 2N critics of mean_B (Q_k,i(s, a) - y_i)^2: q [2N, B], targets [N, B] -> scalar."""
    return (q - targets.repeat_interleave(2, dim=0)).pow(2).mean(1).sum()


def ensemble_actor_loss(alpha, log_prob: torch.Tensor, q_ensemble: torch.Tensor) -> torch.Tensor:  # Eq. (7)
    """mean_B [alpha log pi^E(a~|s) - Q^E(s, a~)], a~ ~ pi^E(.|s) reparameterised: [B], [B] -> scalar."""
    return (alpha * log_prob - q_ensemble).mean()


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's automatic temperature: -mean_B [log alpha (log pi^E(a~|s) + target entropy)], log_prob detached."""
    return -(log_alpha * (log_prob + target_entropy)).mean()


def tanh_gaussian_sample(mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor):
    """Reparameterised a = tanh(mean + std * noise) and log pi(a|s) with the tanh correction."""
    pre_tanh = mean + log_std.exp() * noise
    return torch.tanh(pre_tanh), tanh_gaussian_log_prob(mean, log_std, pre_tanh)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, std) - sum log(1 - tanh(u)^2), summed over action dims; stable softplus form."""
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    tanh_correction = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - tanh_correction).sum(-1)


def check_layout(name: str, tensor: torch.Tensor, layout: str, shape: tuple, dtype: torch.dtype | None = None):
    """One sentence (ValueError) unless `tensor` has `shape` and a floating-point dtype (`dtype`, the networks', when
    given); no host-device sync."""
    if tensor.shape != shape:
        raise ValueError(f"finetune_losses: {name} must be {layout} = {list(shape)}, not {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"finetune_losses: {name} must be floating point, not {tensor.dtype}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"finetune_losses: {name} must be {dtype} as the critic's weights are, not {tensor.dtype}")


def check_batch_layout(obs, actions, rewards, next_obs, terminals, noise, log_alpha, num_agents: int,
                       dtype: torch.dtype) -> None:
    """finetune_losses' inputs against its contract: shapes, dtypes (the batch and noise in the networks' `dtype`) and
    log_alpha a tensor with requires_grad; attributes only, no host-device sync."""
    if not isinstance(log_alpha, torch.Tensor):
        raise ValueError(f"finetune_losses: log_alpha must be a tensor [1] with requires_grad, "
                         f"not a {type(log_alpha).__name__}")
    if num_agents < 1 or obs.dim() != 2 or actions.dim() != 2:
        raise ValueError(f"finetune_losses: needs num_agents >= 1, obs [B, obs_dim] and actions [B, A], not "
                         f"{num_agents}, {list(obs.shape)} and {list(actions.shape)}")
    batch_size, obs_dim, act_dim = obs.shape[0], obs.shape[1], actions.shape[1]
    check_layout("obs", obs, "[B, obs_dim]", (batch_size, obs_dim), dtype)
    check_layout("actions", actions, "[B, A]", (batch_size, act_dim), dtype)
    check_layout("rewards", rewards, "[B]", (batch_size,), dtype)
    check_layout("next_obs", next_obs, "[B, obs_dim]", (batch_size, obs_dim), dtype)
    check_layout("terminals", terminals, "[B]", (batch_size,), dtype)
    check_layout("noise (rows :B for a~ at s, rows B: for a' at s')", noise, "[2B, A]", (2 * batch_size, act_dim),
                 dtype)
    check_layout("log_alpha", log_alpha, "[1]", (1,))
    if not log_alpha.requires_grad:
        raise ValueError("finetune_losses: log_alpha must have requires_grad (a leaf its optimiser steps), "
                         "or the temperature never learns")


def frozen_parameters(critic, target_critic) -> dict:
    """The critic's registered parameters, detached: evaluated with them (torch.func.functional_call) the critics
    pass gradients to their inputs only. A critic without real registered weights cannot be frozen this way, and a
    target_critic that is the critic, or holds any of its weights' storage, is no target network."""
    frozen = {name: p.detach() for name, p in critic.named_parameters()} if isinstance(critic, torch.nn.Module) else {}
    if all(p.is_meta for p in frozen.values()):  # none, or only the skeleton of stack_module_state's tutorial
        raise ValueError("finetune_losses: the critic must be an nn.Module whose weights are registered parameters "
                         "(weights in a plain dict are not, and the actor loss would reach them)")
    storages = {p.untyped_storage().data_ptr() for p in frozen.values()} - {0}  # 0: meta or empty, no storage
    if isinstance(target_critic, torch.nn.Module) and any(p.untyped_storage().data_ptr() in storages
                                                          for p in target_critic.parameters()):
        raise ValueError("finetune_losses: target_critic must be a copy of the critic with weights of its own "
                         "(copy.deepcopy), not the critic itself or a module that shares its storage")
    return frozen


def stack_twin_critics(pairs) -> tuple[dict, dict]:
    """N pairs (Q1_i, Q2_i) of modules of one architecture -> torch.func.stack_module_state of the 2N critics in the
    order finetune_losses takes: member 2i + j is critic j of agent i, by construction. Returns (params, buffers),
    each weight stacked [2N, ...] and copied: register the params as your critic's nn.Parameters (an
    nn.ParameterList, say) and run them through torch.vmap, as tests/test_update_block.py's Stacked does."""
    return torch.func.stack_module_state([q for q1, q2 in pairs for q in (q1, q2)])  # Q1_0, Q2_0, Q1_1, Q2_1, ...


def finetune_losses(actor, critic, target_critic, log_alpha, obs, actions, rewards, next_obs, terminals, noise,
                    num_agents: int, gamma: float, target_entropy: float):
    """The three losses of one Off2OnRL step, Eqs. (2)-(7) with beta = 0, for N actors and 2N critics on a batch of B.

    The networks, any callables with the ensemble axis first (as modules stacked with
    torch.func.stack_module_state and run through torch.vmap give it):
        actor(obs [N, B, obs_dim]) -> (mean, log_std), each [N, B, A]: member i's pre-tanh Gaussian, its log_std
            already clamped (this project: to [-20, 2]).
        critic(obs [2N, B, obs_dim], actions [2N, B, A]) -> Q [2N, B]. Member 2i + j is critic j (j = 0, 1) of
            agent i: an agent's two critics are neighbours, [Q1_0, Q2_0, Q1_1, Q2_1, ...]. A stack ordered
            [Q1 of every agent, Q2 of every agent] has the same shapes and wrong twin pairs: stack_twin_critics
            stacks N pairs (Q1_i, Q2_i) in the block's order by construction.
        target_critic: the slow copy of critic with weights of its own (copy.deepcopy(critic)), in the same layout;
            called under torch.no_grad().
    Every member is given the same batch, as a stride-0 view (x.expand(E, -1, -1), no copy): reshape it inside a
    network, do not view it.
    The critic must also be an nn.Module whose weights are all registered parameters (critic.named_parameters()):
    the actor's loss evaluates it as torch.func.functional_call(critic, {name: p.detach() for name, p in
    critic.named_parameters()}, ...), and these detached parameters are what keep the actor loss's gradient out of
    the critics. Weights held in a plain dict (the stack_module_state tutorial's pattern) are not registered, and
    the actor loss would reach them: hold them as nn.Parameters (in an nn.ParameterList, say). One row of the batch
    checks it every step: the critic evaluated with the detached parameters must not require grad.

    The batch, in the networks' floating dtype and device (this project: float32):
        obs [B, obs_dim], actions [B, A] in tanh space (in (-1, 1), as the env took them), rewards [B],
        next_obs [B, obs_dim], terminals [B]: 1.0 where the episode terminated at s' (not where a time limit cut
        it), else 0.0;
        noise [2B, A], standard normal, drawn by the caller: rows :B give a~ ~ pi^E(.|s) for the actor and
        temperature losses, rows B: give a' ~ pi^E(.|s') for the targets.
    log_alpha [1]: log of SAC's temperature alpha, one for the whole ensemble, a tensor leaf with requires_grad (for
    a fixed temperature, pass such a leaf and leave alpha_loss out).
    num_agents: N. gamma: the discount; target_entropy: SAC's (this project: -A).

    Returns (critic_loss, actor_loss, alpha_loss, metrics): three scalar losses, and the step's diagnostics as
    detached scalar tensors (nothing is read back to the host). Each loss has a gradient in one network only:
        critic_loss, Eq. (6): the 2N critics (the targets are computed without a graph);
        actor_loss, Eq. (7) with Eq. (2): the N actors (the critics frozen as above, alpha detached);
        alpha_loss, SAC's temperature loss: log_alpha (log pi^E detached).
    So one backward pass of their sum gives every network the gradient of its own objective, all at the weights
    from before this step, and the optimiser steps that follow update actor, critics and temperature
    simultaneously, as the official code's separate optimisers do (all its losses are computed before any step).
    Three separate backward passes give the same gradients (the three graphs share nothing).

    What stays with the caller: drawing the noise; zeroing the gradients, the backward pass and the optimiser steps
    (this project: Adam for log_alpha, the actors and the critics); then the soft target update
    target_critic <- (1 - tau) target_critic + tau critic (tau = 5e-3), after the critics' step.

    A layout it can see from shapes, dtypes and attributes alone (no host-device sync) raises a ValueError in one
    sentence that names the argument: num_agents < 1, a batch tensor or noise of the wrong shape, not floating point
    or not in the dtype of the critic's weights, noise not [2B, A], log_alpha not a tensor [1] with requires_grad,
    actor outputs not [N, B, A], critic outputs not [2N, B], a critic with no registered parameters or one that
    still requires grad with them detached, a target_critic that is the critic or shares its storage. The member
    order cannot be seen: stack_twin_critics gets 2i + j right by construction; otherwise it is the caller's part.
    """
    frozen = frozen_parameters(critic, target_critic)
    dtype = next(p.dtype for p in frozen.values() if not p.is_meta)  # the networks' floating dtype
    check_batch_layout(obs, actions, rewards, next_obs, terminals, noise, log_alpha, num_agents, dtype)
    n, batch_size, act_dim = num_agents, obs.shape[0], actions.shape[1]
    alpha = log_alpha.exp().detach()

    def every_actor(x):  # [B, D] -> [N, B, D]
        return x.expand(n, -1, -1)

    def every_critic(x):  # [B, D] -> [2N, B, D]: all critics see the same batch
        return x.expand(2 * n, -1, -1)

    # the frozen critic on one row of data has no graph, unless it holds weights outside its registered parameters
    if torch.func.functional_call(critic, frozen, (every_critic(obs[:1].detach()),
                                                   every_critic(actions[:1].detach()))).requires_grad:
        raise ValueError("finetune_losses: the critic still requires grad when evaluated with its registered "
                         "parameters detached: it holds weights outside them (in a plain dict, say), and the actor "
                         "loss would reach them")

    # Eq. (3): pi^E at s (trained through the actor loss) and at s' (for the target only: no graph), a sample each
    mean, log_std = actor(every_actor(obs))  # [N, B, A] each
    check_layout("the actor's mean", mean, "[N, B, A]", (n, batch_size, act_dim))
    check_layout("the actor's log_std", log_std, "[N, B, A]", (n, batch_size, act_dim))
    new_actions, new_log_prob = tanh_gaussian_sample(*ensemble_policy(mean, log_std), noise[:batch_size])  # [B, A], [B]
    with torch.no_grad():
        next_actions, next_log_prob = tanh_gaussian_sample(*ensemble_policy(*actor(every_actor(next_obs))),
                                                           noise[batch_size:])

    # Eqs. (5)-(6): every member regresses to its own target at the shared a' ~ pi^E(.|s')
    with torch.no_grad():
        next_q = target_critic(every_critic(next_obs), every_critic(next_actions))  # [2N, B]
        check_layout("target_critic(next_obs, next_actions)", next_q, "[2N, B]", (2 * n, batch_size))
        next_q_members = twin_min(next_q)  # [N, B]
        uncertainty = uncertainty_std(next_q_members)  # [B]: measured only, Off2OnRL does not use it
        targets = soft_target(rewards, terminals, next_q_members, next_log_prob, alpha, gamma)  # [N, B]
    q_data = critic(every_critic(obs), every_critic(actions))  # [2N, B]
    check_layout("critic(obs, actions)", q_data, "[2N, B]", (2 * n, batch_size))
    q_members = twin_min(q_data.detach())  # [N, B]
    critic_loss = critic_td_loss(q_data, targets)

    # Eq. (7) with Eq. (2), the critics frozen (their detached parameters); and the temperature
    q_new = twin_min(torch.func.functional_call(critic, frozen, (every_critic(obs), every_critic(new_actions))))
    actor_loss = ensemble_actor_loss(alpha, new_log_prob, ensemble_q_mean(q_new))
    alpha_loss = temperature_loss(log_alpha, new_log_prob.detach(), target_entropy)
    metrics = dict(critic_loss=critic_loss.detach(), actor_loss=actor_loss.detach(),
                   q_ensemble=ensemble_q_mean(q_members).mean(),  # Q^E(s, a) on the batch
                   q_spread=q_members.std(0, correction=0).mean(),  # the members' disagreement at (s, a)
                   target_mean=targets.mean(), uncertainty=uncertainty.mean(), uncertainty_max=uncertainty.max(),
                   alpha=alpha[0], entropy=-new_log_prob.detach().mean())  # pi^E's entropy, estimated
    return critic_loss, actor_loss, alpha_loss, metrics
# <<< Off2OnRL update: to here


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


class DensityRatio(nn.Module):
    """w(s, a) >= 0, the online/offline density ratio of balanced replay: [B, obs+act] -> [B]."""

    def __init__(self, in_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = vectorized_mlp(in_dim, hidden_sizes, 1, 1, 3e-3, 0.0)  # Off2OnRL's rlkit Mlp: hidden biases 0
        nn.init.constant_(self.net[-1].bias, 1.0)  # Off2OnRL official: w starts near 1

    def forward(self, state_action: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(state_action[None]))[0, :, 0]


# ---------------------------------------------------------------------------------------------------------------
# Replay: offline data and online buffer as rows of one tensor, sampled through one sum tree
# ---------------------------------------------------------------------------------------------------------------
def pack_transitions(obs, actions, rewards, next_obs, terminals) -> np.ndarray:
    """Transitions as rows [obs | action | reward | next obs | terminal], float32 [M, 2 obs + act + 2]."""
    columns = (obs, actions, np.reshape(rewards, (-1, 1)), next_obs, np.reshape(terminals, (-1, 1)))
    return np.concatenate(columns, axis=1, dtype=np.float32)


def unpack_transitions(packed: torch.Tensor, obs_dim: int, act_dim: int):
    """Inverse of pack_transitions: obs [B, obs], actions [B, act], rewards [B], next obs [B, obs], terminals [B]."""
    obs, actions, rewards, next_obs, terminals = packed.split([obs_dim, act_dim, 1, obs_dim, 1], dim=1)
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
    """The offline data and the online ring buffer as packed transitions in one tensor on the device, sampled as one.

    Why balanced replay (Off2OnRL): fine-tuning learns best from near-on-policy data, yet online rows are few at
    first and the offline ones were collected by other policies. Each row's priority follows the density ratio
    w(s, a) of online to offline data, so offline rows close to the current policy are drawn more often than those
    far from it, and each online row enters at P_max.

    Rows 0 .. M-1 hold the offline transitions (priority 1), rows M .. M + capacity - 1 the online ones (priority
    P_max when written; P_max starts at initial_online_priority and rises to the largest priority ever written).
    balanced=False: no priorities, batches uniform over all rows written (the paper's Algorithm 1).
    """

    def __init__(self, offline: torch.Tensor, online_capacity: int, balanced: bool, p_max: float):
        self.offline_size, self.online_capacity = len(offline), online_capacity
        self.online_size = self.online_written = 0
        self.transitions = offline.new_zeros(self.offline_size + online_capacity, offline.shape[1])
        self.transitions[: self.offline_size] = offline
        self.tree = SumTree(len(self.transitions), offline.device) if balanced else None
        if self.tree is not None:
            self.tree.fill(torch.ones(self.offline_size, device=offline.device))
        self.p_max = torch.tensor(p_max, dtype=torch.float64, device=offline.device)

    def add(self, online: torch.Tensor) -> None:
        """Online transitions [n, width] into the ring (the oldest overwritten once full), each with priority P_max."""
        written = self.online_written + torch.arange(len(online), device=online.device)
        slots = self.offline_size + written % self.online_capacity
        self.transitions[slots] = online
        if self.tree is not None:
            self.tree.update(slots, self.p_max.expand(len(online)))
        self.online_written += len(online)
        self.online_size = min(self.online_written, self.online_capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Row indices: the RL batch [B] by priority, then uniform offline [B] and online [B] rows for w(s, a).

        Without priorities, only the RL batch, uniform over offline + online rows.
        """
        device = self.transitions.device
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
        return dict(online_rows=self.transitions[self.offline_size: written].clone().cpu(),
                    priorities=None if self.tree is None else self.tree.levels[0][:written].clone().cpu(),
                    p_max=float(self.p_max), online_size=self.online_size, online_written=self.online_written)

    def load_state_dict(self, state: dict) -> None:
        self.online_size, self.online_written = state["online_size"], state["online_written"]
        online = state["online_rows"].to(self.transitions.device)
        self.transitions[self.offline_size: self.offline_size + self.online_size] = online
        if self.tree is not None:
            self.tree.fill(state["priorities"].to(self.transitions.device))
        self.p_max.fill_(state["p_max"])


# ---------------------------------------------------------------------------------------------------------------
# One gradient step: all members in one graph, one backward
# ---------------------------------------------------------------------------------------------------------------
def density_ratio_step(density_ratio, state_actions: torch.Tensor, temperature: float):
    """Balanced replay on one draw: state_actions [3B, obs+act] = the RL batch, uniform offline, uniform online rows.

    Returns (the JS loss of w on the offline and online rows, the RL batch's new priorities [B] from w before
    its update, the mean of w on the offline and on the online rows)."""
    w_batch, w_offline, w_online = density_ratio(state_actions).split(len(state_actions) // 3)  # [B] each
    priorities = balanced_replay_priorities(w_batch.detach(), w_offline.detach(), temperature)
    means = dict(w_offline=w_offline.detach().mean(), w_online=w_online.detach().mean())
    return density_ratio_loss(w_offline, w_online), priorities, means


METRICS = ["critic_loss", "actor_loss", "q_ensemble", "q_spread", "target_mean", "uncertainty", "uncertainty_max",
           "alpha", "entropy", "ratio_loss", "w_offline", "w_online", "online_fraction"]


def loss_hyperparameters(alg: Algorithm) -> dict:
    """finetune_losses' keyword arguments."""
    return dict(gamma=alg.gamma, target_entropy=alg.target_entropy)


def finetune_update(nets: dict, optimizers: dict, replay: BalancedReplay, generator: torch.Generator,
                    batch_size: int, tau: float, priority_temperature: float, loss_args: dict, num_agents: int,
                    act_dim: int) -> dict:
    """One gradient step: draw the batch, the three losses, one backward of their sum (the networks' simultaneous
    update), Adam steps, soft target update (tau), new priorities.

    loss_args: finetune_losses' hyperparameters (loss_hyperparameters); num_agents: N; act_dim: A (the observation
    width follows from the replay's rows). Returns the step's metrics.
    """
    density_ratio = nets["density_ratio"]
    obs_dim = (replay.transitions.shape[1] - act_dim - 2) // 2  # rows [obs | action | reward | next obs | terminal]
    index = replay.sample(batch_size, generator)  # [B] ([3B] with balanced replay)
    noise = torch.randn(2 * batch_size, act_dim, generator=generator, dtype=replay.transitions.dtype,
                        device=replay.transitions.device)
    drawn = replay.transitions[index]
    critic_loss, actor_loss, alpha_loss, metrics = finetune_losses(
        nets["actor"], nets["critic"], nets["target_critic"], nets["log_alpha"],
        *unpack_transitions(drawn[:batch_size], obs_dim, act_dim), noise, num_agents, **loss_args)
    loss = critic_loss + actor_loss + alpha_loss
    zero = torch.zeros((), device=loss.device)
    metrics.update(ratio_loss=zero, w_offline=zero, w_online=zero)
    if density_ratio is not None:
        ratio_loss, priorities, w_means = density_ratio_step(density_ratio, drawn[:, : obs_dim + act_dim],
                                                             priority_temperature)
        loss = loss + ratio_loss
        metrics.update(ratio_loss=ratio_loss.detach(), **w_means)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers.values():
        opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(nets["target_critic"].parameters()), list(nets["critic"].parameters()), tau)
        if density_ratio is not None:
            replay.reprioritize(index[:batch_size], priorities)
    metrics["online_fraction"] = (index[:batch_size] >= replay.offline_size).float().mean()
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Acting and evaluation: the envs step on the CPU, pi^E runs on the device
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(env, actor: Actor, num_agents: int, steps: int, seed: int, generator, device) -> np.ndarray:
    """`steps` env steps with a ~ pi^E(.|s) (Eq. 3) of the actor's N = num_agents members from a fresh episode (reset
    with `seed`), as Off2OnRL's collector starts every epoch: returns the packed transitions. Only termination stops
    bootstrapping; an episode cut by the time limit or by the end of the epoch bootstraps (Off2OnRL keeps the cut
    path, terminal 0)."""
    transitions, obs = [], env.reset(seed=seed)[0]
    for _ in range(steps):
        state = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mean, log_std = ensemble_policy(*actor(state.expand(num_agents, 1, -1)))  # [1, A]
        noise = torch.randn(mean.shape, generator=generator, device=device)
        action = tanh_gaussian_sample(mean, log_std, noise)[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        transitions.append(pack_transitions(obs[None], action[None], reward, next_obs[None], float(terminated)))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return np.concatenate(transitions)


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


# ---------------------------------------------------------------------------------------------------------------
# The ensemble from the CQL agents: actor member k = agent k's actor, critic member 2k + j = agent k's critic j
# ---------------------------------------------------------------------------------------------------------------
def load_members(module: nn.Module, state: dict, members: int) -> None:
    """The first `members` members of a saved ensemble's tensors into module (the first N agents of a larger set)."""
    try:
        module.load_state_dict({name: value[:members] for name, value in state.items()})
    except (KeyError, RuntimeError) as error:
        fail(f"the checkpoint's tensors do not fit the shapes its meta records ({type(error).__name__})")


def build_run(alg: Algorithm, run: Run, start: dict, saved: dict | None, data: plumbing.OfflineData, device):
    """The ensemble, its optimisers, the replay and the random stream: fresh from the CQL agents `start`, or as the
    resumed run saved them."""
    obs_dim, act_dim, hidden = data.observations.shape[1], data.actions.shape[1], tuple(start["meta"]["hidden_sizes"])
    n = alg.num_agents or start["meta"]["num_agents"]
    torch.manual_seed(run.seed)
    actor = Actor(obs_dim, act_dim, hidden, n, LOG_STD_RANGE)
    critic = Critic(obs_dim, act_dim, hidden, 2 * n)
    target_critic = Critic(obs_dim, act_dim, hidden, 2 * n)
    load_members(actor, start["actor"], n)
    load_members(critic, start["critic"], 2 * n)
    load_members(target_critic, start["target_critic" if saved else "critic"], 2 * n)  # SPEC: targets start as critics
    target_critic.requires_grad_(False)
    density_ratio = DensityRatio(obs_dim + act_dim, alg.density_ratio_hidden_sizes) if alg.balanced_replay else None
    nets = {"actor": actor.to(device), "critic": critic.to(device), "target_critic": target_critic.to(device),
            "log_alpha": torch.zeros(1, device=device, requires_grad=True),  # fresh temperature, alpha = 1 (SPEC)
            "density_ratio": None if density_ratio is None else density_ratio.to(device)}
    adam = dict(fused=True, capturable=device.type == "cuda")  # capturable: its step count lives on the GPU
    optimizers = {  # stepped in this order: alpha, policy, critics, density ratio (Off2OnRL official)
        "alpha": torch.optim.Adam([nets["log_alpha"]], lr=alg.policy_lr, **adam),
        "actor": torch.optim.Adam(actor.parameters(), lr=alg.policy_lr, **adam),
        "critic": torch.optim.Adam(critic.parameters(), lr=alg.critic_lr, **adam),
    }
    if density_ratio is not None:
        optimizers["density_ratio"] = torch.optim.Adam(density_ratio.parameters(), lr=alg.density_ratio_lr, **adam)
    # one random stream for the batches and the action noise: the device's default one, which CUDA graphs can replay
    generator = (torch.default_generator if device.type == "cpu"
                 else torch.cuda.default_generators[torch.cuda.current_device()])
    generator.manual_seed(run.seed)
    offline = pack_transitions(data.observations, data.actions, data.rewards, data.next_observations, data.terminals)
    replay = BalancedReplay(torch.as_tensor(offline, device=device), alg.online_buffer_size, alg.balanced_replay,
                            initial_online_priority(len(offline), alg.init_online_fraction, alg.steps_per_epoch))
    if saved is not None:  # the resumed run's temperature, density-ratio net, Adam moments, replay and random stream
        with torch.no_grad():
            nets["log_alpha"].copy_(saved["log_alpha"])
        if density_ratio is not None:
            density_ratio.load_state_dict(saved["density_ratio"])
        plumbing.restore_optimizers(optimizers, saved["optimizers"], device)
        replay.load_state_dict(saved["replay"])
        plumbing.restore_generators([generator], [saved["generator"]])
    return nets, optimizers, replay, generator


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1: collect an epoch with pi^E, train, evaluate, save
# ---------------------------------------------------------------------------------------------------------------
def updates_due(env_steps: int, alg: Algorithm) -> int:
    """Gradient steps done once the epoch ending at env_steps is trained (epoch 0 does --first-epoch-multiplier x)."""
    return env_steps + alg.steps_per_epoch * (alg.first_epoch_multiplier - 1) if env_steps else 0


def main(args: Args) -> None:
    alg, run = args.algorithm, args.run
    r = start_run(args)  # folders, offline data, the ensemble (the CQL agents or the saved run), replay, logs
    nets, replay, generator, device = r.nets, r.replay, r.generator, r.device
    env_steps, grad_steps, n = r.meta.get("env_steps", 0), r.meta.get("grad_steps", 0), r.meta["num_agents"]
    update = functools.partial(finetune_update, nets, r.optimizers, replay, generator, alg.batch_size, alg.tau,
                               alg.priority_temperature, loss_hyperparameters(alg), n, r.data.actions.shape[1])
    total_updates, grad_steps_at_start = updates_due(alg.total_steps, alg), grad_steps
    env, started = gym.make(r.data.gym_env_id), time.perf_counter()
    cycle_start = started  # a cycle: evaluating and saving the last epoch, collecting and training this one

    def where(done: int = 0) -> str:  # the run's progress in gradient steps, with its ETA
        return plumbing.progress(grad_steps + done, total_updates, grad_steps_at_start, started, "updates")

    while env_steps < alg.total_steps or grad_steps < updates_due(env_steps, alg):  # (a stopped run: its epoch's rest)
        # Collect an epoch with a ~ pi^E (Eq. 3) into the online buffer, at priority P_max
        if grad_steps == updates_due(env_steps, alg) and not r.stop["signal"]:  # (a run stopped mid-epoch: not yet)
            transitions = collect(env, nets["actor"], n, alg.steps_per_epoch, run.seed + env_steps, generator, device)
            replay.add(torch.as_tensor(transitions, device=device))
            env_steps += len(transitions)
        # Train: as many gradient steps as env steps (x --first-epoch-multiplier in epoch 0), Eqs. (2)-(7)
        timer = time.perf_counter()
        means, done = plumbing.train_epoch(update, updates_due(env_steps, alg) - grad_steps, r.cuda_graph, r.stop,
                                           lambda done: print(f"  training: {where(done)}", flush=True))
        grad_steps += done
        if r.stop["signal"]:
            save_run(r, env_steps, grad_steps)
            plumbing.exit_stopped(r.stop, f"env step {env_steps:,} (gradient step {grad_steps:,})", r.save_dir)
        # Evaluate pi^E, log, save
        plumbing.check_finite(means, ("critic_loss", "actor_loss", "ratio_loss"),
                              f"in the epoch ending at env step {env_steps:,}", r.save_dir)
        speeds = dict(updates_per_s=done / (time.perf_counter() - timer),
                      env_steps_per_s=alg.steps_per_epoch / (time.perf_counter() - cycle_start))
        cycle_start = time.perf_counter()
        plumbing.log_score(r, env_steps, evaluate(r, env_steps), epoch_line(means, speeds, where()))
        plumbing.log_metrics(r, [env_steps, grad_steps, *(f"{means[k]:.6g}" for k in METRICS),
                                 *(f"{v:.2f}" for v in speeds.values())], {**means, **speeds})
        if env_steps % (run.save_every * alg.steps_per_epoch) == 0 or env_steps == alg.total_steps:
            save_run(r, env_steps, grad_steps)
    env.close()
    session = f"{grad_steps - grad_steps_at_start:,} in {plumbing.duration(time.perf_counter() - started)}"
    plumbing.finish_run(r, f"at env step {env_steps:,}, gradient step {grad_steps:,} ({session}); saved {n} fine-tuned "
                           f"agents to {r.save_dir / CHECKPOINT}")


# =============================================================================================================
# Setting the run up, logging it and saving it (the plumbing itself is plumbing.py)
# =============================================================================================================
def start_run(args: Args) -> SimpleNamespace:
    """Everything before the first epoch: flags, folders (locked), the CQL agents or the resumed run, offline data,
    the ensemble and its replay, the logs (pending until the first save), wandb, and the step-0 evaluation."""
    alg, run = args.algorithm, args.run
    check_finetune_flags(alg, run)
    device = plumbing.pick_device(args.common)
    stop = plumbing.catch_stop_signals()  # until it is armed, a signal ends the run at once with nothing written
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run.env)
    name = run_name(alg, run, slug)
    save_dir, run_dir, saved, locks = plumbing.prepare_folders(
        args, f"checkpoints/{name}__seed{run.seed}", f"{name}__{run.seed}", (FINETUNED_FORMAT,))
    if saved and saved["meta"]["grad_steps"] == updates_due(alg.total_steps, alg):  # its last epoch trained
        print(f"the run in {save_dir} is already at --total-steps {alg.total_steps:,}: nothing to do")
        raise SystemExit(0)
    start, source = (saved, None) if saved else plumbing.load_pretrained(
        run.checkpoints, f"checkpoints/{slug}__seed1", (CQL_FORMAT,), alg.num_agents)
    plumbing.check_video(args.common)
    data = plumbing.load_offline_data(run.env, run.gym_env)
    alg.target_entropy = -float(data.actions.shape[1]) if alg.target_entropy is None else alg.target_entropy
    note = plumbing.check_fit(start, saved, data, alg.num_agents, alg.total_steps)
    plumbing.check_resumed(args, saved, data)
    nets, optimizers, replay, generator = build_run(alg, run, start, saved, data, device)
    meta = plumbing.run_meta(args, data, run_dir, save_dir, saved, format=FINETUNED_FORMAT, algorithm=ALGORITHM,
                             version=PROJECT_VERSION, hidden_sizes=start["meta"]["hidden_sizes"],
                             num_agents=alg.num_agents or start["meta"]["num_agents"],
                             pretrained=None if saved else dict(path=source, run_id=start["meta"]["run_id"],
                                                                step=start["meta"]["step"]))  # (resumed: as saved)
    r = SimpleNamespace(args=args, device=device, stop=stop, save_dir=save_dir, run_dir=run_dir, locks=locks,
                        data=data, meta=meta, nets=nets, optimizers=optimizers, replay=replay, generator=generator,
                        cuda_graph=run.cuda_graph and device.type == "cuda")
    r.logs = plumbing.open_run_logs(  # a fresh run's logs are pending until its first save
        run_dir, {"eval": ["step", "return", "normalized_score"],
                  "metrics": ["step", "grad_steps", *METRICS, "updates_per_s", "env_steps_per_s"]},
        meta.get("env_steps"), meta)
    r.wandb = plumbing.start_wandb(args.common, meta)
    print(f"{note}dataset {data.dataset_id}: {len(data.rewards):,} transitions, env {data.gym_env_id}, reference "
          f"returns {data.ref_source}; ensemble of {meta['num_agents']} agents (hidden {meta['hidden_sizes']}) on "
          f"{device}; {'balanced' if alg.balanced_replay else 'uniform'} replay; run dir {run_dir}; checkpoint "
          f"{save_dir}" + (f"; resumed at env step {meta['env_steps']:,}" if saved else ""))
    if not saved:  # the pre-trained ensemble, the first point of the paper's Fig. 2
        plumbing.log_score(r, 0, evaluate(r, 0))
    stop["armed"] = True  # from here a signal saves the run and stops it
    return r


def evaluate(r: SimpleNamespace, step: int) -> tuple[float, float]:
    """pi^E's mean return over --eval-episodes (seeds seed + 10,000 on), and its normalised score."""
    run = r.args.run
    videos = plumbing.video_folder(r.args.common, r.run_dir, step // r.args.algorithm.steps_per_epoch, step,
                                   step == r.args.algorithm.total_steps)
    returns = evaluate_ensemble(r.nets["actor"], r.data.gym_env_id, run.eval_episodes, run.seed + 10_000, r.device,
                                videos)
    return returns.mean(), float(normalized_score(returns.mean(), r.data.ref_min_score, r.data.ref_max_score))


def save_run(r: SimpleNamespace, env_steps: int, grad_steps: int) -> None:
    """The whole run as one file: networks (agent k = actor member k, critics 2k and 2k + 1), temperature, density
    ratio, Adam moments, replay and random stream; then the logs of a fresh run take their place."""
    nets = r.nets
    plumbing.save_checkpoint(r.save_dir / CHECKPOINT, dict(
        meta={**r.meta, "env_steps": env_steps, "grad_steps": grad_steps},
        **{name: nets[name].state_dict() for name in ("actor", "critic", "target_critic")},
        log_alpha=nets["log_alpha"].detach(), optimizers={name: opt.state_dict() for name, opt in r.optimizers.items()},
        density_ratio=None if nets["density_ratio"] is None else nets["density_ratio"].state_dict(),
        replay=r.replay.state_dict(), generator=r.generator.get_state()))
    r.logs.commit()


def epoch_line(means: dict, speeds: dict, where: str) -> str:
    return (f" | Q {means['q_ensemble']:.2f}"
            f" | U {means['uncertainty']:.3f}"
            f" | alpha {means['alpha']:.4f} | online fraction {means['online_fraction']:.3f}"
            f" | {speeds['updates_per_s']:.1f} updates/s | {speeds['env_steps_per_s']:.1f} env steps/s | {where}")


if __name__ == "__main__":
    with plumbing.errors_in_one_sentence():
        main(tyro.cli(tyro.conf.OmitArgPrefixes[Args]))
