"""The rank study of figure (p): scale spreads, the grid table and verdict, and the dense network's tau-ranks."""

from types import SimpleNamespace

import pandas as pd

from lowrank.engine.experiments import rank_study


def run(ranks_by_epoch: list[list[int]]) -> SimpleNamespace:
    """A result whose history holds the hidden ranks of each epoch (and an output layer's column)."""
    history = pd.DataFrame([{"epoch": e, "rank_0": r0, "rank_1": r1, "rank_2": 10}
                            for e, (r0, r1) in enumerate(ranks_by_epoch)])
    return SimpleNamespace(history=history)


def stats(*ranks: list[int]) -> dict:
    return {"ranks": [list(r) for r in ranks]}


def test_the_scale_spread_is_the_largest_ratio_of_mean_ranks_over_the_layers():
    # layer 0 means 50, 40, 30 (ratio 1.67); layer 1 means 60, 55, 50 (1.2)
    assert rank_study.scale_spread([stats([48, 60], [52, 60]), stats([40, 55]), stats([30, 50])]) == 50 / 30
    assert rank_study.mean_ranks(stats([48, 60], [52, 58])) == [50.0, 59.0]


def test_a_run_reaches_r_max_if_any_hidden_layer_of_any_seed_touches_it_at_any_epoch():
    assert rank_study.reaches_r_max([run([[128, 128], [256, 100], [90, 90]])], 256)
    assert not rank_study.reaches_r_max([run([[128, 128], [255, 100]]), run([[128, 128], [60, 61]])], 256)


def test_the_grid_table_meets_the_criterion_only_without_run_away_and_within_the_bound():
    def seeds(*finals):
        costs = {"parameters": 1000, "compression": 0.5, "flops_per_sample": 1e5, "train_seconds_cum": 1.0}
        return [SimpleNamespace(test_accuracy=0.97, history=run([[128, 128], list(f)]).history.assign(**costs))
                for f in finals]

    groups = {rank_study.grid_name("mnist", 0.001, c): members for c, members in
              ((1.0, seeds([60, 60], [62, 58])), (0.2, seeds([50, 50], [52, 52])), (0.05, seeds([44, 45], [46, 45])))}
    groups.update({rank_study.grid_name("mnist", 0.003, c): members for c, members in
                   ((1.0, seeds([60, 60])), (0.2, seeds([70, 70])), (0.05, seeds([256, 250])))})
    table = rank_study.scale_table(groups, ["mnist"], [0.001, 0.003], [1.0, 0.2, 0.05], r_max=256)
    assert list(table["criterion"]) == ["met", "missed"]
    assert list(table["reached r_max"]) == ["no", "yes"]
    assert table.loc[("mnist", 0.001), "scale spread"] == round(61 / 45, 2)  # layer 0: means 61, 51, 45
    assert table.loc[("mnist", 0.001), "scale 0.05"] == "45, 45 (97.00 %)"


def test_factor_spreads_vary_one_factor_at_a_time():
    names = {}
    for dataset, base in (("mnist", 40), ("fashion-mnist", 44)):
        for rate, bump in ((0.001, 0), (0.003, 20)):
            for scale, extra in ((1.0, 10), (0.2, 0)):
                names[rank_study.grid_name(dataset, rate, scale)] = stats([base + bump + extra, 50])
    spreads = rank_study.factor_spreads(names, ["mnist", "fashion-mnist"], [0.001, 0.003], [1.0, 0.2])
    assert spreads["learning rate"] == 60 / 40  # mnist at scale 0.2: 40 -> 60
    assert spreads["initial scale"] == 50 / 40  # mnist at lr 0.001: 40 -> 50
    assert spreads["dataset"] == 44 / 40


def test_the_dense_tau_rank_of_each_epoch_is_the_truncation_s_rank_of_the_stored_singular_values():
    rows = []
    for epoch, values in enumerate(([4.0, 3.0, 2.0, 1.0], [4.0, 0.1, 0.1, 0.1])):
        rows += [{"epoch": epoch, "layer": layer, "index": i, "value": v}
                 for layer in (0, 1, 2) for i, v in enumerate(values)]
    result = SimpleNamespace(spectra=pd.DataFrame(rows), config=SimpleNamespace(name="dense"))
    table = rank_study.dense_tau_ranks(result, tau=0.1)
    # ||d[3:]|| = 1 > 0.1 * sqrt(30): rank 4 at epoch 0; ||d[1:]|| = 0.17 <= 0.1 * 4.0: rank 1 at epoch 1
    assert list(table["epoch"]) == [0, 1] and list(table["rank_0"]) == [4, 1] and list(table["rank_1"]) == [4, 1]
    assert "rank_2" not in table
