"""Matplotlib figures and summary tables of training results, used by the figure notebooks.

Every function takes a list of :class:`lowrank.engine.training.TrainingResult` (``name``, ``history``,
``test_accuracy``, ...) and returns a ``matplotlib.figure.Figure`` or a pandas ``DataFrame``. A model trained
from several seeds (``[figure] seeds``, named ``"<name> seed=<s>"``) is one entry: its mean, with the range
over the seeds as a band or an error bar.

Figures are drawn for the book's page: :data:`PAGE_WIDTH` inches wide, so that the book shows them at their
own size and their text reads like the body text. Each model keeps one colour across the figures of a page:
its position among the models of the figure (:func:`colours`), whichever subset a figure shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from lowrank.engine.summary import Seconds, hidden_rank_columns, rank_ranges_text, seed_groups, seed_statistics

#: Width of a figure in inches: the text column of the book at 1400 px (about 760 px at 100 px per inch).
PAGE_WIDTH = 7.6
#: Pixels per inch of the stored PNGs: sharper than the page needs, shown at PAGE_WIDTH * 100 px.
DPI = 150
CURVES = (("train_loss", "training loss"), ("val_loss", "validation loss"),
          ("train_accuracy", "training accuracy (%)"), ("val_accuracy", "validation accuracy (%)"))


def page_figure(height: float, width: float = PAGE_WIDTH, **subplots) -> tuple[Figure, np.ndarray]:
    """A figure of the page's width (constrained layout, :data:`DPI`) and its axes (``Figure.subplots(**subplots)``,
    always a 2-d array)."""
    fig = _unshown_figure(width, height)
    return fig, fig.subplots(squeeze=False, **subplots)


def _unshown_figure(width: float, height: float) -> Figure:
    """A figure made by pyplot (in a notebook that selects the inline backend, which renders a glued figure as
    PNG) and closed at once: a notebook shows it only where it glues it, in a ``{glue:figure}`` with its
    caption, not once more at the end of the cell."""
    fig = plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")
    plt.close(fig)
    return fig


def colours(results: Sequence) -> dict[str, str]:
    """One colour per model of a figure, by its position among the models (seeds of one model share it):
    matplotlib's ten default colours, or the twenty of ``tab20`` for a figure of more models (figure (d))."""
    names = list(seed_groups(results))
    if len(names) <= 10:
        return {name: f"C{i}" for i, name in enumerate(names)}
    palette = matplotlib.colormaps["tab20"].colors
    return {name: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, name in enumerate(names)}


def label(members: Sequence) -> str:
    """``name (parameters, compression)`` of a model (the mean over its seeds), for legends."""
    stats = seed_statistics(members)
    return f"{_name(members)} ({stats['parameters'] / 1e3:,.0f}k params, {stats['compression']:.0f}% fewer)"


def _name(members: Sequence) -> str:
    return next(iter(seed_groups(members)))


def _mean_and_range(members: Sequence, column: str, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """Per epoch, over the seeds: the epochs, the mean, the lowest and the highest value of a history column."""
    values = np.stack([scale * m.history[column].to_numpy(dtype=float) for m in members])
    return members[0].history["epoch"].to_numpy(), values.mean(0), values.min(0), values.max(0)


def _band(ax, members: Sequence, column: str, colour: str, scale: float = 1.0, **line) -> None:
    """A model's mean curve of ``column`` and, over several seeds, their range as a shaded band."""
    epochs, mean, low, high = _mean_and_range(members, column, scale)
    ax.plot(epochs, mean, color=colour, marker=".", **line)
    if len(members) > 1:
        ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)


def accuracy_limits(groups: dict[str, Sequence], column: str) -> tuple[float, float]:
    """The range of an accuracy axis (%) that shows the differences: from the lowest mean after the first epoch
    of training (epoch 1; the untrained network lies below) to the highest value, with a margin."""
    low = min(_mean_and_range(m, column, 100)[1][1:].min() for m in groups.values())
    high = max(_mean_and_range(m, column, 100)[3].max() for m in groups.values())
    margin = 0.05 * (high - low) + 0.05
    return low - margin, min(100.0, high + margin)


