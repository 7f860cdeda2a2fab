"""What decides the rank of a dynamical low-rank network (figure p): tables and verdicts over a grid of runs.

The figure trains figure (a)'s network over initial scales ``c``, learning rates ``h`` and datasets, and reads
three things from the results:

- the *scale spread* of each (dataset, learning rate): for every hidden layer, the largest over the smallest of
  the final ranks of the scales (each the mean over the seeds); the criterion of the report is that it stays
  within :data:`SCALE_SPREAD_BOUND` and that no run ends at ``r_max``;
- the *tau-rank* of a dense network's weights, ``min r`` with ``||sigma[r:]|| <= tau ||sigma||``
  (:func:`lowrank.optim.tolerance_rank`, the rank DLRT's truncation would give that matrix), after every
  epoch, from the singular values a ``track_layers`` run stores;
- whether a run reaches ``r_max`` at any epoch.

Model names follow ``"<dataset> lr=<h> scale=<c>"`` (:func:`grid_name`), with a suffix for the variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from lowrank.engine import summary
from lowrank.optim import tolerance_rank

#: The report's bound on the scale spread: final ranks of the initial scales within this factor of each other.
SCALE_SPREAD_BOUND = 1.5


def grid_name(dataset: str, learning_rate: float, scale: float, suffix: str = "") -> str:
    """The model name of one grid point, e.g. ``"mnist lr=0.001 scale=0.2"`` (``suffix`` appended after a space)."""
    return f"{dataset} lr={learning_rate:g} scale={scale:g}" + (f" {suffix}" if suffix else "")


def mean_ranks(stats: dict) -> list[float]:
    """Each hidden layer's final rank, the mean over the seeds of :func:`summary.seed_statistics`."""
    return [sum(column) / len(column) for column in zip(*stats["ranks"])]


def scale_spread(stats: Sequence[dict]) -> float:
    """The largest, over the hidden layers, of (largest / smallest) mean final rank among ``stats`` (one per
    initial scale)."""
    layers = zip(*(mean_ranks(s) for s in stats))
    return max(max(ranks) / min(ranks) for ranks in layers)


def reaches_r_max(members: Sequence, r_max: int) -> bool:
    """Whether any seed of a model holds a hidden layer at ``r_max`` after any epoch."""
    return any((member.history[summary.hidden_rank_columns(member.history)] >= r_max).any().any()
               for member in members)


def scale_table(groups: dict[str, Sequence], datasets: Sequence[str], rates: Sequence[float],
                scales: Sequence[float], r_max: int, suffix: str = "") -> pd.DataFrame:
    """One row per (dataset, learning rate): each scale's mean final ranks per hidden layer and test accuracy
    (``"52, 51 (97.78 %)"``),
    the scale spread (:func:`scale_spread`), whether a run reached ``r_max`` (:func:`reaches_r_max`) and the
    verdict ``"met"`` when the spread is at most :data:`SCALE_SPREAD_BOUND` and no run reached ``r_max``."""
    rows = []
    for dataset in datasets:
        for rate in rates:
            names = [grid_name(dataset, rate, scale, suffix) for scale in scales]
            stats = [summary.seed_statistics(groups[name]) for name in names]
            spread = scale_spread(stats)
            capped = any(reaches_r_max(groups[name], r_max) for name in names)
            row = {"dataset": dataset, "learning rate": rate}
            for scale, s in zip(scales, stats):  # mean final ranks per hidden layer (test accuracy)
                ranks = ", ".join(f"{rank:.0f}" for rank in mean_ranks(s))
                row[f"scale {scale:g}"] = f"{ranks} ({s['test_accuracy']:.2f} %)"
            row.update({"scale spread": round(spread, 2), "reached r_max": "yes" if capped else "no",
                        "criterion": "met" if spread <= SCALE_SPREAD_BOUND and not capped else "missed"})
            rows.append(row)
    return pd.DataFrame(rows).set_index(["dataset", "learning rate"])


