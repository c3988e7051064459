"""results/plot.py: final scores and curves computed from eval.csv files the test writes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results"))
import plot  # noqa: E402


def write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_table_has_mean_and_std_over_seeds_of_the_last_evaluation(tmp_path):
    write_csv(tmp_path / "upq" / "s1" / "eval.csv", "step,return,normalized_score", ["0,1,10.0", "1000,2,20.0"])
    write_csv(tmp_path / "upq" / "s2" / "eval.csv", "step,return,normalized_score", ["0,1,12.0", "1000,2,40.0"])
    # cql_pretrain.py rows: one per agent and one of their ensemble; a seed's score is the mean over its agents
    write_csv(tmp_path / "cql" / "eval.csv", "step,agent,return,normalized_score",
              ["0,0,1,1.0", "0,1,1,3.0", "0,ensemble,1,90.0", "500,0,1,4.0", "500,1,1,8.0", "500,ensemble,1,90.0"])
    table, figure = tmp_path / "table.md", tmp_path / "fig.png"
    plot.main(plot.Args(series=[f"hopper:CQL={tmp_path}/cql/eval.csv", f"hopper:UPQ={tmp_path}/upq/s*/eval.csv"],
                        figure=str(figure), table=str(table)))
    lines = table.read_text().splitlines()
    assert lines[0] == "| dataset | CQL | UPQ |"
    assert lines[2] == "| hopper | 6.0 (n=1) | 30.0 ± 10.0 (n=2) |"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"


def test_early_drop_and_final_evals_tables(tmp_path):
    write_csv(tmp_path / "upq" / "s1" / "eval.csv", "step,return,normalized_score",
              ["0,1,50.0", "1000,1,30.0", "2000,1,10.0", "3000,1,60.0"])
    write_csv(tmp_path / "upq" / "s2" / "eval.csv", "step,return,normalized_score",
              ["0,1,5.0", "1000,1,40.0", "2000,1,45.0", "3000,1,1.0"])  # step 0 and step 3000 lie outside
    write_csv(tmp_path / "cql" / "eval.csv", "step,agent,return,normalized_score", ["0,0,1,1.0"])
    table = tmp_path / "table.md"
    plot.main(plot.Args(series=[f"hopper:CQL={tmp_path}/cql/eval.csv", f"hopper:UPQ={tmp_path}/upq/s*/eval.csv"],
                        figure=str(tmp_path / "fig.png"), table=str(table), early_steps=2000))
    lines = table.read_text().splitlines()
    assert lines[2] == "| hopper | 1.0 (n=1) | 30.5 ± 29.5 (n=2) |"  # the last evaluations
    assert lines[4] == "Lowest score at env steps 1-2,000 (the early drop):"
    assert lines[6:] == ["| dataset | UPQ |", "| --- | --- |", "| hopper | 25.0 ± 15.0 (n=2) |"]

    plot.main(plot.Args(series=[f"hopper:CQL={tmp_path}/cql/eval.csv", f"hopper:UPQ={tmp_path}/upq/s*/eval.csv"],
                        figure=str(tmp_path / "fig.png"), table=str(table), final_evals=2))
    lines = table.read_text().splitlines()  # seeds: (10 + 60) / 2 = 35 and (45 + 1) / 2 = 23; CQL: its last row
    assert lines[0] == "Mean of the last 2 evaluations:"
    assert lines[4] == "| hopper | 1.0 (n=1) | 29.0 ± 6.0 (n=2) |"


def test_final_evals_below_one_is_refused(tmp_path):
    write_csv(tmp_path / "upq" / "eval.csv", "step,return,normalized_score", ["0,1,5.0"])
    with pytest.raises(SystemExit, match="--final-evals must be >= 1"):
        plot.main(plot.Args(series=[f"hopper:UPQ={tmp_path}/upq/eval.csv"], figure=str(tmp_path / "f.png"),
                            table=str(tmp_path / "t.md"), final_evals=0))


def test_a_series_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="matches no file"):
        plot.main(plot.Args(series=[f"hopper:UPQ={tmp_path}/none/*.csv"], figure=str(tmp_path / "f.png"),
                            table=str(tmp_path / "t.md")))


def test_a_series_lists_its_seeds_in_numeric_order(tmp_path):
    for seed in (10, 2, 1):
        write_csv(tmp_path / f"run_seed{seed}" / "eval.csv", "step,normalized_score", ["0,1.0"])
    panel, label, files = plot.parse_series(f"P:L={tmp_path}/run_seed*/eval.csv")
    assert (panel, label) == ("P", "L")
    assert [Path(f).parent.name for f in files] == ["run_seed1", "run_seed2", "run_seed10"]


def test_diagnostics_draw_u_q_and_the_penalty_from_metrics_csv(tmp_path, monkeypatch):
    for method, seed, penalty in (("off2on", 1, None), ("upq", 1, 0.001), ("upq", 2, 0.003)):
        folder = tmp_path / method / f"s{seed}"
        start = 16.0 if seed == 2 else 10.0  # the step-0 scores of the three runs: 10, 10, 16
        write_csv(folder / "eval.csv", "step,return,normalized_score", [f"0,1,{start}", "1000,2,20.0", "2000,3,30.0"])
        columns = "step,q_ensemble,uncertainty" + (",penalty_fraction" if penalty else "")
        rows = [f"{step},{100 * seed},{seed}" + (f",{penalty}" if penalty else "") for step in (1000, 2000)]
        write_csv(folder / "metrics.csv", columns, rows)
    drawn = []
    original = plot.draw_band

    def recording(axis, runs, label, color):
        drawn.append((label, [values.tolist() for _, values in runs]))
        original(axis, runs, label, color)

    monkeypatch.setattr(plot, "draw_band", recording)
    levels = []
    original_level = plot.plt.Axes.axhline
    monkeypatch.setattr(plot.plt.Axes, "axhline", lambda axis, y, **style: levels.append((y, style["label"])) or
                        original_level(axis, y, **style))
    figure = tmp_path / "fig.png"
    plot.main(plot.Args(series=[f"hopper:Off2OnRL={tmp_path}/off2on/s*/eval.csv",
                                f"hopper:UPQ={tmp_path}/upq/s*/eval.csv"], figure=str(figure),
                        table=str(tmp_path / "t.md"), diagnostics=True, ensemble_level=True))
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert drawn == [  # scores, then U, Q^E and (UPQ only) beta U / |y| per seed, against env steps
        ("Off2OnRL", [[10.0, 20.0, 30.0]]), ("Off2OnRL", [[1.0, 1.0]]), ("Off2OnRL", [[100.0, 100.0]]),
        ("UPQ", [[10.0, 20.0, 30.0], [16.0, 20.0, 30.0]]), ("UPQ", [[1.0, 1.0], [2.0, 2.0]]),
        ("UPQ", [[100.0, 100.0], [200.0, 200.0]]),
        ("UPQ", [[0.001, 0.001], [0.003, 0.003]]),
    ]
    assert levels == [(12.0, "pre-trained ensemble, step 0 (12.0)")]  # --ensemble-level: the mean of 10, 10, 16
    metrics = plot.read_metrics(str(tmp_path / "upq" / "s2" / "eval.csv"))
    assert metrics["penalty_fraction"].tolist() == [0.003, 0.003] and metrics["step"].tolist() == [1000, 2000]
    assert plot.read_metrics(str(tmp_path / "none" / "eval.csv")) is None
