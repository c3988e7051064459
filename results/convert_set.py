"""Convert a CQL checkpoint set of the older per-agent layout (manifest.json and agent_k.pt, as cql_pretrain.py wrote
them before commit d784d18) into the one checkpoint.pt that cql_pretrain.py now writes and fine-tuning starts from;
or strip such a checkpoint.pt to its weights, the form results/ commits agents in.

    python results/convert_set.py OLD_FOLDER NEW_FOLDER [--weights-only]
    python results/convert_set.py CQL_SAVE_DIR NEW_FOLDER --weights-only

Agent k's slices go back to their rows of the ensemble tensors: actor member k, critic (and target) members 2k and
2k + 1, temperature entry k, the same rows of each Adam moment; its random stream becomes generators[k]. A full set
gives a checkpoint that cql_pretrain.py --resume continues, a weights-only set (or --weights-only) one without the
Adam moments and random streams, which fine-tuning reads alike. Fine-tuned sets of the older layout are refused.
A checkpoint.pt of the current layout keeps its meta and weights, byte for byte, without its Adam moments and random
streams.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cql_pretrain import CQL_FORMAT  # noqa: E402
from plumbing import CHECKPOINT, fail, load_checkpoint, save_checkpoint  # noqa: E402

OLD_SET, OLD_AGENT = "upq-checkpoint-set-v1", "upq-cql-agent-v2"
PER_AGENT_META = ("agent", "seed", "normalized_score", "grad_steps")  # the new meta keeps `seeds` and `step`


def concat(values: list):
    """The agents' values joined along the ensemble axis: tensors concatenated, dicts key by key, and the rest (Adam's
    step counts and param_groups, the same for every agent) taken from agent 0."""
    if isinstance(values[0], dict):
        return {key: concat([value[key] for value in values]) for key in values[0]}
    return torch.cat(values) if isinstance(values[0], torch.Tensor) and values[0].dim() else values[0]


def read_old_set(folder: Path) -> list[dict]:
    """The agents of an older CQL set, in order, checked to be one run at one step."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        fail(f"{folder} is not a checkpoint set of the older layout (no readable manifest.json)")
    if (folder / "commit.json").exists() or manifest.get("format") != OLD_SET:
        fail(f"{folder} is not a complete {OLD_SET} set (an unfinished save, or another file's manifest)")
    names = [f"agent_{k}.pt" for k in range(len(manifest["files"]))]
    if sorted(manifest["files"]) != sorted(names):
        fail(f"{folder} lists {', '.join(manifest['files'])}: only CQL sets (agent_0.pt ... agent_k.pt) convert")
    try:
        agents = [torch.load(folder / name, map_location="cpu", weights_only=True) for name in names]
    except Exception as error:  # noqa: BLE001 -- a missing, truncated or foreign file: all mean "cannot convert"
        fail(f"an agent file of {folder} cannot be read ({type(error).__name__})")
    formats = {agent.get("meta", {}).get("format") for agent in agents}
    if formats != {OLD_AGENT}:
        fail(f"{folder} holds {' and '.join(map(str, formats))} agents: only {OLD_AGENT} (CQL) agents convert")
    stamps = [(agent["meta"]["run_id"], agent["meta"]["step"], agent["meta"]["agent"]) for agent in agents]
    if stamps != [(manifest["run_id"], manifest["step"], k) for k in range(len(agents))]:
        fail(f"the agents of {folder} are not agents 0 to {len(agents) - 1} of one run at one step (run, step, agent: "
             f"{stamps})")
    return agents


def convert(old: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="OLD")],
            new: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="NEW")],
            weights_only: bool = False) -> None:
    """Write NEW/checkpoint.pt from the older set in OLD, or from OLD's checkpoint.pt with --weights-only.

    Args:
        old: a folder with manifest.json and agent_0.pt ... agent_{N-1}.pt (cql_pretrain.py's older --save-dir);
            with --weights-only, also a --save-dir of cql_pretrain.py now, or the checkpoint.pt in it
        new: the folder for checkpoint.pt (created; it must not hold a checkpoint yet)
        weights_only: leave out the Adam moments and random streams (what only cql_pretrain.py --resume needs)
    """
    if (new / CHECKPOINT).exists() or (new / "manifest.json").exists():
        fail(f"{new} already holds a checkpoint; convert into a new folder")
    old = old.parent if old.is_file() and old.name == CHECKPOINT else old  # (the checkpoint.pt itself)
    if (old / "manifest.json").exists():
        state = join_old_set(old, weights_only)
    elif not (old / CHECKPOINT).exists():
        fail(f"OLD {old} holds neither {CHECKPOINT} (a --save-dir of cql_pretrain.py, for --weights-only) nor "
             f"manifest.json (a set of the older per-agent layout)")
    elif not weights_only:
        fail(f"{old / CHECKPOINT} has the current layout already; --weights-only strips it to its weights")
    else:
        state = load_checkpoint(old, (CQL_FORMAT,), flag="OLD")  # (its digest checked)
        state = {key: value for key, value in state.items() if key not in ("optimizers", "generators")}
    new.mkdir(parents=True, exist_ok=True)
    save_checkpoint(new / CHECKPOINT, state)
    meta = state["meta"]
    print(f"converted {meta['num_agents']} agents of run {meta['run_id']} at step {meta['step']:,} from {old} to "
          f"{new / CHECKPOINT} ({'with' if 'optimizers' in state else 'without'} Adam moments and random streams)")


def join_old_set(old: Path, weights_only: bool) -> dict:
    """The checkpoint.pt state of the older set in OLD: its agents' rows joined along the ensemble axis."""
    agents = read_old_set(old)
    metas = [agent["meta"] for agent in agents]
    meta = {key: value for key, value in metas[0].items() if key not in PER_AGENT_META}
    meta.update(format=CQL_FORMAT, num_agents=len(agents), seeds=[m["seed"] for m in metas])
    state = {"meta": meta, **{name: concat([agent[name] for agent in agents]) if name in agents[0] else None
                              for name in ("actor", "critic", "target_critic", "log_alpha", "log_alpha_prime")}}
    if not weights_only and all("optimizers" in agent for agent in agents):
        state.update(optimizers=concat([agent["optimizers"] for agent in agents]),
                     generators=[agent["generator_state"] for agent in agents])
    return state


if __name__ == "__main__":
    tyro.cli(convert)
