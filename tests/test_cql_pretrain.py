"""cql_pretrain.py: each piece of Eq. (1) against hand computations, the N-agent wiring against a
per-agent loop, data loading, checkpoints, determinism/resume and the command-line behaviour."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import cql_pretrain as cql
import plumbing
import upq_finetune as upq
from conftest import (
    assert_refused,
    assert_same_tensors,
    members,
    read_rows,
    rewrite_checkpoint,
    write_random_hopper_hdf5,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def f64(values):
    """Hand computations run in double precision."""
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- the math, by hand
def test_tanh_gaussian_log_prob_matches_change_of_variables():
    mean = f64([[0.3, -1.2]])
    log_std = f64([[-0.5, 0.4]])
    noise = f64([[0.7, -0.2]])
    action, log_prob = cql.tanh_gaussian_sample(mean, log_std, noise)
    u = mean + log_std.exp() * noise
    gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum()
    expected = gaussian - torch.log(1 - torch.tanh(u) ** 2 + 1e-6).sum()
    assert torch.allclose(action, torch.tanh(u))
    assert torch.allclose(log_prob, expected.reshape(1), atol=1e-10)
    # the dataset-action version inverts tanh to the same pre-activation
    assert torch.allclose(cql.action_log_prob(mean, log_std, action), log_prob, atol=1e-8)


def test_cql_logsumexp_by_hand():
    # one state, R = 2 actions per group, |A| = 3: uniform density 0.5^3
    q_random = f64([[1.0], [2.0]])
    q_current = f64([[0.5], [-1.0]])
    q_next = f64([[3.0], [0.0]])
    logp_current = f64([[-1.0], [0.5]])
    logp_next = f64([[2.0], [-0.5]])
    values = [1 - 3 * math.log(0.5), 2 - 3 * math.log(0.5), 3.0 - 2.0, 0.0 + 0.5, 0.5 + 1.0, -1.0 - 0.5]
    expected = math.log(sum(math.exp(v) for v in values))
    got = cql.cql_logsumexp(q_random, q_current, q_next, logp_current, logp_next, act_dim=3, temperature=1.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # temperature t: t * log sum exp(v / t)
    hot = cql.cql_logsumexp(q_random, q_current, q_next, logp_current, logp_next, act_dim=3, temperature=2.0)
    assert hot.item() == pytest.approx(2.0 * math.log(sum(math.exp(v / 2.0) for v in values)), abs=1e-12)


def test_gap_target_and_policy_loss_by_hand():
    logsumexp = f64([2.0, 4.0, 6.0])
    q_data = f64([1.0, 1.0, 4.0])
    assert cql.conservative_gap(logsumexp, q_data).item() == pytest.approx(4.0 - 2.0)
    target = cql.bellman_target(f64([1.0, 2.0]), f64([0.0, 1.0]), f64([10.0, 10.0]), 0.9)
    assert target.tolist() == pytest.approx([1.0 + 0.9 * 10.0, 2.0])
    alpha, log_prob = f64([[0.5]]), f64([[-2.0, 0.0]])
    q, bc = f64([[3.0, 5.0]]), f64([[-1.0, -3.0]])
    soft_q, cloning = (cql.policy_loss(alpha, log_prob, q, bc, behaviour_cloning=flag).item() for flag in (False, True))
    assert soft_q == pytest.approx((-1 - 3 + 0 - 5) / 2) and cloning == pytest.approx((-1 + 1 + 0 + 3) / 2)


def test_normalized_score_uses_d4rl_reference_returns():
    low, high = plumbing.D4RL_REF_SCORES["hopper"]
    assert cql.normalized_score([low, high, 1000.0], low, high).tolist() == pytest.approx(
        [0.0, 100.0, 100 * (1000.0 + 20.272305) / (3234.3 + 20.272305)])
    assert np.isnan(cql.normalized_score([1.0], None, None)).all()


# --------------------------------------------------------------------------- N agents vs a loop
def mlp_member(seq, member, x):
    """Apply member `member` of a vectorized MLP to x [B, in] the slow way."""
    for layer in seq:
        if isinstance(layer, cql.VectorizedLinear):
            x = x @ layer.weight[member] + layer.bias[member, 0]
        else:
            x = torch.relu(x)
    return x


def reference_losses(actor, critic, target_critic, log_alpha, batch, noise, args, behaviour_cloning):
    """Per-agent CQL losses written out state by state, sample by sample."""
    obs, actions, rewards, next_obs, terminals = batch
    num_agents, batch_size = rewards.shape
    R, A = args.num_random, actions.shape[-1]
    out = {"critic": [], "actor": [], "alpha": []}

    def tanh_log_prob(mean, log_std, u):  # log-density of tanh(u), u ~ N(mean, std), in the epsilon form
        gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
        return (gaussian - torch.log(1 - torch.tanh(u) ** 2 + 1e-6)).sum(-1)

    for k in range(num_agents):
        def policy(states, eps):
            mean, log_std = mlp_member(actor.net, k, states).chunk(2, -1)
            log_std = log_std.clamp(-5, 2)
            u = mean + log_std.exp() * eps
            return torch.tanh(u), tanh_log_prob(mean, log_std, u)

        def q(net, j, states, acts):
            return mlp_member(net.net, 2 * k + j, torch.cat([states, acts], -1)).squeeze(-1)

        s_eps = noise["s"][k].view(1 + R, batch_size, A)
        next_eps = noise["next"][k].view(1 + R, batch_size, A)
        uniform = noise["uniform"][k].view(R, batch_size, A)
        a_pi, logp_pi = policy(obs[k], s_eps[0])
        a_target, _ = policy(next_obs[k], next_eps[0])
        target = rewards[k] + args.gamma * (1 - terminals[k]) * torch.minimum(
            q(target_critic, 0, next_obs[k], a_target), q(target_critic, 1, next_obs[k], a_target))
        critic_loss = 0.0
        for j in range(2):
            q_data = q(critic, j, obs[k], actions[k])
            lse = []
            for b in range(batch_size):
                values = []
                for r in range(R):
                    values.append(q(critic, j, obs[k][b:b + 1], uniform[r, b:b + 1])[0] - A * math.log(0.5))
                for r in range(R):
                    a_n, lp_n = policy(next_obs[k][b:b + 1], next_eps[1 + r, b:b + 1])
                    values.append(q(critic, j, obs[k][b:b + 1], a_n)[0] - lp_n[0])
                for r in range(R):
                    a_c, lp_c = policy(obs[k][b:b + 1], s_eps[1 + r, b:b + 1])
                    values.append(q(critic, j, obs[k][b:b + 1], a_c)[0] - lp_c[0])
                lse.append(torch.logsumexp(torch.stack(values), 0))
            gap = torch.stack(lse).mean() - q_data.mean()
            critic_loss = critic_loss + ((q_data - target) ** 2).mean() + args.min_q_weight * gap
        q_pi = torch.minimum(q(critic, 0, obs[k], a_pi), q(critic, 1, obs[k], a_pi))
        alpha = log_alpha[k].exp()
        if behaviour_cloning:
            mean, log_std = mlp_member(actor.net, k, obs[k]).chunk(2, -1)
            u = torch.atanh(actions[k].clamp(-1 + 1e-6, 1 - 1e-6))
            log_std = log_std.clamp(-5, 2)
            actor_loss = (alpha * logp_pi - tanh_log_prob(mean, log_std, u)).mean()
        else:
            actor_loss = (alpha * logp_pi - q_pi).mean()
        out["critic"].append(critic_loss)
        out["actor"].append(actor_loss)
        out["alpha"].append(-(log_alpha[k] * (logp_pi + args.target_entropy)).mean())
    return {key: torch.stack(value) for key, value in out.items()}


def small_problem(num_agents=2, batch_size=3, num_random=2, obs_dim=4, act_dim=3, hidden=(8,)):
    torch.manual_seed(0)
    actor = cql.Actor(obs_dim, act_dim, hidden, num_agents).double()
    critic = cql.Critic(obs_dim, act_dim, hidden, 2 * num_agents).double()
    target_critic = cql.Critic(obs_dim, act_dim, hidden, 2 * num_agents).double()
    log_alpha = torch.tensor([0.1, -0.3][:num_agents], dtype=torch.float64, requires_grad=True)
    double = dict(dtype=torch.float64)
    batch = (
        torch.randn(num_agents, batch_size, obs_dim, **double),
        torch.rand(num_agents, batch_size, act_dim, **double) * 2 - 1,
        torch.randn(num_agents, batch_size, **double),
        torch.randn(num_agents, batch_size, obs_dim, **double),
        torch.tensor([[0.0, 1.0, 0.0]] * num_agents, **double)[:, :batch_size],
    )
    generators = [torch.Generator().manual_seed(10 + k) for k in range(num_agents)]
    noise = cql.draw_noise(generators, batch_size, act_dim, num_random, "cpu")
    noise = {key: value.to(torch.float64) for key, value in noise.items()}
    args = dict(num_random=num_random, gamma=0.99, cql_temperature=1.0, min_q_weight=5.0, lagrange_threshold=None,
                target_entropy=-float(act_dim))
    return actor, critic, target_critic, log_alpha, batch, noise, args


@pytest.mark.parametrize("behaviour_cloning", [True, False])
def test_vectorized_losses_equal_per_agent_loop(behaviour_cloning):
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem()
    total, metrics = cql.cql_losses(actor, critic, target_critic, log_alpha, None, *batch, noise, behaviour_cloning,
                                    **args)
    expected = reference_losses(actor, critic, target_critic, log_alpha, batch, noise, SimpleNamespace(**args),
                                behaviour_cloning)
    assert torch.allclose(metrics["critic_loss"], expected["critic"], atol=1e-9)
    assert torch.allclose(metrics["actor_loss"], expected["actor"], atol=1e-9)
    assert total.item() == pytest.approx(sum(v.sum().item() for v in expected.values()), abs=1e-8)


def test_compiled_losses_equal_eager_losses():
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem()
    eager_total, eager = cql.cql_losses(actor, critic, target_critic, log_alpha, None, *batch, noise, False, **args)
    compiled_total, compiled = torch.compile(cql.cql_losses)(actor, critic, target_critic, log_alpha, None, *batch,
                                                             noise, False, **args)
    assert compiled_total.item() == pytest.approx(eager_total.item(), rel=1e-9)
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-9)


def test_one_backward_gives_each_network_its_own_gradient():
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem()
    total, metrics = cql.cql_losses(actor, critic, target_critic, log_alpha, None, *batch, noise, False, **args)
    critic_grads = torch.autograd.grad(total, list(critic.parameters()), retain_graph=True)
    actor_grads = torch.autograd.grad(total, list(actor.parameters()), retain_graph=True)
    only_critic = torch.autograd.grad(metrics["critic_loss"].sum(), list(critic.parameters()), retain_graph=True)
    only_actor = torch.autograd.grad(metrics["actor_loss"].sum(), list(actor.parameters()))
    for got, want in zip(critic_grads + actor_grads, only_critic + only_actor):
        assert torch.allclose(got, want, atol=1e-12)
    # and agent 0's loss moves no parameter of agent 1
    grads = torch.autograd.grad(metrics["critic_loss"][0], list(critic.parameters()))
    assert all(g[2:].abs().max() == 0 for g in grads) and any(g[:2].abs().max() > 0 for g in grads)


def test_update_steps_each_network_on_its_own_gradient_then_moves_the_targets_tau_towards_the_critics():
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem()
    total, _ = cql.cql_losses(actor, critic, target_critic, log_alpha, None, *batch, noise, False, **args)
    groups = {"actor": (list(actor.parameters()), 0.1), "critic": (list(critic.parameters()), 0.2),
              "alpha": ([log_alpha], 0.3)}
    params = [(p, lr) for group, lr in groups.values() for p in group]
    grads = torch.autograd.grad(total, [p for p, _ in params])  # at the weights before the step
    before = [p.detach().clone() for p, _ in params]
    targets_before = [p.detach().clone() for p in target_critic.parameters()]
    optimizers = {name: torch.optim.SGD(group, lr=lr) for name, (group, lr) in groups.items()}
    cql.cql_update(actor, critic, target_critic, log_alpha, None, optimizers, batch, noise, False, 0.25, args)
    for (p, lr), p0, grad in zip(params, before, grads):
        assert torch.allclose(p, p0 - lr * grad, rtol=0, atol=1e-12)
    for target, target0, stepped in zip(target_critic.parameters(), targets_before, critic.parameters()):
        assert torch.allclose(target, target0 + 0.25 * (stepped - target0), rtol=0, atol=1e-12)
    assert not torch.allclose(targets_before[0], list(critic.parameters())[0])  # the check above can fail


def test_lagrange_term_pushes_alpha_prime_towards_threshold():
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem()
    args["lagrange_threshold"] = -1e3  # far below any gap: alpha' must grow
    log_alpha_prime = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    total, _ = cql.cql_losses(actor, critic, target_critic, log_alpha, log_alpha_prime, *batch, noise, False, **args)
    (grad,) = torch.autograd.grad(total, [log_alpha_prime])
    assert (grad < 0).all()  # gradient descent increases log alpha'


# --------------------------------------------------------------------------- data loading
def test_hdf5_transitions_keep_termination_and_truncation_apart(tiny_hopper_hdf5):
    with h5py.File(tiny_hopper_hdf5) as f:
        terminals, timeouts = f["terminals"][()], f["timeouts"][()]
    assert terminals.any() and timeouts.any()  # the fixture exercises both flags
    data = plumbing.load_offline_data(str(tiny_hopper_hdf5))
    assert data.gym_env_id == "Hopper-v5" and len(data.rewards) == 1500
    assert np.array_equal(data.terminals, terminals.astype(np.float32))  # a timeout is not a terminal
    assert data.ref_min_score == plumbing.D4RL_REF_SCORES["hopper"][0]


def test_hdf5_without_next_observations_drops_episode_ends(tmp_path):
    rewards = np.arange(6, dtype=np.float32)
    with h5py.File(tmp_path / "hopper_small.hdf5", "w") as f:
        f["observations"] = np.tile(rewards[:, None], (1, 11))
        f["actions"] = np.zeros((6, 3), np.float32)
        f["rewards"] = rewards
        f["terminals"] = np.array([0, 1, 0, 0, 0, 0], bool)
        f["timeouts"] = np.array([0, 0, 0, 1, 0, 0], bool)
    data = plumbing.load_offline_data(str(tmp_path / "hopper_small.hdf5"))
    assert data.rewards.tolist() == [0, 1, 2, 4]  # row 3 timed out, row 5 is last: no next state
    assert data.next_observations[:, 0].tolist() == [1, 2, 3, 5]
    assert data.terminals.tolist() == [0, 1, 0, 0]


def test_d4rl_name_found_in_cache_folder(tmp_path, monkeypatch):
    write_random_hopper_hdf5(tmp_path / "hopper_medium_replay-v2.hdf5", num_steps=50, max_episode_steps=20)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    data = plumbing.load_offline_data("hopper-medium-replay-v2")
    assert len(data.rewards) == 50 and data.gym_env_id == "Hopper-v5"
    (tmp_path / "halfcheetah_medium_expert-v2.hdf5").touch()  # D4RL's file name: the level's hyphens as underscores
    assert plumbing.fetch_d4rl("halfcheetah-medium-expert-v2") == tmp_path / "halfcheetah_medium_expert-v2.hdf5"


@pytest.mark.parametrize("dataset_id", ["local/hopper/test-v0", "mujoco/hopper/test-v0"])
def test_local_minari_dataset_loads_with_its_flags(tmp_path, monkeypatch, capsys, dataset_id):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = gym.make("Hopper-v5")
    buffers = []
    for episode, length in enumerate((4, 3)):
        obs = np.full((length + 1, 11), episode, np.float32)
        obs[:, 1] = np.arange(length + 1)
        buffers.append(EpisodeBuffer(
            id=episode, observations=list(obs), actions=list(np.zeros((length, 3), np.float32)),
            rewards=list(np.ones(length)), terminations=[False] * (length - 1) + [episode == 0],
            truncations=[False] * (length - 1) + [episode == 1], infos={}))
    minari.create_dataset_from_buffers(dataset_id, buffers, env="Hopper-v5", ref_min_score=1.0, ref_max_score=11.0)
    data = plumbing.load_offline_data(dataset_id)
    said = f"Minari dataset {dataset_id}: read from this machine's copy at {tmp_path / dataset_id}, not from Minari's"
    assert (said in capsys.readouterr().out) == dataset_id.startswith("mujoco/")  # a remote id that is shadowed
    assert data.terminals.tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert data.next_observations[:, 1].tolist() == [1, 2, 3, 4, 1, 2, 3]
    assert (data.ref_min_score, data.ref_max_score, data.gym_env_id) == (1.0, 11.0, "Hopper-v5")
    assert cql.normalized_score([6.0], data.ref_min_score, data.ref_max_score).tolist() == [50.0]
    del env


# --------------------------------------------------------------------------- the script, end to end
TINY = ["--num-agents", "2", "--hidden-sizes", "16", "16", "--batch-size", "16", "--num-random", "2",
        "--eval-episodes", "1", "--bc-steps", "5", "--log-every", "10"]


def assert_refused_leaving(run_script, kept: Path, message, *flags):
    """A bad run of cql_pretrain.py is refused and leaves the file `kept` byte for byte as it was."""
    before = kept.read_bytes()
    assert_refused(run_script("cql_pretrain.py", *flags), message)
    assert kept.read_bytes() == before


def params_of(save_dir: Path, agent: int):
    """The checkpoint in save_dir, and agent `agent`'s actor and critic weights (its members of the stacked tensors:
    actor k, critics 2k and 2k + 1) as one vector."""
    ckpt = torch.load(save_dir / "checkpoint.pt", weights_only=True)
    actor = members(ckpt["actor"], slice(agent, agent + 1))
    critic = members(ckpt["critic"], slice(2 * agent, 2 * agent + 2))
    return ckpt, torch.cat([v.flatten() for v in (*actor.values(), *critic.values())])


@pytest.fixture(scope="module")
def trained(run_script, tiny_hopper_hdf5, tmp_path_factory):
    """Two identical 30-step runs, and the same run interrupted at step 20 and resumed."""
    root = tmp_path_factory.mktemp("cql")
    common = ["--env", tiny_hopper_hdf5, *TINY, "--eval-every", "20", "--save-every", "20"]
    for name in ("a", "b"):
        result = run_script("cql_pretrain.py", *common, "--total-steps", "30", "--save-dir", root / name,
                            "--run-dir", root / f"run_{name}")
        assert result.returncode == 0, result.stderr
    first = run_script("cql_pretrain.py", *common, "--total-steps", "20", "--save-dir", root / "c",
                       "--run-dir", root / "run_c")
    assert first.returncode == 0, first.stderr
    resumed = run_script("cql_pretrain.py", *common, "--total-steps", "30", "--save-dir", root / "c",
                         "--run-dir", root / "run_c", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return root, result.stdout


def test_smoke_run_writes_one_checkpoint_and_eval_csv(trained):
    root, stdout = trained
    assert sorted(p.name for p in (root / "a").iterdir()) == [".lock", "checkpoint.pt"]  # no temporary file left
    rows = read_rows(root / "run_a" / "eval.csv")
    assert [(r["step"], r["agent"]) for r in rows] == [(s, a) for s in ("0", "20", "30")
                                                       for a in ("0", "1", "ensemble")]
    low, high = plumbing.D4RL_REF_SCORES["hopper"]
    for row in rows:
        expected = 100 * (float(row["return"]) - low) / (high - low)
        assert float(row["normalized_score"]) == pytest.approx(expected, abs=1e-2)
    assert "updates/s" in stdout
    ckpt = torch.load(root / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt.pop("sha256") == plumbing.digest(ckpt)
    meta = ckpt["meta"]
    assert (meta["format"], meta["gym_env_id"], meta["step"], meta["num_agents"], meta["seeds"]) == (
        "upq-cql-v3", "Hopper-v5", 30, 2, [1, 2])
    assert (meta["obs_dim"], meta["act_dim"], meta["hidden_sizes"], meta["run_dir"]) == (
        11, 3, [16, 16], str(root / "run_a"))
    last = [float(r["normalized_score"]) for r in rows if r["step"] == "30" and r["agent"] != "ensemble"]
    assert meta["normalized_scores"] == pytest.approx(last, abs=1e-3)  # each agent's last evaluation
    assert ckpt["actor"]["net.0.weight"].shape == (2, 11, 16) and ckpt["critic"]["net.0.weight"].shape == (4, 14, 16)
    assert ckpt["target_critic"]["net.0.weight"].shape == (4, 14, 16)
    assert ckpt["log_alpha"].shape == (2,) and ckpt["log_alpha_prime"] is None
    assert sorted(ckpt["optimizers"]) == ["actor", "alpha", "critic"] and len(ckpt["generators"]) == 2


def test_checkpoint_round_trip_reproduces_the_logged_evaluation(trained):
    root, _ = trained
    ckpt = torch.load(root / "a" / "checkpoint.pt", weights_only=True)
    logged = {r["agent"]: float(r["return"]) for r in read_rows(root / "run_a" / "eval.csv") if r["step"] == "30"}
    for k in range(2):  # agent k alone: its member of the stacked actor
        actor = cql.Actor(11, 3, (16, 16), 1)
        actor.load_state_dict(members(ckpt["actor"], slice(k, k + 1)))
        returns = cql.evaluate_agents(actor, "Hopper-v5", 1, 1, seed=1 + 10_000, device="cpu")
        assert returns[0, 0] == pytest.approx(logged[str(k)], abs=1e-3)
    # the ensemble row: pi^E of the two saved agents, as fine-tuning loads and evaluates them
    actor = upq.Actor(11, 3, (16, 16), 2)
    upq.load_members(actor, ckpt["actor"], 2)
    ensemble = upq.evaluate_ensemble(actor, "Hopper-v5", 1, seed=1 + 10_000, device="cpu")
    assert ensemble[0] == pytest.approx(logged["ensemble"], abs=1e-3)


def test_an_ensemble_of_identical_agents_acts_as_each_of_them():
    """pi^E's mean is the members' mean (Eq. 3), so two copies of one policy score exactly what that policy scores."""
    torch.manual_seed(0)
    actor = cql.Actor(11, 3, (16, 16), 2)
    with torch.no_grad():
        for param in actor.parameters():
            param[1] = param[0]
    single = cql.evaluate_agents(actor, "Hopper-v5", 2, 2, seed=7, device="cpu")
    assert single[0].tolist() == single[1].tolist()
    assert cql.evaluate_ensemble(actor, "Hopper-v5", 2, seed=7, device="cpu").tolist() == single[0].tolist()


@pytest.mark.parametrize("script", [cql, upq], ids=["cql", "finetune"])
def test_evaluation_acts_with_tanh_of_the_members_mean_and_each_agent_with_its_own(script, monkeypatch):
    torch.manual_seed(0)
    actor = script.Actor(11, 3, (16, 16), 3)  # three different members, weights large enough for tanh to bend
    with torch.no_grad():
        for param in actor.parameters():
            param.normal_()
    acted = {}
    monkeypatch.setattr(plumbing, "lockstep_returns", lambda env_id, seeds, act, video_dir=None:
                        acted.setdefault("act", act) and np.zeros(len(seeds)))
    script.evaluate_ensemble(actor, "Hopper-v5", 2, seed=7, device="cpu")
    obs = np.random.default_rng(0).normal(size=(2, 11)).astype(np.float32)
    with torch.no_grad():  # as during the evaluation, which runs under no_grad
        means = actor(torch.as_tensor(obs).expand(3, -1, -1))[0]  # [3 members, 2 episodes, 3]
        got = acted.pop("act")(obs)
    assert np.allclose(got, torch.tanh(means.mean(0)).numpy(), atol=1e-6)  # Eq. (3)'s mean
    assert not np.allclose(torch.tanh(means.mean(0)).numpy(), torch.tanh(means).mean(0).numpy(), atol=1e-6)
    if script is cql:  # each agent alone: agent k on its own rows, with its own member
        cql.evaluate_agents(actor, "Hopper-v5", 3, 1, seed=7, device="cpu")
        rows = np.random.default_rng(1).normal(size=(3, 11)).astype(np.float32)
        with torch.no_grad():
            own = torch.tanh(actor(torch.as_tensor(rows)[:, None])[0][:, 0]).numpy()  # member k at row k
            got = acted["act"](rows)
        assert np.allclose(got, own, atol=1e-6)


def test_agents_are_independent_and_runs_deterministic(trained):
    root, _ = trained
    a, a0 = params_of(root / "a", 0)
    _, a1 = params_of(root / "a", 1)
    b, b0 = params_of(root / "b", 0)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, b0)
    assert_same_tensors(a, b)  # all of it: networks, temperatures, Adam moments, each agent's random stream
    assert a["meta"]["run_id"] != b["meta"]["run_id"]
    assert read_rows(root / "run_a" / "eval.csv") == read_rows(root / "run_b" / "eval.csv")


def test_resume_equals_uninterrupted_run(trained):
    root, _ = trained
    straight, resumed = (torch.load(root / name / "checkpoint.pt", weights_only=True) for name in ("a", "c"))
    assert_same_tensors(straight, resumed)  # networks, target critics, temperatures, Adam moments, random streams
    assert read_rows(root / "run_a" / "eval.csv") == read_rows(root / "run_c" / "eval.csv")
    config = json.loads((root / "run_c" / "config.json").read_text())  # the resume continued the run it found
    assert resumed["meta"]["step"] == 30 and config["resumed"][0]["at_step"] == 20
    assert resumed["meta"]["run_id"] == config["run_id"] == config["resumed"][0]["run_id"]


def test_agent_initialisation_does_not_depend_on_n():
    """Agent k of N is initialised exactly as a single agent with seed + k (as N separate runs would be)."""
    actor3, critic3 = cql.make_agents(4, 2, (8,), 3, seed=1)
    actor1, critic1 = cql.make_agents(4, 2, (8,), 1, seed=2)
    for big, small, rows in ((actor3, actor1, slice(1, 2)), (critic3, critic1, slice(2, 4))):
        for param, single in zip(big.parameters(), small.parameters()):
            assert torch.equal(param[rows], single)
    assert not torch.equal(actor3.net[0].weight[0], actor3.net[0].weight[1])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("dataset, message", [
    ("hopper-mediocre-v2", "unknown dataset"),
    ("hopper-medium-v2", "could not be downloaded"),
    ("mujoco/hopper/medium-v0", "could not be downloaded"),
    ("/nonexistent/hopper.hdf5", "does not exist"),
])
def test_bad_dataset_gives_one_clear_sentence(run_script, dataset, message):
    result = run_script("cql_pretrain.py", "--env", dataset, "--total-steps", "1", timeout=120)
    assert_refused(result, message)
    assert len(result.stderr.strip().splitlines()) == 1


def test_occupied_save_dir_and_corrupted_resume_are_refused(run_script, tiny_hopper_hdf5, trained, tmp_path):
    root, _ = trained
    checkpoint = root / "b" / "checkpoint.pt"
    assert_refused_leaving(run_script, checkpoint, "already holds a checkpoint: pass --resume", "--env",
                           tiny_hopper_hdf5, *TINY, "--save-dir", root / "b", "--total-steps", "5",
                           "--run-dir", tmp_path / "run")

    truncated, edited = tmp_path / "truncated", tmp_path / "edited"
    for folder in (truncated, edited):
        folder.mkdir()
    (truncated / "checkpoint.pt").write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    rewrite_checkpoint(checkpoint, edited / "checkpoint.pt", lambda ckpt: ckpt["log_alpha"].add_(0.01),
                       keep_digest=True)  # one number changed, the digest of the run's own
    for folder, message in ((truncated, "is corrupted or not a checkpoint"),
                            (edited, "is corrupted: its contents do not match the digest")):
        assert_refused_leaving(run_script, folder / "checkpoint.pt", message, "--env", tiny_hopper_hdf5, *TINY,
                               "--save-dir", folder, "--total-steps", "40", "--resume", "--run-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_another_dataset_is_refused_on_resume(run_script, trained, tmp_path):
    root, _ = trained
    cheetah = tmp_path / "halfcheetah_small.hdf5"
    with h5py.File(cheetah, "w") as f:
        f["observations"] = np.zeros((10, 17), np.float32)
        f["next_observations"] = np.zeros((10, 17), np.float32)
        f["actions"] = np.zeros((10, 6), np.float32)
        f["rewards"] = np.zeros(10, np.float32)
        f["terminals"] = np.zeros(10, bool)
    assert_refused_leaving(run_script, root / "b" / "checkpoint.pt",
                           f"this command {cheetah}; a resumed run keeps every flag that shapes its numbers",
                           "--env", cheetah,
                           *TINY, "--save-dir", root / "b", "--resume", "--total-steps", "40",
                           "--run-dir", tmp_path / "run")


def test_resume_on_another_kind_of_device_is_refused(run_script, tiny_hopper_hdf5, trained, tmp_path):
    """A CUDA generator's state (16 bytes) cannot continue a CPU generator's stream (5,056 bytes), nor the reverse."""
    root, _ = trained
    moved = tmp_path / "moved"
    moved.mkdir()
    rewrite_checkpoint(root / "b" / "checkpoint.pt", moved / "checkpoint.pt",
                       lambda ckpt: ckpt.update(generators=[torch.zeros(16, dtype=torch.uint8)] * 2))
    assert_refused_leaving(run_script, moved / "checkpoint.pt", "saved on another kind of device", "--env",
                           tiny_hopper_hdf5, *TINY, "--save-dir", moved, "--total-steps", "40", "--resume",
                           "--run-dir", tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_the_eager_updates(run_script, tiny_hopper_hdf5, tmp_path):
    """On CUDA the recorded steps (one graph for the BC warm-up, one after) do what the eager steps do, draw the
    same random numbers, and a graphed run resumes to the uninterrupted one."""
    common = ["--env", tiny_hopper_hdf5, *TINY, "--eval-every", "20", "--save-every", "20", "--device", "cuda"]
    runs = {"eager": ["--no-cuda-graph", "--total-steps", "30"], "graph": ["--total-steps", "30"],
            "first_half": ["--total-steps", "20"], "resumed": ["--total-steps", "30", "--resume"]}
    for name, flags in runs.items():
        save = tmp_path / ("resumed" if name == "first_half" else name)
        result = run_script("cql_pretrain.py", *common, *flags, "--save-dir", save,
                            "--run-dir", tmp_path / f"run_{name}")
        assert result.returncode == 0, result.stderr
        assert "agents on cuda" in result.stdout
    for k in range(2):
        eager, eager_params = params_of(tmp_path / "eager", k)
        for name in ("graph", "resumed"):
            checkpoint, params = params_of(tmp_path / name, k)
            assert torch.equal(checkpoint["generators"][k], eager["generators"][k])
            assert torch.allclose(params, eager_params, rtol=1e-4, atol=1e-6)
            assert torch.allclose(checkpoint["log_alpha"][k], eager["log_alpha"][k], rtol=1e-4, atol=1e-6)


def test_readme_loading_snippet_gives_the_deterministic_action(trained, tmp_path):
    """The lines the README shows for loading one agent of a checkpoint and acting, run as written from another
    folder, in a fresh interpreter that has only the standard path."""
    root, _ = trained
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "checkpoints/hopper-medium-v2__seed1/checkpoint.pt" in snippet and "path/to/upq" in snippet
    snippet = snippet.replace("checkpoints/hopper-medium-v2__seed1/checkpoint.pt", str(root / "a" / "checkpoint.pt"))
    snippet = snippet.replace("path/to/upq", str(Path(__file__).resolve().parents[1]))
    obs = np.linspace(-1, 1, 11)
    program = (f"import numpy as np\nobs = np.linspace(-1, 1, 11)\n{snippet}\n"
               "print(type(action).__name__, action.tolist())")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    kind, values = result.stdout.split(" ", 1)
    reference = cql.Actor(11, 3, (16, 16), 2)
    reference.load_state_dict(torch.load(root / "a" / "checkpoint.pt", weights_only=True)["actor"])
    agents = [torch.tanh(mlp_member(reference.net, k, torch.as_tensor(obs, dtype=torch.float32)[None])[0, :3])
              for k in range(2)]  # layer by layer
    assert kind == "ndarray"
    assert np.allclose(json.loads(values), agents[0].detach().numpy(), atol=1e-6)  # agent 0's action
    assert not np.allclose(json.loads(values), agents[1].detach().numpy(), atol=1e-6)  # not agent 1's


def test_a_used_run_dir_is_refused_without_resume_or_overwrite(run_script, tiny_hopper_hdf5, trained, tmp_path):
    root, _ = trained
    assert_refused_leaving(run_script, root / "run_a" / "eval.csv", "eval.csv already exists", "--env",
                           tiny_hopper_hdf5, *TINY, "--save-dir", tmp_path / "fresh", "--total-steps", "5",
                           "--run-dir", root / "run_a")
    assert not (tmp_path / "fresh").exists()


# --------------------------------------------------------------------------- the official code's last details
def test_networks_are_initialised_as_the_official_cql_code():
    """rlkit: hidden weights within 1/sqrt(size[0]) of a Linear weight [out, in] (the output width), hidden biases
    0.1, the critics' last layer within 3e-3 and the policy's within 1e-3 (weights and biases)."""
    torch.manual_seed(0)
    actor, critic = cql.Actor(11, 3, (256, 256), 1), cql.Critic(11, 3, (256, 256), 2)
    for net, last_bound in ((actor.net, 1e-3), (critic.net, 3e-3)):
        first, second, last = net[0], net[2], net[4]
        for layer in (first, second):
            assert layer.weight.abs().max() <= 1 / 16 and layer.weight.abs().max() > 0.99 / 16
            assert (layer.bias == 0.1).all()
        assert first.weight.abs().max() < 1 / math.sqrt(14)  # not the true fan-in's bound (0.27 for the critic)
        for tensor in (last.weight, last.bias):
            assert tensor.abs().max() <= last_bound and tensor.abs().max() > 0.5 * last_bound


def test_tanh_gaussian_log_prob_is_the_official_cql_codes_epsilon_form():
    # u = mean = [10, 0], std = 1 in float32: tanh(10) rounds to 1, so the correction is -log(1e-6) = 13.8155
    log_prob = cql.tanh_gaussian_log_prob(torch.tensor([[10.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[10.0, 0.0]]))
    assert log_prob.item() == pytest.approx(11.97763, abs=1e-4)  # Off2OnRL's exact form: 16.77583
    small = cql.tanh_gaussian_log_prob(f64([[0.5]]), f64([[0.0]]), f64([[0.5]]))
    assert small.item() == pytest.approx(-0.5 * math.log(2 * math.pi) - math.log(1 - math.tanh(0.5) ** 2 + 1e-6))


def test_lagrange_term_is_the_official_cql_codes_form():
    """alpha' (w gap - threshold) for each critic; alpha' loss -1/2 sum_j alpha' (w gap_j - threshold): with w = 5,
    gaps 3 and 2, threshold 10, alpha' = 1: terms 5 and 0, loss -2.5, d/dlog alpha' = -2.5 (alpha' rises)."""
    actor, critic, target_critic, log_alpha, batch, noise, args = small_problem(num_agents=1)
    args.update(min_q_weight=5.0, lagrange_threshold=10.0)
    log_alpha_prime = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    gaps = f64([[3.0, 2.0]])
    original = cql.conservative_gap
    try:
        cql.conservative_gap = lambda logsumexp, q_data: gaps + 0 * logsumexp.mean(-1)
        zeros = torch.zeros(1, 9, 3, dtype=torch.float64)
        sampled = (*cql.tanh_gaussian_sample(zeros, zeros, noise["s"]),
                   *cql.tanh_gaussian_sample(zeros, zeros, noise["next"]), noise["uniform"])
        critic_loss, alpha_prime_loss, _, _ = cql.cql_critic_loss(critic, target_critic, log_alpha_prime, *batch,
                                                                  sampled, 0.99, 5.0, 2, 1.0, 10.0)
        plain_loss = cql.cql_critic_loss(critic, target_critic, None, *batch, sampled, 0.99, 5.0, 2, 1.0, None)[0]
    finally:
        cql.conservative_gap = original
    # the critics' conservative terms: alpha' (5 * 3 - 10) + alpha' (5 * 2 - 10) = 5 with the Lagrange variant,
    # 5 * (3 + 2) = 25 without it; the TD terms are the same
    assert (critic_loss - plain_loss).item() == pytest.approx(5.0 - 25.0)
    assert alpha_prime_loss.item() == pytest.approx(-2.5)
    (grad,) = torch.autograd.grad(alpha_prime_loss, [log_alpha_prime])
    assert grad.item() == pytest.approx(-2.5)
