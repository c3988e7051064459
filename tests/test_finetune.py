"""off2on_finetune.py and upq_finetune.py: Eqs. (2)-(7) against hand computations, the vectorised step
against a member-by-member loop, balanced replay's sampler, checkpoint loading, and both scripts end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import off2on_finetune as off2on
import plumbing
import upq_finetune as upq
from conftest import assert_refused, assert_same_tensors, members, read_rows, rewrite_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
BOTH = pytest.mark.parametrize("script", [off2on, upq], ids=["off2on", "upq"])
F64 = torch.float64


# --------------------------------------------------------------------------- the equations, by hand
@BOTH
def test_ensemble_policy_has_the_moments_of_the_gaussian_mixture(script):  # Eq. (3)
    mu = [[0.5, -1.0], [1.5, 0.0], [-0.5, 2.0]]  # N = 3 members, |A| = 2, one state
    sigma = [[0.2, 1.0], [0.4, 0.5], [0.1, 2.0]]
    mean, log_std = script.ensemble_policy(torch.tensor(mu, dtype=F64)[:, None],
                                           torch.tensor(sigma, dtype=F64).log()[:, None])
    # by hand: mean_i mu_i; mean_i (sigma_i^2 + mu_i^2) - mean^2
    expected_mean = [(0.5 + 1.5 - 0.5) / 3, (-1.0 + 0.0 + 2.0) / 3]
    expected_var = [(0.04 + 0.25 + 0.16 + 2.25 + 0.01 + 0.25) / 3 - 0.5**2,
                    (1 + 1 + 0.25 + 0 + 4 + 4) / 3 - (1 / 3) ** 2]
    assert mean[0].tolist() == pytest.approx(expected_mean, abs=1e-12)
    assert (2 * log_std[0]).exp().tolist() == pytest.approx(expected_var, abs=1e-12)
    # and by sampling the mixture: a member uniformly, then its Gaussian
    rng = np.random.default_rng(0)
    member = rng.integers(3, size=400_000)
    samples = np.asarray(mu)[member] + np.asarray(sigma)[member] * rng.standard_normal((400_000, 2))
    assert samples.mean(0) == pytest.approx(expected_mean, abs=0.01)
    assert samples.var(0) == pytest.approx(expected_var, rel=0.01)


@BOTH
def test_ensemble_policy_clamps_std_to_the_official_range(script):
    same_mean, tiny_std = torch.full((2, 1, 1), 3.0, dtype=F64), torch.full((2, 1, 1), -25.0, dtype=F64)
    assert script.ensemble_policy(same_mean, tiny_std)[1].item() == -20.0  # std >= e^-20
    far_apart = torch.tensor([-100.0, 100.0], dtype=F64).view(2, 1, 1)
    assert script.ensemble_policy(far_apart, tiny_std)[1].item() == 2.0  # std <= e^2 (the spread alone is 100)


@BOTH
def test_ensemble_q_mean_averages_each_agents_twin_minimum(script):  # Eq. (2)
    q = torch.tensor([[1.0, 5.0], [2.0, 4.0], [7.0, -1.0], [3.0, 0.0]])  # [2N, B], member 2k + j = critic j of agent k
    members = script.twin_min(q)
    assert members.tolist() == [[1.0, 4.0], [3.0, -1.0]]
    assert script.ensemble_q_mean(members).tolist() == [2.0, 1.5]


def test_uncertainty_std_is_the_population_std():  # Eq. (4)
    q = np.array([[1.0, 2.0, 10.0], [3.0, 2.0, -2.0], [8.0, 2.0, 4.0], [0.0, 2.0, 0.0]])  # N = 4, B = 3
    got = upq.uncertainty_std(torch.tensor(q)).numpy()
    assert got[0] == pytest.approx(math.sqrt((4 + 0 + 25 + 9) / 4))  # mean 3: deviations -2, 0, 5, -3
    assert got[1] == 0.0
    assert got == pytest.approx(np.std(q, axis=0, ddof=0))
    assert got != pytest.approx(np.std(q, axis=0, ddof=1))  # not PBRL's sample std


def test_per_member_penalized_targets_by_hand():  # Eqs. (4)-(5)
    target_q = torch.tensor([[10.0, 12.0], [11.0, 7.0], [6.0, 3.0], [9.0, 5.0]], dtype=F64)  # [2N = 4, B = 2]
    next_q = upq.twin_min(target_q)
    assert next_q.tolist() == [[10.0, 7.0], [6.0, 3.0]]
    uncertainty = upq.uncertainty_std(next_q)
    assert uncertainty.tolist() == [2.0, 2.0]
    rewards, terminals = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    next_log_prob = torch.tensor([-1.0, 0.5], dtype=F64)
    alpha, gamma, beta = 0.2, 0.9, 0.5
    targets = upq.penalized_target(rewards, terminals, next_q, next_log_prob, alpha, gamma, beta, uncertainty)
    # member 0: 1 + 0.9 (10 + 0.2 - 0.5 * 2) = 9.28; member 1: 1 + 0.9 (6 + 0.2 - 1) = 5.68; the terminal: r alone
    assert torch.allclose(targets, torch.tensor([[9.28, 2.0], [5.68, 2.0]], dtype=F64), rtol=0, atol=1e-12)
    # beta = 0 is Off2OnRL's target, to the bit
    unpenalized = upq.penalized_target(rewards, terminals, next_q, next_log_prob, alpha, gamma, 0.0, uncertainty)
    assert torch.equal(unpenalized, off2on.soft_target(rewards, terminals, next_q, next_log_prob, alpha, gamma))
    expected = torch.tensor([[1 + 0.9 * 10.2, 2.0], [1 + 0.9 * 6.2, 2.0]], dtype=F64)
    assert torch.allclose(unpenalized, expected, rtol=0, atol=1e-12)


@BOTH
def test_critic_actor_and_temperature_losses_by_hand(script):  # Eqs. (6), (7)
    q = torch.tensor([[1.0, 2.0], [0.0, 4.0], [3.0, 3.0], [2.0, 1.0]], dtype=F64)  # [2N = 4, B = 2]
    targets = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=F64)  # [N = 2, B]
    # agent 0: (0 + 1) / 2 + (1 + 1) / 2; agent 1: (1 + 1) / 2 + (0 + 1) / 2
    assert script.critic_td_loss(q, targets).item() == pytest.approx(0.5 + 1.0 + 1.0 + 0.5)
    log_prob, q_ensemble = torch.tensor([-2.0, 1.0], dtype=F64), torch.tensor([3.0, -1.0], dtype=F64)
    assert script.ensemble_actor_loss(0.5, log_prob, q_ensemble).item() == pytest.approx(((-1 - 3) + (0.5 + 1)) / 2)
    log_alpha = torch.tensor([0.3], dtype=F64)
    assert script.temperature_loss(log_alpha, log_prob, -3.0).item() == pytest.approx(-0.3 * ((-2 - 3) + (1 - 3)) / 2)


@BOTH
def test_density_ratio_loss_and_priorities_by_hand(script):
    w_offline, w_online = torch.tensor([1.0, 3.0], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64)
    # offline: -log(2/2) = 0, -log(2/4) = log 2; online: log(2/2) = 0, log(0 + 1e-10)
    expected = math.log(2) / 2 - math.log(1e-10) / 2
    assert script.density_ratio_loss(w_offline, w_online).item() == pytest.approx(expected, rel=1e-6)
    # T = 5: w^(1/5) = 2, 0, 1e6 over the offline mean (1 + 2) / 2 = 1.5, clamped to [1e-3, 1e3]
    priorities = script.balanced_replay_priorities(torch.tensor([32.0, 0.0, 1e30], dtype=F64),
                                                   torch.tensor([1.0, 32.0], dtype=F64), 5.0)
    assert priorities.tolist() == pytest.approx([2 / 1.5, 1e-3, 1e3])
    assert script.initial_online_priority(offline_size=1000, online_fraction=0.5, first_epoch_steps=100) == 10.0
    assert script.initial_online_priority(offline_size=1000, online_fraction=0.2, first_epoch_steps=100) == 2.5


# --------------------------------------------------------------------------- the vectorised step vs a loop
OBS, ACT, HIDDEN = 11, 3, (8, 8)


def one_agent_module(script, big, rows, kind):
    """The slice `rows` of an ensemble module as a separate one-member network (own leaf tensors)."""
    small = kind(OBS, ACT, HIDDEN, rows.stop - rows.start).double()
    small.load_state_dict(members(big.state_dict(), rows))
    return small


def member_by_member_step(script, actor, critic, target_critic, log_alpha, rows, noise, batch_size, beta, mean_target):
    """The step written out per agent with separate networks and the paper's formulas as printed.

    Returns the critic loss, the actor loss (both with graphs into the separate networks), those networks and
    log pi^E(a~|s).
    """
    n = actor.net[0].weight.shape[0]
    actors = [one_agent_module(script, actor, slice(k, k + 1), script.Actor) for k in range(n)]
    critics = [one_agent_module(script, critic, slice(m, m + 1), script.Critic) for m in range(2 * n)]
    targets = [one_agent_module(script, target_critic, slice(m, m + 1), script.Critic) for m in range(2 * n)]
    obs, actions, rewards, next_obs, terminals = script.unpack_transitions(rows[:batch_size], OBS, ACT)
    alpha = log_alpha.exp().item()

    outputs = [a(torch.cat([obs, next_obs])[None]) for a in actors]
    mu = torch.stack([mean[0] for mean, _ in outputs])  # [N, 2B, A]
    sigma = torch.stack([log_std[0].exp() for _, log_std in outputs])
    mean = mu.mean(0)
    std = ((sigma**2 + mu**2).mean(0) - mean**2).sqrt().clamp(math.exp(-20), math.exp(2))  # Eq. (3) as printed
    pre_tanh = mean + std * noise
    gaussian = torch.distributions.Normal(mean, std).log_prob(pre_tanh)
    log_prob = (gaussian - torch.log(1 - torch.tanh(pre_tanh) ** 2)).sum(-1)
    new_actions, next_actions = torch.tanh(pre_tanh).split(batch_size)
    new_log_prob, next_log_prob = log_prob.split(batch_size)

    def agent_min(nets, k, o, a):  # min(Q1_k, Q2_k)(o, a) [B]
        return torch.min(nets[2 * k](o[None], a[None])[0], nets[2 * k + 1](o[None], a[None])[0])

    with torch.no_grad():
        next_values = [agent_min(targets, k, next_obs, next_actions) for k in range(n)]
        spread = torch.tensor(np.std(torch.stack(next_values).numpy(), axis=0), dtype=F64)
        if mean_target:
            next_values = [sum(next_values) / n] * n
        y = [rewards + 0.99 * (1 - terminals) * (v - alpha * next_log_prob - beta * spread) for v in next_values]
    critic_loss = sum(((critics[m](obs[None], actions[None])[0] - y[m // 2]) ** 2).mean() for m in range(2 * n))
    q_new = sum(agent_min(critics, k, obs, new_actions) for k in range(n)) / n
    actor_loss = (alpha * new_log_prob - q_new).mean()
    with torch.no_grad():
        q_members = torch.stack([agent_min(critics, k, obs, actions) for k in range(n)])
        diagnostics = dict(q_ensemble=q_members.mean(), q_spread=torch.tensor(np.std(q_members.numpy(), 0)).mean(),
                           target_mean=torch.stack(y).mean(), uncertainty=spread.mean(), uncertainty_max=spread.max(),
                           penalty_fraction=beta * spread.mean() / torch.stack(y).abs().mean(),
                           entropy=-new_log_prob.mean())
    return critic_loss, actor_loss, actors, critics, new_log_prob.detach(), diagnostics


@pytest.mark.parametrize("script, beta, mean_target", [(off2on, 0.0, False), (upq, 0.3, False), (upq, 0.3, True)],
                         ids=["off2on", "upq", "upq-ensemble-mean-target"])
def test_one_backward_gives_every_member_the_gradient_of_its_own_loss(script, beta, mean_target):
    torch.manual_seed(0)
    n, batch_size = 3, 6
    actor = script.Actor(OBS, ACT, HIDDEN, n).double()
    critic = script.Critic(OBS, ACT, HIDDEN, 2 * n).double()
    target_critic = script.Critic(OBS, ACT, HIDDEN, 2 * n).double()
    density_ratio = script.DensityRatio(OBS + ACT, HIDDEN).double()
    log_alpha = torch.tensor([math.log(0.3)], dtype=F64, requires_grad=True)
    rows = torch.randn(3 * batch_size, 2 * OBS + ACT + 2, dtype=F64)
    rows[:, OBS: OBS + ACT] = rows[:, OBS: OBS + ACT].tanh()
    rows[:, -1] = (torch.arange(3 * batch_size) % 3 == 0).double()  # some terminals
    noise = torch.randn(2 * batch_size, ACT, dtype=F64)
    upq_terms = dict(beta=beta, ensemble_mean_target=mean_target) if script is upq else {}

    *losses, metrics = script.finetune_losses(actor, critic, target_critic, log_alpha,
                                              *script.unpack_transitions(rows[:batch_size], OBS, ACT), noise, n,
                                              gamma=0.99, target_entropy=-3.0, **upq_terms)
    ratio_loss, priorities, w_means = script.density_ratio_step(density_ratio, rows[:, : OBS + ACT], 5.0)
    (sum(losses) + ratio_loss).backward()
    critic_loss, actor_loss, actors, critics, new_log_prob, diagnostics = member_by_member_step(
        script, actor, critic, target_critic, log_alpha, rows, noise, batch_size, beta, mean_target)
    assert metrics["critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-10)
    assert metrics["actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-10)
    for name, value in diagnostics.items():  # what the run logs every epoch (metrics.csv), member by member
        if name in metrics:
            assert metrics[name].item() == pytest.approx(value.item(), rel=1e-9, abs=1e-12), name
    assert ("penalty_fraction" in metrics) == (script is upq) and metrics["uncertainty_max"] > metrics["uncertainty"]
    # each network's gradient is that of its own loss alone: no actor gradient through the critic loss or targets,
    # no critic gradient through the actor loss
    for loss_alone, ensemble, singles in ((actor_loss, actor, actors), (critic_loss, critic, critics)):
        for m, single in enumerate(singles):
            grads = torch.autograd.grad(loss_alone, list(single.parameters()), retain_graph=True)
            for big, grad in zip(ensemble.parameters(), grads):
                assert torch.allclose(big.grad[m: m + 1], grad, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in target_critic.parameters())
    # the temperature and the density-ratio network on their batches
    assert log_alpha.grad.item() == pytest.approx(-(new_log_prob - 3.0).mean().item(), rel=1e-10)
    w_batch, w_offline, w_online = density_ratio(rows[:, : OBS + ACT]).split(batch_size)
    assert torch.allclose(ratio_loss, script.density_ratio_loss(w_offline, w_online))
    assert torch.allclose(priorities, script.balanced_replay_priorities(w_batch, w_offline, 5.0))
    assert (w_means["w_offline"], w_means["w_online"]) == (w_offline.mean(), w_online.mean())


@BOTH
def test_update_moves_the_target_critics_tau_of_the_way_to_the_stepped_critics(script):
    torch.manual_seed(0)
    n, batch_size = 2, 4
    nets = dict(actor=script.Actor(OBS, ACT, HIDDEN, n).double(),
                critic=script.Critic(OBS, ACT, HIDDEN, 2 * n).double(),
                target_critic=script.Critic(OBS, ACT, HIDDEN, 2 * n).double(),
                density_ratio=script.DensityRatio(OBS + ACT, HIDDEN).double(),
                log_alpha=torch.zeros(1, dtype=F64, requires_grad=True))
    optimizers = {name: torch.optim.SGD([nets["log_alpha"]] if name == "log_alpha" else nets[name].parameters(),
                                        lr=0.1) for name in ("actor", "critic", "density_ratio", "log_alpha")}
    rows = torch.randn(12, 2 * OBS + ACT + 2, dtype=F64)
    rows[:, OBS: OBS + ACT], rows[:, -1] = rows[:, OBS: OBS + ACT].tanh(), 0.0
    replay = script.BalancedReplay(rows[:8], 10, balanced=True, p_max=1.0)
    replay.add(rows[8:])
    critic_before = [p.detach().clone() for p in nets["critic"].parameters()]
    target_before = [p.detach().clone() for p in nets["target_critic"].parameters()]
    loss_args = dict(gamma=0.99, target_entropy=-3.0, **(dict(beta=0.1) if script is upq else {}))
    script.finetune_update(nets, optimizers, replay, torch.Generator().manual_seed(1), batch_size, 0.25, 5.0,
                           loss_args, n, ACT)
    for target, target0, stepped, critic0 in zip(nets["target_critic"].parameters(), target_before,
                                                 nets["critic"].parameters(), critic_before):
        assert torch.allclose(target, target0 + 0.25 * (stepped - target0), rtol=0, atol=1e-12)
        assert not torch.equal(stepped, critic0)  # the critics stepped first: the targets follow the new weights


# --------------------------------------------------------------------------- balanced replay's sampler
@BOTH
def test_stratified_draws_are_exact_for_two_priorities(script):
    tree = script.SumTree(2, "cpu")
    tree.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    for seed in range(5):  # one draw per quarter of the mass: leaf 0 owns exactly the first quarter
        assert tree.sample(4, torch.Generator().manual_seed(seed)).tolist() == [0, 1, 1, 1]


@BOTH
def test_sampler_frequencies_match_density_ratio_priorities(script):
    size, capacity = 3000, 5000  # 64-ary: levels of 5,056, 128, 64 and 1 entries
    w = torch.linspace(0.0, 4.0, size, dtype=F64) ** 2  # a fixed density-ratio output per transition
    priorities = script.balanced_replay_priorities(w, w[:1000], 5.0)
    tree = script.SumTree(capacity, "cpu")
    tree.fill(priorities.flip(0))
    # rewriting priorities leaf by leaf (repeats included) keeps every level the sum of the one below
    repeats = torch.tensor([5, 5, 2999])
    tree.update(torch.cat([torch.arange(size), repeats]), torch.cat([priorities, priorities[repeats]]))
    for below, above in zip(tree.levels[:-1], tree.levels[1:]):
        assert torch.allclose(above[: len(below) // 64], below.view(-1, 64).sum(1))
    assert tree.levels[-1].item() == pytest.approx(priorities.sum().item())

    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([tree.sample(256, generator) for _ in range(400)])
    assert draws.max().item() < size  # never an empty slot
    observed = torch.bincount(draws, minlength=size).double().view(30, -1).sum(1)  # 30 groups of 100 transitions
    expected = (priorities / priorities.sum() * len(draws)).view(30, -1).sum(1)
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 60  # 29 degrees of freedom: p ~ 6e-4 under the right frequencies


@BOTH
@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_online_fraction_after_the_first_epoch_is_f(script, fraction):
    offline_size, first_epoch, width = 20_000, 1_000, 2 * OBS + ACT + 2
    p_max = script.initial_online_priority(offline_size, fraction, first_epoch)
    replay = script.BalancedReplay(torch.zeros(offline_size, width), 5_000, balanced=True, p_max=p_max)
    replay.add(torch.ones(first_epoch, width))
    assert (replay.transitions[offline_size: offline_size + first_epoch] == 1).all()
    assert replay.online_size == first_epoch
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([replay.sample(256, generator) for _ in range(50)])
    rl, offline, online = index.view(50, 3, 256).unbind(1)
    assert (rl >= offline_size).double().mean().item() == pytest.approx(fraction, abs=0.005)
    assert offline.max() < offline_size and online.min() >= offline_size and online.max() < offline_size + first_epoch
    # priorities written after an update raise P_max; --no-balanced-replay samples uniformly over what was written
    replay.reprioritize(torch.tensor([3, 20_003]), torch.tensor([2.0, 2 * p_max]))
    assert replay.p_max.item() == 2 * p_max and replay.tree.levels[0][20_003].item() == 2 * p_max
    uniform = script.BalancedReplay(torch.zeros(offline_size, width), 5_000, balanced=False, p_max=p_max)
    uniform.add(torch.ones(first_epoch, width))
    draws = uniform.sample(256_000, generator)
    assert draws.max() < offline_size + first_epoch
    online_share = (draws >= offline_size).double().mean().item()
    assert online_share == pytest.approx(first_epoch / (offline_size + first_epoch), abs=0.003)


@BOTH
def test_online_buffer_is_a_ring_and_resumes_exactly(script):
    replay = script.BalancedReplay(torch.zeros(10, 4), 6, balanced=True, p_max=3.0)
    replay.add(torch.arange(4.0)[:, None].expand(4, 4))
    replay.add(torch.arange(4.0, 8.0)[:, None].expand(4, 4))  # 8 written into 6 slots: 6 and 7 overwrite 0 and 1
    assert replay.transitions[10:, 0].tolist() == [6, 7, 2, 3, 4, 5] and replay.online_size == 6
    assert replay.tree.levels[-1].item() == 10 + 6 * 3.0
    copy = script.BalancedReplay(torch.zeros(10, 4), 6, balanced=True, p_max=1.0)
    copy.load_state_dict(replay.state_dict())
    assert torch.equal(copy.transitions, replay.transitions)
    assert all(torch.equal(a, b) for a, b in zip(copy.tree.levels, replay.tree.levels))
    assert (copy.p_max, copy.online_written) == (replay.p_max, 8)


# --------------------------------------------------------------------------- the scripts, end to end
TINY = ["--steps-per-epoch", "10", "--first-epoch-multiplier", "2", "--batch-size", "32", "--eval-episodes", "1",
        "--density-ratio-hidden-sizes", "16", "16", "--seed", "3"]


@pytest.fixture(scope="module")
def finetuned(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path_factory):
    """off2on and upq --beta 0 on the first 2 of 3 agents (--checkpoints: the folder), and with uniform replay; upq on
    all 3 (--checkpoints: the file) stopped at step 10 and resumed. Each run saves to root/<name>, logs to
    root/<name>_run."""
    root = tmp_path_factory.mktemp("finetune")
    two = ["--env", tiny_hopper_hdf5, *TINY, "--checkpoints", tiny_cql_checkpoints, "--num-agents", "2",
           "--total-steps", "20"]
    three = ["--env", tiny_hopper_hdf5, *TINY, "--beta", "0.1", "--checkpoints",
             tiny_cql_checkpoints / "checkpoint.pt"]
    runs = {  # name: (script, its save dir's name, arguments)
        "off2on": ("off2on_finetune.py", "off2on", two),
        "upq_beta0": ("upq_finetune.py", "upq_beta0", [*two, "--beta", "0"]),
        "uniform": ("off2on_finetune.py", "uniform", [*two, "--no-balanced-replay"]),
        "upq_first_half": ("upq_finetune.py", "upq", [*three, "--total-steps", "10"]),
        "upq_resumed": ("upq_finetune.py", "upq", [*three, "--total-steps", "20", "--resume"]),
    }
    stdout = {}
    for name, (script, save, args) in runs.items():
        result = run_script(script, *args, "--save-dir", root / save, "--run-dir", root / f"{save}_run")
        assert result.returncode == 0, result.stderr
        stdout[name] = result.stdout
    return root, stdout


def test_smoke_run_saves_one_checkpoint_eval_csv_and_log(finetuned, tiny_cql_checkpoints):
    root, stdout = finetuned
    assert sorted(p.name for p in (root / "off2on").iterdir()) == [".lock", "checkpoint.pt"]  # no temporary file left
    rows = read_rows(root / "off2on_run" / "eval.csv")
    assert [r["step"] for r in rows] == ["0", "10", "20"]  # an evaluation at the start of every epoch, and the end
    low, high = plumbing.D4RL_REF_SCORES["hopper"]
    for row in rows:
        expected = 100 * (float(row["return"]) - low) / (high - low)
        assert float(row["normalized_score"]) == pytest.approx(expected, abs=1e-2)
    for field in ("| Q ", "| alpha ", "| online fraction ", "updates/s", "env steps/s"):
        assert field in stdout["off2on"]
    assert "beta U / |y| 0.00e+00" in stdout["upq_beta0"] and "beta U" not in stdout["off2on"]
    assert "| U " in stdout["off2on"]  # Off2OnRL's ensemble spread, measured though not used

    checkpoint = torch.load(root / "off2on" / "checkpoint.pt", weights_only=True)
    assert checkpoint.pop("sha256") == plumbing.digest(checkpoint)
    pretrained = torch.load(tiny_cql_checkpoints / "checkpoint.pt", weights_only=True)
    meta = checkpoint["meta"]
    assert (meta["format"], meta["algorithm"], meta["gym_env_id"], meta["num_agents"], meta["hidden_sizes"]) == (
        "upq-finetune-v3", "off2on", "Hopper-v5", 2, [32, 32])
    assert (meta["env_steps"], meta["grad_steps"], meta["offline_size"]) == (20, 10 * 2 + 10, 1500)  # epoch 0: 2x
    assert meta["pretrained"] == dict(path=str(tiny_cql_checkpoints), run_id=pretrained["meta"]["run_id"], step=50)
    assert checkpoint["actor"]["net.0.weight"].shape == (2, 11, 32)
    assert checkpoint["critic"]["net.0.weight"].shape == (4, 14, 32)
    assert checkpoint["target_critic"]["net.0.weight"].shape == (4, 14, 32)
    assert checkpoint["log_alpha"].shape == (1,) and checkpoint["density_ratio"] is not None
    assert sorted(checkpoint["optimizers"]) == ["actor", "alpha", "critic", "density_ratio"]

    # step 0 is the pre-trained ensemble of the first two agents, evaluated as the script does
    actor = off2on.Actor(11, 3, (32, 32), 2)
    actor.load_state_dict(members(pretrained["actor"], slice(0, 2)))
    returns = off2on.evaluate_ensemble(actor, "Hopper-v5", 1, seed=3 + 10_000, device="cpu")
    assert float(rows[0]["return"]) == pytest.approx(returns.mean(), abs=1e-3)


def test_upq_with_beta_zero_is_off2on(finetuned):
    root, _ = finetuned
    assert (root / "upq_beta0_run" / "eval.csv").read_text() == (root / "off2on_run" / "eval.csv").read_text()
    ours, theirs = (torch.load(root / run / "checkpoint.pt", weights_only=True) for run in ("upq_beta0", "off2on"))
    assert_same_tensors(ours, theirs)  # networks, temperature, density ratio, Adam moments, replay, random stream
    assert (ours["meta"]["algorithm"], theirs["meta"]["algorithm"]) == ("upq", "off2on")


def test_resume_continues_the_run(finetuned, tiny_cql_checkpoints):
    root, stdout = finetuned
    assert "ensemble of 3 agents" in stdout["upq_resumed"] and "resumed at env step 10" in stdout["upq_resumed"]
    assert [r["step"] for r in read_rows(root / "upq_run" / "eval.csv")] == ["0", "10", "20"]
    checkpoint = torch.load(root / "upq" / "checkpoint.pt", weights_only=True)
    meta = checkpoint["meta"]
    assert (meta["algorithm"], meta["env_steps"], meta["grad_steps"], meta["num_agents"]) == ("upq", 20, 30, 3)
    assert meta["pretrained"]["path"] == str(tiny_cql_checkpoints / "checkpoint.pt")
    assert meta["run_id"] == json.loads((root / "upq_run" / "config.json").read_text())["run_id"]  # the same run
    assert checkpoint["actor"]["net.0.weight"].shape == (3, 11, 32)
    replay = checkpoint["replay"]
    assert replay["online_rows"].shape == (20, 2 * 11 + 3 + 2) and replay["online_size"] == 20
    assert replay["priorities"].shape == (1500 + 20,)


def test_uniform_replay_samples_offline_and_online_alike(finetuned):
    root, stdout = finetuned
    state = torch.load(root / "uniform" / "checkpoint.pt", weights_only=True)
    assert state["density_ratio"] is None and state["replay"]["priorities"] is None
    assert "density_ratio" not in state["optimizers"]
    fractions = [float(line.split("online fraction ")[1].split()[0]) for line in stdout["uniform"].splitlines()
                 if "online fraction" in line]
    assert fractions[0] == pytest.approx(10 / 1510, abs=0.01) and fractions[1] == pytest.approx(20 / 1520, abs=0.02)
    assert 0 < fractions[0] and 0 < fractions[1]  # few draws (640 an epoch), some online (0.002, 0.009 here)


def test_occupied_save_dir_is_refused(run_script, finetuned, tiny_hopper_hdf5, tiny_cql_checkpoints):
    root, _ = finetuned
    before = (root / "off2on" / "checkpoint.pt").read_bytes()
    result = run_script("off2on_finetune.py", "--env", tiny_hopper_hdf5, *TINY, "--checkpoints", tiny_cql_checkpoints,
                        "--total-steps", "10", "--save-dir", root / "off2on", "--run-dir", root / "again")
    assert_refused(result, "already holds a checkpoint: pass --resume")
    assert (root / "off2on" / "checkpoint.pt").read_bytes() == before and not (root / "again").exists()


def saved_files(folder: Path) -> dict:
    """The files of a save dir, byte for byte (its .lock aside: each run writes its process id there)."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.name != ".lock"}


