"""Score fine-tuned ensembles as their runs ended, with many evaluation episodes on the same start states.

    python results/evidence/final_eval.py --sets "runs/evidence/*" --episodes 100 \
        --csv results/evidence/final_eval.csv --table results/evidence/final_eval.md

A fine-tuning run's eval.csv rows average 5 episodes each of the policy of that epoch. To tell how much of a row is
the evaluation and how much the policy, and to compare runs on more than 5 episodes, this loads each run's checkpoint
(checkpoint.pt in the --save-dir of off2on_finetune.py / upq_finetune.py), rebuilds the ensemble policy pi^E (Eq. 3)
exactly as the run evaluates it (deterministic action tanh of pi^E's mean) and plays --episodes episodes of the run's
env, episode e from env seed --eval-seed + e: the same start states for every run, so the methods are compared on
equal terms. Writes one row per run to --csv and a table to --table: per method (Off2OnRL, UPQ beta = ...), the
mean ± std over seeds of each run's mean normalised score, and the mean standard error of one run's score over its
episodes.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402
import upq_finetune as ft  # noqa: E402  (off2on_finetune.py saves the same checkpoint layout)
from plot import natural_order  # noqa: E402  (results/plot.py: seed2 before seed10, as in the figure and tables)

COLUMNS = ["set", "method", "seed", "env_steps", "episodes", "eval_seed", "return_mean", "normalized_mean",
           "normalized_std"]


@dataclass
class Args:
    sets: list[str] = field(default_factory=list)
    """fine-tuning runs' --save-dir folders (each with its checkpoint.pt) or globs of them, e.g. "runs/evidence/*" """
    episodes: int = 100
    """evaluation episodes per set (the runs' own evaluations: 5)"""
    eval_seed: int = 100_000
    """episode e starts from env seed eval_seed + e, for every set (a run's own evaluations use --seed + 10,000 + e)"""
    csv: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(required)")] = None
    """write one row per set here: its method, seed, env steps, and the mean and std of the normalised score;
    no default, so that no run writes over the study's results/evidence/final_eval.csv"""
    table: Annotated[str | None, tyro.conf.arg(
        help_behavior_hint="(required)")] = None
    """write here, per method, the mean ± std over seeds of the runs' scores,
    and the runs' mean standard error over episodes"""


def method_of(meta: dict) -> str:
    """'Off2OnRL' or 'UPQ beta = 0.01': the row label of a fine-tuned agent's meta."""
    return "Off2OnRL" if meta["algorithm"] == "off2on" else f"UPQ beta = {meta['args']['beta']:g}"


def load_policy(set_folder: Path) -> tuple[ft.Actor, dict]:
    """pi^E's members as the run saved them (its ensemble actor, member k = agent k) and the run's meta."""
    if not (set_folder / ft.CHECKPOINT).exists() and not (set_folder / "manifest.json").exists():
        ft.fail(f"{set_folder} holds no {ft.CHECKPOINT}: give the --save-dir of a fine-tuning run")
    state = plumbing.load_checkpoint(set_folder, (ft.FINETUNED_FORMAT,))
    meta = state["meta"]
    actor = ft.Actor(meta["obs_dim"], meta["act_dim"], tuple(meta["hidden_sizes"]), meta["num_agents"],
                     ft.LOG_STD_RANGE)
    ft.load_members(actor, state["actor"], meta["num_agents"])
    return actor, meta


@functools.cache
def env_and_references(dataset_id: str, gym_env: str | None) -> tuple[str, float | None, float | None]:
    """The run's env and score references, as fine-tuning resolved them from its --env (read once per dataset)."""
    data = plumbing.load_offline_data(dataset_id, gym_env)
    return data.gym_env_id, data.ref_min_score, data.ref_max_score


def evaluate_set(set_folder: Path, episodes: int, eval_seed: int) -> dict:
    """One --csv row: the set's pi^E over `episodes` episodes from env seeds eval_seed, eval_seed + 1, ..."""
    actor, meta = load_policy(set_folder)
    env_id, ref_min, ref_max = env_and_references(meta["dataset_id"], meta["args"]["gym_env"])
    returns = ft.evaluate_ensemble(actor, env_id, episodes, eval_seed, torch.device("cpu"))
    scores = ft.normalized_score(returns, ref_min, ref_max)
    spread = scores.std(ddof=1) if episodes > 1 else 0.0  # the sample std: its / sqrt(episodes) is the standard error
    return dict(set=str(set_folder), method=method_of(meta), seed=meta["args"]["seed"], env_steps=meta["env_steps"],
                episodes=episodes, eval_seed=eval_seed, return_mean=f"{returns.mean():.3f}",
                normalized_mean=f"{scores.mean():.3f}", normalized_std=f"{spread:.3f}")


def method_table(rows: list[dict]) -> str:
    """Markdown: per method, in order of appearance, mean ± std over seeds (ddof 0, as results/plot.py; one seed: no
    std) and the runs' mean standard error over episodes."""
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    lines = ["| method | env steps | seeds | final score (mean ± std over seeds) | one run's standard error |",
             "| --- | --- | --- | --- | --- |"]
    for method, runs in by_method.items():
        steps = sorted({int(run["env_steps"]) for run in runs})
        if len(steps) > 1:
            ft.fail(f"the {method} sets are at different env steps ({', '.join(map(str, steps))}): score one step at "
                    f"a time")
        means = np.array([float(run["normalized_mean"]) for run in runs])
        errors = [float(run["normalized_std"]) / np.sqrt(int(run["episodes"])) for run in runs]
        spread = f" ± {means.std():.1f}" if len(means) > 1 else ""  # none with one seed
        lines.append(f"| {method} | {steps[0]:,} | {', '.join(str(run['seed']) for run in runs)} | "
                     f"{means.mean():.1f}{spread} | {np.mean(errors):.1f} |")
    episodes = sorted({int(row["episodes"]) for row in rows})
    return "\n".join(lines) + (f"\n\nEach run's pi^E as it ended, {'/'.join(map(str, episodes))} episodes from the "
                               f"same start states (results/evidence/final_eval.py); std over seeds with ddof 0, as in "
                               f"table.md.\n")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def set_folders(patterns: list[str]) -> list[Path]:
    """The folders that --sets names, each glob's matches in natural order (seed2 before seed10)."""
    return [Path(path) for pattern in patterns for path in sorted(glob.glob(pattern), key=natural_order)
            if Path(path).is_dir()]


def main(args: Args) -> None:
    if args.episodes < 1:
        ft.fail(f"--episodes must be >= 1, not {args.episodes}")
    if not args.csv or not args.table:
        ft.fail("give --csv and --table, the files to write (the study's own are results/evidence/final_eval.csv "
                "and .md)")
    folders = set_folders(args.sets)
    if not folders:
        ft.fail("no set to score: give --sets with folders (or globs of them) that fine-tuning runs saved")
    rows = []
    for folder in folders:
        rows.append(evaluate_set(folder, args.episodes, args.eval_seed))
        print(f"{folder}: {rows[-1]['method']} seed {rows[-1]['seed']} at env step {rows[-1]['env_steps']:,}: "
              f"normalised {rows[-1]['normalized_mean']} (std {rows[-1]['normalized_std']} over {args.episodes} "
              f"episodes)", flush=True)
    table = method_table(rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(Path(args.csv), text.getvalue())
    write_atomically(Path(args.table), table)
    print(table, end="")


if __name__ == "__main__":
    main(tyro.cli(Args))