def dense_tau_ranks(result, tau: float, layers: Sequence[int] = (0, 1)) -> pd.DataFrame:
    """The tau-rank of each of ``layers``' weights of a dense run after every epoch, from its stored singular
    values (``result.spectra``: columns epoch, layer, index, value). Columns ``epoch`` and ``rank_<layer>``."""
    if result.spectra is None:
        raise ValueError(f"{result.config.name} stored no spectra: train it with track_layers = true")
    table = {}
    for (epoch, layer), values in result.spectra.groupby(["epoch", "layer"]):
        if layer in layers:
            ordered = values.sort_values("index")["value"].tolist()
            table.setdefault(int(epoch), {})[f"rank_{layer}"] = tolerance_rank(sorted(ordered, reverse=True), tau)
    return pd.DataFrame([{"epoch": epoch, **ranks} for epoch, ranks in sorted(table.items())])


def factor_spreads(stats: dict[str, dict], datasets: Sequence[str], rates: Sequence[float],
                   scales: Sequence[float]) -> dict[str, float]:
    """How far each factor of the grid moves the final ranks: for ``"initial scale"``, ``"learning rate"`` and
    ``"dataset"``, the largest :func:`scale_spread` over the groups of grid points that differ in that factor
    only (``stats``: :func:`summary.seed_statistics` by model name, :func:`grid_name`)."""
    points = [(d, h, c) for d in datasets for h in rates for c in scales]
    factors = {"dataset": 0, "learning rate": 1, "initial scale": 2}
    spreads = {}
    for factor, position in factors.items():
        groups: dict[tuple, list[dict]] = {}
        for point in points:
            rest = point[:position] + point[position + 1:]
            groups.setdefault(rest, []).append(stats[grid_name(*point)])
        spreads[factor] = max(scale_spread(group) for group in groups.values())
    return spreads


# The grid of figure (p) and the names of its controls (notebooks/configs/fig_p.toml).
DATASETS = ("mnist", "fashion-mnist")
RATES = (0.0003, 0.001, 0.003)
SCALES = (1.0, 0.2, 0.05)
CONTROL_RATE = 0.001


def sgd_name(scale: float) -> str:
    return f"mnist sgd lr=0.01 scale={scale:g}"


def tau_name(tau: float) -> str:
    return f"mnist lr={CONTROL_RATE:g} scale=0.2 tau={tau:g}"


def dense_name(scale: float) -> str:
    return f"mnist lr={CONTROL_RATE:g} dense scale={scale:g}"


def _reach(reached: bool) -> summary.Text:
    return summary.Text("reach" if reached else "do not reach")


def grid_values(prefix: str, groups: dict[str, Sequence], r_max: int) -> tuple[pd.DataFrame, dict[str, object]]:
    """The grid's :func:`scale_table` and what the text glues from it: ``{prefix}_seeds``, ``_bound``, ``_grid_met``
    (``"6 of 6"``), ``_grid_largest_spread``, ``_grid_reached``, each factor's :func:`factor_spreads` as
    ``_<factor>_moves`` and ``_largest_factor``."""
    stats = {name: summary.seed_statistics(members) for name, members in groups.items()}
    grid = scale_table(groups, DATASETS, RATES, SCALES, r_max)
    spreads = factor_spreads(stats, DATASETS, RATES, SCALES)
    values: dict[str, object] = {
        f"{prefix}_seeds": next(iter(stats.values()))["seeds"], f"{prefix}_bound": SCALE_SPREAD_BOUND,
        f"{prefix}_grid_met": summary.Text(f"{int((grid['criterion'] == 'met').sum())} of {len(grid)}"),
        f"{prefix}_grid_largest_spread": float(grid["scale spread"].max()),
        f"{prefix}_grid_reached": summary.Text("no run" if (grid["reached r_max"] == "no").all() else "some runs"),
        f"{prefix}_largest_factor": summary.Text(max(spreads, key=spreads.get)),
    }
    values.update({f"{prefix}_{summary.slug(factor)}_moves": round(spread, 2) for factor, spread in spreads.items()})
    return grid, values