def test_resume_on_another_kind_of_device_is_refused(run_script, finetuned, tiny_hopper_hdf5, tmp_path):
    """A CUDA generator's state (16 bytes) cannot continue a CPU run's random stream, nor the reverse."""
    root, _ = finetuned
    moved = tmp_path / "moved"
    moved.mkdir()
    rewrite_checkpoint(root / "upq" / "checkpoint.pt", moved / "checkpoint.pt",
                       lambda checkpoint: checkpoint.update(generator=torch.zeros(16, dtype=torch.uint8)))
    before = saved_files(moved)
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *TINY, "--beta", "0.1", "--total-steps", "30",
                        "--resume", "--save-dir", moved, "--run-dir", tmp_path / "run")
    assert_refused(result, "saved on another kind of device")
    assert saved_files(moved) == before


def edit_meta(**entries):
    """An edit for rewrite_checkpoint: some meta entries replaced."""
    return lambda checkpoint: checkpoint["meta"].update(entries)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("truncated", "is corrupted or not a checkpoint"),
    ("edited", "is corrupted: its contents do not match the digest"),
    ("other env", "the agents were trained for HalfCheetah-v5 (obs 17, actions 6) but --env"),
    ("more agents than saved", "--num-agents must lie between 1 and the 3 agents of"),
    ("finetuned, not cql", "is not a upq-cql-v3 checkpoint (it is a upq-finetune-v3 one): pass the --save-dir of "
                           "cql_pretrain.py (a fine-tuned run continues from its own --save-dir with --resume)"),
    ("NaN weights", "holds NaN or inf values in critic.net.4.bias: its run diverged"),  # a digest of NaN matches
])
def test_bad_checkpoints_give_one_sentence_and_overwrite_nothing(run_script, finetuned, tiny_hopper_hdf5,
                                                                 tiny_cql_checkpoints, tmp_path, case, message):
    root, _ = finetuned
    good, bad, num_agents = tiny_cql_checkpoints / "checkpoint.pt", tmp_path / "checkpoint.pt", "2"
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[:5000])
    elif case == "edited":  # a meta entry changed, the digest of the run's own
        rewrite_checkpoint(good, bad, edit_meta(step=49), keep_digest=True)
    elif case == "other env":
        rewrite_checkpoint(good, bad, edit_meta(gym_env_id="HalfCheetah-v5", obs_dim=17, act_dim=6))
    elif case == "more agents than saved":
        bad, num_agents = good, "4"
    elif case == "finetuned, not cql":
        bad = root / "upq"  # the folder of a fine-tuning run
    elif case == "NaN weights":
        rewrite_checkpoint(good, bad, lambda checkpoint: checkpoint["critic"]["net.4.bias"][0].fill_(float("nan")))
    before = saved_files(root / "off2on")
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *TINY, "--total-steps", "10", "--checkpoints",
                        bad, "--num-agents", num_agents, "--save-dir", root / "off2on", "--overwrite",
                        "--run-dir", tmp_path / "run")
    assert_refused(result, message)
    assert saved_files(root / "off2on") == before and not (tmp_path / "run").exists()


