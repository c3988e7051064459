"""Learning curves (as the paper's Fig. 2) and a final-score table (as its Table 1) from eval.csv files.

    python results/plot.py \
        --series "medium-replay:CQL=results/evidence/cql/eval.csv" \
                 "medium-replay:Off2OnRL=results/evidence/off2on_seed*/eval.csv" \
                 "medium-replay:UPQ=results/evidence/upq_beta0.001_seed*/eval.csv" \
        --figure fig2.png --table table1.md

Each --series is PANEL:LABEL=GLOB; every file the glob matches is one seed. A file with an `agent`
column (cql_pretrain.py) counts the mean over its agents (not its `ensemble` rows) and is drawn as a
level (its final score), since its steps are gradient steps, not env steps. Curves show the mean over
seeds and a band of one standard deviation; the table gives mean ± std over seeds of the last
evaluation, in normalised score. --ensemble-level draws the fine-tuning runs' step-0 score (the
pre-trained ensemble) as a level. --diagnostics adds, below each panel, the uncertainty U, Q^E and
beta U / |y| of every fine-tuning series against env steps, from the metrics.csv beside each eval.csv (one
row per panel). --final-evals K averages each fine-tuning seed's last K evaluations. --early-steps N
adds a second table: each fine-tuning series' lowest score at env steps 1 .. N (the early drop), mean ±
std over seeds.
"""

from __future__ import annotations

import csv
import glob
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    series: list[str] = field(default_factory=list)
    """PANEL:LABEL=GLOB, one per curve; every matched eval.csv is one seed"""
    figure: str = "results/fig2.png"
    """PNG with one panel per PANEL"""
    table: str = "results/table1.md"
    """Markdown table of final normalised scores (mean ± std over seeds)"""
    ensemble_level: bool = False
    """draw the mean step-0 score of each panel's fine-tuning runs (the pre-trained ensemble) as a dashed level"""
    diagnostics: bool = False
    """add rows for U, Q^E and beta U / |y| (metrics.csv of the fine-tuning runs) below the score curves"""
    final_evals: int = 1
    """a fine-tuning seed's final score: the mean of its last this many evaluations;
    1: the last one, more: an average over the policy's changes from epoch to epoch;
    a pre-training file always gives its last"""
    early_steps: int = 0
    """if > 0, a second table (the early drop the paper reports for Off2OnRL):
    each fine-tuning series' lowest score at env steps 1 .. early_steps, mean ± std over seeds"""


DIAGNOSTICS = {"uncertainty": "U(s', a'), mean", "q_ensemble": "Q^E(s, a)", "penalty_fraction": "beta U / |y|"}


def read_curve(path: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Steps, normalised scores and whether it is a pre-training file (an `agent` column: the mean over agents; its
    rows of agent `ensemble`, the agents' ensemble, are left out)."""
    by_step = defaultdict(list)
    with open(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            if row.get("agent") != "ensemble":
                by_step[int(row["step"])].append(float(row["normalized_score"]))
        pretraining = "agent" in (reader.fieldnames or [])
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps]), pretraining


def read_metrics(eval_csv: str) -> dict[str, np.ndarray] | None:
    """The columns of the metrics.csv beside an eval.csv (fine-tuning: one row per epoch), or None."""
    path = Path(eval_csv).with_name("metrics.csv")
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(row[key]) for row in rows]) for key in (rows[0] if rows else {})}


def final_score(scores: np.ndarray, pretraining: bool, final_evals: int) -> float:
    """A seed's final score: the mean of its last `final_evals` evaluations (a pre-training file: its last)."""
    return float(scores[-1] if pretraining else scores[-final_evals:].mean())


def early_minimum(steps: np.ndarray, scores: np.ndarray, early_steps: int) -> float | None:
    """A fine-tuning seed's lowest score at env steps 1 .. early_steps (the early drop), or None if none lies there."""
    early = scores[(steps > 0) & (steps <= early_steps)]
    return float(early.min()) if len(early) else None


def draw_band(axis, runs: list[tuple[np.ndarray, np.ndarray]], label: str, color: str) -> None:
    """Mean over runs and a band of one standard deviation, on the steps all runs reached."""
    length = min(len(steps) for steps, _ in runs)
    values = np.stack([v[:length] for _, v in runs])
    mean, std = values.mean(0), values.std(0)
    axis.plot(runs[0][0][:length], mean, label=f"{label} (n={len(runs)})", color=color)
    axis.fill_between(runs[0][0][:length], mean - std, mean + std, alpha=0.2, color=color)


