"""Matplotlib figures and summary tables of training results, used by the figure notebooks.

Every function takes a list of :class:`lowrank.engine.training.TrainingResult` (``name``, ``history``,
``test_accuracy``, ...) and returns a ``matplotlib.figure.Figure`` or a pandas ``DataFrame``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lowrank.engine.summary import Seconds, hidden_rank_columns, seed_groups, seed_statistics

CURVES = (("train_loss", "training loss"), ("val_loss", "validation loss"),
          ("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"))


def label(result) -> str:
    """``name (parameters, compression)`` for legends."""
    last = result.history.iloc[-1]
    return f"{result.config.name} ({last['parameters'] / 1e3:,.0f}k params, {last['compression']:.0%} fewer)"


def summary_table(results: Sequence, readable: bool = True) -> pd.DataFrame:
    """One row per model: test accuracy, parameters, compression, FLOPs, ranks and training time.

    ``readable``: the training time as text (``"12.3 s"``, see :class:`lowrank.engine.summary.Seconds`), for display;
    otherwise as a number of seconds, for plotting.
    """
    rows = []
    for result in results:
        last = result.history.iloc[-1]
        ranks = [int(last[c]) for c in hidden_rank_columns(result.history)]
        seconds = float(last["train_seconds_cum"])
        rows.append({
            "model": result.config.name,
            "test accuracy (%)": round(100 * result.test_accuracy, 2),
            "parameters": int(last["parameters"]),
            "compression (%)": round(100 * float(last["compression"]), 1),
            "MFLOPs / sample": round(float(last["flops_per_sample"]) / 1e6, 3),
            "hidden ranks": str(ranks),
            "training time": str(Seconds(seconds)) if readable else seconds,
        })
    return pd.DataFrame(rows).set_index("model")


def seed_table(results: Sequence) -> pd.DataFrame:
    """One row per model of a figure with ``[figure] seeds``: mean test accuracy, its half-range over the seeds,
    each seed's final hidden ranks, mean compression and mean training time (:func:`lowrank.engine.summary.seed_statistics`)."""
    rows = []
    for name, members in seed_groups(results).items():
        stats = seed_statistics(members)
        rows.append({"model": name, "test accuracy (%)": round(stats["test_accuracy"], 2),
                     "± (half-range)": round(stats["spread"], 2), "seeds": stats["seeds"],
                     "hidden ranks (each seed)": " / ".join(str(r) for r in stats["ranks"]),
                     "compression (%)": round(stats["compression"], 1), "training time": str(Seconds(stats["seconds"]))})
    return pd.DataFrame(rows).set_index("model")


def seed_bars(results: Sequence, title: str = "") -> Figure:
    """Mean test accuracy of each model over its seeds, with the range of the seeds as an error bar."""
    groups = seed_groups(results)
    stats = [seed_statistics(members) for members in groups.values()]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(groups) + 1.2), layout="constrained")
    means = [s["test_accuracy"] for s in stats]
    ax.barh(range(len(groups)), means, xerr=[s["spread"] for s in stats], color=[f"C{i % 10}" for i in range(len(groups))],
            capsize=3)
    ax.set_yticks(range(len(groups)), list(groups))
    ax.invert_yaxis()
    low, high = min(means), max(means)
    ax.set(xlabel="test accuracy (%), mean and range over the seeds", title=title,
           xlim=(low - 0.15 * (high - low) - 0.5, high + 0.1 * (high - low) + 0.5))
    ax.grid(axis="x", alpha=0.3)
    return fig