def _seed_rows(results: Sequence, readable: bool) -> list[dict]:
    rows = []
    for name, members in seed_groups(results).items():
        stats = seed_statistics(members)
        rows.append({
            "model": name, "test accuracy (%)": round(stats["test_accuracy"], 2),
            "± (half-range)": round(stats["spread"], 2), "seeds": stats["seeds"],
            "parameters": round(stats["parameters"]), "compression (%)": round(stats["compression"], 1),
            "MFLOPs / sample": round(stats["mflops"], 3), "hidden ranks": rank_ranges_text(stats),
            "training time": str(Seconds(stats["seconds"])) if readable else stats["seconds"],
        })
    return rows


def summary_table(results: Sequence, readable: bool = True) -> pd.DataFrame:
    """One row per model: test accuracy, parameters, compression, FLOPs, final hidden ranks and training time.

    A model trained from several seeds is one row of means, with the half-range of its test accuracy
    (``± (half-range)``), its number of seeds and each hidden layer's lowest to highest rank. ``readable``: the
    training time as text (``"12.3 s"``, see :class:`lowrank.engine.summary.Seconds`), for display; otherwise
    as a number of seconds, for plotting.
    """
    table = pd.DataFrame(_seed_rows(results, readable)).set_index("model")
    if (table["seeds"] == 1).all():
        table = table.drop(columns=["± (half-range)", "seeds"])
    return table


def seed_table(results: Sequence) -> pd.DataFrame:
    """:func:`summary_table` of a figure with ``[figure] seeds``: always with the spread and number of seeds."""
    return pd.DataFrame(_seed_rows(results, readable=True)).set_index("model")


def seed_bars(results: Sequence, title: str = "") -> Figure:
    """Mean test accuracy of each model over its seeds, with the range of the seeds as an error bar."""
    groups = seed_groups(results)
    stats = [seed_statistics(members) for members in groups.values()]
    fig, ((ax,),) = page_figure(0.32 * len(groups) + 1.2)
    means = [s["test_accuracy"] for s in stats]
    ax.barh(range(len(groups)), means, xerr=[s["spread"] for s in stats], color=list(colours(results).values()),
            capsize=3)
    ax.set_yticks(range(len(groups)), list(groups))
    ax.invert_yaxis()
    low, high = min(means), max(means)
    ax.set(xlabel="test accuracy (%), mean and range over the seeds", title=title,
           xlim=(low - 0.15 * (high - low) - 0.5, high + 0.1 * (high - low) + 0.5))
    ax.grid(axis="x", alpha=0.3)
    return fig