def test_nan_loss_stops_the_run_before_anything_is_saved(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path):
    def huge_critic(checkpoint):  # agent 0's first critic, its last bias: finite, but its square overflows
        checkpoint["critic"]["net.4.bias"][0].fill_(3e38)

    huge_agent = rewrite_checkpoint(tiny_cql_checkpoints / "checkpoint.pt", tmp_path / "huge.pt", huge_critic)
    result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *TINY, "--total-steps", "20", "--save-every", "1",
                        "--checkpoints", huge_agent, "--num-agents", "2",
                        "--save-dir", tmp_path / "save", "--run-dir", tmp_path / "run")
    assert_refused(result, "non-finite")
    assert "env steps 0: return" in result.stdout  # it had evaluated step 0 and trained
    assert not (tmp_path / "save").exists() and not (tmp_path / "run").exists()  # nothing saved: nothing left


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_end_to_end_with_and_without_cuda_graphs(run_script, tiny_hopper_hdf5, tiny_cql_checkpoints, tmp_path):
    """The recorded update (from the 4th step of every epoch on) does what the eager one does, with the same draws,
    and a graphed run stopped after its first epoch resumes to the uninterrupted one, bit for bit."""
    saved = {}
    runs = {"graph": ["--total-steps", "20"], "eager": ["--no-cuda-graph", "--total-steps", "20"],
            "first_half": ["--total-steps", "10"], "resumed": ["--total-steps", "20", "--resume"]}
    for name, flags in runs.items():
        folder = "resumed" if name == "first_half" else name
        result = run_script("upq_finetune.py", "--env", tiny_hopper_hdf5, *TINY, *flags, "--device", "cuda",
                            "--checkpoints", tiny_cql_checkpoints, "--save-dir", tmp_path / folder,
                            "--run-dir", tmp_path / f"run_{folder}")
        assert result.returncode == 0, result.stderr
        assert "on cuda" in result.stdout
        saved[folder] = torch.load(tmp_path / folder / "checkpoint.pt", weights_only=True)
    for name in ("graph", "eager", "resumed"):
        assert [r["step"] for r in read_rows(tmp_path / f"run_{name}" / "eval.csv")] == ["0", "10", "20"]
    graph, eager = saved["graph"], saved["eager"]
    assert torch.equal(graph["generator"], eager["generator"])
    for net in ("actor", "critic", "target_critic"):
        for key in eager[net]:
            assert torch.allclose(graph[net][key], eager[net][key], rtol=1e-4, atol=1e-6)
    assert_same_tensors(saved["resumed"], graph)  # networks, temperature, Adam moments, replay, random stream
    assert read_rows(tmp_path / "run_resumed" / "eval.csv") == read_rows(tmp_path / "run_graph" / "eval.csv")


