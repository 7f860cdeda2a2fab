"""The step benchmark (lowrank.engine.experiments.benchmark) runs end to end on a tiny grid and reports every variant against
dense; its TOML files (figure kind "step-benchmark") are validated with errors that name the key.

No timing is asserted: only what does not depend on the machine (parameters, FLOPs, the rows and columns).
"""

from pathlib import Path

import pytest
import torch

from lowrank.engine import report
from lowrank.engine.experiments import benchmark
from lowrank.engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "notebooks" / "configs" / "fig_n.toml"


def test_the_step_benchmark_times_every_variant_against_dense(tmp_path):
    rows = benchmark.main(["--widths", "32", "--ranks", "4", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert [row["variant"] for row in rows] == list(benchmark.VARIANTS)
    reference, dense, vanilla = rows[:3]
    assert reference["step_x"] == reference["peak_x"] == reference["gflop_x"] == reference["flop_limit"] == 1.0
    assert dense["params"] == reference["params"] and dense["flop_limit"] == 1.0  # the same network, ours
    assert all(row["step_ms"] > 0 and row["gflop"] > 0 for row in rows)
    assert vanilla["params"] < reference["params"] and vanilla["flop_limit"] < 1.0  # rank 4 of 32
    assert [row["variant"] for row in rows if "top_operations" in row] == [benchmark.PROFILED]
    table = (tmp_path / "step.md").read_text()
    assert all(f"| {variant} |" in table for variant in benchmark.VARIANTS)
    assert table.startswith("# Step benchmark\n\n`python -m lowrank benchmark --widths 32")
    assert (tmp_path / "step.csv").read_text().startswith(",".join(benchmark.COLUMNS))


def test_an_every_k_variant_is_timed_and_counted_per_step_of_whole_cycles():
    x, y = torch.rand(16, benchmark.IN_FEATURES), torch.randint(0, benchmark.CLASSES, (16,))
    every = benchmark.make_case("dlrt-adaptive/single-pass/every-3", 24, 4, x, y)
    full = benchmark.make_case("dlrt-adaptive/single-pass", 24, 4, x, y)
    assert (every.steps, full.steps) == (3, 1)
    benchmark.time_interleaved([every], warmup=0, reps=2)
    # two whole cycles of 3 steps (the layers end truncated, between cycles), timed per step
    assert not every.optimizer.dlrt.mid_cycle and every.optimizer.dlrt.state_dict()["dlrt_truncations"] == 2
    assert len(every.seconds) == 2
    # A cycle is one augmentation, three S-steps on the augmented bases and one truncation: per step, fewer FLOPs
    # than a full step.
    assert benchmark.pass_flops(every) < benchmark.step_flops(every) < benchmark.step_flops(full)


def test_the_table_formats_the_columns_asked_for():
    row = dict(width=64, rank=8, variant="vanilla", step_ms=1.234, step_x=0.5, flop_limit=0.25, params=12345)
    frame = benchmark.table([row], ["width", "rank", "variant", "step_x", "peak_mb", "params"])
    assert list(frame.columns) == ["width", "rank", "variant", "step x torch dense", "params"]  # no peak_mb measured
    assert frame.iloc[0].tolist() == ["64", "8", "vanilla", "0.500", "12,345"]


def test_targets_are_judged_only_where_the_run_measured_them():
    row = dict(width=512, rank=20, batch=232, threads=1, variant=benchmark.DEFAULT_CYCLE, step_x=0.3)
    (target,) = benchmark.target_results([row, {**row, "threads": 2, "step_x": 0.1},
                                          {**row, "variant": benchmark.PROFILED, "step_x": 0.1}])
    assert target == dict(width=512, rank=20, variant=benchmark.DEFAULT_CYCLE, limit=0.25, ratio=0.3, met=False)
    assert benchmark.target_lines([row])[0].endswith("(target <= 0.25): MISSED")


def test_unknown_variants_are_refused_with_the_allowed_ones(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--variants", "dlrt-adaptive/every-10"])
    assert "dlrt-adaptive/<kls|single-pass>/every-<k>" in capsys.readouterr().err
    assert benchmark.basis_interval("dlrt-adaptive/single-pass/every-5") == 5
    assert benchmark.basis_interval("dlrt-adaptive/kls") == 1


def test_the_command_line_builds_the_experiment():
    experiment, out = benchmark.parse_args(["--full", "--ranks", "7", "--no-memory", "--out", "somewhere"])
    assert experiment.widths == benchmark.FULL["widths"] and experiment.ranks == (7,)  # explicit options win
    assert not experiment.memory and experiment.device == "cpu" and out == Path("somewhere")
    assert benchmark.parse_args([])[0] == benchmark.BenchmarkExperiment()


def test_cuda_asked_for_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--device", "cuda"])
    assert "--device: device cuda was asked for, but torch" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"torch\.cuda\.is_available\(\) is False\); use device cpu"):
        benchmark.run(benchmark.BenchmarkExperiment(widths=(8,), ranks=(2,), device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_benchmark_runs_on_cuda():
    rows = benchmark.run(benchmark.BenchmarkExperiment(widths=(64,), ranks=(8,), reps=2, warmup=1, device="cuda"))
    assert [row["variant"] for row in rows] == [benchmark.REFERENCE, *benchmark.BenchmarkExperiment().variants]
    assert all(row["step_ms"] > 0 and row["peak_mb"] > 0 for row in rows)
    assert rows[2]["flop_limit"] < 1.0  # vanilla, rank 8 of 64


def test_the_figure_config_is_a_step_benchmark_and_its_quick_run_is_smaller():
    assert "fig_n" in {figure.name for figure in report.discover(ROOT)}
    assert report.figure_kind(CONFIG) == "step-benchmark"
    full, quick = report.validate(CONFIG), benchmark.load_experiment(CONFIG, quick=True)
    assert isinstance(full, benchmark.BenchmarkExperiment) and full.variants == quick.variants
    assert max(quick.widths) < min(full.widths) and quick.reps < full.reps
    assert {target[:2] for target in benchmark.TARGETS} <= {(w, r) for w in full.widths for r in full.ranks}
    figure = next(f for f in report.discover(ROOT) if f.name == "fig_n")
    assert report.estimated_work(figure) == 0.0 and list(report.figure_keys(figure)) == ["config"]


KIND = '[figure]\nkind = "step-benchmark"\n'


@pytest.mark.parametrize("text, message", [
    (KIND + "[grid]\nwidth = [512]", r"grid\.width is not a key of \[grid\] \(did you mean \"widths\"\?\); allowed keys: widths, ranks, batch"),
    (KIND + '[grid]\nvariants = ["dense", "dlrt/kls"]',
     r'grid\.variants\[1\] = "dlrt/kls" is unknown; allowed: a non-empty list of torch-dense, dense' ),
    (KIND + "[grid]\nwidths = [0, 512]", r"grid\.widths\[0\] = 0 is too small; allowed: a non-empty list of integers >= 1"),
    (KIND + "[grid]\nwidths = 512", r"grid\.widths = 512 has the wrong type; allowed: a non-empty list of integers"),
    (KIND + '[protocol]\ndevice = "gpu"', r'protocol\.device = "gpu" is unknown.*; allowed: "cpu" \| "cuda"'),
    (KIND + "[protocol]\nreps = 0", r"protocol\.reps = 0 is too small; allowed: an integer >= 1"),
    (KIND + "[quick]\nwidths = [16]", r"the quick run has rank 100, larger than every width \[16\]"),
    (KIND + "[timing]\nreps = 3", r"unknown top-level key 'timing'; allowed: \[figure\], \[grid\], \[protocol\]"),
    ('[figure]\nkind = "matrix-ode"', r'figure\.kind = .* allowed: "step-benchmark"'),
])
def test_config_errors_name_the_file_the_key_and_the_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        benchmark.load_experiment(path)
    assert str(error.value).startswith(str(path))


def test_the_report_s_benchmark_measures_the_schedule_its_targets_judge():
    """Figure (n) times the report's default cycle (benchmark.DEFAULT_CYCLE, from Settings.basis_interval), so that
    its targets are judged on every run of the record."""
    experiment = benchmark.load_experiment(ROOT / "notebooks" / "configs" / "fig_n.toml", quick=False)
    assert benchmark.DEFAULT_CYCLE in experiment.variants
    assert {(width, rank) for width, rank, _, _ in benchmark.TARGETS} <= {
        (w, r) for w in experiment.widths for r in experiment.ranks}