def control_values(prefix: str, groups: dict[str, Sequence], r_max: int) -> tuple[pd.DataFrame, dict[str, object]]:
    """The controls at the control learning rate: the classic step (``k=1``, both datasets) and the plain rank test
    (``accumulated``, MNIST) as :func:`scale_table` rows, SGD's scale spread, and whether the rank falls as tau
    rises. Glued: ``{prefix}_classic_spreads`` / ``_reached``, ``_plain_spreads`` / ``_reached``, ``_sgd_spread``
    / ``_reached``, ``_tau_verdict``. Returns the classic step's table."""
    stats = {name: summary.seed_statistics(members) for name, members in groups.items()}
    classic = scale_table(groups, DATASETS, [CONTROL_RATE], SCALES, r_max, suffix="k=1")
    plain = scale_table(groups, ["mnist"], [CONTROL_RATE], SCALES, r_max, suffix="accumulated")
    values: dict[str, object] = {}
    for key, table in (("classic", classic), ("plain", plain)):
        values[f"{prefix}_{key}_spreads"] = summary.names_text(f"{s:.2f}" for s in table["scale spread"])
        values[f"{prefix}_{key}_reached"] = _reach((table["reached r_max"] == "yes").any())
    values[f"{prefix}_sgd_spread"] = round(scale_spread([stats[sgd_name(c)] for c in SCALES]), 2)
    values[f"{prefix}_sgd_reached"] = _reach(any(reaches_r_max(groups[sgd_name(c)], r_max) for c in SCALES))
    by_tau = [sum(mean_ranks(stats[name])) for name in
              (tau_name(0.05), grid_name("mnist", CONTROL_RATE, 0.2), tau_name(0.2))]
    values[f"{prefix}_tau_verdict"] = summary.Text("falls" if by_tau[0] > by_tau[1] > by_tau[2] else "does not fall")
    return classic, values


def dense_values(prefix: str, groups: dict[str, Sequence], tau: float
                 ) -> tuple[dict[str, pd.DataFrame], dict[str, Sequence], dict[str, object]]:
    """The dense networks' tau-ranks per epoch (:func:`dense_tau_ranks`, by ``"scale <c>"``), the DLRT runs of the
    same scales at the control learning rate, and what the text glues: ``{prefix}_dense_<c>_start`` / ``_end``
    (both hidden layers), ``_dense_spread`` (largest over smallest final tau-rank of a layer over the scales) and
    ``_dense_over_dlrt`` (per scale, the larger over the layers of dense tau-rank over DLRT's mean rank)."""
    dense = {f"scale {c:g}": dense_tau_ranks(groups[dense_name(c)][0], tau) for c in SCALES}
    dynamical = {f"scale {c:g}": groups[grid_name("mnist", CONTROL_RATE, c)] for c in SCALES}
    layers = ("rank_0", "rank_1")
    values: dict[str, object] = {}
    for c, table in zip(SCALES, dense.values()):
        for when, row in (("start", 0), ("end", -1)):
            values[f"{prefix}_dense_{summary.slug(f'{c:g}')}_{when}"] = summary.Text(
                ", ".join(str(int(table[layer].iloc[row])) for layer in layers))
    finals = [[float(table[layer].iloc[-1]) for layer in layers] for table in dense.values()]
    values[f"{prefix}_dense_spread"] = round(max(max(f[i] for f in finals) / min(f[i] for f in finals)
                                                 for i in range(len(layers))), 2)
    ratios = [max(d / m for d, m in zip(final, mean_ranks(summary.seed_statistics(members))))
              for final, members in zip(finals, dynamical.values())]
    values[f"{prefix}_dense_over_dlrt"] = summary.names_text(f"{ratio:.1f}" for ratio in ratios)
    return dense, dynamical, values
