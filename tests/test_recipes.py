"""lowrank.engine.experiments.recipes: figure (h)'s claims judged against the seed spread."""

from types import SimpleNamespace

import pandas as pd
import pytest

from lowrank.engine import summary
from lowrank.engine.experiments import recipes

RECIPES = ("dense", "random", "random, seed 1", "random, flat", "spectral", "spectral-ones", "spectral + L2 on factors",
           "spectral + Frobenius decay", "warm start")


def result(name: str, accuracy: float, erank: float, start: float = 64.0) -> SimpleNamespace:
    """A trained model as figure (h) has it: three epochs from effective rank ``start`` to ``erank``, the warm
    start factorised after the first."""
    history = pd.DataFrame({"epoch": [0, 1, 2], "erank_0": [start, erank, erank], "erank_1": [start, erank, erank],
                            "val_accuracy": [0.1, 0.5, 0.9], "train_seconds_cum": [0.0, 1.0, 2.0],
                            "phase": ["warm-up", "warm-up", "low-rank"]})
    return SimpleNamespace(config=SimpleNamespace(name=name), test_accuracy=accuracy / 100, history=history)


def dataset(name: str, accuracy: dict[str, float], erank: dict[str, float] | None = None) -> list:
    erank = erank or {}
    return [result(f"{name}: {recipe}", accuracy[recipe], erank.get(recipe, 50.0)) for recipe in RECIPES]


def accuracies(**changes) -> dict[str, float]:
    base = dict.fromkeys(RECIPES, 90.0) | {"random, seed 1": 90.5}  # seed spread 0.5 points
    return base | {key.replace("_", " "): value for key, value in changes.items()}


def test_each_claim_needs_a_difference_beyond_the_seed_spread():
    mnist = dataset("MNIST", accuracies(spectral=91.0) | {"spectral-ones": 90.8, "warm start": 91.6},
                    {"spectral + Frobenius decay": 52.0, "random, seed 1": 50.5})
    fashion = dataset("Fashion-MNIST", accuracies(spectral=90.4) | {"spectral-ones": 89.0, "warm start": 91.0})
    values, table = recipes.findings(mnist + fashion, "fig_z")
    assert values["fig_z_c1_verdict"].text == "holds on MNIST only"  # +1.0 > 0.5; +0.4 is within it
    assert values["fig_z_c2_verdict"].text == "holds on MNIST only"  # |-0.2| <= 0.5; |-1.4| is not
    assert values["fig_z_c3_verdict"].text == "holds on MNIST only"  # erank +2 > spread 0.5; +0 is not
    assert values["fig_z_c4_verdict"].text == "holds on both datasets"  # +0.6 over the better of random, spectral
    assert values["fig_z_mnist_seed_spread_points"] == 0.5
    assert values["fig_z_fashion_mnist_warm_start_best_of_random_spectral_points"] == 0.6
    assert list(table.columns) == ["MNIST", "Fashion-MNIST"] and table.loc["spectral - random (points)", "MNIST"] == 1.0
    assert values["fig_z_mnist_warm_switch_accuracy"] == 50.0  # the last warm-up epoch
    assert repr(values["fig_z_total_seconds"]) == "36.0 s" and values["fig_z_models"] == 18  # 18 models of 2 s
    assert values["fig_z_bias_verdict"].text == "holds on both datasets"  # from 64 to 50: far beyond the spread
    assert values["fig_z_mnist_erank_random_flat_at_epoch_0"] == 64.0 and values["fig_z_mnist_erank_random_flat"] == 50.0


def test_a_flat_start_whose_effective_rank_stays_within_the_seed_spread_shows_no_bias():
    flat = {"random, seed 1": 49.0, "random, flat": 63.5}  # erank spread 1.0 (random 50 vs 49); flat falls by 0.5
    values, _ = recipes.findings(dataset("MNIST", accuracies(), flat) + dataset("Fashion-MNIST", accuracies()), "fig_z")
    assert values["fig_z_bias_verdict"].text == "holds on Fashion-MNIST only"


def test_verdict_names_where_a_claim_holds():
    assert recipes.verdict({"MNIST": True, "Fashion-MNIST": True}).text == "holds on both datasets"
    assert recipes.verdict({"MNIST": False, "Fashion-MNIST": True}).text == "holds on Fashion-MNIST only"
    assert recipes.verdict({"MNIST": False, "Fashion-MNIST": False}).text == "holds on neither dataset"


def test_the_initial_norms_are_seeded_and_the_spectral_ones_norm_is_the_rank():
    norms = recipes.initial_norms()
    assert norms == recipes.initial_norms()
    assert norms["spectral-ones"] == pytest.approx(64.0)  # U V^T with orthonormal U, V of rank 64
    assert isinstance(summary.total_seconds([]), summary.Seconds)
