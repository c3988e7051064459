"""results/stats.py: IQM, mean and probability of improvement against hand counts, seeded bootstrap intervals, and the
table from eval.csv files the test writes."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_refused

sys.path.insert(0, str(REPO / "results"))
import stats  # noqa: E402

REPS = 300  # few resamples: the tests check the arithmetic and the seeding, not the intervals' precision


def write_eval(path: Path, scores: list[float], steps: tuple[int, ...] = (0, 1000, 2000, 3000)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{step},1.0,{score}" for step, score in zip(steps, scores)]
    path.write_text("\n".join(["step,return,normalized_score", *rows]) + "\n")


def test_iqm_is_the_mean_of_the_middle_half_of_all_runs_and_tasks():
    values = np.array([100.0, 1.0, 5.0, 3.0, 7.0, 2.0, 6.0, -50.0])  # sorted: -50 1 | 2 3 5 6 | 7 100
    assert stats.mean_and_iqm(values.reshape(8, 1)).tolist() == [74.0 / 8, (2 + 3 + 5 + 6) / 4]
    # two tasks of four runs: the IQM trims over all eight scores, the mean averages the two tasks' means
    assert stats.mean_and_iqm(values.reshape(4, 2)).tolist() == [74.0 / 8, 4.0]


def test_probability_of_improvement_counts_pairs_by_hand():
    x, y = np.array([[3.0], [5.0], [7.0]]), np.array([[1.0], [5.0], [6.0], [9.0]])
    # x = 3 beats 1; x = 5 beats 1 and ties 5 (1/2); x = 7 beats 1, 5, 6: 5.5 of the 12 pairs
    assert stats.improvement(x, y, REPS, seed=0)[0] == pytest.approx(5.5 / 12)
    assert stats.improvement(y, x, REPS, seed=0)[0] == pytest.approx(6.5 / 12)
    assert stats.improvement(y, y, REPS, seed=0)[0] == 0.5  # every pair of equal scores counts a half


def test_intervals_hold_the_estimate_and_repeat_with_the_same_seed_only():
    scores = np.random.default_rng(0).normal(50.0, 20.0, size=(10, 1))
    before = np.random.get_state()[1].copy()
    point, interval = stats.seeded_interval(scores, stats.mean_and_iqm, REPS, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator is put back
    assert point.tolist() == pytest.approx([scores.mean(), np.sort(scores[:, 0])[2:8].mean()])
    assert np.all(interval[0] <= point) and np.all(point <= interval[1]) and np.all(interval[0] < interval[1])
    again = stats.seeded_interval(scores, stats.mean_and_iqm, REPS, seed=0)[1]
    other = stats.seeded_interval(scores, stats.mean_and_iqm, REPS, seed=1)[1]
    assert np.array_equal(again, interval) and not np.array_equal(other, interval)
    poi = stats.improvement(scores + 10.0, scores, REPS, seed=0)
    assert poi == stats.improvement(scores + 10.0, scores, REPS, seed=0) != stats.improvement(
        scores + 10.0, scores, REPS, seed=1)
    assert poi[1] <= poi[0] <= poi[2]


def test_table_from_eval_csv_files(tmp_path):
    # steps 0, 1k, 2k, 3k; with --final-evals 2 and --early-steps 2000: final = mean of the 2k and 3k scores, early
    # minimum = the lower of the 1k and 2k scores (step 0, the pre-trained start, and step 3k lie outside), drop =
    # that minimum minus the seed's own step-0 score
    for seed, scores in enumerate([[50, 10, 20, 30], [52, 12, 30, 40], [54, 14, 40, 50], [56, 16, 60, 70]]):
        write_eval(tmp_path / f"off2on_seed{seed}" / "eval.csv", scores)  # finals 25 35 45 65, early 10 12 14 16
    for seed, scores in enumerate([[50, 4, 70, 80], [50, 6, 80, 90], [50, 7, 90, 100], [50, 7, 100, 110]]):
        write_eval(tmp_path / f"upq_seed{seed}" / "eval.csv", scores)  # ... 75 85 95 105, 4 6 7 7, -46 -44 -43 -43
    for seed in range(4):
        write_eval(tmp_path / f"flat_seed{seed}" / "eval.csv", [50, 20, 50, 50])  # final 50, early 20 on every seed
    args = stats.Args(series=[f"hopper:{label}={tmp_path}/{name}_seed*/eval.csv"
                              for label, name in (("Off2OnRL", "off2on"), ("UPQ", "upq"), ("flat", "flat"))],
                      final_evals=2, early_steps=2000, reps=REPS, seed=3, table=str(tmp_path / "stats.md"),
                      csv=str(tmp_path / "stats.csv"))
    stats.main(args)
    table, rows = Path(args.table).read_text(), Path(args.csv).read_text()
    lines = table.splitlines()
    assert "rliable 1.2.0, percentile, 300 resamples, numpy seed 3" in lines[0]
    number = r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]"
    cells = re.fullmatch(r"\| Off2OnRL \| 4 \|" + rf" {number} \|" * 6, lines[4])
    points = [float(value) for value in cells.groups()[::3]]
    # means of 25 35 45 65 and 10 12 14 16; IQMs: 35 45 and 12 14; each seed 40 below its own step-0 score
    assert points == [42.5, 40.0, 13.0, 13.0, -40.0, -40.0]
    assert lines[5].startswith("| UPQ | 4 | 90.0 [") and "| 6.0 [" in lines[5] and "| 6.5 [" in lines[5]
    upq = re.fullmatch(r"\| UPQ \| 4 \|" + rf" {number} \|" * 6, lines[5]).groups()[::3]
    assert [float(value) for value in upq[4:]] == [-44.0, -43.5]  # drops -46 -44 -43 -43; IQM: -44 and -43
    assert lines[6] == "| flat | 4 |" + " 50.0 [50.0, 50.0] |" * 2 + " 20.0 [20.0, 20.0] |" * 2 + \
        " -30.0 [-30.0, -30.0] |" * 2
    assert lines[8].startswith("Probability of improvement over Off2OnRL")
    assert lines[10:12] == ["| method | n vs n | final score | lowest early score | lowest early - step 0 |",
                            "| --- | --- | --- | --- | --- |"]
    # every UPQ final above every Off2OnRL final, every UPQ minimum below; flat's 50 beats 3 of the 4 finals
    assert lines[12] == "| UPQ | 4 vs 4 | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00] |"
    assert lines[13].startswith("| flat | 4 vs 4 | 0.75 [") and lines[13].endswith(" 1.00 [1.00, 1.00] |" * 2)
    assert "final,P(X > baseline),UPQ,4,Off2OnRL,4,1.0000,1.0000,1.0000\n" in rows
    assert "early_min,IQM,flat,4,,,20.0000,20.0000,20.0000\n" in rows
    assert lines[15] == "Per seed, the numbers the estimates above come from (each run named by its folder):"
    assert lines[19:23] == [f"| Off2OnRL | hopper | off2on_seed{seed} | {final:.1f} | {early:.1f} | -40.0 |"
                            for seed, final, early in zip(range(4), (25, 35, 45, 65), (10, 12, 14, 16))]
    assert lines[23] == "| UPQ | hopper | upq_seed0 | 75.0 | 4.0 | -46.0 |" and len(lines) == 19 + 12
    assert "early_drop,mean,flat,4,,,-30.0000,-30.0000,-30.0000\n" in rows
    stats.main(args)  # the same seed: the same bytes
    assert Path(args.table).read_text() == table and Path(args.csv).read_text() == rows


@pytest.mark.parametrize("case, message", [
    ("no match", "matches no file"),
    ("one seed", "needs 2 seeds or more"),
    ("no baseline", "--baseline 'Off2OnRL' is none of the labels"),
    ("unfinished", "end at different env steps (2000, 3000)"),
    ("no early evaluation", "has no evaluation at env steps 1-500"),
    ("no step 0", "has no evaluation at env step 0 (the pre-trained start)"),
    ("pre-training file", "is not a fine-tuning run's eval.csv"),
    ("other columns", "is not an eval.csv with numbers in columns step and normalized_score"),
    ("short of the window", "ends at env step 3,000, before the end of the early window (--early-steps 5,000)"),
    ("few evaluations", "has 3 evaluations after step 0, fewer than --final-evals 4"),
    ("folders", "which is not a file: end the glob with the runs' eval.csv"),
])
def test_bad_input_is_refused(tmp_path, case, message):
    for seed in (1, 2):
        write_eval(tmp_path / "a" / f"s{seed}" / "eval.csv", [50, 10, 20, 30])
        write_eval(tmp_path / "b" / f"s{seed}" / "eval.csv", [50, 10, 20, 30])
    series = [f"t:Off2OnRL={tmp_path}/a/s*/eval.csv", f"t:UPQ={tmp_path}/b/s*/eval.csv"]
    early_steps = {"no early evaluation": 500, "short of the window": 5000}.get(case, 2000)
    final_evals = 4 if case == "few evaluations" else 2  # (each run: 3 evaluations after step 0; "unfinished": 2)
    if case == "no match":
        series[1] = f"t:UPQ={tmp_path}/none/*.csv"
    elif case == "one seed":
        series[1] = f"t:UPQ={tmp_path}/b/s1/eval.csv"
    elif case == "no baseline":
        series = series[1:]
    elif case == "unfinished":  # a run still going: its last evaluation at 2k, the others' at 3k
        write_eval(tmp_path / "b" / "s2" / "eval.csv", [50, 10, 20])
    elif case == "no step 0":  # the drop is measured from the run's own step-0 score
        write_eval(tmp_path / "b" / "s2" / "eval.csv", [10, 20, 30], steps=(1000, 2000, 3000))
    elif case == "pre-training file":
        (tmp_path / "b" / "s2" / "eval.csv").write_text("step,agent,return,normalized_score\n0,0,1,1.0\n")
    elif case == "other columns":
        (tmp_path / "b" / "s2" / "eval.csv").write_text("step,return,score\n0,1,1.0\n")
    elif case == "folders":  # the runs' folders, not their eval.csv files
        series[1] = f"t:UPQ={tmp_path}/b/s*"
    with pytest.raises(SystemExit, match=re.escape(message)):
        stats.main(stats.Args(series=series, early_steps=early_steps, final_evals=final_evals, reps=REPS,
                              table=str(tmp_path / "t.md"), csv=str(tmp_path / "t.csv")))
    assert not (tmp_path / "t.md").exists()


def test_the_command_refuses_in_one_sentence(run_script, tmp_path):
    assert_refused(run_script("results/stats.py", "--series", f"t:Off2OnRL={tmp_path}/none/*.csv"), "matches no file")
