"""D4RL-style offline datasets for any gymnasium MuJoCo env, written as standard Minari datasets.

The UPQ paper (Jang, Kim, Noh) pre-trains on D4RL's medium, medium-replay and medium-expert
datasets (Fu et al., 2020). This script rebuilds them the way D4RL did, for gymnasium v5 envs:

- random:        a uniform random policy;
- medium:        a SAC agent trained until its evaluation return reaches a target (default: the
                 mean return of D4RL's medium-v2 dataset for the body), then rolled out;
- medium-replay: every transition that SAC agent saw until it reached that target;
- expert:        the same SAC run continued to a step budget; its best evaluated policy rolled out;
- medium-expert: the medium and expert datasets, equal sizes, concatenated (as D4RL).

The SAC behaviour agent is CleanRL's sac_continuous_action.py, inline. One SAC run per
(dataset directory, seed) serves every kind: its whole state (networks, optimisers, RNG,
replay, and the actor at every evaluation) is saved beside the datasets, e.g.
~/.minari/datasets/local/hopper/sac-seed0.pt, so `--kind expert` continues the run that made
`--kind medium`, and `--kind medium-replay` only reads it. Output root: Minari's own
(MINARI_DATASETS_PATH, default ~/.minari/datasets). A dataset is written beside its place and renamed there
when whole: a killed run leaves the old dataset or the new one, never a part of one (write_dataset).
The policy a medium or expert dataset rolls out can be kept as a small file (--export-policy) and rolled out again
without SAC (--behaviour-policy): with the same --seed and --num-steps, the same transitions.

Example:
    python make_dataset.py --env Hopper-v5 --kind medium --num-steps 200000
    python -c "import minari; print(minari.load_dataset('local/hopper/medium-v0'))"
"""

import errno
import importlib.metadata
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional
from unittest import mock

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import gen_dataset_id, parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path

from plumbing import (
    D4RL_REF_SCORES,
    check_flags,
    digest,
    duration,
    errors_in_one_sentence,
    fail,
    gym_make,
    hold_lock,
    load_checkpoint,
    progress,
    save_checkpoint,
)


@dataclass
class Args:
    env: str = "Hopper-v5"
    """gymnasium MuJoCo env id with Box spaces (its spec is recorded, so dataset.recover_environment() works)"""
    kind: Literal["random", "medium", "medium-replay", "expert", "medium-expert"] = "medium"
    """which D4RL-style dataset to write (see the module docstring)"""
    dataset_id: Annotated[Optional[str], tyro.conf.arg(
        help_behavior_hint="(default: local/<body>/<kind>-v0, e.g. local/hopper/medium-v0)")] = None
    """Minari id to write"""
    num_steps: int = 1_000_000
    """transitions to collect, at least 1 (D4RL: 1M; medium-expert takes this many from medium and from expert;
    ignored by medium-replay)"""
    seed: int = 0
    """seed of env resets, actions and SAC; same seed and flags give identical datasets"""
    overwrite: bool = False
    """replace a dataset with this id (else refuse), kept until the new one is whole, or the --export-policy file;
    never retrains a saved SAC run"""
    export_policy: Optional[str] = None
    """--kind medium or expert: write the behaviour policy that kind rolls out to this file, weights only (~300 KB),
    and stop without writing a dataset (SAC is trained as far as it needs, or read from its saved run)"""
    behaviour_policy: Optional[str] = None
    """--kind medium or expert: roll out this policy (a file --export-policy wrote) instead of training SAC;
    with the --seed and --num-steps that made a dataset, it makes the same transitions again"""
    max_episode_steps: Annotated[Optional[int], tyro.conf.arg(
        help_behavior_hint="(default: the env's own, 1000 for the MuJoCo locomotion envs)")] = None
    """time limit of an episode"""
    target_return: Annotated[Optional[float], tyro.conf.arg(
        help_behavior_hint="(default: D4RL's medium-v2 mean return: hopper 1422, halfcheetah 4770, walker2d 3000; "
                           "required for other bodies)")] = None
    """evaluation return at which SAC counts as 'medium'"""
    total_timesteps: int = 1_000_000
    """SAC step budget: the cap for reaching the medium target, and the training length for expert (D4RL: 1M)"""
    eval_frequency: int = 10_000
    """evaluate SAC at the end of the first episode after every this many env steps"""
    eval_episodes: int = 10
    """episodes per evaluation (stochastic policy, as it is rolled out); also episodes for measuring a random return"""
    num_threads: int = 1
    """torch CPU threads (2x256 networks gain little from more; 1 leaves a shared machine usable)"""
    gamma: float = 0.99
    """SAC discount factor (CleanRL)"""
    tau: float = 0.005
    """SAC target smoothing coefficient (CleanRL)"""
    batch_size: int = 256
    """SAC batch size (CleanRL)"""
    learning_starts: int = 5_000
    """uniform random actions and no updates for this many steps (CleanRL)"""
    policy_lr: float = 3e-4
    """actor learning rate (CleanRL)"""
    q_lr: float = 1e-3
    """critic and temperature learning rate (CleanRL);
    with the SAC paper's 3e-4 a Hopper run stayed at return ~330 for 140k steps here"""
    policy_frequency: int = 2
    """actor updated every this many steps, that many times (CleanRL's delayed update)"""
    target_network_frequency: int = 1
    """target networks soft-updated every this many steps (CleanRL)"""
    alpha: float = 0.2
    """entropy temperature, >= 0 (0: no entropy bonus), used only with --no-autotune (CleanRL)"""
    autotune: bool = True
    """auto-tune the temperature towards entropy -|A| (CleanRL)"""