def training_curves(results: Sequence, title: str = "") -> Figure:
    """Losses and accuracies per epoch (2 x 2) and each model's training time (the seed study's timer)."""
    fig = plt.figure(figsize=(13, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=(1, 1, 0.8))
    for i, (column, name) in enumerate(CURVES):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        for result in results:
            ax.plot(result.history["epoch"], result.history[column], marker=".", label=label(result))
        ax.set(xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "loss" in column:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    timer = fig.add_subplot(grid[:, 2])
    names = [r.config.name for r in results]
    seconds = [float(r.history["train_seconds_cum"].iloc[-1]) for r in results]
    bars = timer.barh(names, seconds, color=[f"C{i}" for i in range(len(results))])
    timer.bar_label(bars, labels=[f"{s:.1f} s" for s in seconds], padding=3)
    timer.invert_yaxis()
    timer.set(xlabel="training time (s, data loading excluded)", title="timer")
    timer.set_xlim(0, 1.25 * max(seconds))
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(3, len(results)))
    if title:
        fig.suptitle(title)
    return fig


def rank_curves(results: Sequence) -> Figure:
    """Each low-rank layer's rank per epoch (one panel per hidden layer, one line per model)."""
    layers = hidden_rank_columns(results[0].history)
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.5), layout="constrained", squeeze=False)
    for ax, column in zip(axes[0], layers):
        for result in results:
            ax.plot(result.history["epoch"], result.history[column], marker=".", label=result.config.name)
        ax.set(xlabel="epoch", ylabel="rank", title=f"layer {column.removeprefix('rank_')}", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][-1].legend()
    return fig


def sweep(results: Sequence, values: Sequence[float], xlabel: str, logx: bool = False) -> Figure:
    """Test accuracy, parameters and training time against a swept hyper-parameter."""
    table = summary_table(results, readable=False)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), layout="constrained")
    for ax, column in zip(axes, ("test accuracy (%)", "parameters", "training time")):
        ax.plot(values, table[column], marker="o")
        ax.set(xlabel=xlabel, ylabel=column, xscale="log" if logx else "linear")
        ax.grid(alpha=0.3)
    return fig