def training_curves(results: Sequence, title: str = "") -> Figure:
    """Losses and accuracies per epoch (2 x 2; mean over the seeds, their range shaded) and each model's training
    time (the student study's timer; mean, the range of the seeds as an error bar). The accuracy axes are zoomed to
    the trained epochs (:func:`accuracy_limits`); a dashed line marks where fixed-rank fine-tuning starts."""
    groups, colour = seed_groups(results), colours(results)
    fig = _unshown_figure(PAGE_WIDTH, 6.2 + 0.25 * len(groups))
    grid = fig.add_gridspec(3, 2, height_ratios=(1, 1, 0.25 + 0.1 * len(groups)))
    for i, (column, name) in enumerate(CURVES):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        scale = 100 if "accuracy" in column else 1
        for model, members in groups.items():
            _band(ax, members, column, colour[model], scale, label=label(members))
        _mark_fine_tuning(ax, fine_tuning_start(results))
        ax.set(xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "loss" in column:
            ax.set_yscale("log")
        else:  # from the first trained epoch: the untrained network's accuracy lies below the axis
            ax.set(xlim=(0.7, None), ylim=accuracy_limits(groups, column))
        ax.grid(alpha=0.3)
    timer = fig.add_subplot(grid[2, :])
    stats = [seed_statistics(members) for members in groups.values()]
    seconds, spreads = [s["seconds"] for s in stats], [s["seconds_spread"] for s in stats]
    timer.barh(list(groups), seconds, xerr=spreads, color=[colour[m] for m in groups], capsize=3)
    for row, (mean, spread) in enumerate(zip(seconds, spreads)):
        timer.annotate(f"{mean:.1f} s", (mean + spread, row), xytext=(4, 0), textcoords="offset points", va="center")
    timer.invert_yaxis()
    timer.set(xlabel="training time (s, in optimiser steps)", xlim=(0, 1.2 * max(m + s for m, s in zip(seconds, spreads))))
    timer.tick_params(axis="y", labelsize="small")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def fine_tuning_start(results: Sequence) -> int | None:
    """The epoch after which fixed-rank fine-tuning starts (the last epoch before the first history row of
    ``phase`` ``"fine-tune"``), or ``None`` when no result fine-tunes."""
    starts = [int(r.history.loc[r.history["phase"] == "fine-tune", "epoch"].min()) - 1
              for r in results if "phase" in r.history and (r.history["phase"] == "fine-tune").any()]
    return min(starts) if starts else None


def _mark_fine_tuning(ax, start: int | None) -> None:
    """A dashed vertical line at ``start`` (:func:`fine_tuning_start`), labelled at the top of ``ax``."""
    if start is None:
        return
    ax.axvline(start, color="black", linestyle="--", linewidth=0.8, label="_fine-tuning starts")
    ax.annotate("fine-tuning", (start, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", va="top", fontsize="small")


def rank_curves(results: Sequence) -> Figure:
    """Each low-rank layer's rank per epoch (one panel per hidden layer; one line per model, the mean over its
    seeds with their range shaded; a dashed line where fixed-rank fine-tuning starts, :func:`fine_tuning_start`).
    Dense models are left out; the others keep their colours (:func:`colours`)."""
    groups, colour = seed_groups(results), colours(results)
    factorised = {name: members for name, members in groups.items()
                  if any(layer.type != "dense" for layer in members[0].config.layers)}
    layers = hidden_rank_columns(next(iter(factorised.values()))[0].history)
    columns = min(len(layers), 2)
    fig, axes = page_figure(2.8 * -(-len(layers) // columns) + 0.6, ncols=columns, nrows=-(-len(layers) // columns))
    for ax, column in zip(axes.flat, layers):
        for name, members in factorised.items():
            _band(ax, members, column, colour[name], label=name)
        _mark_fine_tuning(ax, fine_tuning_start(results))
        ax.set(xlabel="epoch", ylabel="rank", title=f"layer {column.removeprefix('rank_')}", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.remove()
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    return fig


def ranks_against_dense(dynamical: dict[str, Sequence], dense: dict[str, pd.DataFrame],
                        layers: Sequence[int] = (0, 1)) -> Figure:
    """Each hidden layer's rank per epoch: DLRT models (``{label: seeds}``, the mean over the seeds with their range
    shaded, solid) against the tau-rank of dense weights (``{label: table}`` with columns ``epoch`` and
    ``rank_<layer>``, dashed); the i-th entries of the two dicts share a colour (the same initial scale)."""
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers):
        for i, (name, members) in enumerate(dynamical.items()):
            _band(ax, members, f"rank_{layer}", f"C{i % 10}", label=f"DLRT, {name}")
        for i, (name, table) in enumerate(dense.items()):
            ax.plot(table["epoch"], table[f"rank_{layer}"], linestyle="--", marker=".", color=f"C{i % 10}",
                    label=f"dense tau-rank, {name}")
        ax.set(xlabel="epoch", ylabel="rank", title=f"layer {layer}", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], columns=2)
    return fig


def sweep(results: Sequence, values: Sequence[float], xlabel: str, logx: bool = False) -> Figure:
    """Test accuracy, parameters and training time against a swept hyper-parameter (one value per model, in the
    figure's order; means over the seeds, the range of the accuracy as an error bar)."""
    table = summary_table(results, readable=False)
    spread = table["± (half-range)"] if "± (half-range)" in table else None
    fig, axes = page_figure(2.8, ncols=3)
    for ax, column in zip(axes[0], ("test accuracy (%)", "parameters", "training time")):
        ax.errorbar(values, table[column], yerr=spread if column == "test accuracy (%)" else None, marker="o", capsize=3)
        ax.set(xlabel=xlabel, ylabel=column + (" (s)" if column == "training time" else ""),
               xscale="log" if logx else "linear")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    return fig


def pareto(results: Sequence) -> Figure:
    """Test accuracy against parameters and against training time (means over the seeds, the range of the
    accuracy as an error bar); the Pareto-optimal models (:func:`pareto_front`) joined by steps that rise from
    left to right, the models tied with the front within the seed spread (:func:`front_ties`) drawn hollow."""
    table = summary_table(results, readable=False)
    spread = table["± (half-range)"] if "± (half-range)" in table else pd.Series(0.0, index=table.index)
    colour = colours(results)
    fig, axes = page_figure(3.4 + 0.12 * len(table), ncols=2, sharey=True)
    for ax, cost in zip(axes[0], ("parameters", "training time")):
        ties = front_ties(table, cost)
        for name, row in table.iterrows():
            ax.errorbar(row[cost], row["test accuracy (%)"], yerr=spread[name], color=colour[name], marker="o",
                        mfc="white" if name in ties else colour[name], capsize=2, label=name, zorder=3)
        front = pareto_front(table, cost)
        ax.step(front[cost], front["test accuracy (%)"], where="post", color="gray", alpha=0.6, zorder=2)
        ax.set(xscale="log", xlabel=cost + (" (s)" if cost == "training time" else ""))
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels at the powers of ten only
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    return fig


def pareto_front(table: pd.DataFrame, cost: str) -> pd.DataFrame:
    """The Pareto-optimal rows of mean test accuracy against ``cost``: those that no other row dominates (no more
    ``cost`` and no less accuracy, one of the two strictly better). Sorted by cost, so the accuracy rises strictly
    along the front: a model that costs more is on it only if it is more accurate on average."""
    accuracy, costs = table["test accuracy (%)"], table[cost]

    def dominated(name) -> bool:
        better = (costs <= costs[name]) & (accuracy >= accuracy[name]) & ((costs < costs[name]) | (accuracy > accuracy[name]))
        return bool(better.any())

    front = [name for name in table.index if not dominated(name)]
    return table.loc[front].sort_values([cost, "test accuracy (%)"], ascending=[True, False])


def front_ties(table: pd.DataFrame, cost: str) -> pd.Index:
    """The rows off the :func:`pareto_front` that no cheaper row (no more ``cost``) beats beyond the seed spread:
    every such row is less accurate by at most the sum of the two half-ranges (``± (half-range)``, 0 without
    seeds). These models are below the front on average, but the seeds cannot tell them from it."""
    spread = table["± (half-range)"] if "± (half-range)" in table else pd.Series(0.0, index=table.index)
    accuracy, costs = table["test accuracy (%)"], table[cost]
    front = pareto_front(table, cost).index

    def beaten(name) -> bool:
        cheaper = table.index[(costs <= costs[name]) & (table.index != name)]
        return bool((accuracy[cheaper] - spread[cheaper] > accuracy[name] + spread[name]).any())

    return pd.Index([name for name in table.index if name not in front and not beaten(name)])


# ---------------------------------------------------------------------------------------------
# Layer-wise views: effective ranks, spectra, within-class variability, truncation

def _panels(count: int, columns: int = 2, height: float = 2.6):
    """A page-wide figure with ``count`` panels in rows of ``columns`` (unused panels removed), and the flat list
    of axes; the legend goes below (:func:`_legend_below`)."""
    columns = min(columns, count)
    rows = -(-count // columns)
    fig, grid = page_figure(height * rows + 0.8, ncols=columns, nrows=rows)
    axes = list(grid.flat)
    for ax in axes[count:]:
        ax.remove()
    return fig, axes[:count]


def _legend_below(fig: Figure, ax, columns: int = 3) -> None:
    """The legend of ``ax`` under the panels, across the page."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=columns, fontsize="small")


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
    if len(groups) == 1:
        _legend_below(fig, axes[0])
    else:  # one legend per group, in its last panel: the model names differ between groups
        for group in groups:
            axes[[g for g, _, _ in panels].index(group) + len(layers) - 1].legend(fontsize="x-small")
    return fig


def comparison_bars(groups: dict[str, Sequence], column: str = "test accuracy (%)", strip: str = ": ") -> Figure:
    """One panel per group (e.g. dataset): a horizontal bar per model with its :func:`summary_table` value.

    Model names are shortened to the part after the first ``strip`` (``"MNIST: dense"`` -> ``"dense"``).
    The x-axis starts near the smallest value, so that small differences show: read the value labels.
    """
    tallest = max(len(members) for members in groups.values())
    fig, axes = page_figure(0.3 * tallest + 1.3, ncols=len(groups))
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
    _legend_below(fig, axes[0])
    return fig


def spectrum_evolution(result, tolerance: float | None = 1e-3) -> Figure:
    """One model's normalised singular values ``sigma_i / ||W||_F`` per layer, one line per epoch (dark to light)."""
    spectra = result.spectra
    layers = sorted(spectra["layer"].unique())
    epochs = sorted(spectra["epoch"].unique())
    colors = matplotlib.colormaps["viridis"]
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
    _legend_below(fig, axes[0])
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
    _legend_below(fig, axes[0])
    return fig


def ode_errors(table: pd.DataFrame, steps: Sequence[float], sigma_mins: Sequence[float],
               methods: Sequence[str]) -> Figure:
    """Figure (j): the error to ``X(t)`` over time of each integrator, one panel per step (rows, largest first)
    and smallest singular value (columns); a run that blew up says so in the legend."""
    steps = sorted(steps, reverse=True)
    fig, axes = page_figure(1.9 * len(steps) + 0.4, nrows=len(steps), ncols=len(sigma_mins), sharex=True, sharey=True)
    for (h, s), ax in zip([(h, s) for h in steps for s in sigma_mins], axes.flat):
        for method, style in zip(methods, ["-o", "-s", "-", "-^", ":"]):
            run = table[(table.method == method) & (table.step == h) & (table.sigma_min == s) & (table.time > 0)]
            ax.semilogy(run.time, run.error, style, markersize=3,
                        label=method + (" (diverged)" if run.diverged.any() else ""))
        ax.set_title(f"sigma_min = {s:g}, h = {h:g}", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("t")
    for ax in axes[:, 0]:
        ax.set_ylabel("error to X(t)")
    _legend_below(fig, axes[0, 0], columns=len(methods))
    return fig


def adapter_budget(history: pd.DataFrame, weights: pd.DataFrame, layer_names: Sequence[str], tau: float,
                   threshold: float) -> Figure:
    """Figure (k): how the budget ``tau`` is shared between the layers' adapters over the outer steps (left), and
    the final weights ``s`` of each layer, largest first, against the pruning ``threshold`` (right)."""
    fig, ((left, right),) = page_figure(3.4, ncols=2)
    for i, name in enumerate(layer_names):
        left.plot(history.step, history[f"mass_{i}"], label=name)
    left.set(xlabel="outer step", ylabel="sum of s in the layer", title=f"Where the budget tau = {tau:g} goes")
    left.legend(fontsize="x-small")
    for i, name in enumerate(layer_names):
        s = weights[weights.layer == i].s.to_numpy()
        ranks = np.arange(1, len(s) + 1)
        right.semilogy(ranks[s > 0], s[s > 0], "o-", markersize=3, label=name)
    right.axhline(threshold, color="gray", linestyle="--", label="threshold")
    right.set(xlabel="term (largest first)", ylabel="s_i (non-zero only)", title="Final weights s")
    right.legend(fontsize="x-small")
    return fig


def step_benchmark(rows: Sequence[dict], widths: Sequence[int]) -> Figure:
    """Figure (n): each variant's training-step time over torch's dense step against its FLOP limit (the ratio of
    its forward and backward FLOPs to dense's), one marker per width, the rank beside each point; on the dotted
    diagonal a step is as fast as its FLOPs allow."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    colour = {variant: f"C{i % 10}" for i, variant in enumerate(variants)}
    marker = dict(zip(widths, "os^D"))
    fig, ((ax,),) = page_figure(4.6)
    for row in rows:
        ax.scatter(row["flop_limit"], row["step_x"], color=colour[row["variant"]], marker=marker[row["width"]])
        ax.annotate(str(row["rank"]), (row["flop_limit"], row["step_x"]), xytext=(4, 2), textcoords="offset points",
                    fontsize="x-small")
    handles = [ax.scatter([], [], color=colour[v], label=v) for v in variants]
    handles += [ax.scatter([], [], color="grey", marker=marker[w], label=f"w = {w}") for w in widths]
    low = min(min(row["flop_limit"], row["step_x"]) for row in rows) / 1.5
    high = max(max(row["flop_limit"], row["step_x"]) for row in rows) * 1.5
    handles += ax.plot([low, high], [low, high], "k:", label="ratio = FLOP limit")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
           xlabel="FLOP limit (pass FLOPs / torch dense)", ylabel="step time / torch dense step")
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside right center", fontsize="x-small")
    return fig
