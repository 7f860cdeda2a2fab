"""What notebooks show and glue (lowrank.engine.summary): durations, seed statistics, verdicts."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from lowrank.engine import config, summary


def test_glued_values_print_as_the_book_shows_them():
    assert repr(summary.Seconds(12.345)) == "12.3 s"
    assert repr(summary.Text("dense and vanilla r=20")) == "dense and vanilla r=20"
    assert summary.slug("dynamical tau=0.1") == "dynamical_tau_0_1"


def test_glue_results_gives_each_models_numbers_and_its_hidden_layers_ranks(monkeypatch):
    import myst_nb

    from lowrank.engine.training import TrainingResult

    model = config.loads(
        """
        [[layer]]
        type = "dynamical"
        dims = [784, 64]
        rank = 32
        r_max = 48
        [[layer]]
        type = "lowrank"
        dims = [64, 64]
        rank = 8
        [[layer]]
        type = "dense"
        dims = [64, 10]
        activation = "identity"
        """,
        "dlrt net.toml",
    ).models[0]
    history = pd.DataFrame({
        "epoch": [0, 1], "parameters": [1000, 900], "compression": [0.5, 0.55], "train_seconds_cum": [0.0, 3.25],
        "rank_0": [32, 20], "rank_1": [8, 8], "rank_2": [10, 10],
    })
    result = TrainingResult(model, history, test_loss=0.1, test_accuracy=0.98765, model=None, path=Path("."))
    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda key, value, display=True: glued.__setitem__(key, value))
    summary.glue_results("fig_z", [result])
    key = f"fig_z_{summary.slug(model.name)}"
    assert glued[f"{key}_test_accuracy"] == 98.77
    assert (glued[f"{key}_parameters"], glued[f"{key}_compression"]) == (900, 55.0)
    assert repr(glued[f"{key}_seconds"]) == "3.2 s"
    assert glued[f"{key}_ranks"] == [20, 8]
    assert glued[f"{key}_initial_ranks"] == [32, 8]
    assert glued[f"{key}_max_ranks"] == [48, 8]


def test_trend_and_compare_count_a_change_only_beyond_the_sum_of_the_seed_spreads():
    assert summary.trend((97.0, 0.1), (96.5, 0.2)) == "falls"
    assert summary.trend((97.0, 0.3), (96.5, 0.3)) == "does not change beyond the seed spread"
    assert summary.trend((96.5, 0.1), (97.0, 0.1)) == "rises"
    assert summary.compare((97.5, 0.1), (97.0, 0.1)) == "above"
    assert summary.compare((96.5, 0.1), (97.0, 0.1)) == "below"
    assert summary.compare((97.1, 0.1), (97.0, 0.1)) == "within the seed spread of"


def test_ranks_differ_when_some_layer_s_seed_ranges_do_not_overlap():
    first = {"ranks": [[40, 50], [42, 51]]}
    assert summary.ranks_differ(first, {"ranks": [[41, 53], [40, 52]]})  # second layer: 50-51 against 52-53
    assert not summary.ranks_differ(first, {"ranks": [[42, 51], [44, 49]]})  # both layers overlap
    assert not summary.ranks_differ(first, first)


def test_ranks_at_least_needs_every_layer_s_lowest_seed_at_or_above_the_other_s_highest():
    k1 = {"ranks": [[47, 52], [46, 47]]}
    assert summary.ranks_at_least({"ranks": [[61, 72], [52, 70]]}, k1)
    assert not summary.ranks_at_least({"ranks": [[61, 72], [46, 70]]}, k1)  # layer 0: 46 < 47
    assert summary.ranks_at_least(k1, k1) is False and summary.ranks_at_least({"ranks": [[47, 52]]}, {"ranks": [[47, 52]]})


def test_epochs_at_max_rank_counts_the_epochs_a_dynamical_layer_ends_clamped_at_r_max():
    model = config.loads("""
