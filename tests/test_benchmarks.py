"""The step benchmark runs end to end on a tiny grid and reports every variant against dense."""

from benchmarks import step


def test_the_step_benchmark_times_every_variant_against_dense(tmp_path):
    rows = step.main(["--widths", "32", "--ranks", "4", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert [row["variant"] for row in rows] == list(step.VARIANTS)
    assert rows[0]["step_x"] == rows[0]["peak_x"] == rows[0]["gflop_x"] == 1.0
    assert all(row["step_ms"] > 0 and row["gflop"] > 0 for row in rows)
    assert rows[1]["params"] < rows[0]["params"]  # vanilla rank 4 of 32
    table = (tmp_path / "step.md").read_text()
    assert all(f"| {variant} |" in table for variant in step.VARIANTS)
    assert (tmp_path / "step.csv").read_text().startswith(",".join(step.COLUMNS))
