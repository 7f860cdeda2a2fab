"""lowrank.engine.experiments.analysis: truncation to the epsilon-rank."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lowrank import metrics
from lowrank.engine.experiments import analysis
from lowrank.layers import Dense, LowRank
from lowrank.network import NeuralNetwork, effective_weight

torch.set_num_threads(1)


def test_truncated_svd_is_the_best_approximation_with_the_tail_as_error():
    torch.manual_seed(0)
    w = torch.randn(20, 12, dtype=torch.float64)
    sigma = torch.linalg.svdvals(w)
    p, s, q = analysis.truncated_svd(w, 5)
    assert p.shape == (20, 5) and s.shape == (5,) and q.shape == (12, 5)
    error = torch.linalg.matrix_norm(w - (p * s) @ q.T)
    assert error.item() == pytest.approx(sigma[5:].norm().item(), rel=1e-10)
    with pytest.raises(ValueError, match="rank = 13"):
        analysis.truncated_svd(w, 13)


def test_truncated_network_at_full_rank_computes_the_same_function():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), LowRank(5, 4, rank=2), Dense(4, 3)], ["relu", "relu", "identity"]).eval()
    copy = analysis.truncated_network(model, [5, 2, 3])
    x = torch.randn(9, 6)
    assert torch.allclose(copy(x), model(x), atol=1e-5)
    assert all(isinstance(layer, Dense) for layer in copy.layers)
    low = analysis.truncated_network(model, [1, 1, 1])
    assert [metrics.epsilon_rank(metrics.layer_singular_values(l), 1e-6) for l in low.layers] == [1, 1, 1]
    assert torch.equal(effective_weight(model.layers[0]), model.layers[0].weight.detach())  # model unchanged


def test_truncation_table_loses_nothing_at_a_tiny_tolerance():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), Dense(5, 3)], ["relu", "identity"])
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    table = analysis.truncation_table(model, x, y, [1e-9, 0.99])
    assert list(table.columns) == ["eps", "rank_0", "rank_1", "factor_fraction", "accuracy", "accuracy_lost"]
    assert table.loc[0, ["rank_0", "rank_1"]].tolist() == [5, 3]
    assert table.loc[0, "accuracy_lost"] == 0.0
    assert table.loc[0, "accuracy"] == metrics.model_accuracy(model, x, y)
    assert table.loc[1, ["rank_0", "rank_1"]].tolist() == [0, 0]  # no sigma_i / ||W||_F above 0.99
    assert table.loc[0, "factor_fraction"] == pytest.approx((5 * 11 + 3 * 8) / (30 + 15))
    assert math.isclose(table.loc[1, "factor_fraction"], 0.0)


def decay_run(name: str, weight_decay: float, eps_ranks: list[int], nc1: list[float]) -> SimpleNamespace:
    """A finished run of figure (i): two epochs, two layers 6 -> 4 -> 3."""
    history = pd.DataFrame({"train_accuracy": [0.5, 0.9], "train_seconds_cum": [0.0, 1.5],
                            **{f"epsrank_{i}": [3, r] for i, r in enumerate(eps_ranks)},
                            **{f"erank_{i}": [3.0, r - 0.5] for i, r in enumerate(eps_ranks)},
                            **{f"nc1_{i}": [1.0, v] for i, v in enumerate(nc1)}})
    settings = SimpleNamespace(num_epochs=2, subset=1000, batch_size=100, learning_rate=0.1, weight_decay=weight_decay,
                               dataset="mnist")
    model = NeuralNetwork([Dense(6, 4), Dense(4, 3)], ["relu", "identity"])
    return SimpleNamespace(config=SimpleNamespace(name=name, settings=settings), history=history, model=model,
                           test_accuracy=0.9)


def decay_runs(decay_ranks: list[int], nc1_of_rank) -> list:
    names = [*analysis.DECAY_RUNS, "wd 0.01, batch 128", "wd 0.01, lr 0.03", "wd 0.01, lr 0.2"]
    ranks = dict(zip(analysis.DECAY_RUNS, decay_ranks)) | {"wd 0.01, batch 128": 9, "wd 0.01, lr 0.03": 9,
                                                          "wd 0.01, lr 0.2": 1}
    decay = {"wd 0": 0.0, "wd 0.003": 0.003, "wd 0.02": 0.02}
    return [decay_run(n, decay.get(n, 0.01), [ranks[n] // 2, ranks[n] - ranks[n] // 2],
                      [1.0, nc1_of_rank(ranks[n] - ranks[n] // 2)]) for n in names]


def truncation(results) -> dict:
    return {r.config.name: pd.DataFrame({"eps": [1e-3, 1e-2, 1e-1], "accuracy": [0.9, 0.85, 0.5],
                                         "accuracy_lost": [0.0, 0.05, 0.4], "factor_fraction": [0.8, 0.5, 0.1]})
            for r in results}


def test_figure_i_verdicts_need_strict_trends_and_read_the_sign_of_the_correlation():
    results = decay_runs([8, 6, 4, 2], nc1_of_rank=lambda rank: 0.05 * rank)  # NC1 falls with the rank
    values, lost = analysis.decay_findings(results, truncation(results), "fig_z")
    assert values["fig_z_decay_ranks"] == [8, 6, 4, 2] and values["fig_z_decay_verdict"].text == "holds"
    assert values["fig_z_batch_ranks"] == [4, 9] and values["fig_z_batch_verdict"].text == "holds"
    assert values["fig_z_lr_ranks"] == [9, 4, 1] and values["fig_z_lr_verdict"].text == "holds"
    assert values["fig_z_nc1_rank_rho"] > 0 and values["fig_z_nc1_rank_verdict"].text.startswith("positive")
    assert values["fig_z_nc1_state"].text.startswith("close to collapse")  # NC1 0.05 in a run
    assert list(lost.columns) == ["lost at 0.001 (points)", "lost at 0.01 (points)", "lost at 0.1 (points)"]
    assert values["fig_z_lost_max_1e1"] == 40.0 and values["fig_z_kept_min_1e3"] == 80.0
    assert values["fig_z_kept_max_1e2"] == 50.0 and values["fig_z_kept_min_1e1"] == 10.0
    assert repr(values["fig_z_compressed_1e3"]).startswith("wd 0; wd 0.003; ")  # every run keeps 80 % < 100 %
    uncompressed = {name: table.assign(factor_fraction=[1.2, 0.5, 0.1]) for name, table in truncation(results).items()}
    values, _ = analysis.decay_findings(results, uncompressed, "fig_z")
    assert repr(values["fig_z_compressed_1e3"]) == "none" and repr(values["fig_z_compressed_1e2"]).startswith("wd 0; wd 0.003; ")

    results = decay_runs([8, 6, 6, 2], nc1_of_rank=lambda rank: 1.0 / rank)  # a tie; NC1 rises as the rank falls
    values, _ = analysis.decay_findings(results, truncation(results), "fig_z")
    assert values["fig_z_decay_verdict"].text == "does not hold"
    assert values["fig_z_nc1_rank_rho"] < 0 and values["fig_z_nc1_rank_verdict"].text == "not positive"


def test_the_decay_table_states_eta_lambda_t_and_the_truncated_accuracy():
    results = decay_runs([8, 6, 4, 2], nc1_of_rank=lambda rank: 0.5)
    values, table = analysis.decay_table(results, truncation(results), "fig_z")
    assert table.loc["wd 0.01", "steps T"] == 20 and table.loc["wd 0.01", "eta lambda T"] == 0.02
    assert table.loc["wd 0", "eps-ranks"] == "[4, 4]" and table.loc["wd 0", "truncated accuracy (%)"] == 90.0
    assert values["fig_z_wd_0_01_eps_ranks"] == [2, 2] and values["fig_z_wd_0_lost"] == 0.0


def test_a_gaussian_core_is_worse_conditioned_at_a_larger_rank_and_a_flat_one_not_at_all():
    assert analysis.initial_core_condition(100) > analysis.initial_core_condition(50) > 10
    assert analysis.initial_core_condition(100, init="kaiming-flat") == pytest.approx(1.0)


def test_figure_b_names_the_remedies_that_lift_rank_100_beyond_the_seed_spread(make_result):
    def seeds(name, accuracies, gap=0.0):
        results = [make_result(name, s, [0.1, a], [100, 100]) for s, a in enumerate(accuracies)]
        for result in results:
            result.history["val_accuracy"] = result.history["train_accuracy"] - gap
        return results

    results = (seeds("vanilla r=50", [0.974, 0.975]) + seeds("vanilla r=100", [0.970, 0.972], gap=0.01)
               + seeds("vanilla r=100 (lr 0.0005)", [0.976, 0.977]) + seeds("vanilla r=100 (flat start)", [0.971, 0.973]))
    values = analysis.vanilla_rank_findings(results, "fig_z")
    assert repr(values["fig_z_half_lr_vs_r100"]) == "above" and repr(values["fig_z_half_lr_vs_r50"]) == "above"
    assert repr(values["fig_z_flat_vs_r100"]).startswith("within")
    assert repr(values["fig_z_remedies"]) == "half the learning rate"
    assert values["fig_z_gap_r100"] == 1.0 and values["fig_z_gap_r50"] == 0.0
