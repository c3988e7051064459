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
    # cql_pretrain.py rows: one per agent; a seed's score is the mean over its agents
    write_csv(tmp_path / "cql" / "eval.csv", "step,agent,return,normalized_score",
              ["0,0,1,1.0", "0,1,1,3.0", "500,0,1,4.0", "500,1,1,8.0"])
    table, figure = tmp_path / "table.md", tmp_path / "fig.png"
    plot.main(plot.Args(series=[f"hopper:CQL={tmp_path}/cql/eval.csv", f"hopper:UPQ={tmp_path}/upq/s*/eval.csv"],
                        figure=str(figure), table=str(table)))
    lines = table.read_text().splitlines()
    assert lines[0] == "| dataset | CQL | UPQ |"
    assert lines[2] == "| hopper | 6.0 ± 0.0 (n=1) | 30.0 ± 10.0 (n=2) |"
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:4] == b"\x89PNG"


def test_a_series_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="matches no file"):
        plot.main(plot.Args(series=[f"hopper:UPQ={tmp_path}/none/*.csv"], figure=str(tmp_path / "f.png"),
                            table=str(tmp_path / "t.md")))
