"""Learning curves (as the paper's Fig. 2) and a final-score table (as its Table 1) from eval.csv files.

    python results/plot.py \
        --series "hopper-medium:CQL=results/runs/hopper-medium/cql/eval.csv" \
                 "hopper-medium:Off2OnRL=results/runs/hopper-medium/off2on_seed*/eval.csv" \
                 "hopper-medium:UPQ=results/runs/hopper-medium/upq_seed*/eval.csv" \
        --figure results/fig2.png --table results/table1.md

Each --series is PANEL:LABEL=GLOB; every file the glob matches is one seed. A file with an `agent`
column (cql_pretrain.py) counts the mean over its agents and is drawn as a level (its final score), since
its steps are gradient steps, not env steps. Curves show the mean over
seeds and a band of one standard deviation; the table gives mean ± std over seeds of the last
evaluation, in normalised score.
"""

from __future__ import annotations

import csv
import glob
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


def read_curve(path: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Steps, normalised scores and whether it is a pre-training file (an `agent` column: the mean over agents)."""
    by_step = defaultdict(list)
    with open(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            by_step[int(row["step"])].append(float(row["normalized_score"]))
        pretraining = "agent" in (reader.fieldnames or [])
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps]), pretraining


def parse_series(spec: str) -> tuple[str, str, list[str]]:
    try:
        panel_label, pattern = spec.split("=", 1)
        panel, label = panel_label.split(":", 1)
    except ValueError:
        raise SystemExit(f"error: --series {spec!r} is not PANEL:LABEL=GLOB")
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"error: --series {spec!r} matches no file")
    return panel, label, files


def main(args: Args) -> None:
    if not args.series:
        raise SystemExit("error: give at least one --series PANEL:LABEL=GLOB")
    panels: dict[str, list] = defaultdict(list)
    for spec in args.series:
        panel, label, files = parse_series(spec)
        panels[panel].append((label, [read_curve(path) for path in files]))

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    rows = []
    for axis, (panel, curves) in zip(axes[0], panels.items()):
        for label, seeds in curves:
            finals = np.array([scores[-1] for _, scores, _ in seeds])
            rows.append((panel, label, finals))
            if seeds[0][2] or len(seeds[0][0]) < 2:  # pre-training (gradient steps) or one point: a level
                axis.axhline(finals.mean(), linestyle="--", color="gray", label=f"{label} ({finals.mean():.1f})")
                continue
            length = min(len(steps) for steps, _, _ in seeds)
            steps = seeds[0][0][:length]
            scores = np.stack([s[:length] for _, s, _ in seeds])
            mean, std = scores.mean(0), scores.std(0)
            axis.plot(steps, mean, label=f"{label} (n={len(seeds)})")
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
        axis.set_title(panel)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("normalised score")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=120)

    labels = list(dict.fromkeys(label for _, label, _ in rows))
    cells = {(panel, label): finals for panel, label, finals in rows}
    lines = ["| dataset | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for panel in panels:
        entries = []
        for label in labels:
            finals = cells.get((panel, label))
            entries.append("" if finals is None else f"{finals.mean():.1f} ± {finals.std():.1f} (n={len(finals)})")
        lines.append(f"| {panel} | " + " | ".join(entries) + " |")
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"figure: {args.figure}; table: {args.table}")


if __name__ == "__main__":
    main(tyro.cli(Args))
