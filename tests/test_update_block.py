"""The update users copy: the block between the '>>> ... update' and '<<< ... update' lines of upq_finetune.py and
off2on_finetune.py, run as another codebase would run it. The block is read as text (the scripts are not imported),
exec'd in a fresh namespace that has only math, torch and torch.nn.functional as F, and driven by foreign networks:
N ordinary nn.Module actors and 2N nn.Module critics stacked with torch.func.stack_module_state and run through
torch.vmap. Each network's gradient from one backward of the summed losses is checked against its own loss written out
by hand, member by member, in float64; and each cheap check is made to fire."""

import ast
import copy
import math
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64
OBS, ACT, N, B = 5, 2, 3, 7
GAMMA, TARGET_ENTROPY = 0.97, -1.5
TIGHT = dict(rtol=1e-10, atol=1e-12)
BLOCK = re.compile(r"^# >>> (\w+) update: copy from here.*?^# <<< \1 update: to here$", re.MULTILINE | re.DOTALL)
EQUATIONS = ["twin_min", "ensemble_q_mean", "ensemble_policy", "uncertainty_std", "critic_td_loss",
             "ensemble_actor_loss", "temperature_loss", "tanh_gaussian_sample", "tanh_gaussian_log_prob",
             "check_layout", "check_batch_layout", "frozen_parameters",  # and the contract's checks
             "stack_twin_critics"]  # and the critics stacked in the block's order
TARGET_OF = {"upq_finetune.py": "penalized_target", "off2on_finetune.py": "soft_target"}  # Eq. (5), beta > 0 or 0


def block_text(script: str) -> str:
    """The lines from '# >>> <method> update: copy from here' to '# <<< <method> update: to here', both included."""
    blocks = [match.group(0) for match in BLOCK.finditer((REPO / script).read_text())]
    assert len(blocks) == 1, f"{script} must hold one update block"
    return blocks[0]


def copied(script: str) -> types.ModuleType:
    """The block exec'd alone, after the three imports it may need, as a module of its own."""
    module = types.ModuleType(f"copied_from_{Path(script).stem}")
    source = "import math\nimport torch\nimport torch.nn.functional as F\n" + block_text(script)
    exec(compile(source, f"<{script}'s update block>", "exec"), module.__dict__)
    return module


# --------------------------------------------------------------------------- foreign networks
class PolicyNet(nn.Module):
    """One agent's actor as another codebase writes it: obs [..., OBS] -> mean, log_std [..., ACT] (pre-tanh)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, 2 * ACT))

    def forward(self, obs):
        mean, log_std = self.body(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)


class QNet(nn.Module):
    """One Q-function: obs [..., OBS], action [..., ACT] -> Q [...]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(OBS + ACT, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, obs, action):
        return self.body(torch.cat([obs, action], dim=-1)).squeeze(-1)


class Stacked(nn.Module):
    """Members stacked with torch.func.stack_module_state, their weights registered as nn.Parameters [E, ...], run
    through torch.vmap: inputs [E, B, ...] -> outputs [E, B, ...]. Weights copied: the members keep their own."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        params, _ = torch.func.stack_module_state(members)
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params.values()])
        self.template = [copy.deepcopy(members[0]).to("meta")]  # in a list: its meta weights are not registered here

    def forward(self, *inputs):
        def one_member(weights, *member_inputs):
            return torch.func.functional_call(self.template[0], weights, member_inputs)

        return torch.vmap(one_member)(dict(zip(self.names, self.stacked)), *inputs)


class DictStacked(Stacked):
    """The stack_module_state tutorial's pattern: the stacked weights in a plain dict, so no registered parameters."""

    def __init__(self, members: list[nn.Module]):
        super().__init__(members)
        self.plain = {name: p.detach().clone().requires_grad_() for name, p in zip(self.names, self.stacked)}
        del self.stacked

    def forward(self, *inputs):
        def one_member(weights, *member_inputs):
            return torch.func.functional_call(self.template[0], weights, member_inputs)

        return torch.vmap(one_member)(self.plain, *inputs)


