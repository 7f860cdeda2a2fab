"""What the figure notebooks show and glue into the book: durations, seed statistics, verdicts.

Every function here reads trained results (``lowrank.engine.training.TrainingResult``) or tables made from
them and returns text, numbers or tables; the notebooks only call them and plot. Numbers go into the book
with myst-nb's ``glue``, so that no number in the text is typed by hand.
"""

from __future__ import annotations

import re

import pandas as pd

from lowrank.engine import config as cfg


class Seconds(float):
    """A duration that prints as ``12.3 s``: how timings are glued into the book and shown in tables.

    Every timing a notebook shows has this form, so nbval's sanitize rule (``tests/nbval_sanitize.cfg``)
    can replace timings, and only timings, before comparing outputs.
    """

    def __repr__(self) -> str:
        return f"{float(self):.1f} s"

    __str__ = __repr__


class Text:
    """Text glued into the book as it is (a glued ``str`` would show its quotes)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def glue_all(values: dict[str, object]) -> None:
    """Glue every ``{key: value}`` into the book, in order, without displaying it (a figure's findings)."""
    from myst_nb import glue

    for key, value in values.items():
        glue(key, value, display=False)


def total_seconds(results) -> Seconds:
    """The training time of all ``results`` together."""
    return Seconds(sum(float(r.history["train_seconds_cum"].iloc[-1]) for r in results))


class FullTable:
    """A table that the book shows whole. pandas elides the middle rows of a DataFrame longer than
    ``display.max_rows`` (60) in both its HTML and its text; this shows every row, in a box that scrolls
    vertically when it is taller than a screen (``.full-table`` in ``book/_css/book.css``)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def _repr_html_(self) -> str:
        return f'<div class="full-table">{self.table.to_html(notebook=True, max_rows=None, max_cols=None)}</div>'

    def __repr__(self) -> str:
        return self.table.to_string(max_rows=None, max_cols=None)


def names_text(names) -> Text:
    """A list of names as ``"a, b and c"`` (``"none"`` when empty); ``"a, x; b and c, y"`` when a name holds a comma."""
    names = list(names)
    separator = "; " if any(", " in name for name in names) else ", "
    return Text("none" if not names else names[0] if len(names) == 1 else separator.join(names[:-1]) + " and " + names[-1])


def points_text(difference: float) -> Text:
    """A signed difference of accuracies in percentage points as words: ``"0.12 points above"``,
    ``"0.30 points below"`` (2 decimals; ``"0.00 points from"`` when it rounds to zero)."""
    size = f"{abs(difference):.2f} points"
    return Text(size + (" from" if size == "0.00 points" else " above" if difference > 0 else " below"))


def glue_names(key: str, names) -> None:
    """Glue a list of names as :func:`names_text` under ``key``."""
    from myst_nb import glue

    glue(key, names_text(names), display=False)


def slug(name: str) -> str:
    """``"dynamical tau=0.1"`` -> ``"dynamical_tau_0_1"``: a model name as part of a glue key."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def hidden_rank_columns(history) -> list[str]:
    """The ``rank_<i>`` columns of a history for every layer but the output layer."""
    return [c for c in history.columns if c.startswith("rank_")][:-1]


def largest_loss_rise(result, column: str = "val_loss") -> dict:
    """The trained epoch in which ``column`` of ``result``'s history rose most over the epoch before: ``epoch``,
    the loss ``before`` and ``after``, and the hidden ranks (:func:`hidden_rank_columns`) ``ranks_before`` and
    ``ranks_after`` that epoch (``epoch`` is ``None`` when the loss never rose)."""
    history = result.history.reset_index(drop=True)
    rises = history[column].diff().iloc[2:]  # from the second trained epoch: epoch 1 starts from the random net
    if rises.empty or rises.max() <= 0:
        return {"epoch": None}
    row = int(rises.idxmax())
    ranks = hidden_rank_columns(history)
    return {"epoch": int(history["epoch"].iloc[row]), "before": float(history[column].iloc[row - 1]),
            "after": float(history[column].iloc[row]), "ranks_before": [int(history[c].iloc[row - 1]) for c in ranks],
            "ranks_after": [int(history[c].iloc[row]) for c in ranks]}


def loss_rises_by_rank_change(results, column: str = "val_loss") -> dict[str, int]:
    """Over every trained epoch after the first of every model whose hidden ranks change at all: how many epochs
    lowered some hidden rank (``rank_fell``) and in how many of them ``column`` rose (``rank_fell_loss_rose``),
    and the same for the epochs that lowered no rank (``no_rank_fell``, ``no_rank_fell_loss_rose``)."""
    counts = dict.fromkeys(("rank_fell", "rank_fell_loss_rose", "no_rank_fell", "no_rank_fell_loss_rose"), 0)
    for result in results:
        history = result.history.reset_index(drop=True)
        ranks = history[hidden_rank_columns(history)]
        if (ranks.nunique() == 1).all():
            continue  # a dense or fixed-rank model: its ranks never move
        fell = (ranks.diff() < 0).any(axis=1).iloc[2:]
        rose = (history[column].diff() > 0).iloc[2:]
        counts["rank_fell"] += int(fell.sum())
        counts["rank_fell_loss_rose"] += int((fell & rose).sum())
        counts["no_rank_fell"] += int((~fell).sum())
        counts["no_rank_fell_loss_rose"] += int((~fell & rose).sum())
    return counts


def loss_spike_values(prefix: str, result, results, column: str = "val_loss") -> dict[str, object]:
    """What the book says of ``result``'s largest loss rise (:func:`largest_loss_rise`) and of loss rises in the
    epochs that lowered a rank over ``results`` (:func:`loss_rises_by_rank_change`), as glue values:
    ``{prefix}_spike`` (a sentence's predicate) and one count per key of the latter."""
    rise = largest_loss_rise(result, column)
    if rise["epoch"] is None:
        spike = Text("never rises from one epoch to the next after the first")
    else:
        spike = Text(f"rises most in epoch {rise['epoch']}, from {rise['before']:.3f} to {rise['after']:.3f}, while "
                     f"the ranks go from {rise['ranks_before']} to {rise['ranks_after']}")
    return {f"{prefix}_spike": spike, **{f"{prefix}_{key}": count
                                          for key, count in loss_rises_by_rank_change(results, column).items()}}


def glue_results(prefix: str, results) -> None:
    """Glue each model's headline numbers for the book's prose, as ``{prefix}_{slug(name)}_{metric}``.

    Metrics: ``test_accuracy`` (%, 2 decimals), ``parameters``, ``compression`` (%, 1 decimal),
    ``seconds`` (training time, :class:`Seconds`), and three lists over the hidden layers (every layer but
    the output layer): ``ranks`` (final ranks), ``initial_ranks`` (ranks of the untrained network) and
    ``max_ranks`` (the largest rank each may reach: ``r_max`` of a dynamical layer, the fixed rank of a
    lowrank one, ``min(dims)`` of a dense one).
    """
    from myst_nb import glue

    for result in results:
        key = f"{prefix}_{slug(result.config.name)}"
        last = result.history.iloc[-1]
        hidden = hidden_rank_columns(result.history)
        glue(f"{key}_test_accuracy", round(100 * result.test_accuracy, 2), display=False)
        glue(f"{key}_parameters", int(last["parameters"]), display=False)
        glue(f"{key}_compression", round(100 * float(last["compression"]), 1), display=False)
        glue(f"{key}_seconds", Seconds(last["train_seconds_cum"]), display=False)
        glue(f"{key}_ranks", [int(last[c]) for c in hidden], display=False)
        glue(f"{key}_epochs_at_max_rank", epochs_at_max_rank(result), display=False)
        glue_rank_limits(key, result)


def epochs_at_max_rank(result) -> int:
    """How many epochs of ``result`` ended with some hidden layer of a dynamical network at its :func:`max_rank`
    (``r_max``): the epochs in which the truncation was clamped instead of choosing the rank."""
    hidden = hidden_rank_columns(result.history)
    limits = [max_rank(layer) for layer in result.config.layers[:-1]]
    dynamical = [layer.type == "dynamical" for layer in result.config.layers[:-1]]
    rows = result.history.iloc[1:]
    return int(sum(any(flag and int(row[c]) >= limit for c, limit, flag in zip(hidden, limits, dynamical))
                   for _, row in rows.iterrows()))


def last_rank_change(result) -> int:
    """The last epoch of ``result`` after which some hidden layer's rank differs from the epoch before (0: never)."""
    ranks = result.history[hidden_rank_columns(result.history)]
    changed = (ranks.diff().iloc[1:] != 0).any(axis=1)
    epochs = result.history["epoch"].iloc[1:][changed.to_numpy()]
    return int(epochs.max()) if len(epochs) else 0


def glue_rank_limits(key: str, result) -> None:
    """Glue ``{key}_initial_ranks`` (the hidden ranks of the untrained network) and ``{key}_max_ranks``
    (:func:`max_rank` of each hidden layer)."""
    from myst_nb import glue

    hidden = hidden_rank_columns(result.history)
    glue(f"{key}_initial_ranks", [int(result.history.iloc[0][c]) for c in hidden], display=False)
    glue(f"{key}_max_ranks", [max_rank(layer) for layer in result.config.layers[:-1]], display=False)


def seed_groups(results) -> dict[str, list]:
    """The results of a figure with ``[figure] seeds``, by model: ``{"dense": [seed 0, seed 1], ...}`` in file
    order (a name without a ``" seed=<s>"`` suffix is a group of one)."""
    groups: dict[str, list] = {}
    for result in results:
        groups.setdefault(re.sub(r" seed=\d+$", "", result.config.name), []).append(result)
    return groups


def seed_statistics(members) -> dict:
    """Over the seeds of one model: test accuracy (%) mean and half-range (``spread``), final hidden ranks of
    each seed, and the means of parameters, compression (%), MFLOPs per sample and training seconds (with the
    half-range of the seconds, ``seconds_spread``)."""
    accuracy = [100 * r.test_accuracy for r in members]
    lasts = [r.history.iloc[-1] for r in members]
    seconds = [float(last["train_seconds_cum"]) for last in lasts]
    hidden = hidden_rank_columns(members[0].history)

    def mean(column: str) -> float:
        return sum(float(last[column]) for last in lasts) / len(lasts)

    return {"test_accuracy": sum(accuracy) / len(accuracy), "spread": (max(accuracy) - min(accuracy)) / 2,
            "ranks": [[int(last[c]) for c in hidden] for last in lasts], "seeds": len(members),
            "parameters": mean("parameters"), "compression": 100 * mean("compression"),
            "mflops": mean("flops_per_sample") / 1e6,
            "seconds": sum(seconds) / len(seconds), "seconds_spread": (max(seconds) - min(seconds)) / 2}


def rank_ranges_text(stats: dict) -> str:
    """The final hidden ranks of :func:`seed_statistics` as one list, each layer's lowest to highest over the
    seeds: ``"[45-47, 50]"`` (a layer whose seeds agree shows one number)."""
    layers = zip(*stats["ranks"])
    return "[" + ", ".join(f"{min(r)}" if min(r) == max(r) else f"{min(r)}-{max(r)}" for r in layers) + "]"


def group_statistics(results) -> dict[str, dict]:
    """:func:`seed_statistics` of every model of a figure, by model name (:func:`seed_groups`)."""
    return {name: seed_statistics(members) for name, members in seed_groups(results).items()}


#: What :func:`versus` says of a model that is missing from the statistics: every seed of it diverged.
NOT_COMPARABLE = "not comparable (every seed of one of them diverged) to"


def versus(stats: dict[str, dict], model: str, reference: str) -> Text:
    """:func:`compare` of two models' mean test accuracies and seed spreads (``stats``: :func:`group_statistics`);
    :data:`NOT_COMPARABLE` when either has no result (a figure that keeps diverged models out)."""
    if model not in stats or reference not in stats:
        return Text(NOT_COMPARABLE)
    first, second = stats[model], stats[reference]
    return Text(compare((first["test_accuracy"], first["spread"]), (second["test_accuracy"], second["spread"])))


def time_ratio(stats: dict[str, dict], model: str, reference: str) -> float:
    """``model``'s mean training time over ``reference``'s (``stats``: :func:`group_statistics`), 2 decimals."""
    return round(stats[model]["seconds"] / stats[reference]["seconds"], 2)


def seed_ranks_text(stats: dict) -> str:
    """Each seed's final hidden ranks of :func:`seed_statistics`, as the book prints them: ``"[47, 50] and [48, 50]"``."""
    return " and ".join(str(ranks) for ranks in stats["ranks"])


def ranks_differ(first: dict, second: dict) -> bool:
    """Whether two models' final ranks differ beyond their seeds: in some hidden layer, the ranges of the seeds'
    ranks (``seed_statistics(...)["ranks"]``) do not overlap."""
    for layer in range(len(first["ranks"][0])):
        a, b = [ranks[layer] for ranks in first["ranks"]], [ranks[layer] for ranks in second["ranks"]]
        if max(a) < min(b) or max(b) < min(a):
            return True
    return False


def ranks_at_least(first: dict, second: dict) -> bool:
    """Whether ``first``'s final ranks are at least ``second``'s beyond their seeds: in every hidden layer the
    lowest of ``first``'s seeds is at least the highest of ``second``'s (``seed_statistics(...)["ranks"]``)."""
    return all(min(ranks[layer] for ranks in first["ranks"]) >= max(ranks[layer] for ranks in second["ranks"])
               for layer in range(len(first["ranks"][0])))


def glue_seed_results(prefix: str, results) -> None:
    """Glue each model's statistics over its seeds (:func:`seed_statistics`) as ``{prefix}_{slug(model)}_{metric}``:
    ``test_accuracy`` and ``spread`` (%, 2 decimals), ``ranks`` (each seed's final hidden ranks, as text),
    ``parameters`` (mean, rounded), ``compression`` (%, 1 decimal), ``seconds`` (mean training time), and
    ``initial_ranks`` / ``max_ranks`` as :func:`glue_results` (the same for every seed), and
    ``epochs_at_max_rank`` of each seed (:func:`epochs_at_max_rank`, as text: ``"0, 2 and 10"``)."""
    from myst_nb import glue

    for name, members in seed_groups(results).items():
        key, stats = f"{prefix}_{slug(name)}", seed_statistics(members)
        glue(f"{key}_test_accuracy", round(stats["test_accuracy"], 2), display=False)
        glue(f"{key}_spread", round(stats["spread"], 2), display=False)
        glue(f"{key}_ranks", Text(seed_ranks_text(stats)), display=False)
        glue(f"{key}_parameters", round(stats["parameters"]), display=False)
        glue(f"{key}_compression", round(stats["compression"], 1), display=False)
        glue(f"{key}_seconds", Seconds(stats["seconds"]), display=False)
        glue_rank_limits(key, members[0])
        glue(f"{key}_epochs_at_max_rank", names_text(str(epochs_at_max_rank(m)) for m in members), display=False)


def trend(first: tuple[float, float], last: tuple[float, float]) -> str:
    """How a mean changes from ``first`` to ``last`` (each ``(mean, spread)``), judged against the spreads:
    ``"falls"`` / ``"rises"`` when the change exceeds the sum of the two spreads, else
    ``"does not change beyond the seed spread"``."""
    change, noise = last[0] - first[0], first[1] + last[1]
    if change < -noise:
        return "falls"
    if change > noise:
        return "rises"
    return "does not change beyond the seed spread"


def compare(model: tuple[float, float], reference: tuple[float, float]) -> str:
    """``model`` against ``reference`` (each ``(mean, spread)``): ``"above"`` / ``"below"`` when the means differ
    by more than the sum of the two spreads, else ``"within the seed spread of"``."""
    verdict = trend(reference, model)
    return {"rises": "above", "falls": "below"}.get(verdict, "within the seed spread of")


#: The target of DLRT's cycles (basis_interval k) against dense: at most this fraction of dense's training time,
#: at a test accuracy not below k = 1's beyond the seed spread.
TIME_TARGET = 0.6
#: The columns of :func:`basis_interval_table` that depend on the machine's speed (not compared by nbval).
TIME_COLUMNS = ["train s", "time / dense", "target"]


def basis_interval_table(stats: dict[str, dict], models: dict[int, str], dense: str,
                         target: float = TIME_TARGET) -> pd.DataFrame:
    """Each cycle length ``k`` of ``models`` (``{k: model name}``, ``k = 1`` among them) judged against ``k = 1``
    and against ``dense``, from :func:`seed_statistics` of every model (``stats``). One row per ``k``:

    - ``test accuracy (%)``, ``spread``, ``ranks`` (each layer's range over the seeds, :func:`rank_ranges_text`),
      ``train s`` (mean over the seeds, as :class:`Seconds` prints it);
    - ``vs k=1``: :func:`compare` of the accuracies; ``ranks vs k=1``: ``"differ"`` when :func:`ranks_differ`;
    - ``vs dense (points)``: this accuracy minus dense's (negative: below dense); ``time / dense``: training
      time over dense's;
    - ``target``: ``"met"`` when ``time / dense <= target`` and the accuracy is not below ``k = 1``'s.

    ``train s``, ``time / dense`` and ``target`` depend on the machine's speed (:data:`TIME_COLUMNS`).
    """
    baseline, reference = stats[models[1]], stats[dense]
    rows = []
    for k, name in sorted(models.items()):
        model = stats[name]
        ratio = model["seconds"] / reference["seconds"]
        difference = model["test_accuracy"] - reference["test_accuracy"]
        versus_k1 = compare((model["test_accuracy"], model["spread"]), (baseline["test_accuracy"], baseline["spread"]))
        below = versus_k1 == "below"
        rows.append({
            "k": k, "test accuracy (%)": round(model["test_accuracy"], 2), "spread": round(model["spread"], 2),
            "ranks": rank_ranges_text(model),
            "train s": str(Seconds(model["seconds"])),
            "vs k=1": versus_k1,
            "ranks vs k=1": "differ" if ranks_differ(model, baseline) else "do not differ",
            "time / dense": round(ratio, 2), "vs dense (points)": round(difference, 2) + 0.0,
            "target": "met" if ratio <= target and not below else "missed",
        })
    return pd.DataFrame(rows).set_index("k")


def largest_equivalent_interval(table: pd.DataFrame) -> int:
    """The largest ``k`` of a :func:`basis_interval_table` up to which no ``k`` is below ``k = 1``'s accuracy beyond
    the seed spread (1 if the next ``k`` already is): the report's default cycle length. A longer ``k`` that
    passes after a shorter one failed does not count, since the accuracy is not expected to recover with ``k``.
    The ranks may differ from ``k = 1``'s."""
    below = table.index[table["vs k=1"] == "below"]
    return int(table.index[table.index < below.min()].max()) if len(below) else int(table.index.max())


def max_rank(layer: cfg.LayerConfig) -> int:
    """The largest rank ``layer`` can have: ``r_max`` (dynamical), ``rank`` (lowrank), ``min(dims)`` (dense)."""
    return {"dynamical": layer.r_max, "lowrank": layer.rank}.get(layer.type, min(layer.matrix_dims))


def tau_sweep_values(results, prefix: str, reference: str = "dynamical tau=0.05") -> dict[str, object]:
    """What a sweep of DLRT's tolerance (figure f) shows, over its seeds: whether the accuracy changes from the
    smallest to the largest tau (:func:`trend`), whether the mean total rank falls at every step of tau,
    whether every model's hidden layers end at different ranks, and dense's lead over ``reference``."""
    groups = seed_groups(results)
    tolerances = [name for name in groups if name.startswith("dynamical")]  # in increasing tau
    stats = {name: seed_statistics(groups[name]) for name in groups}
    accuracy = {name: (s["test_accuracy"], s["spread"]) for name, s in stats.items()}
    mean_ranks = [sum(map(sum, stats[name]["ranks"])) / len(stats[name]["ranks"]) for name in tolerances]
    layers_differ = all(len(set(ranks)) > 1 for name in tolerances for ranks in stats[name]["ranks"])
    return {
        f"{prefix}_accuracy_trend": Text(trend(accuracy[tolerances[0]], accuracy[tolerances[-1]])),
        f"{prefix}_ranks_fall": Text("fall" if all(a > b for a, b in zip(mean_ranks, mean_ranks[1:])) else "do not fall"),
        f"{prefix}_layers_differ": Text("differ" if layers_differ else "do not always differ"),
        f"{prefix}_gap_{slug(reference.removeprefix('dynamical '))}":
            round(stats["dense"]["test_accuracy"] - stats[reference]["test_accuracy"], 2),
    }


#: Our rank of a layer matches a published one when the larger is at most this factor times the smaller.
RANK_MATCH_FACTOR = 1.5


def published_comparison(results, published: dict[str, tuple[float, float, list[int] | None]]) -> pd.DataFrame:
    """Our models against a paper's: one row per model named in ``published`` (``{name: (mean accuracy %, its
    standard deviation over the paper's runs, the paper's ranks or None)}``), with our test accuracy and final
    ranks of the factorised layers, the difference, whether ours lies within the published mean ± one
    standard deviation, and whether every layer's rank is within :data:`RANK_MATCH_FACTOR` of the published one."""
    ours = {r.config.name: r for r in results}
    rows = []
    for name, (mean, std, ranks) in published.items():
        result = ours[name]
        last = result.history.iloc[-1]
        accuracy = round(100 * result.test_accuracy, 2)
        factorised = [int(last[f"rank_{i}"]) for i, layer in enumerate(result.config.layers) if layer.type != "dense"]
        rows.append({"model": name, "test accuracy (%)": accuracy, "ranks": str(factorised) if factorised else "dense",
                     "published (%)": f"{mean:.2f} ± {std:.2f}", "published ranks": str(ranks) if ranks else "dense",
                     "difference (points)": round(accuracy - mean, 2) + 0.0,
                     "within the published spread": "yes" if abs(accuracy - mean) <= std else "no",
                     "ranks against published": _rank_comparison(factorised, ranks),
                     "ranks within 1.5x": "-" if not ranks else "yes" if all(
                         max(a, b) <= RANK_MATCH_FACTOR * min(a, b) for a, b in zip(factorised, ranks)) else "no"})
    return pd.DataFrame(rows).set_index("model")


def reproduction_values(prefix: str, table: pd.DataFrame, verdict_key: str) -> dict[str, object]:
    """What a :func:`published_comparison` decides, to glue: per model ``{prefix}_{slug}_within`` (``"within"`` /
    ``"outside"`` the published band) and ``{prefix}_{slug}_ranks_vs_published``, and ``verdict_key``:
    ``"reproduce"`` when every model is within its band and every layer within :data:`RANK_MATCH_FACTOR` of the
    published rank, else ``"do not reproduce"``."""
    values: dict[str, object] = {}
    for name, row in table.iterrows():
        values[f"{prefix}_{slug(name)}_within"] = Text("within" if row["within the published spread"] == "yes"
                                                       else "outside")
        values[f"{prefix}_{slug(name)}_ranks_vs_published"] = Text(row["ranks against published"])
    reproduced = (table["within the published spread"] == "yes").all() and (table["ranks within 1.5x"] == "yes").all()
    values[verdict_key] = Text("reproduce" if reproduced else "do not reproduce")
    return values


def time_ratios_text(stats: dict[str, dict], names, reference: str = "dense") -> Text:
    """The training time of each of ``names`` over ``reference``'s (:func:`time_ratio`), as ``"1.34, 1.20 and 0.90"``."""
    return names_text(f"{time_ratio(stats, name, reference):.2f}" for name in names)


def ranks_at_epoch(result, epoch: int) -> list[int]:
    """The hidden layers' ranks of ``result`` after ``epoch``."""
    row = result.history[result.history["epoch"] == epoch].iloc[0]
    return [int(row[column]) for column in hidden_rank_columns(result.history)]


def _rank_comparison(ours: list[int], published: list[int] | None) -> str:
    """Layer by layer, ``"higher"``, ``"equal"`` or ``"lower"`` than the published rank (``"-"`` without them)."""
    if not published:
        return "-"
    return ", ".join("higher" if a > b else "equal" if a == b else "lower" for a, b in zip(ours, published, strict=True))


def target_verdict(table: pd.DataFrame, names) -> Text:
    """``"met"`` if every model in ``names`` lies within the published spread (:func:`published_comparison`)."""
    return Text("met" if (table.loc[list(names), "within the published spread"] == "yes").all() else "missed")