def natural_order(path: str) -> list:
    """Sort key: runs of digits compare as numbers, so ".../off2on_seed2/..." comes before ".../off2on_seed10/..."."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def parse_series(spec: str) -> tuple[str, str, list[str]]:
    try:
        panel_label, pattern = spec.split("=", 1)
        panel, label = panel_label.split(":", 1)
    except ValueError:
        raise SystemExit(f"error: --series {spec!r} is not PANEL:LABEL=GLOB (a panel or task, a label, then a glob of "
                         f"eval.csv files)")
    files = sorted(glob.glob(pattern), key=natural_order)  # seed2 before seed10
    if not files:
        raise SystemExit(f"error: --series {spec!r} matches no file")
    if folder := next((path for path in files if not Path(path).is_file()), None):
        raise SystemExit(f"error: --series {spec!r} matches {folder}, which is not a file: end the glob with the "
                         f"runs' eval.csv (e.g. runs/off2on_seed*/eval.csv)")
    return panel, label, files


def markdown_table(panels: list[str], rows: list[tuple[str, str, np.ndarray]]) -> str:
    """One line per panel, one column per label: mean ± std (n seeds) of each row's numbers (one seed: no std)."""
    labels = list(dict.fromkeys(label for _, label, _ in rows))
    cells = {(panel, label): values for panel, label, values in rows}
    lines = ["| dataset | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for panel in panels:
        entries = []
        for label in labels:
            values = cells.get((panel, label))
            spread = f" ± {values.std():.1f}" if values is not None and len(values) > 1 else ""  # none with one seed
            entries.append("" if values is None else f"{values.mean():.1f}{spread} (n={len(values)})")
        lines.append(f"| {panel} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    if not args.series:
        raise SystemExit("error: give at least one --series PANEL:LABEL=GLOB")
    if args.final_evals < 1 or args.early_steps < 0:
        raise SystemExit(f"error: --final-evals must be >= 1 and --early-steps >= 0, not {args.final_evals} and "
                         f"{args.early_steps}")
    panels: dict[str, list] = defaultdict(list)
    for spec in args.series:
        panel, label, files = parse_series(spec)
        panels[panel].append((label, [read_curve(path) for path in files]))

    metrics = {(panel, label): [read_metrics(path) for path in parse_series(spec)[2]]
               for spec in args.series for panel, label, _ in [parse_series(spec)]} if args.diagnostics else {}
    kinds = ["score", *(DIAGNOSTICS if args.diagnostics else [])]
    # one row of panels (Fig. 2); with --diagnostics one row per panel: the scores, then U, Q^E, beta U / |y|
    shape = (len(panels), len(kinds)) if args.diagnostics else (1, len(panels))
    figure, grid = plt.subplots(*shape, figsize=(4.6 * shape[1], 3.6 * shape[0]), squeeze=False)
    rows, early_rows = [], []  # (panel, label, one number per seed): the last evaluation; the lowest early one
    for column, (panel, curves) in enumerate(panels.items()):
        axes = grid[column] if args.diagnostics else [grid[0, column]]
        starts = [scores[0] for _, seeds in curves if not seeds[0][2] for _, scores, _ in seeds]
        if args.ensemble_level and starts:
            axes[0].axhline(np.mean(starts), linestyle=":", color="black",
                            label=f"pre-trained ensemble, step 0 ({np.mean(starts):.1f})")
        for index, (label, seeds) in enumerate(curves):
            finals = np.array([final_score(scores, pretraining, args.final_evals) for _, scores, pretraining in seeds])
            rows.append((panel, label, finals))
            if seeds[0][2] or len(seeds[0][0]) < 2:  # pre-training (gradient steps) or one point: a level
                axes[0].axhline(finals.mean(), linestyle="--", color="gray", label=f"{label} ({finals.mean():.1f})")
                continue
            if args.early_steps > 0:
                lows = [early_minimum(steps, scores, args.early_steps) for steps, scores, _ in seeds]
                if None not in lows:
                    early_rows.append((panel, label, np.array(lows)))
            draw_band(axes[0], [(steps, scores) for steps, scores, _ in seeds], label, f"C{index}")
            for axis, key in zip(axes[1:], kinds[1:]):
                runs = [(m["step"], m[key]) for m in metrics[panel, label] if m is not None and key in m]
                if runs:
                    draw_band(axis, runs, label, f"C{index}")
        for axis, kind in zip(axes, kinds):
            axis.set_title(panel if kind == "score" else DIAGNOSTICS[kind], fontsize=10)
            axis.set_xlabel("environment steps")
            axis.set_ylabel("normalised score" if kind == "score" else DIAGNOSTICS[kind])
            axis.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=120)

    tables = [("" if args.final_evals == 1 else f"Mean of the last {args.final_evals} evaluations:\n\n")
              + markdown_table(list(panels), rows)]
    if early_rows:
        tables.append(f"Lowest score at env steps 1-{args.early_steps:,} (the early drop):\n\n"
                      + markdown_table(list(panels), early_rows))
    Path(args.table).write_text("\n".join(tables))
    print("\n".join(tables))
    print(f"figure: {args.figure}; table: {args.table}")


if __name__ == "__main__":
    main(tyro.cli(Args))
