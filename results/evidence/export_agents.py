"""A CQL checkpoint set without what only resuming needs: the agents to keep in git and fine-tune from.

    python results/evidence/export_agents.py results/evidence/agents results/evidence/cql_agents

copies each agent_k.pt of the source set (cql_pretrain.py's --save-dir) with its networks, temperatures and meta,
and without its Adam moments and random-generator state (about half the bytes), as a new set that
off2on_finetune.py / upq_finetune.py read with --checkpoints and cql_pretrain.py --resume refuses (the manifest
says weights_only). The destination must not hold a set yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cql_pretrain as cql  # noqa: E402

ONLY_FOR_RESUMING = ("optimizers", "generator_state")


def export(source: Path, destination: Path) -> None:
    if cql.holds_a_set(destination):
        cql.fail(f"{destination} already holds a checkpoint set; export to a new folder")
    manifest, paths = cql.read_set(source)
    agents = {name: cql.load_checkpoint(path, cql.CQL_FORMAT) for name, path in paths.items()}
    cql.check_one_set(list(paths.values()), list(agents.values()))
    files = {name: {key: value for key, value in agent.items() if key not in ONLY_FOR_RESUMING}
             for name, agent in agents.items()}
    kept = {key: manifest[key] for key in ("script", "run_id", "step", "run_dir")}
    cql.save_set(destination, files, {**kept, "weights_only": True})
    print(f"exported {len(files)} agents at step {manifest['step']:,} from {source} to {destination} (weights only)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        cql.fail("usage: python results/evidence/export_agents.py SOURCE_SET_FOLDER NEW_FOLDER")
    export(Path(sys.argv[1]), Path(sys.argv[2]))