[[layer]]
type = "dynamical"
dims = [784, 64]
rank = 16
r_max = 32
[[layer]]
type = "dense"
dims = [64, 10]
activation = "identity"
""").models[0]
    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "rank_0": [16, 32, 32, 30], "rank_1": [10, 10, 10, 10]})
    assert summary.epochs_at_max_rank(SimpleNamespace(config=model, history=history)) == 2
    history["rank_0"] = [32, 31, 20, 12]  # the untrained network (epoch 0) does not count
    assert summary.epochs_at_max_rank(SimpleNamespace(config=model, history=history)) == 0


def test_basis_intervals_are_judged_against_k_1_and_against_dense():
    def stats(accuracy, spread, ranks, seconds):
        return {"test_accuracy": accuracy, "spread": spread, "ranks": ranks, "seconds": seconds}

    models = {1: "k=1", 2: "k=2", 5: "k=5", 10: "k=10"}
    stats_of = {
        "dense": stats(98.0, 0.05, [[512, 512], [512, 512]], 20.0),
        "k=1": stats(97.9, 0.05, [[47, 50], [48, 50]], 50.0),
        "k=2": stats(97.85, 0.05, [[47, 51], [48, 50]], 30.0),  # within the spread of k=1 (0.05 <= 0.05 + 0.05)
        "k=5": stats(97.75, 0.05, [[47, 50], [49, 50]], 19.0),  # 0.15 below k=1: below; 0.25 below dense
        "k=10": stats(97.85, 0.02, [[30, 31], [30, 32]], 15.0),  # ranks differ from k=1's
    }
    table = summary.basis_interval_table(stats_of, models, "dense")
    assert list(table.index) == [1, 2, 5, 10]
    assert list(table["vs k=1"]) == ["within the seed spread of", "within the seed spread of", "below",
                                     "within the seed spread of"]
    assert list(table["ranks vs k=1"]) == ["do not differ", "do not differ", "do not differ", "differ"]
    assert list(table["time / dense"]) == [2.5, 1.5, 0.95, 0.75]
    assert list(table["target"]) == ["missed", "missed", "missed", "missed"]  # none at most 0.6x dense
    assert list(summary.basis_interval_table({**stats_of, "k=10": stats(97.85, 0.02, [[30, 31], [30, 32]], 12.0)},
                                             models, "dense")["target"]) == ["missed", "missed", "missed", "met"]
    assert list(summary.basis_interval_table({**stats_of, "k=5": stats(97.75, 0.05, [[47, 50]], 10.0)},
                                             models, "dense")["target"])[2] == "missed"  # fast, but below k = 1
    assert list(table["vs dense (points)"]) == [-0.1, -0.15, -0.25, -0.15]  # signed: negative is below dense
    assert table.loc[1, "ranks"] == "[47-48, 50]" and table.loc[1, "train s"] == "50.0 s"
    assert summary.largest_equivalent_interval(table) == 2  # k = 10 passes again, after k = 5 failed
    table.loc[5, "vs k=1"] = "within the seed spread of"
    assert summary.largest_equivalent_interval(table) == 10  # different ranks do not exclude k = 10
    table.loc[2, "vs k=1"] = "below"
    assert summary.largest_equivalent_interval(table) == 1


def test_a_signed_difference_of_points_reads_as_above_or_below():
    assert repr(summary.points_text(0.123)) == "0.12 points above"
    assert repr(summary.points_text(-0.1)) == "0.10 points below"
    assert repr(summary.points_text(0.001)) == repr(summary.points_text(-0.004)) == "0.00 points from"


def sweep_result(name: str, seed: int, accuracy: float, ranks: list[int]) -> SimpleNamespace:
    history = pd.DataFrame({"parameters": [1000], "compression": [0.5], "flops_per_sample": [2e5], "train_seconds_cum": [1.0],
                            **{f"rank_{i}": [r] for i, r in enumerate([*ranks, 10])}})
    return SimpleNamespace(config=SimpleNamespace(name=f"{name} seed={seed}"), test_accuracy=accuracy / 100,
                           history=history)


def test_a_tau_sweep_reads_accuracy_against_the_seed_spread_and_ranks_per_step():
    def sweep(accuracies: dict[str, float], ranks: dict[str, list[int]]) -> dict:
        return summary.tau_sweep_values([sweep_result(name, seed, accuracies[name] + 0.1 * seed, ranks[name])
                                         for name in accuracies for seed in (0, 1)], "fig_z")

    names = ("dense", "dynamical tau=0.05", "dynamical tau=0.1", "dynamical tau=0.2")
    falling = dict(zip(names, ([500, 500], [80, 60], [50, 40], [20, 30])))
    values = sweep(dict(zip(names, (98.0, 97.9, 97.5, 96.0))), falling)
    assert values["fig_z_accuracy_trend"].text == "falls" and values["fig_z_ranks_fall"].text == "fall"
    assert values["fig_z_layers_differ"].text == "differ" and values["fig_z_gap_tau_0_05"] == 0.1
    values = sweep(dict(zip(names, (98.0, 97.9, 97.9, 97.95))), falling | {"dynamical tau=0.2": [50, 50]})
    assert values["fig_z_accuracy_trend"].text == "does not change beyond the seed spread"
    assert values["fig_z_ranks_fall"].text == "do not fall"  # 90 then 100
    assert values["fig_z_layers_differ"].text == "do not always differ"  # [50, 50]


def test_names_text_joins_with_and():
    assert summary.names_text([]).text == "none" and summary.names_text(["a"]).text == "a"
    assert summary.names_text(["a", "b", "c"]).text == "a, b and c"


def test_the_published_comparison_marks_what_lies_within_one_standard_deviation():
    from lowrank.engine import config

    model = config.loads('[[layer]]\ntype = "dynamical"\ndims = [784, 20]\nrank = 8\n'
                         '[[layer]]\ntype = "dense"\ndims = [20, 10]\nactivation = "identity"\n', "m.toml").models[0]
    named = [config.ModelConfig(name, model.settings, model.layers) for name in ("a", "b")]
    results = [SimpleNamespace(config=c, test_accuracy=accuracy / 100, history=pd.DataFrame({"rank_0": [8, r], "rank_1": [10, 10]}))
               for c, accuracy, r in zip(named, (98.1, 97.0), (6, 4))]
    table = summary.published_comparison(results, {"a": (98.16, 0.26, [10]), "b": (97.45, 0.3, None)})
    assert list(table["within the published spread"]) == ["yes", "no"]
    assert list(table["difference (points)"]) == [-0.06, -0.45]
    assert table.loc["a", "ranks"] == "[6]" and table.loc["a", "published (%)"] == "98.16 ± 0.26"
    assert list(table["ranks against published"]) == ["lower", "-"]  # 6 against 10; no published ranks
    assert list(table["ranks within 1.5x"]) == ["no", "-"]  # 10 > 1.5 x 6
    close = summary.published_comparison(results, {"a": (98.16, 0.26, [9]), "b": (97.45, 0.3, [7])})
    assert list(close["ranks within 1.5x"]) == ["yes", "no"]  # 9 <= 1.5 x 6; 7 > 1.5 x 4
    assert summary.target_verdict(table, ["a"]).text == "met" and summary.target_verdict(table, ["a", "b"]).text == "missed"


def test_the_largest_loss_rise_is_found_with_the_ranks_of_its_epoch():
    history = pd.DataFrame({"epoch": range(5), "val_loss": [2.3, 0.5, 0.4, 0.9, 0.3],
                            "rank_0": [10, 8, 8, 4, 4], "rank_1": [10, 10, 10, 10, 10], "rank_2": 10})
    rise = summary.largest_loss_rise(SimpleNamespace(history=history))
    assert rise == {"epoch": 3, "before": 0.4, "after": 0.9, "ranks_before": [8, 10], "ranks_after": [4, 10]}
    falling = history.assign(val_loss=[2.3, 0.5, 0.4, 0.3, 0.2])
    assert summary.largest_loss_rise(SimpleNamespace(history=falling)) == {"epoch": None}


def test_loss_rises_are_counted_apart_for_epochs_that_lowered_a_rank():
    adaptive = pd.DataFrame({"epoch": range(5), "val_loss": [2.3, 0.5, 0.6, 0.9, 0.3],
                             "rank_0": [10, 8, 8, 4, 4], "rank_1": 10})
    fixed = adaptive.assign(rank_0=10)  # never changes rank: left out
    counts = summary.loss_rises_by_rank_change([SimpleNamespace(history=adaptive), SimpleNamespace(history=fixed)])
    # epochs 2-4: epoch 3 lowered a rank and the loss rose; epochs 2 (rose) and 4 (fell) lowered none
    assert counts == {"rank_fell": 1, "rank_fell_loss_rose": 1, "no_rank_fell": 2, "no_rank_fell_loss_rose": 1}


def test_the_loss_spike_reads_as_a_sentence_with_the_counts_beside_it():
    history = pd.DataFrame({"epoch": range(5), "val_loss": [2.3, 0.5, 0.4, 0.9, 0.3],
                            "rank_0": [10, 8, 8, 4, 4], "rank_1": 10})
    result = SimpleNamespace(history=history)
    values = summary.loss_spike_values("fig_z", result, [result])
    assert repr(values["fig_z_spike"]) == "rises most in epoch 3, from 0.400 to 0.900, while the ranks go from [8] to [4]"
    assert values["fig_z_rank_fell"] == 1 and values["fig_z_no_rank_fell_loss_rose"] == 0


def test_names_that_hold_commas_are_listed_with_semicolons():
    assert repr(summary.names_text(["a", "b", "c"])) == "a, b and c"
    assert repr(summary.names_text(["wd 0.01", "wd 0.02", "wd 0.01, lr 0.2"])) == "wd 0.01; wd 0.02 and wd 0.01, lr 0.2"
    assert repr(summary.names_text([])) == "none"


def test_the_last_rank_change_is_the_last_epoch_whose_ranks_differ_from_the_epoch_before():
    history = pd.DataFrame({"epoch": [0, 1, 2, 3, 4], "rank_0": [64, 40, 38, 38, 38], "rank_1": [64, 50, 50, 49, 49],
                            "rank_2": [10, 10, 10, 10, 10]})
    assert summary.last_rank_change(SimpleNamespace(history=history)) == 3
    history["rank_1"] = [64, 50, 50, 50, 50]
    assert summary.last_rank_change(SimpleNamespace(history=history)) == 2
    history["rank_0"] = history["rank_1"] = 64
    assert summary.last_rank_change(SimpleNamespace(history=history)) == 0
