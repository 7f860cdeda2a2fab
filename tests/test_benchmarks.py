"""The step benchmark runs end to end on a tiny grid and reports every variant against dense."""

import pytest

from benchmarks import step


def test_the_step_benchmark_times_every_variant_against_dense(tmp_path):
    rows = step.main(["--widths", "32", "--ranks", "4", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert [row["variant"] for row in rows] == list(step.VARIANTS)
    reference, dense, vanilla = rows[:3]
    assert reference["step_x"] == reference["peak_x"] == reference["gflop_x"] == reference["flop_limit"] == 1.0
    assert dense["params"] == reference["params"] and dense["flop_limit"] == 1.0  # the same network, ours
    assert all(row["step_ms"] > 0 and row["gflop"] > 0 for row in rows)
    assert vanilla["params"] < reference["params"] and vanilla["flop_limit"] < 1.0  # rank 4 of 32
    assert [row["variant"] for row in rows if "top_operations" in row] == [step.PROFILED]
    table = (tmp_path / "step.md").read_text()
    assert all(f"| {variant} |" in table for variant in step.VARIANTS)
    assert (tmp_path / "step.csv").read_text().startswith(",".join(step.COLUMNS))


def test_unknown_variants_are_refused_with_the_allowed_ones(capsys):
    with pytest.raises(SystemExit):
        step.parse_args(["--variants", "dlrt-adaptive/every-10"])
    assert "dlrt-adaptive/<kls|single-pass>/every-<k>" in capsys.readouterr().err
    assert step.basis_interval("dlrt-adaptive/single-pass/every-5") == 5
    assert step.basis_interval("dlrt-adaptive/kls") == 1