# --------------------------------------------------------------------------- the official code's last details
def test_fine_tuning_clamps_each_members_log_std_to_off2onrls_range():
    for script in (off2on, upq):
        assert script.LOG_STD_RANGE == (-20.0, 2.0)
        actor = script.Actor(2, 1, (4,), 1, script.LOG_STD_RANGE)
        with torch.no_grad():
            actor.net[-1].weight.zero_()
            actor.net[-1].bias.copy_(torch.tensor([[[0.0, -10.0]]]))  # raw mean 0, raw log-std -10
        assert actor(torch.zeros(1, 1, 2))[1].exp().item() == pytest.approx(4.539993e-5, rel=1e-5)  # e^-10
    cql_like = off2on.Actor(2, 1, (4,), 1)  # cql_pretrain.py's range, [-5, 2]
    cql_like.load_state_dict(actor.state_dict())
    assert cql_like(torch.zeros(1, 1, 2))[1].exp().item() == pytest.approx(6.737947e-3, rel=1e-5)  # e^-5


@BOTH
def test_tanh_gaussian_log_prob_is_off2onrls_exact_form_where_actions_saturate(script):
    # u = mean = 10, std = 1 (float32): log N = -0.9189385 and log(1 - tanh(10)^2) = -18.6137, exactly
    saturated = torch.tensor([[10.0, 0.0]])
    log_prob = script.tanh_gaussian_log_prob(saturated, torch.zeros(1, 2), saturated)
    assert log_prob.item() == pytest.approx(17.694767 - 0.9189385, abs=1e-4)  # cql_pretrain.py's form: 11.97763