def foreign_setup(seed: int = 0) -> dict:
    """N actors, 2N critics in the block's order (critic j of agent i at 2i + j) and their targets, as separate
    modules and stacked; a float64 batch with some terminals; the noise; log alpha."""
    torch.manual_seed(seed)
    actors = [PolicyNet().double() for _ in range(N)]
    q1, q2 = [QNet().double() for _ in range(N)], [QNet().double() for _ in range(N)]
    critics = [q for pair in zip(q1, q2) for q in pair]  # Q1_0, Q2_0, Q1_1, Q2_1, ...
    targets = [copy.deepcopy(q) for q in critics]
    with torch.no_grad():
        for target in targets:  # targets that lag the critics
            for p in target.parameters():
                p.add_(0.1 * torch.randn_like(p))
    batch = dict(obs=torch.randn(B, OBS, dtype=F64), actions=torch.rand(B, ACT, dtype=F64) * 1.8 - 0.9,
                 rewards=torch.randn(B, dtype=F64), next_obs=torch.randn(B, OBS, dtype=F64),
                 terminals=(torch.arange(B) % 3 == 0).to(F64))
    return dict(actors=actors, critics=critics, targets=targets, actor=Stacked(actors), critic=Stacked(critics),
                target_critic=Stacked(targets).requires_grad_(False), batch=batch,
                noise=torch.randn(2 * B, ACT, dtype=F64),
                log_alpha=torch.tensor([math.log(0.4)], dtype=F64, requires_grad=True))


def block_losses(block, nets: dict, beta: float, mean_target: bool, **changed):
    """finetune_losses of the copied block on nets, with any argument replaced by `changed`."""
    upq_terms = dict(beta=beta, ensemble_mean_target=mean_target) if hasattr(block, "penalized_target") else {}
    arguments = dict(actor=nets["actor"], critic=nets["critic"], target_critic=nets["target_critic"],
                     log_alpha=nets["log_alpha"], **nets["batch"], noise=nets["noise"], num_agents=N, gamma=GAMMA,
                     target_entropy=TARGET_ENTROPY, **upq_terms)
    return block.finetune_losses(**{**arguments, **changed})


