"""The documents: every relative link and #anchor in README.md, docs/ and results/ resolves (anchors as GitHub makes
them); the README's results table carries the numbers of the stats.md files it quotes and Table 1's cells; the
README's caller example of the update block runs on upq_finetune.py's networks and does what it says."""

import copy
import re

import pytest
import torch

from conftest import REPO

DOCUMENTS = sorted({REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("results/**/README.md")})
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")  # [text](target), ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
STATS = {"20k": "results/evidence/stats.md", "200k": "results/evidence/budget200k/stats.md"}


# --------------------------------------------------------------------------- reading markdown
def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings live."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (code marks dropped, links as their text), lowercase, every character
    that is not a letter, digit, space, - or _ removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.replace("`", ""))
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", path.read_text()), re.MULTILINE):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def links(path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each body row of the markdown table whose header row starts with `header`."""
    lines = text[text.index(header):].splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]
    return rows[:next((i for i, line in enumerate(lines[2:]) if not line.startswith("|")), len(rows))]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index(f"\n## {title}\n"):].split("\n## ", 2)[1]


# --------------------------------------------------------------------------- links and anchors
def test_the_documents_are_found():
    names = {str(path.relative_to(REPO)) for path in DOCUMENTS}
    assert {"README.md", "docs/data.md", "docs/runs.md", "docs/speed.md", "results/README.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(document):
    targets = links(document)
    assert targets, f"{document.name}: no links found (is the link pattern broken?)"
    broken = []
    for target in targets:
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(REPO)}")
    assert not broken, f"{document.relative_to(REPO)}: " + "; ".join(broken)


def test_anchors_are_made_as_github_makes_them():
    assert slug("The paper's protocol on a GPU") == "the-papers-protocol-on-a-gpu"
    assert slug("`make_dataset.py`") == "make_datasetpy"
    assert slug("At 200k env steps (seeds 1–3)") == "at-200k-env-steps-seeds-13"  # an en dash is punctuation
    assert slug("20k env steps: UPQ at three β") == "20k-env-steps-upq-at-three-β"


# --------------------------------------------------------------------------- the README's results
def stats_cells(path: str) -> dict[str, dict[str, str]]:
    """method -> n, mean, IQM and P(> Off2OnRL) of the final score, as results/stats.py wrote them."""
    text = (REPO / path).read_text()
    cells = {row[0]: dict(n=row[1], mean=row[2], iqm=row[3], p="")
             for row in table_rows(text, "| method | n | final score: mean [95% CI] | final score: IQM [95% CI] |")}
    for row in table_rows(text, "| method | n vs n | final score |"):
        cells[row[0]]["p"] = row[2]
    return cells


def test_the_readme_results_table_carries_the_numbers_of_the_stats_files():
    rows = table_rows(readme_section("Results in short"), "| method | env steps | n | mean [95% CI] |")
    ours = [row for row in rows if not row[0].startswith("paper")]
    assert ours, "the README's results table has no rows"
    quoted = {}
    for method, steps, n, mean, iqm, p in ours:
        quoted[steps, method.replace("β =", "beta")] = dict(n=n, mean=mean, iqm=iqm, p=p)
    expected = {(steps, method): cells for steps, path in STATS.items() for method, cells in stats_cells(path).items()}
    assert quoted == expected


def table1() -> dict[str, tuple[float, float, float]]:
    """SPEC.md's copy of the paper's Table 1: task -> (CQL, Off2OnRL, UPQ)."""
    spec = (REPO / "SPEC.md").read_text()
    return {task: tuple(map(float, scores))
            for task, *scores in re.findall(r"([a-z0-9]+-[a-z-]+) ([\d.]+) / ([\d.]+) / ([\d.]+)", spec)}


def test_the_readme_quotes_table_1_for_its_task_and_names_its_largest_gains():
    section = readme_section("Results in short")
    rows = table_rows(section, "| method | env steps | n | mean [95% CI] |")
    paper = {row[0]: float(row[3]) for row in rows if row[0].startswith("paper")}
    _, off2on, upq = table1()["hopper-medium-replay"]
    assert paper == {"paper, Table 1: Off2OnRL": off2on, "paper, Table 1: UPQ β = 0.001": upq}
    gains = sorted(((upq - off2on, task) for task, (_, off2on, upq) in table1().items()), reverse=True)
    assert len(gains) == 9
    claim = " ".join(section[section.index("largest gains"):].split())
    named = re.findall(r"(Hopper|Walker2d|HalfCheetah) ([a-z-]+) \(\+([\d.]+):", claim)
    assert [(f"{body.lower()}-{kind}", float(gain)) for body, kind, gain in named] == [
        (task, round(gain, 1)) for gain, task in gains[:len(named)]]
    assert len(named) >= 3


# --------------------------------------------------------------------------- the update to copy
def test_the_readme_caller_example_trains_upq_finetune_networks():
    from upq_finetune import Actor, Critic

    example = readme_section("Copying the update").split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    n, obs_dim, act_dim, batch_size, tau = 2, 5, 3, 8, 0.005
    actor, critic = Actor(obs_dim, act_dim, (16, 16), n, (-20.0, 2.0)), Critic(obs_dim, act_dim, (16, 16), 2 * n)
    target_critic = copy.deepcopy(critic)
    with torch.no_grad():  # a target that lags its critic, as after some training
        for p in target_critic.parameters():
            p.add_(0.01 * torch.randn_like(p))
    log_alpha = torch.zeros(1, requires_grad=True)
    scope = dict(torch=torch, actor=actor, critic=critic, target_critic=target_critic, log_alpha=log_alpha, N=n,
                 tau=tau, obs=torch.randn(batch_size, obs_dim), actions=torch.rand(batch_size, act_dim) * 2 - 1,
                 rewards=torch.randn(batch_size), next_obs=torch.randn(batch_size, obs_dim),
                 terminals=(torch.rand(batch_size) < 0.2).float(),
                 actor_optimizer=torch.optim.Adam(actor.parameters(), lr=3e-4),
                 critic_optimizer=torch.optim.Adam(critic.parameters(), lr=3e-4),
                 alpha_optimizer=torch.optim.Adam([log_alpha], lr=3e-4))
    before = {name: [p.detach().clone() for p in net.parameters()]
              for name, net in (("actor", actor), ("critic", critic), ("target", target_critic))}

    exec(compile(example, "<README.md: the caller example>", "exec"), scope)

    assert set(scope["metrics"]) >= {"critic_loss", "actor_loss", "uncertainty", "alpha"}
    assert all(torch.isfinite(value) for value in scope["metrics"].values())
    for name, net in (("actor", actor), ("critic", critic)):  # the optimiser steps moved every weight tensor
        assert all(not torch.equal(p, old) for p, old in zip(net.parameters(), before[name])), name
    assert log_alpha.item() != 0.0
    for target, old, new in zip(target_critic.parameters(), before["target"], critic.parameters()):
        assert not torch.equal(target, old)  # the target moved by exactly tau of its gap to the stepped critic
        torch.testing.assert_close(target.detach(), old + tau * (new.detach() - old), rtol=0, atol=1e-7)