def test_density_ratio_network_is_initialised_as_off2onrls():
    torch.manual_seed(0)
    w = upq.DensityRatio(14, (256, 256))
    first, second, last = w.net[0], w.net[2], w.net[4]
    assert first.weight.abs().max() <= 1 / 16 and first.weight.abs().max() > 0.99 / 16  # rlkit: 1/sqrt(256 outputs)
    assert (first.bias == 0).all() and (second.bias == 0).all()  # Off2OnRL's rlkit Mlp: hidden biases 0
    assert last.weight.abs().max() <= 3e-3 and (last.bias == 1.0).all()
    assert w(torch.randn(5, 14)).sub(1.0).abs().max() < 0.05  # w starts near 1


class CountingEnv:
    """An env that terminates every `length` steps and counts its resets: to see how collect cuts episodes."""

    def __init__(self, length: int):
        self.length, self.t, self.resets = length, 0, []

    def reset(self, seed=None):
        self.t = 0
        self.resets.append(seed)
        return np.zeros(11, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(11, self.t, np.float32), 1.0, self.t == self.length, False, {}


def test_an_epochs_logged_metrics_are_the_means_over_its_updates():
    calls, stop = [], {"signal": None}

    def update():  # step k = 1, 2, ... returns k and k^2; a stop signal arrives during the third
        calls.append(len(calls) + 1)
        if len(calls) == 3 and stop.get("after_three"):
            stop["signal"] = 15
        return {"k": torch.tensor(float(len(calls))), "k2": torch.tensor(float(len(calls) ** 2))}

    assert plumbing.train_epoch(update, 4, False, stop, print) == ({"k": 2.5, "k2": 7.5}, 4)  # (1+2+3+4)/4, 30/4
    calls.clear()
    stop["after_three"] = True  # the signal ends the epoch after the update that was running: 3 done, not 4
    means, done = plumbing.train_epoch(update, 4, False, stop, print)
    assert done == 3 and means == pytest.approx({"k": 2.0, "k2": 14 / 3}, rel=1e-6)  # (1+4+9)/3 in float32


@BOTH
def test_collected_actions_are_samples_of_the_ensemble_policy(script):
    torch.manual_seed(0)
    actor = script.Actor(11, 3, (8,), 2)
    with torch.no_grad():  # two clearly different members
        for param in actor.parameters():
            param.normal_()
    transitions = script.collect(CountingEnv(300), actor, 2, 2, seed=7, generator=torch.Generator().manual_seed(0),
                                 device="cpu")
    draws = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0))  # one draw per step, in order
    with torch.no_grad():
        for step, obs in enumerate((np.zeros(11), np.ones(11))):  # CountingEnv: s_0 = 0, s_1 = 1
            mu, log_std = actor(torch.as_tensor(obs, dtype=torch.float32).expand(2, 1, -1))  # [2 members, 1, 3]
            mean = mu.mean(0)  # Eq. (3) as printed: the mixture's mean and standard deviation
            std = ((log_std.exp() ** 2 + mu**2).mean(0) - mean**2).sqrt().clamp(math.exp(-20), math.exp(2))
            expected = torch.tanh(mean + std * draws[step])[0].numpy()
            assert np.allclose(transitions[step, 11:14], expected, atol=1e-5), step


@BOTH
def test_every_epoch_collects_from_a_fresh_episode_as_off2onrl(script):
    env, actor = CountingEnv(300), script.Actor(11, 3, (8,), 2)
    transitions = script.collect(env, actor, 2, 1000, seed=7, generator=torch.Generator().manual_seed(0), device="cpu")
    terminals = transitions[:, -1]
    assert np.flatnonzero(terminals).tolist() == [299, 599, 899]  # paths of 300, 300, 300 and a cut 100
    assert terminals[-1] == 0  # the path cut by the epoch's end bootstraps (Off2OnRL keeps it, terminal 0)
    assert env.resets == [7, None, None, None]  # seeded at the epoch's start, then the env's own stream
    script.collect(env, actor, 2, 10, seed=8, generator=torch.Generator(), device="cpu")
    assert env.resets[-1] == 8 and env.t == 10  # the next epoch starts a fresh episode, not step 101 of the last