# --------------------------------------------------------------------------- the step by hand, member by member
def hand_losses(actors, critics, targets, log_alpha, batch: dict, noise, beta: float, mean_target: bool):
    """The critic, actor and temperature losses with the paper's formulas as printed, looping over the members'
    own modules (nothing from the block): Eq. (3) by the mixture's moments, Eq. (4) as a population std, Eq. (5)
    per member (or from Q^E), Eq. (6) over the 2N critics, Eq. (7) through the critics (not frozen: each loss is
    differentiated only with respect to its own network)."""
    obs, actions, rewards, next_obs, terminals = (batch[k] for k in ("obs", "actions", "rewards", "next_obs",
                                                                     "terminals"))
    alpha = log_alpha.detach().exp()

    def ensemble_sample(states, eps):  # a ~ pi^E(.|s) = tanh(u), u ~ N(mean, std^2) matching the mixture's moments
        outputs = [actor(states) for actor in actors]
        mean = sum(mu for mu, _ in outputs) / N
        second_moment = sum(log_std.exp() ** 2 + mu**2 for mu, log_std in outputs) / N
        std = (second_moment - mean**2).sqrt().clamp(math.exp(-20), math.exp(2))
        u = mean + std * eps
        log_prob = (torch.distributions.Normal(mean, std).log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
        return torch.tanh(u), log_prob

    def agent_min(nets, i, s, a):  # min(Q1_i, Q2_i)(s, a)
        return torch.minimum(nets[2 * i](s, a), nets[2 * i + 1](s, a))

    new_actions, new_log_prob = ensemble_sample(obs, noise[:B])
    with torch.no_grad():
        next_actions, next_log_prob = ensemble_sample(next_obs, noise[B:])
        values = [agent_min(targets, i, next_obs, next_actions) for i in range(N)]
        q_ensemble = sum(values) / N
        spread = (sum((v - q_ensemble) ** 2 for v in values) / N).sqrt()
        if mean_target:
            values = [q_ensemble] * N
        y = [rewards + GAMMA * (1 - terminals) * (v - alpha * next_log_prob - beta * spread) for v in values]
    critic_loss = sum(((critics[k](obs, actions) - y[k // 2]) ** 2).mean() for k in range(2 * N))
    actor_loss = (alpha * new_log_prob - sum(agent_min(critics, i, obs, new_actions) for i in range(N)) / N).mean()
    alpha_loss = -(log_alpha * (new_log_prob.detach() + TARGET_ENTROPY)).mean()
    return critic_loss, actor_loss, alpha_loss


def own_gradients(loss, members: list[nn.Module]) -> list[torch.Tensor]:
    """d loss / d (each member's weights), stacked over the members as stack_module_state orders them: [E, ...]."""
    per_member = [torch.autograd.grad(loss, list(m.parameters()), retain_graph=True) for m in members]
    return [torch.stack(grads) for grads in zip(*per_member)]


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("script", ["upq_finetune.py", "off2on_finetune.py"])
def test_the_block_holds_exactly_the_update_and_needs_only_three_imports(script):
    names = [node.name for node in ast.parse(block_text(script)).body]
    assert sorted(names) == sorted([*EQUATIONS, TARGET_OF[script], "finetune_losses"])
    assert names[-1] == "finetune_losses"
    module = copied(script)  # runs: every name the block uses is defined in it or by the three imports
    assert set(names) <= set(vars(module))


def test_the_readme_names_the_block_and_every_function_in_it():
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("The update to copy"):].split("\n\n")[0]
    for script in TARGET_OF:
        start, end = block_text(script).splitlines()[0], block_text(script).splitlines()[-1]
        assert start.split(":")[0] in paragraph and end.split(":")[0] in paragraph
        for node in ast.parse(block_text(script)).body:
            assert f"`{node.name}`" in paragraph or f"`{node.name}(" in paragraph, node.name


@pytest.mark.parametrize("script, beta, mean_target", [("upq_finetune.py", 0.3, False), ("upq_finetune.py", 0.3, True),
                                                       ("off2on_finetune.py", 0.0, False)],
                         ids=["upq", "upq-ensemble-mean-target", "off2on"])
def test_one_backward_gives_foreign_networks_the_gradient_of_their_own_loss(script, beta, mean_target):
    block, nets = copied(script), foreign_setup()
    critic_loss, actor_loss, alpha_loss, metrics = block_losses(block, nets, beta, mean_target)
    (critic_loss + actor_loss + alpha_loss).backward()

    hand_log_alpha = nets["log_alpha"].detach().clone().requires_grad_()
    hand = hand_losses(nets["actors"], nets["critics"], nets["targets"], hand_log_alpha, nets["batch"], nets["noise"],
                       beta, mean_target)
    for got, expected in zip((critic_loss, actor_loss, alpha_loss), hand):
        torch.testing.assert_close(got, expected, **TIGHT)
    torch.testing.assert_close(metrics["critic_loss"], hand[0].detach(), **TIGHT)
    torch.testing.assert_close(metrics["actor_loss"], hand[1].detach(), **TIGHT)
    # each network: the gradient of its own loss alone, not of the sum
    for stacked, members, own_loss in ((nets["critic"], nets["critics"], hand[0]),
                                       (nets["actor"], nets["actors"], hand[1])):
        for got, expected in zip(stacked.stacked, own_gradients(own_loss, members)):
            torch.testing.assert_close(got.grad, expected, **TIGHT)
    torch.testing.assert_close(nets["log_alpha"].grad, torch.autograd.grad(hand[2], hand_log_alpha)[0], **TIGHT)
    assert all(p.grad is None for p in nets["target_critic"].parameters())


@pytest.mark.parametrize("script", ["upq_finetune.py", "off2on_finetune.py"])
def test_three_separate_backward_passes_give_the_summed_gradients(script):
    """As the docstring says: the three losses' graphs share nothing (no retain_graph needed)."""
    block, summed, separate = copied(script), foreign_setup(seed=1), foreign_setup(seed=1)
    losses = block_losses(block, summed, 0.3, False)[:3]
    sum(losses).backward()
    for loss in block_losses(block, separate, 0.3, False)[:3]:
        loss.backward()
    for name in ("actor", "critic"):
        for a, b in zip(summed[name].parameters(), separate[name].parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    torch.testing.assert_close(summed["log_alpha"].grad, separate["log_alpha"].grad, rtol=0, atol=0)


class MemberMinimum(nn.Module):
    """A critic that returns its agents' min(Q1, Q2) [N, B] instead of every critic's Q [2N, B]."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        self.critic = critic

    def forward(self, obs, actions):
        return self.critic(obs, actions).view(N, 2, -1).min(1).values


class MetaSkeletonStacked(DictStacked):
    """The same, with the tutorial's meta-device copy kept as a submodule: only its (meta) parameters register."""

    def __init__(self, members: list[nn.Module]):
        super().__init__(members)
        self.base = self.template[0]


class RealBaseStacked(DictStacked):
    """The same, with a real (non-meta) copy of one member kept as a submodule: its parameters register and detach,
    but the forward never uses them, so the actor loss reaches the weights in the plain dict."""

    def __init__(self, members: list[nn.Module]):
        super().__init__(members)
        self.base = copy.deepcopy(members[0])


def sharing_target(critic: Stacked) -> Stacked:
    """A target critic whose weights are the critic's own storage (detached views): no target network at all."""
    target = copy.deepcopy(critic)
    target.stacked = nn.ParameterList([nn.Parameter(p.detach(), requires_grad=False) for p in critic.stacked])
    return target


@pytest.mark.parametrize("script", ["upq_finetune.py", "off2on_finetune.py"])
@pytest.mark.parametrize("case, message", [
    ("noise [B, A]", "noise (rows :B for a~ at s, rows B: for a' at s') must be [2B, A] = [14, 2], not [7, 2]"),
    ("critic output [N, B]", "critic(obs, actions) must be [2N, B] = [6, 7], not [3, 7]"),
    ("target critic output [N, B]", "target_critic(next_obs, next_actions) must be [2N, B] = [6, 7], not [3, 7]"),
    ("integer terminals", "terminals must be floating point, not torch.int64"),
    ("rewards [B, 1]", "rewards must be [B] = [7], not [7, 1]"),
    ("log_alpha []", "log_alpha must be [1] = [1], not []"),
    ("actor averaged [B, A]", "the actor's mean must be [N, B, A] = [3, 7, 2], not [7, 2]"),
    ("num_agents 0", "needs num_agents >= 1"),
    ("critic weights in a plain dict", "the critic must be an nn.Module whose weights are registered parameters"),
    ("a meta skeleton registered", "the critic must be an nn.Module whose weights are registered parameters"),
    ("critic weights in a plain dict beside a real module",
     "the critic still requires grad when evaluated with its registered parameters detached"),
    ("log_alpha a Python float", "log_alpha must be a tensor [1] with requires_grad, not a float"),
    ("log_alpha without requires_grad", "log_alpha must have requires_grad"),
    ("target_critic is the critic", "target_critic must be a copy of the critic with weights of its own"),
    ("target_critic shares the critic's storage", "target_critic must be a copy of the critic with weights of its own"),
    ("float32 batch", "obs must be torch.float64 as the critic's weights are, not torch.float32"),
    ("float32 noise", "noise (rows :B for a~ at s, rows B: for a' at s') must be torch.float64 as the critic's "
                      "weights are, not torch.float32"),
])
def test_a_wrong_layout_raises_one_clear_sentence(script, case, message):
    block, nets = copied(script), foreign_setup()
    batch = nets["batch"]
    changed = {
        "noise [B, A]": dict(noise=nets["noise"][:B]),
        "critic output [N, B]": dict(critic=MemberMinimum(nets["critic"])),
        "target critic output [N, B]": dict(target_critic=MemberMinimum(nets["target_critic"])),
        "integer terminals": dict(terminals=batch["terminals"].long()),
        "rewards [B, 1]": dict(rewards=batch["rewards"][:, None]),
        "log_alpha []": dict(log_alpha=nets["log_alpha"][0]),
        "actor averaged [B, A]": dict(actor=lambda obs: tuple(x.mean(0) for x in nets["actor"](obs))),
        "num_agents 0": dict(num_agents=0),
        "critic weights in a plain dict": dict(critic=DictStacked(nets["critics"])),
        "a meta skeleton registered": dict(critic=MetaSkeletonStacked(nets["critics"])),
        "critic weights in a plain dict beside a real module": dict(critic=RealBaseStacked(nets["critics"])),
        "log_alpha a Python float": dict(log_alpha=math.log(0.4)),
        "log_alpha without requires_grad": dict(log_alpha=nets["log_alpha"].detach()),
        "target_critic is the critic": dict(target_critic=nets["critic"]),
        "target_critic shares the critic's storage": dict(target_critic=sharing_target(nets["critic"])),
        "float32 batch": {name: x.float() for name, x in batch.items()},
        "float32 noise": dict(noise=nets["noise"].float()),
    }[case]
    with pytest.raises(ValueError) as error:
        block_losses(block, nets, 0.3, False, **changed)
    text = str(error.value)
    assert text.startswith("finetune_losses: ") and message in text and "\n" not in text


@pytest.mark.parametrize("script", ["upq_finetune.py", "off2on_finetune.py"])
def test_stack_twin_critics_puts_critic_j_of_agent_i_at_member_2i_plus_j(script):
    """By construction, with pairs whose weights all differ: the stacked weights and, run through torch.vmap as the
    block's critic runs, the stacked Qs."""
    torch.manual_seed(0)
    pairs = [(QNet().double(), QNet().double()) for _ in range(N)]
    params, buffers = copied(script).stack_twin_critics(pairs)
    for i, pair in enumerate(pairs):
        for j, q in enumerate(pair):
            for name, p in q.named_parameters():
                assert torch.equal(params[name][2 * i + j], p), (i, j, name)
    obs, actions = torch.randn(B, OBS, dtype=F64), torch.rand(B, ACT, dtype=F64) * 2 - 1
    q = torch.vmap(lambda weights: torch.func.functional_call(pairs[0][0], weights, (obs, actions)))(params)  # [2N, B]
    torch.testing.assert_close(q, torch.stack([qj(obs, actions) for pair in pairs for qj in pair]), **TIGHT)
    assert buffers == {}


@pytest.mark.parametrize("script", ["upq_finetune.py", "off2on_finetune.py"])
def test_twin_min_pairs_neighbours_whatever_the_strides_of_the_critic_output(script):
    """The block's only view splits the member axis, which any strides allow (a foreign critic's Q [2N, B] may be
    transposed, sliced or expanded); cql_pretrain.py shares the definition byte for byte."""
    twin_min = copied(script).twin_min
    for q in (torch.randn(2 * N, B), torch.randn(B, 2 * N).T, torch.randn(2 * N, 2 * B)[:, ::2],
              torch.randn(1, B).expand(2 * N, B), torch.randn(2 * N, 1).expand(2 * N, B)):
        expected = torch.stack([torch.minimum(q[2 * i], q[2 * i + 1]) for i in range(N)])
        assert torch.equal(twin_min(q), expected)
