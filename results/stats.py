"""Few-seed statistics as rliable gives them (Agarwal et al., 2021): IQM, mean and probability of improvement.

    python results/stats.py --baseline Off2OnRL \
        --series "Hopper medium-replay:Off2OnRL=results/evidence/off2on_seed*/eval.csv" \
                 "Hopper medium-replay:UPQ beta 0.1=results/evidence/upq_beta0.1_seed*/eval.csv" \
        --table results/evidence/stats.md --csv results/evidence/stats.csv

Each --series is TASK:LABEL=GLOB (results/plot.py's PANEL:LABEL=GLOB, the task as the panel); every eval.csv the
glob matches is one seed (a fine-tuning run). A seed gives three numbers, which HELP below defines (it is what
--help prints). For each label and each of the three, a score matrix [num_seeds, num_tasks] gives the mean and the
interquartile mean (IQM: the mean of the middle half of all its scores, scipy's trim_mean at 0.25), each with a 95%
stratified bootstrap CI (rliable.library.get_interval_estimates, percentile method; seeds are resampled within each
task); and each other label against --baseline gives the probability of improvement P(X > Y) + P(X = Y) / 2 over
pairs of their seeds (rliable.metrics.probability_of_improvement, averaged over tasks), with its CI from the two
labels' seeds resampled independently. rliable 1.2.0 draws its resamples from numpy's global generator
(np.random.choice) whatever random_state it is given, so every estimate seeds that generator with --seed first (and
puts its state back after): each interval depends only on its own data and --seed, and the table is the same byte
for byte from run to run.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import tyro
from rliable import library, metrics

import plot  # results/plot.py: the spec format, eval.csv reading, a seed's final score and lowest early score


@dataclass
class Args:
    series: list[str] = field(default_factory=list)
    """TASK:LABEL=GLOB, one per method and task; every matched eval.csv is one seed"""
    baseline: str = "Off2OnRL"
    """the label every other label is compared against (probability of improvement)"""
    final_evals: int = 5
    """a seed's final score: the mean of its last this many evaluations (as results/evidence/run.sh's plot.py flag)"""
    early_steps: int = 5000
    """a seed's lowest early score: its lowest score at env steps 1 .. early_steps (as run.sh's plot.py flag)"""
    reps: int = 50_000
    """bootstrap resamples per interval (rliable's default)"""
    seed: int = 0
    """seed of numpy's global generator, set before every interval (rliable draws from it)"""
    table: str | None = None
    """write the markdown tables to this file (e.g. results/evidence/stats.md); they are printed either way"""
    csv: str | None = None
    """write the same numbers to this CSV file, one estimate a row, 4 decimals"""


HELP = """IQM, mean and probability of improvement (rliable) of each method's seeds, from their eval.csv files.

Each seed gives three numbers: its final score, the mean of its last --final-evals evaluations (after step 0); its
lowest early score, its lowest score at env steps 1 .. --early-steps, the early drop that the paper reports for
Off2OnRL (both as results/plot.py computes them); and "lowest early - step 0", that lowest score minus its score at
step 0 (the pre-trained ensemble's, on the run's own evaluation seeds): how far fine-tuning first fell, negative
when it lost ground. The docstring of results/stats.py says how each estimate and interval is made."""
MEASURES = {"final": "final score", "early_min": "lowest early score",  # the CSV's name of each: its heading
            "early_drop": "lowest early - step 0"}


def mean_and_iqm(scores: np.ndarray) -> np.ndarray:
    """[num_seeds, num_tasks] scores -> [2]: their mean over tasks of the seeds' mean, and the IQM of all of them."""
    return np.array([metrics.aggregate_mean(scores), metrics.aggregate_iqm(scores)])


def seeded_interval(scores: np.ndarray | list[np.ndarray], func: Callable, reps: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """func's point estimate on `scores` and its 95% stratified-bootstrap interval [2, ...] (lower row, upper row);
    a list of score matrices is resampled independently (rliable's way for the probability of improvement)."""
    state = np.random.get_state()
    np.random.seed(seed)  # rliable 1.2.0 resamples with np.random.choice, not with random_state
    try:
        points, intervals = library.get_interval_estimates({"x": scores}, func, reps=reps)
    finally:
        np.random.set_state(state)
    return np.asarray(points["x"]), np.asarray(intervals["x"]).reshape(2, -1)


def improvement(scores_x: np.ndarray, scores_y: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """P(X > Y) + P(X = Y) / 2 over pairs of runs (averaged over tasks), and its 95% CI."""
    point, interval = seeded_interval([scores_x, scores_y], metrics.probability_of_improvement, reps, seed)
    return float(point), float(interval[0, 0]), float(interval[1, 0])


def read_scores(args: Args) -> tuple[list[str], dict[str, dict[str, np.ndarray]], dict[tuple[str, str], list[str]]]:
    """The tasks in order; per measure and label, its score matrix [num_seeds, num_tasks]; per (label, task), its
    runs' folder names in the matrix's order. Bad input refused."""
    values = {}  # (measure, label, task) -> one number per seed
    runs = {}  # (label, task) -> the folder of each seed's eval.csv
    ends = defaultdict(set)  # task -> the env steps its runs end at
    tasks, labels = [], []
    for spec in args.series:
        task, label, files = plot.parse_series(spec)
        if ("final", label, task) in values:
            raise SystemExit(f"error: --series gives {label!r} on {task!r} twice")
        if len(files) < 2:
            raise SystemExit(f"error: --series {spec!r} matches one file; a confidence interval needs 2 seeds or more")
        seeds = []  # per file: its three measures, in MEASURES' order
        for path in files:
            try:
                steps, scores, pretraining = plot.read_curve(path)
            except (KeyError, ValueError):
                raise SystemExit(f"error: {path} is not an eval.csv with numbers in columns step and normalized_score")
            if pretraining or len(steps) == 0:
                raise SystemExit(f"error: {path} is not a fine-tuning run's eval.csv with evaluations")
            if steps[0] != 0:
                raise SystemExit(f"error: {path} has no evaluation at env step 0 (the pre-trained start)")
            if steps[-1] < args.early_steps:
                raise SystemExit(f"error: {path} ends at env step {steps[-1]:,}, before the end of the early window "
                                 f"(--early-steps {args.early_steps:,})")
            low = plot.early_minimum(steps, scores, args.early_steps)
            if low is None:
                raise SystemExit(f"error: {path} has no evaluation at env steps 1-{args.early_steps:,}")
            if len(steps) - 1 < args.final_evals:
                raise SystemExit(f"error: {path} has {len(steps) - 1} evaluations after step 0, fewer than "
                                 f"--final-evals {args.final_evals}")
            seeds.append((plot.final_score(scores, False, args.final_evals), low, low - scores[0]))
            ends[task].add(int(steps[-1]))
        for measure, column in zip(MEASURES, zip(*seeds)):
            values[measure, label, task] = list(column)
        runs[label, task] = [Path(path).parent.name for path in files]
        tasks += [task] if task not in tasks else []
        labels += [label] if label not in labels else []
    for task, steps in ends.items():
        if len(steps) > 1:
            raise SystemExit(f"error: the runs on {task!r} end at different env steps "
                             f"({', '.join(map(str, sorted(steps)))}); compare finished runs of one budget")
    for label in labels:
        counts = {len(values.get(("final", label, task), [])) for task in tasks}
        if len(counts) > 1:
            raise SystemExit(f"error: {label!r} needs the same number of seeds on every task, not {sorted(counts)}")
    if args.baseline not in labels:
        raise SystemExit(f"error: --baseline {args.baseline!r} is none of the labels {labels}")
    scores = {measure: {label: np.array([values[measure, label, task] for task in tasks]).T  # [num_seeds, tasks]
                        for label in labels} for measure in MEASURES}
    return tasks, scores, runs


def write_outputs(args: Args, tasks: list[str], scores: dict[str, dict[str, np.ndarray]],
                  runs: dict[tuple[str, str], list[str]]) -> str:
    """Compute every estimate, write the CSV and return the markdown (ending with every seed's three numbers)."""
    rows = []  # measure, statistic, method, n, versus, n_versus, estimate, ci_low, ci_high
    summary = {}  # (label, measure) -> "mean [lo, hi]" and "IQM [lo, hi]" cells
    for measure, by_label in scores.items():
        for label, matrix in by_label.items():
            point, interval = seeded_interval(matrix, mean_and_iqm, args.reps, args.seed)
            for index, statistic in enumerate(("mean", "IQM")):
                rows.append((measure, statistic, label, len(matrix), "", "", point[index], *interval[:, index]))
                summary[label, measure, statistic] = f"{point[index]:.1f} [{interval[0, index]:.1f}, " \
                                                     f"{interval[1, index]:.1f}]"
        baseline = by_label[args.baseline]
        for label, matrix in by_label.items():
            if label != args.baseline:
                estimate = improvement(matrix, baseline, args.reps, args.seed)
                rows.append((measure, "P(X > baseline)", label, len(matrix), args.baseline, len(baseline), *estimate))
                summary[label, measure, "poi"] = "{:.2f} [{:.2f}, {:.2f}]".format(*estimate)

    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["measure", "statistic", "method", "n", "versus", "n_versus", "estimate", "ci_low",
                             "ci_high"])
            writer.writerows([*row[:6], *(f"{value:.4f}" for value in row[6:])] for row in rows)

    labels = list(scores["final"])
    n = {label: len(scores["final"][label]) for label in labels}
    header = (f"{', '.join(tasks)}: per seed, the final score (mean of its last {args.final_evals} evaluations), "
              f"the lowest early score (its lowest score at env steps 1-{args.early_steps:,}, the early drop) and "
              f"the lowest early score minus the seed's step-0 score. Point estimate and 95% stratified-bootstrap CI "
              f"(rliable {version('rliable')}, percentile, {args.reps:,} resamples, numpy seed {args.seed}); n = "
              f"seeds{' per task' if len(tasks) > 1 else ''}.")
    columns = "".join(f" {heading}: {statistic} [95% CI] |" for heading in MEASURES.values()
                      for statistic in ("mean", "IQM"))
    lines = [header, "", f"| method | n |{columns}", "|" + " --- |" * (2 + 2 * len(MEASURES))]
    lines += [f"| {label} | {n[label]} | " + " | ".join(summary[label, measure, statistic] for measure in MEASURES
                                                        for statistic in ("mean", "IQM")) + " |" for label in labels]
    others = [label for label in labels if label != args.baseline]
    if others:
        poi = (f"Probability of improvement over {args.baseline}, P(X > Y) + P(X = Y) / 2 over pairs of seeds (0.5: "
               "neither ahead; for the two early measures, above 0.5: a shallower drop), with its 95% CI:")
        lines += ["", poi, "", f"| method | n vs n | {' | '.join(MEASURES.values())} |", "|" + " --- |" * 5]
        lines += [f"| {label} | {n[label]} vs {n[args.baseline]} | "
                  + " | ".join(summary[label, measure, "poi"] for measure in MEASURES) + " |" for label in others]
    lines += ["", "Per seed, the numbers the estimates above come from (each run named by its folder):", "",
              f"| method | task | run | {' | '.join(MEASURES.values())} |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {label} | {task} | {run} | "
              + " | ".join(f"{scores[measure][label][seed, t]:.1f}" for measure in MEASURES) + " |"
              for label in labels for t, task in enumerate(tasks) for seed, run in enumerate(runs[label, task])]
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    if not args.series:
        raise SystemExit("error: give --series TASK:LABEL=GLOB for the --baseline and each method to compare with it")
    if args.final_evals < 1 or args.early_steps < 1 or args.reps < 1:
        raise SystemExit(f"error: --final-evals, --early-steps and --reps must be >= 1, not {args.final_evals}, "
                         f"{args.early_steps} and {args.reps}")
    markdown = write_outputs(args, *read_scores(args))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(markdown)
    print(markdown + f"table: {args.table or '(not written)'}; csv: {args.csv or '(not written)'}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=HELP))