def pareto(results: Sequence) -> Figure:
    """Test accuracy against parameters and against training time; the Pareto-optimal models joined."""
    table = summary_table(results, readable=False)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    for ax, cost in zip(axes, ("parameters", "training time")):
        for i, (name, row) in enumerate(table.iterrows()):
            ax.scatter(row[cost], row["test accuracy (%)"], color=f"C{i % 10}", label=name, zorder=3)
        front = pareto_front(table, cost)
        ax.step(front[cost], front["test accuracy (%)"], where="post", color="gray", alpha=0.6, zorder=2)
        ax.set(xscale="log", xlabel=cost + (" (s)" if cost == "training time" else ""), ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def pareto_front(table: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Rows not beaten by a cheaper (lower ``cost``) row with a higher test accuracy, sorted by cost."""
    ordered = table.sort_values([cost, "test accuracy (%)"], ascending=[True, False])
    best = ordered["test accuracy (%)"].cummax()
    return ordered[ordered["test accuracy (%)"] >= best]


# ---------------------------------------------------------------------------------------------
# Layer-wise views: effective ranks, spectra, within-class variability, truncation (issue 7)

def _panels(count: int, columns: int = 2, width: float = 5.0, height: float = 3.4):
    """A figure with ``count`` panels in rows of ``columns`` (unused panels removed), and the flat list of axes."""
    columns = min(columns, count)
    rows = -(-count // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(width * columns + 2.5, height * rows), layout="constrained",
                             squeeze=False)
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.remove()
    return fig, axes[:count]


def _outside_legend(fig: Figure, ax) -> None:
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize="small")


def layer_curves(results, prefix: str, ylabel: str, layers: Sequence[int] | None = None, logy: bool = False,
                 warm_up: bool = True) -> Figure:
    """A history column per layer (``prefix`` + layer index, e.g. ``"erank_"``) against the epoch.

    ``results``: a list, or a dict ``{group title: list}`` (e.g. one group per dataset; the panels then
    go one row per group). One panel per layer in ``layers`` (default: every layer with such a column),
    one line per model. The epochs of a dense warm-up (history ``phase`` ``"warm-up"``) are dotted, or left out
    with ``warm_up=False`` (the curve then starts at the first factorised row).
    """
    groups = results if isinstance(results, dict) else {"": results}
    first = next(iter(groups.values()))[0].history
    found = sorted(int(c.removeprefix(prefix)) for c in first.columns
                   if c.startswith(prefix) and c.removeprefix(prefix).isdigit())
    layers = found if layers is None else list(layers)
    panels = [(group, members, layer) for group, members in groups.items() for layer in layers]
    fig, axes = _panels(len(panels), columns=len(layers) if len(groups) > 1 else 2)
    for ax, (group, members, layer) in zip(axes, panels):
        for i, result in enumerate(members):
            history, column = result.history, f"{prefix}{layer}"
            warm = history["phase"] == "warm-up"
            switch = int(history["epoch"][warm].max()) if warm.any() else 0  # the first factorised row
            after = history[history["epoch"] >= switch]
            ax.plot(after["epoch"], after[column], marker=".", color=f"C{i % 10}", label=result.config.name)
            if switch and warm_up:
                before = history[history["epoch"] <= switch]
                ax.plot(before["epoch"], before[column], marker=".", linestyle=":", color=f"C{i % 10}")
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{group + ': ' if group else ''}layer {layer}",
               yscale="log" if logy else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for group, members in groups.items():  # one legend per group: the model names differ between groups
        ax = axes[[g for g, _, _ in panels].index(group) + len(layers) - 1]
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def comparison_bars(groups: dict[str, Sequence], column: str = "test accuracy (%)", strip: str = ": ") -> Figure:
    """One panel per group (e.g. dataset): a horizontal bar per model with its :func:`summary_table` value.

    Model names are shortened to the part after the first ``strip`` (``"MNIST: dense"`` -> ``"dense"``).
    The x-axis starts near the smallest value, so that small differences show: read the value labels.
    """
    tallest = max(len(members) for members in groups.values())
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 0.4 * tallest + 1.3), layout="constrained",
                             squeeze=False)
    for ax, (group, members) in zip(axes[0], groups.items()):
        table = summary_table(members, readable=False)
        names = [name.split(strip, 1)[-1] for name in table.index]
        values = table[column].astype(float)
        bars = ax.barh(names, values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
        ax.invert_yaxis()
        low, high = float(values.min()), float(values.max())
        ax.set_xlim(low - 0.6 * (high - low + 1), high + 0.35 * (high - low + 1))
        ax.set(xlabel=column, title=group)
        ax.grid(alpha=0.3, axis="x")
    return fig


def _normalised(spectra: pd.DataFrame, epoch: int, layer: int) -> pd.Series:
    values = spectra[(spectra["epoch"] == epoch) & (spectra["layer"] == layer)].sort_values("index")["value"]
    return values / (values ** 2).sum() ** 0.5


def normalised_spectra(results: Sequence, epoch: int | None = None, tolerance: float | None = 1e-3) -> Figure:
    """Each layer's singular values ``sigma_i / ||W||_F`` (log scale) at ``epoch`` (default: the last), per model.

    Needs results trained with ``track_layers`` (their ``spectra``). A dotted line marks ``tolerance``: the
    values above it count in the epsilon-rank.
    """
    layers = sorted(results[0].spectra["layer"].unique())
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers):
        for i, result in enumerate(results):
            at = int(result.spectra["epoch"].max()) if epoch is None else epoch
            values = _normalised(result.spectra, at, layer)
            ax.plot(range(1, len(values) + 1), values, color=f"C{i % 10}", label=result.config.name)
        if tolerance is not None:
            ax.axhline(tolerance, color="gray", linestyle=":", label=f"tolerance {tolerance:g}")
        ax.set(xlabel="index i", ylabel=r"$\sigma_i / \|W\|_F$", yscale="log", title=f"layer {layer}")
        ax.grid(alpha=0.3)
    _outside_legend(fig, axes[0])
    return fig


def spectrum_evolution(result, tolerance: float | None = 1e-3) -> Figure:
    """One model's normalised singular values ``sigma_i / ||W||_F`` per layer, one line per epoch (dark to light)."""
    spectra = result.spectra
    layers = sorted(spectra["layer"].unique())
    epochs = sorted(spectra["epoch"].unique())
    colors = plt.get_cmap("viridis")
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers):
        for epoch in epochs:
            values = _normalised(spectra, epoch, layer)
            ax.plot(range(1, len(values) + 1), values, color=colors(epoch / max(epochs[-1], 1)),
                    label=f"epoch {epoch}" if epoch in (epochs[0], epochs[-1]) else None)
        if tolerance is not None:
            ax.axhline(tolerance, color="gray", linestyle=":")
        ax.set(xlabel="index i", ylabel=r"$\sigma_i / \|W\|_F$", yscale="log", title=f"layer {layer}")
        ax.grid(alpha=0.3)
    _outside_legend(fig, axes[0])
    fig.suptitle(result.config.name)
    return fig


def truncation_curves(tables: dict[str, pd.DataFrame]) -> Figure:
    """From :func:`lowrank.engine.experiments.analysis.truncation_table` per model: accuracy lost and kept parameters vs tolerance."""
    fig, axes = _panels(2)
    for i, (name, table) in enumerate(tables.items()):
        axes[0].plot(table["eps"], 100 * table["accuracy_lost"], marker="o", color=f"C{i % 10}", label=name)
        axes[1].plot(table["eps"], 100 * table["factor_fraction"], marker="o", color=f"C{i % 10}", label=name)
    axes[0].set(xscale="log", xlabel="tolerance eps", ylabel="test accuracy lost (points)")
    axes[1].set(xscale="log", xlabel="tolerance eps", ylabel="factor parameters r (n_in + n_out) (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    _outside_legend(fig, axes[0])
    return fig


def ode_errors(table: pd.DataFrame, steps: Sequence[float], sigma_mins: Sequence[float],
               methods: Sequence[str]) -> Figure:
    """Figure (j): the error to ``X(t)`` over time of each integrator, one panel per step (rows, largest first)
    and smallest singular value (columns); a run that blew up says so in the legend."""
    steps = sorted(steps, reverse=True)
    fig, axes = plt.subplots(len(steps), len(sigma_mins), figsize=(3.2 * len(sigma_mins), 2.4 * len(steps)),
                             sharex=True, sharey=True, squeeze=False)
    for (h, s), ax in zip([(h, s) for h in steps for s in sigma_mins], axes.flat):
        for method, style in zip(methods, ["-o", "-s", "-", "-^", ":"]):
            run = table[(table.method == method) & (table.step == h) & (table.sigma_min == s) & (table.time > 0)]
            ax.semilogy(run.time, run.error, style, markersize=3,
                        label=method + (" (diverged)" if run.diverged.any() else ""))
        ax.set_title(f"sigma_min = {s:g}, h = {h:g}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("t")
    for ax in axes[:, 0]:
        ax.set_ylabel("error to X(t)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def adapter_budget(history: pd.DataFrame, weights: pd.DataFrame, layer_names: Sequence[str], tau: float,
                   threshold: float) -> Figure:
    """Figure (k): how the budget ``tau`` is shared between the layers' adapters over the outer steps (left), and
    the final weights ``s`` of each layer, largest first, against the pruning ``threshold`` (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, name in enumerate(layer_names):
        left.plot(history.step, history[f"mass_{i}"], label=name)
    left.set(xlabel="outer step", ylabel="sum of s in the layer", title=f"Where the budget tau = {tau:g} goes")
    left.legend()
    for i, name in enumerate(layer_names):
        s = weights[weights.layer == i].s.to_numpy()
        ranks = np.arange(1, len(s) + 1)
        right.semilogy(ranks[s > 0], s[s > 0], "o-", markersize=3, label=name)
    right.axhline(threshold, color="gray", linestyle="--", label="threshold")
    right.set(xlabel="term (largest first)", ylabel="s_i (non-zero only)", title="Final weights s")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