# Mean episode return of D4RL's medium-v2 datasets: the default medium target.
D4RL_MEDIUM_RETURN = {"hopper": 1422.0, "halfcheetah": 4770.0, "walker2d": 3000.0}
# Episode i of a phase resets with seed + offset + i: phases never share start states, and every
# episode of a dataset can be replayed from the seed recorded with it.
COLLECT_SEED_OFFSET, TRAIN_SEED_OFFSET, EVAL_SEED_OFFSET = 0, 1_000_000, 2_000_000
# The SAC run file is plumbing's checkpoint file (written whole or not at all, its digest checked at load).
SAC_FORMAT = "make-dataset-sac-v1"
POLICY_FORMAT = "make-dataset-policy-v1"  # --export-policy: the behaviour actor and how it was chosen
# Hyperparameters a saved SAC run must share with the current flags to be resumed.
RUN_KEYS = ("env", "seed", "max_episode_steps", "eval_frequency", "eval_episodes", "gamma", "tau",
            "batch_size", "learning_starts", "policy_lr", "q_lr", "policy_frequency",
            "target_network_frequency", "alpha", "autotune")
# Allowed values of the numeric flags (check_flags); --target-return need only be finite.
FLAG_RANGES_OF_ARGS = dict(
    num_steps=">= 1", seed="in [0, 2^32)", max_episode_steps=">= 1", total_timesteps=">= 1", eval_frequency=">= 1",
    eval_episodes=">= 1", num_threads=">= 1", gamma="in [0, 1)", tau="in (0, 1]", batch_size=">= 1",
    learning_starts=">= 0", policy_lr="> 0", q_lr="> 0", policy_frequency=">= 1", target_network_frequency=">= 1",
    alpha=">= 0")
# A progress line (with ETA) after this many SAC steps or seconds, whichever comes first; rollouts print every 10%
# of --num-steps or after this many seconds.
LOG_EVERY_STEPS, LOG_EVERY_SECONDS = 1000, 60
LOG_STD_MAX, LOG_STD_MIN = 2, -5


def soft_q_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, gamma):
    """SAC soft Bellman target y = r + γ(1 − terminal)[min(Q̄1, Q̄2)(s', a') − α log π(a'|s')]."""
    return rewards + gamma * (1.0 - terminations) * (torch.min(next_q1, next_q2) - alpha * next_log_prob)


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim + act_dim, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 1)

    def forward(self, obs, action):
        x = F.relu(self.fc1(torch.cat([obs, action], 1)))
        return self.fc3(F.relu(self.fc2(x)))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, action_low: np.ndarray, action_high: np.ndarray):
        super().__init__()
        act_dim = len(action_low)
        self.fc1 = nn.Linear(obs_dim, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc_mean = nn.Linear(256, act_dim)
        self.fc_logstd = nn.Linear(256, act_dim)
        self.register_buffer("action_scale", torch.tensor((action_high - action_low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((action_high + action_low) / 2.0, dtype=torch.float32))

    def forward(self, obs):
        x = F.relu(self.fc2(F.relu(self.fc1(obs))))
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return self.fc_mean(x), log_std

    def sample(self, obs, generator: Optional[torch.Generator] = None):
        """Tanh-Gaussian sample (reparameterised), its log-probability, and the deterministic action."""
        mean, log_std = self(obs)
        noise = torch.randn(mean.shape, generator=generator)
        y = torch.tanh(mean + log_std.exp() * noise)
        action = y * self.action_scale + self.action_bias
        # log N(x; mean, std) with x = mean + std * noise, written out (cheaper than torch.distributions.Normal)
        log_prob = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = (log_prob - torch.log(self.action_scale * (1 - y.pow(2)) + 1e-6)).sum(1, keepdim=True)
        return action, log_prob, torch.tanh(mean) * self.action_scale + self.action_bias

    @torch.inference_mode()
    def act(self, obs, generator: Optional[torch.Generator] = None):
        """The action of sample() alone (same noise draw), about twice as fast for rollouts."""
        mean, log_std = self(obs)
        noise = torch.randn(mean.shape, generator=generator)
        return torch.tanh(mean + log_std.exp() * noise) * self.action_scale + self.action_bias


def update_critics(batch, actor, qf1, qf2, qf1_target, qf2_target, q_optimizer, alpha, gamma) -> float:
    """One gradient step of both critics towards the soft Bellman target; returns the loss."""
    with torch.no_grad():
        next_action, next_log_prob, _ = actor.sample(batch["next_observations"])
        target = soft_q_target(batch["rewards"], batch["terminations"],
                               qf1_target(batch["next_observations"], next_action),
                               qf2_target(batch["next_observations"], next_action), next_log_prob, alpha, gamma)
    q_loss = F.mse_loss(qf1(batch["observations"], batch["actions"]), target) + F.mse_loss(
        qf2(batch["observations"], batch["actions"]), target)
    q_optimizer.zero_grad()
    q_loss.backward()
    q_optimizer.step()
    return q_loss.item()


def update_actor_and_alpha(obs, actor, qf1, qf2, actor_optimizer, log_alpha, a_optimizer, target_entropy, alpha):
    """One step of the actor (α log π − min Q) and, if a_optimizer is given, of log α; returns α."""
    action, log_prob, _ = actor.sample(obs)
    critic_params = [*qf1.parameters(), *qf2.parameters()]
    for param in critic_params:  # the actor loss needs dQ/da, not the critics' weight gradients
        param.requires_grad_(False)
    actor_loss = (alpha * log_prob - torch.min(qf1(obs, action), qf2(obs, action))).mean()
    actor_optimizer.zero_grad()
    actor_loss.backward()
    actor_optimizer.step()
    for param in critic_params:
        param.requires_grad_(True)
    if a_optimizer is None:
        return alpha
    with torch.no_grad():
        _, log_prob, _ = actor.sample(obs)
    alpha_loss = (-log_alpha.exp() * (log_prob + target_entropy)).mean()
    a_optimizer.zero_grad()
    alpha_loss.backward()
    a_optimizer.step()
    return log_alpha.exp().item()


@torch.no_grad()
def soft_update(target_net: nn.Module, net: nn.Module, tau: float) -> None:
    """Polyak averaging θ̄ ← τθ + (1 − τ)θ̄, in place."""
    for target_param, param in zip(target_net.parameters(), net.parameters()):
        target_param.lerp_(param, tau)


def make_env(args: Args) -> gym.Env:
    if args.max_episode_steps is None:
        return gym.make(args.env)
    return gym.make(args.env, max_episode_steps=args.max_episode_steps)


def actor_policy(actor: Actor, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """The stochastic SAC policy as obs -> action, with its own seeded noise."""
    generator = torch.Generator().manual_seed(seed)

    def policy(obs):
        return actor.act(torch.as_tensor(obs, dtype=torch.float32)[None], generator)[0].numpy()
    return policy


def evaluate(args: Args, policy: Callable, num_episodes: int) -> np.ndarray:
    env = make_env(args)
    returns = []
    for j in range(num_episodes):
        obs, _ = env.reset(seed=args.seed + EVAL_SEED_OFFSET + j)
        done, episode_return = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return np.array(returns)


def collect_episodes(args: Args, policy: Callable, num_steps: int, label: str) -> list[EpisodeBuffer]:
    """Roll out `policy` for exactly num_steps transitions. As Minari's DataCollector does, the last
    episode, cut by num_steps rather than by the env, is marked truncated. Infos are not kept."""
    env = make_env(args)
    episodes, steps, report_every = [], 0, max(num_steps // 10, 1)
    started = last_report = time.perf_counter()
    while steps < num_steps:
        episode_seed = args.seed + COLLECT_SEED_OFFSET + len(episodes)
        obs, _ = env.reset(seed=episode_seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done and steps < num_steps:
            action = policy(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            for buffer, value in zip((observations, actions, rewards, terminations, truncations),
                                     (obs, action, reward, terminated, truncated)):
                buffer.append(value)
            steps += 1
            done = terminated or truncated
            if (steps % report_every == 0 or steps == num_steps
                    or time.perf_counter() - last_report >= LOG_EVERY_SECONDS):
                finished = [float(np.sum(e.rewards)) for e in episodes]
                print(f"[{label}] collected {progress(steps, num_steps, 0, started, 'steps')} | mean episode return "
                      f"{np.mean(finished) if finished else float('nan'):.1f}", flush=True)
                last_report = time.perf_counter()
        truncations[-1] = truncations[-1] or not terminations[-1]
        episodes.append(EpisodeBuffer(
            seed=episode_seed, observations=np.array(observations), actions=np.array(actions, dtype=np.float32),
            rewards=np.array(rewards, dtype=np.float64), terminations=np.array(terminations),
            truncations=np.array(truncations), infos={}))
    return episodes


def replay_episodes(args: Args, replay: dict, num_steps: int) -> list[EpisodeBuffer]:
    """The first num_steps transitions of the SAC replay (which ends with an episode) as episodes."""
    data = {key: value[:num_steps].numpy() for key, value in replay.items()}
    rewards, terminations, truncations = data["rewards"][:, 0], data["terminations"][:, 0], data["truncations"][:, 0]
    episodes, start = [], 0
    for i, end in enumerate(np.flatnonzero(terminations | truncations) + 1):
        episodes.append(EpisodeBuffer(
            seed=args.seed + TRAIN_SEED_OFFSET + i,
            observations=np.concatenate([data["observations"][start:end], data["next_observations"][end - 1:end]]),
            actions=data["actions"][start:end], rewards=rewards[start:end],
            terminations=terminations[start:end], truncations=truncations[start:end], infos={}))
        start = end
    return episodes


def sac_agent(args: Args, env: gym.Env) -> tuple[dict, torch.Tensor]:
    """CleanRL's SAC networks and optimisers ({name: module}) and log alpha, under args.seed."""
    torch.manual_seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = Actor(obs_dim, env.action_space.low, env.action_space.high)
    qf1, qf2 = SoftQNetwork(obs_dim, act_dim), SoftQNetwork(obs_dim, act_dim)
    qf1_target, qf2_target = SoftQNetwork(obs_dim, act_dim), SoftQNetwork(obs_dim, act_dim)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr, fused=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    log_alpha = torch.zeros(1, requires_grad=True)
    a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr) if args.autotune else None
    modules = {"actor": actor, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target, "qf2_target": qf2_target,
               "q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer}
    if a_optimizer is not None:
        modules["a_optimizer"] = a_optimizer
    return modules, log_alpha


def load_sac_run(args: Args, run_path: Path, modules: dict, log_alpha: torch.Tensor) -> dict:
    """The saved SAC run at run_path, loaded into modules and log alpha (refused if its flags differ); or a new one."""
    run = {"config": {key: getattr(args, key) for key in RUN_KEYS}, "global_step": 0, "episodes": 0,
           "evaluations": [], "replay": {}, "meta": {"format": SAC_FORMAT}}
    if run_path.exists():
        run = {**read_sac_run(run_path), "meta": {"format": SAC_FORMAT}}  # (a file of an older version gains meta)
        changed = [key for key in RUN_KEYS if run["config"][key] != getattr(args, key)]
        if changed:
            fail(f"the saved SAC run {run_path} used other values of "
                 f"{', '.join('--' + k.replace('_', '-') for k in changed)}; pass the same values, another --seed, "
                 f"or delete that file to retrain")
        for name, module in modules.items():
            module.load_state_dict(run[name])
        log_alpha.data.copy_(run["log_alpha"])
        torch.set_rng_state(run["rng_state"])
        print(f"resuming SAC run {run_path} at step {run['global_step']}", flush=True)
    return run


def save_sac_run(run: dict, run_path: Path, modules: dict, log_alpha: torch.Tensor, replay: dict,
                 global_step: int, returns: np.ndarray) -> None:
    """Record an evaluation (with the actor evaluated) and save the whole run, atomically (a kill never leaves half)."""
    run["evaluations"].append({"step": global_step, "mean_return": float(returns.mean()),
                               "std_return": float(returns.std()),
                               "actor": {k: v.clone() for k, v in modules["actor"].state_dict().items()}})
    run.update({name: module.state_dict() for name, module in modules.items()})
    run.update(global_step=global_step, log_alpha=log_alpha.detach().clone(), rng_state=torch.get_rng_state(),
               replay={key: value[:global_step].clone() for key, value in replay.items()})
    save_checkpoint(run_path, run)


def read_sac_run(run_path: Path) -> dict:
    """The saved SAC run, checked as the training scripts check their checkpoints; a file of an older version
    (without digest) as it is."""
    return load_checkpoint(run_path, (SAC_FORMAT,), older=("config", "evaluations"))


def train_behaviour(args: Args, run_path: Path, target_return: Optional[float]) -> dict:
    """CleanRL's SAC loop. Stops at the end of the first evaluation whose mean return reaches
    target_return (None: never), else at args.total_timesteps. Resumes from run_path and saves the
    whole run there at every evaluation; returns the saved run."""
    env = make_env(args)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    modules, log_alpha = sac_agent(args, env)
    actor, qf1, qf2, qf1_target, qf2_target = (modules[name] for name in
                                               ("actor", "qf1", "qf2", "qf1_target", "qf2_target"))
    target_entropy = -float(act_dim)
    run = load_sac_run(args, run_path, modules, log_alpha)
    alpha = log_alpha.exp().item() if args.autotune else args.alpha

    # The replay keeps every transition (medium-replay is made of it), observations in the env's dtype.
    capacity = max(args.total_timesteps, run["global_step"]) + env.spec.max_episode_steps
    shapes = {"observations": (obs_dim,), "next_observations": (obs_dim,), "actions": (act_dim,),
              "rewards": (1,), "terminations": (1,), "truncations": (1,)}
    dtypes = {"observations": torch.float64, "next_observations": torch.float64, "actions": torch.float32,
              "rewards": torch.float64, "terminations": torch.bool, "truncations": torch.bool}
    replay = {key: torch.zeros((capacity, *shape), dtype=dtypes[key]) for key, shape in shapes.items()}
    for key, saved in run["replay"].items():
        replay[key][: len(saved)] = saved

    def reached(evaluations):
        return target_return is not None and any(e["mean_return"] >= target_return for e in evaluations)

    def finished():
        last_eval_step = run["evaluations"][-1]["step"] if run["evaluations"] else -1
        return reached(run["evaluations"]) or (run["global_step"] >= args.total_timesteps
                                               and last_eval_step == run["global_step"])

    global_step = start_step = last_print_step = run["global_step"]
    started = last_print_time = time.perf_counter()
    obs, episode_return, last_episode_return = None, 0.0, float("nan")

    def where() -> str:
        """The progress part of a [SAC] line. The last episode may run past the budget: then it counts as the total."""
        if global_step > args.total_timesteps:
            note = f" (past --total-timesteps {args.total_timesteps:,} to end the episode)"
        else:
            note = "" if target_return is None else f" (or sooner: stops at an eval return >= {target_return:g})"
        return progress(global_step, max(args.total_timesteps, global_step), start_step, started, "steps") + note

    while not finished():
        if obs is None:
            obs, _ = env.reset(seed=args.seed + TRAIN_SEED_OFFSET + run["episodes"])
        if global_step < args.learning_starts:
            low, high = env.action_space.low, env.action_space.high
            action = (low + torch.rand(act_dim).numpy() * (high - low)).astype(np.float32)
        else:
            action = actor.act(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(shapes, (obs, next_obs, action, reward, terminated, truncated)):
            replay[key][global_step] = torch.as_tensor(np.asarray(value))
        global_step += 1
        episode_return += float(reward)
        obs = next_obs

        if global_step > args.learning_starts:
            idx = torch.randint(0, global_step, (args.batch_size,))
            batch = {key: replay[key][idx].float() for key in shapes}
            update_critics(batch, actor, qf1, qf2, qf1_target, qf2_target, modules["q_optimizer"], alpha,
                           args.gamma)
            if global_step % args.policy_frequency == 0:
                for _ in range(args.policy_frequency):
                    alpha = update_actor_and_alpha(batch["observations"], actor, qf1, qf2, modules["actor_optimizer"],
                                                   log_alpha, modules.get("a_optimizer"), target_entropy, alpha)
            if global_step % args.target_network_frequency == 0:
                soft_update(qf1_target, qf1, args.tau)
                soft_update(qf2_target, qf2, args.tau)

        if terminated or truncated:
            run["episodes"] += 1
            last_episode_return = episode_return
            last_eval_step = run["evaluations"][-1]["step"] if run["evaluations"] else 0
            new_eval_period = global_step // args.eval_frequency > last_eval_step // args.eval_frequency
            if new_eval_period or global_step >= args.total_timesteps:
                returns = evaluate(args, actor_policy(actor, args.seed + EVAL_SEED_OFFSET), args.eval_episodes)
                save_sac_run(run, run_path, modules, log_alpha, replay, global_step, returns)
                print(f"[SAC] {where()} | eval return {returns.mean():.1f} ± {returns.std():.1f} | "
                      f"last train episode return {last_episode_return:.1f} | alpha {alpha:.3f}", flush=True)
                last_print_step, last_print_time = global_step, time.perf_counter()
            obs, episode_return = None, 0.0
        if (global_step - last_print_step >= LOG_EVERY_STEPS
                or time.perf_counter() - last_print_time >= LOG_EVERY_SECONDS):
            print(f"[SAC] {where()} | last train episode return {last_episode_return:.1f}", flush=True)
            last_print_step, last_print_time = global_step, time.perf_counter()
    if global_step > start_step:
        elapsed = time.perf_counter() - started
        print(f"[SAC] trained {global_step - start_step:,} steps in {duration(elapsed)} "
              f"({(global_step - start_step) / elapsed:.1f} steps/s incl. eval); run saved to {run_path}", flush=True)
    return run


def check_env(env_id: str) -> gym.Env:
    env = gym_make(env_id)
    from gymnasium.envs.mujoco import MujocoEnv  # (after gym_make: importing MuJoCo loads MUJOCO_GL's backend)
    if not (isinstance(env.unwrapped, MujocoEnv) and isinstance(env.observation_space, gym.spaces.Box)
            and isinstance(env.action_space, gym.spaces.Box)):
        fail(f"{env_id} is not a MuJoCo environment with Box observation and action spaces, which is all this script "
             f"makes datasets for")
    return env


def check_local_id(dataset_id: str) -> None:
    """A dataset made here has a version and lives under local/: Minari's other namespaces (mujoco/, D4RL/) hold its
    server's datasets, and a training script given such an id would read one made here as the real one."""
    if not re.search(r"-v\d+$", dataset_id):
        fail(f"--dataset-id {dataset_id!r} has no version: end it with -v<N>, e.g. local/hopper/medium-v0")
    if not dataset_id.startswith("local/"):
        fail(f"--dataset-id {dataset_id}: datasets made here live under local/ (e.g. local/{dataset_id}); Minari's "
             f"other namespaces hold its server's datasets, which a training script would take this one for")


def write_paths(dataset_id: str) -> tuple[Path, Path, Path]:
    """A dataset's folder and, beside it (hidden from Minari's listings), the two temporaries of write_dataset: the
    folder the new dataset is written in, and the name the old one has while the new one is moved into place."""
    path = get_dataset_path(dataset_id)
    return path, path.with_name(f".{path.name}.writing"), path.with_name(f".{path.name}.old")


def recover_interrupted_write(dataset_id: str) -> Path:
    """Undo what a killed write_dataset left: the old dataset put back if the kill fell between its two renames, then
    both temporaries deleted. Returns the dataset's folder."""
    path, writing, old = write_paths(dataset_id)
    if old.exists() and not path.exists():
        os.replace(old, path)
        print(f"restored {dataset_id} from {old}, where an interrupted write had left it", flush=True)
    for temporary in (writing, old):
        if temporary.exists():
            shutil.rmtree(temporary)
            print(f"removed {temporary}, left by an interrupted write", flush=True)
    return path


def lock_dataset_files(dataset_ids: list[str], run_path: Optional[Path]) -> list:
    """One run at a time on each dataset id (its folder and temporaries) and on the SAC run file: runs on other ids
    and seeds of the same body go side by side. The locks are hidden files beside them: .<name>.lock."""
    folder, locks = get_dataset_path(dataset_ids[0]).parent, []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for dataset_id in dataset_ids:
            path = get_dataset_path(dataset_id)
            locks.append(hold_lock(path.with_name(f".{path.name}.lock"), f"dataset {dataset_id}",
                                   "wait for it to end or choose another --dataset-id"))
        if run_path is not None:
            locks.append(hold_lock(run_path.with_name(f".{run_path.name}.lock"), f"the SAC run {run_path}",
                                   "wait for it to end or pass another --seed"))
    except OSError as error:
        fail(f"cannot write in {folder} ({error.strerror or error}): set MINARI_DATASETS_PATH to a writable folder")
    return locks


def is_complete(path: Path) -> bool:
    """Whether a dataset folder holds a whole dataset of this script: Minari's metadata with its episode count, which
    Minari writes after the episodes, and the 'kind' that write_dataset adds last."""
    try:
        metadata = json.loads((path / "data" / "metadata.json").read_text())
    except (OSError, ValueError):  # no metadata, or metadata cut short
        return False
    return metadata.get("total_episodes", 0) > 0 and "kind" in metadata and (path / "data/main_data.hdf5").is_file()


def existing_dataset(dataset_id: str, overwrite: bool) -> bool:
    """After recovering an interrupted write: whether a whole dataset is at dataset_id. An incomplete one (left by a
    version of this script that wrote in place) is refused, or with --overwrite counts as none, to be replaced."""
    path = recover_interrupted_write(dataset_id)
    if not path.exists() or is_complete(path):
        return path.exists()
    if not overwrite:
        fail(f"dataset {dataset_id} at {path} is incomplete (an interrupted write): pass --overwrite to make it again")
    return False


def write_dataset(args: Args, dataset_id: str, episodes: list, kind: str, algorithm_name: str,
                  ref_scores: Optional[tuple], extra_metadata: dict) -> minari.MinariDataset:
    """Write the dataset whole in a folder beside its place, then rename it there. Any old one (--overwrite) is first
    renamed aside and deleted last, so a kill leaves the old dataset or the new one; between the two renames, the old
    one aside, which recover_interrupted_write puts back."""
    path, writing, old = write_paths(dataset_id)
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)  # as Minari does when it writes in place
    num_steps = sum(len(e.rewards) for e in episodes)
    description = (f"D4RL-style '{kind}' dataset for {args.env}: {num_steps} transitions in {len(episodes)} "
                   f"episodes, made by make_dataset.py (seed {args.seed}).")
    ref_min, ref_max = ref_scores if ref_scores is not None else (None, None)
    if ref_scores is None:
        print("note: no reference scores for this env yet (no SAC run to measure a best return); "
              "ref_min_score/ref_max_score left out", flush=True)
    needed = sum(np.asarray(getattr(e, key)).nbytes for e in episodes for key in
                 ("observations", "actions", "rewards", "terminations", "truncations")) + 16_384 * len(episodes)
    try:
        if shutil.disk_usage(path.parent).free < needed:  # checked first: h5py crashes when the disk fills as it writes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # Minari writes a dataset at its id under its root: the writing folder is that root while it writes.
        with warnings.catch_warnings(), mock.patch.dict(os.environ, MINARI_DATASETS_PATH=str(writing)):
            warnings.filterwarnings("ignore", message=".*is set to None")  # Minari warns of every unset field
            written = minari.create_dataset_from_buffers(
                dataset_id, buffer=episodes, env=make_env(args), algorithm_name=algorithm_name,
                ref_min_score=ref_min, ref_max_score=ref_max, description=description,
                requirements=[f"gymnasium=={gym.__version__}", f"mujoco=={importlib.metadata.version('mujoco')}"])
            written.storage.update_metadata({"seed": args.seed, "kind": kind, **extra_metadata})
    except (OSError, RuntimeError) as error:  # h5py reports some failed writes as RuntimeError
        shutil.rmtree(writing, ignore_errors=True)
        fail(f"cannot write dataset {dataset_id} ({getattr(error, 'strerror', None) or error}; it needs about "
             f"{needed / 1e6:,.1f} MB, {shutil.disk_usage(path.parent).free / 1e6:,.1f} MB are free in {path.parent}); "
             f"{'the old dataset is unchanged' if path.exists() else 'nothing was written'}")
    if path.exists():  # only reached with --overwrite
        os.replace(path, old)
    os.replace(written.storage.data_path.parent, path)
    for temporary in (old, writing):
        if temporary.exists():
            shutil.rmtree(temporary)
    dataset = minari.load_dataset(dataset_id)
    time_limit = dataset.env_spec.max_episode_steps
    finished = [float(np.sum(e.rewards)) for e in episodes if e.terminations[-1] or len(e.rewards) == time_limit]
    print(f"wrote {dataset_id}: {dataset.total_steps} steps, {dataset.total_episodes} episodes, "
          f"{dataset.storage.metadata['dataset_size']} MB, mean return of whole episodes "
          f"{np.mean(finished) if finished else float('nan'):.1f} -> {path}", flush=True)
    return dataset


def make_episodes(args: Args, kind: str, run_path: Path, target_return: Optional[float], policy=None):
    """Episodes, algorithm name and extra metadata of one of the kinds random, medium, medium-replay, expert; a
    medium or expert policy given (read_policy) is rolled out without SAC."""
    if kind == "random":
        env = make_env(args)
        env.action_space.seed(args.seed)
        episodes = collect_episodes(args, lambda obs: env.action_space.sample(), args.num_steps, "random")
        return episodes, "uniform random policy", {}
    if policy is not None:
        chosen, metadata = policy
    else:
        run, chosen, metadata = sac_policy(args, kind, run_path, target_return)
    if kind == "medium-replay":
        return replay_episodes(args, run["replay"], chosen["step"]), "SAC (CleanRL), replay until medium", metadata
    env = make_env(args)
    actor = Actor(env.observation_space.shape[0], env.action_space.low, env.action_space.high)
    actor.load_state_dict(chosen["actor"])
    print(f"rolling out the SAC policy of step {chosen['step']} (eval return {chosen['mean_return']:.1f})", flush=True)
    episodes = collect_episodes(args, actor_policy(actor, args.seed + COLLECT_SEED_OFFSET), args.num_steps, kind)
    return episodes, f"SAC (CleanRL), {kind} policy", metadata


def sac_policy(args: Args, kind: str, run_path: Path, target_return: Optional[float]):
    """The SAC run, trained as far as `kind` needs; the evaluation whose actor the kind rolls out (expert: the best;
    medium and medium-replay: the first that reaches the target); and the dataset metadata that records it."""
    run = train_behaviour(args, run_path, target_return if kind in ("medium", "medium-replay") else None)
    if kind == "expert":
        chosen = max(run["evaluations"], key=lambda e: e["mean_return"])
    else:
        reaching = [e for e in run["evaluations"] if e["mean_return"] >= target_return]
        if not reaching:
            best = max((e["mean_return"] for e in run["evaluations"]), default=float("nan"))
            fail(f"SAC reached an evaluation return of at most {best:.1f} < target {target_return} within "
                 f"--total-timesteps {args.total_timesteps}; raise --total-timesteps (training resumes from "
                 f"{run_path}) or lower --target-return")
        chosen = reaching[0]
    metadata = {"behaviour_step": chosen["step"], "behaviour_eval_return": chosen["mean_return"],
                "behaviour_eval_return_std": chosen["std_return"], "behaviour_run": str(run_path),
                "target_return": target_return if kind != "expert" else None,
                "sac_total_timesteps": run["global_step"]}
    return run, chosen, metadata


def export_policy(args: Args, run_path: Path, target_return: Optional[float]) -> None:
    """--export-policy: the actor --kind rolls out, with its evaluation and the dataset metadata, as one file."""
    _, chosen, metadata = sac_policy(args, args.kind, run_path, target_return)
    env = make_env(args)
    save_checkpoint(Path(args.export_policy), dict(
        meta=dict(format=POLICY_FORMAT, env=args.env, kind=args.kind, seed=args.seed,
                  max_episode_steps=env.spec.max_episode_steps, obs_dim=env.observation_space.shape[0],
                  act_dim=env.action_space.shape[0], **metadata),
        evaluation={key: chosen[key] for key in ("step", "mean_return", "std_return")}, actor=chosen["actor"]))
    print(f"wrote the {args.kind} behaviour policy (SAC step {chosen['step']:,}, eval return "
          f"{chosen['mean_return']:.1f}) to {args.export_policy}; make the dataset with --behaviour-policy "
          f"{args.export_policy} --seed {args.seed}", flush=True)


def check_policy_flags(args: Args):
    """--export-policy and --behaviour-policy, checked before anything is written; the policy to roll out, or None."""
    export = Path(args.export_policy) if args.export_policy else None
    if export and args.behaviour_policy:
        fail("--export-policy and --behaviour-policy exclude each other")
    if (export or args.behaviour_policy) and args.kind not in ("medium", "expert"):
        fail(f"--{'export' if export else 'behaviour'}-policy goes with --kind medium or expert (the kinds that roll "
             f"out one policy), not {args.kind}")
    if export and export.exists() and not args.overwrite:
        fail(f"--export-policy {export} already exists: pass --overwrite to replace it, or another file")
    if export and not export.absolute().parent.is_dir():
        fail(f"--export-policy {export}: the folder {export.parent} does not exist")
    return read_policy(args) if args.behaviour_policy else None


def read_policy(args: Args):
    """--behaviour-policy: the saved actor as sac_policy gives it, checked against --env and --kind."""
    saved = load_checkpoint(Path(args.behaviour_policy), (POLICY_FORMAT,), flag="--behaviour-policy")
    meta, env = saved["meta"], make_env(args)
    made_for = (meta["env"], meta["max_episode_steps"], meta["kind"])
    if made_for != (args.env, env.spec.max_episode_steps, args.kind):
        fail(f"{args.behaviour_policy} is the {meta['kind']} policy of {meta['env']} with time limit "
             f"{meta['max_episode_steps']}, not the {args.kind} policy of {args.env} with time limit "
             f"{env.spec.max_episode_steps}")
    if meta["seed"] != args.seed:
        print(f"note: {args.behaviour_policy} was exported by the run with --seed {meta['seed']}; this rollout's "
              f"episodes start from --seed {args.seed}", flush=True)
    metadata = {key: value for key, value in meta.items() if key.startswith(("behaviour_", "sac_", "target_"))}
    metadata.update(behaviour_policy=str(Path(args.behaviour_policy).resolve()), behaviour_policy_sha256=digest(saved))
    return {**saved["evaluation"], "actor": saved["actor"]}, metadata


def load_episodes(args: Args, dataset_id: str) -> list[EpisodeBuffer]:
    dataset = minari.load_dataset(dataset_id)
    if dataset.env_spec.id != args.env or dataset.env_spec.max_episode_steps != make_env(args).spec.max_episode_steps:
        fail(f"existing dataset {dataset_id} was made for {dataset.env_spec.id} with time limit "
             f"{dataset.env_spec.max_episode_steps}, not for these flags; give another --dataset-id")
    seeds = [m.get("seed") for m in dataset.storage.get_episode_metadata(range(dataset.total_episodes))]
    return [EpisodeBuffer(seed=seed, observations=e.observations, actions=e.actions, rewards=e.rewards,
                          terminations=e.terminations, truncations=e.truncations, infos={})
            for seed, e in zip(seeds, dataset.iterate_episodes())]


def reference_scores(args: Args, body: str, run_path: Path) -> Optional[tuple]:
    """D4RL's (min, max) for its three bodies; else the measured random return and the best SAC evaluation."""
    if body in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[body]
    if not run_path.exists():
        return None
    best = max(e["mean_return"] for e in read_sac_run(run_path)["evaluations"])
    env = make_env(args)
    env.action_space.seed(args.seed)
    random_return = evaluate(args, lambda obs: env.action_space.sample(), args.eval_episodes).mean()
    return float(random_return), float(best)


def main(args: Args) -> None:
    check_flags(args, FLAG_RANGES_OF_ARGS)
    if args.target_return is not None and not math.isfinite(args.target_return):
        fail(f"--target-return must be a finite number, not {args.target_return}")
    torch.set_num_threads(args.num_threads)
    body = check_env(args.env).spec.name.lower()
    dataset_id = args.dataset_id or f"local/{body}/{args.kind}-v0"
    check_local_id(dataset_id)
    try:
        namespace, _, version = parse_dataset_id(dataset_id)
    except ValueError as error:
        fail(str(error))
    target_return = args.target_return if args.target_return is not None else D4RL_MEDIUM_RETURN.get(body)
    if target_return is None and args.kind not in ("random", "expert") and not args.behaviour_policy:
        fail(f"D4RL has no medium level for {args.env}; pass --target-return")
    # medium-expert is made of the medium and expert datasets: each reused if whole, else made
    parts = ({part: gen_dataset_id(namespace, part, version) for part in ("medium", "expert")}
             if args.kind == "medium-expert" else {})
    policy = check_policy_flags(args)
    run_path = get_dataset_path(dataset_id).parent / f"sac-seed{args.seed}.pt"
    uses_sac = args.kind != "random" and not args.behaviour_policy
    _locks = lock_dataset_files([dataset_id, *parts.values()], run_path if uses_sac else None)
    if args.export_policy:
        return export_policy(args, run_path, target_return)
    if existing_dataset(dataset_id, args.overwrite) and not args.overwrite:
        fail(f"dataset {dataset_id} already exists at {get_dataset_path(dataset_id)}; pass --overwrite to replace it")
    reused = {part: existing_dataset(part_id, args.overwrite) for part, part_id in parts.items()}

    if args.kind == "medium-expert":
        episodes, metadata = [], {}
        for part, part_id in parts.items():
            if reused[part]:
                print(f"reusing {part_id}", flush=True)
                part_episodes = load_episodes(args, part_id)
                metadata.update({f"{part}_{k}": v for k, v in minari.load_dataset(part_id).storage.metadata.items()
                                 if k.startswith("behaviour_")})
            else:
                part_episodes, algorithm, part_metadata = make_episodes(args, part, run_path, target_return)
                write_dataset(args, part_id, part_episodes, part, algorithm, reference_scores(args, body, run_path),
                              part_metadata)
                metadata.update({f"{part}_{k}": v for k, v in part_metadata.items() if k.startswith("behaviour_")})
            episodes.append(part_episodes)
        sizes = [sum(len(e.rewards) for e in part) for part in episodes]
        if sizes[0] != sizes[1]:
            fail(f"the medium and expert datasets have {sizes[0]} and {sizes[1]} steps; medium-expert needs equal "
                 f"sizes, so regenerate one with the other's --num-steps")
        write_dataset(args, dataset_id, episodes[0] + episodes[1], "medium-expert", "SAC (CleanRL), medium + expert",
                      reference_scores(args, body, run_path), metadata)
    else:
        episodes, algorithm, metadata = make_episodes(args, args.kind, run_path, target_return, policy)
        write_dataset(args, dataset_id, episodes, args.kind, algorithm, reference_scores(args, body, run_path),
                      metadata)


if __name__ == "__main__":
    with errors_in_one_sentence("--total-timesteps (the SAC replay keeps every step) or --num-steps"):
        main(tyro.cli(Args))
