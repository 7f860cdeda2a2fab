"""The conclusion of the report: the student study's claims decided by the data of figures (a), (e), (f), (g).

A claim is decided the way every seeded figure decides a difference: two models differ in test accuracy only
when their means differ by more than the sum of their seed spreads (half the range over the seeds,
:func:`lowrank.engine.summary.compare`), and in training time only when their mean times differ by more than
the sum of the half-ranges of their times. A claim made of several comparisons (two datasets, two low-rank
models) *holds* when every comparison supports it, *does not hold* when none does, and *holds in part*
otherwise; the evidence lists each comparison. Accuracy claims (:func:`accuracy_claims`) reproduce bit for bit
on one machine; timing claims (:func:`timing_claims`) change from run to run and are not compared by nbval.

:func:`results_table` is the report's one table of every model; :func:`training_costs` what each figure's
training took; :func:`repeated_trainings` how much the time of one configuration varies between trainings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import pandas as pd

from lowrank.engine import summary
from lowrank.engine.plots import seed_table

STUDY = "student study"
DENSE, VANILLA, DLRT = "dense", "vanilla r=20", "dynamical tau=0.1"
#: The figures that repeat the study's comparison, and their datasets.
COMPARISONS = {"fig_a": "MNIST", "fig_g": "Fashion-MNIST"}
#: Figure (f)'s DLRT model that the claims compare with its dense network (the tolerance of its gap).
REFERENCE_DLRT = "dynamical tau=0.05"


@dataclass(frozen=True)
class Claim:
    """One claim and what the data say of it."""

    key: str  #: its glue keys: ``{prefix}_{key}_verdict`` and ``{prefix}_{key}_evidence``
    source: str
    claim: str
    criterion: str
    evidence: str
    verdict: str  #: "holds", "holds in part" or "does not hold"


def verdict(checks: list[bool]) -> str:
    """``"holds"`` when every check supports the claim, ``"does not hold"`` when none does, else ``"holds in part"``."""
    return "holds" if all(checks) else "does not hold" if not any(checks) else "holds in part"


def _accuracy(stats: dict) -> str:
    return f"{stats['test_accuracy']:.2f} ± {stats['spread']:.2f} %"


def _seconds(stats: dict) -> str:
    return f"{stats['seconds']:.1f} ± {stats['seconds_spread']:.1f} s"


def faster(first: dict, second: dict) -> bool:
    """Whether ``first`` trains in less time than ``second`` beyond the half-ranges of both times."""
    return first["seconds"] + first["seconds_spread"] < second["seconds"] - second["seconds_spread"]


def _comparisons(stats: dict[str, dict], pairs: list[tuple[str, str]],
                 check: Callable[[dict, dict], bool], show: Callable[[dict], str],
                 relation: Callable[[dict, dict], str]) -> tuple[list[bool], str]:
    """Each ``(model, reference)`` of ``pairs`` in each figure of :data:`COMPARISONS` (``stats``:
    :func:`_statistics`): ``check`` results and the evidence (``"MNIST: vanilla r=20 96.66 ± 0.10 % below dense 97.98 ± 0.05 %; ..."``)."""
    checks, evidence = [], []
    for figure, dataset in COMPARISONS.items():
        for model, reference in pairs:
            first, second = stats[figure][model], stats[figure][reference]
            checks.append(check(first, second))
            evidence.append(f"{dataset}: {model} {show(first)} {relation(first, second)} {reference} {show(second)}")
    return checks, "; ".join(evidence)


def _statistics(figures: dict[str, list]) -> dict[str, dict]:
    """:func:`lowrank.engine.summary.group_statistics` of each figure of :data:`COMPARISONS`, computed once."""
    return {figure: summary.group_statistics(figures[figure]) for figure in COMPARISONS}


def _compared(first: dict, second: dict) -> str:
    return summary.compare((first["test_accuracy"], first["spread"]), (second["test_accuracy"], second["spread"]))


def accuracy_claims(figures: dict[str, list]) -> list[Claim]:
    """The study's claims on accuracy, from figures (a) and (g) (``figures``: ``{figure: results}``) and (f)."""
    stats = _statistics(figures)
    comparable, comparable_evidence = _comparisons(
        stats, [(VANILLA, DENSE), (DLRT, DENSE)], lambda a, b: _compared(a, b) != "below", _accuracy, _compared)
    superior, superior_evidence = _comparisons(
        stats, [(DLRT, DENSE), (DLRT, VANILLA)], lambda a, b: _compared(a, b) == "above", _accuracy, _compared)
    reference = summary.group_statistics(figures["fig_f"])
    in_f = _compared(reference[REFERENCE_DLRT], reference[DENSE])
    superior.append(in_f == "above")
    superior_evidence += (f"; figure (f): {REFERENCE_DLRT} {_accuracy(reference[REFERENCE_DLRT])} {in_f} dense "
                          f"{_accuracy(reference[DENSE])}")
    return [
        Claim("comparable", STUDY, "Low-rank networks are comparable, if not superior, to dense ones in accuracy.",
              "Neither low-rank network (vanilla r=20, DLRT tau=0.1) is below dense beyond the seed spread, on MNIST "
              "(a) and on Fashion-MNIST (g).", comparable_evidence, verdict(comparable)),
        Claim("dlrt_more_accurate", STUDY, "DLRT ends up more accurate (than dense and than vanilla low-rank).",
              "DLRT is above dense and above vanilla r=20 beyond the seed spread on MNIST (a) and Fashion-MNIST (g), "
              f"and {REFERENCE_DLRT} above dense in the DLRT paper's setting (f).", superior_evidence,
              verdict(superior)),
    ]


def timing_claims(figures: dict[str, list]) -> list[Claim]:
    """The study's claims on training time, from figures (a) and (g): they depend on the machine and the run."""
    others = [(VANILLA, DENSE), (VANILLA, DLRT)]
    stats = _statistics(figures)
    fastest, fastest_evidence = _comparisons(
        stats, others, faster, _seconds, lambda a, b: "faster than" if faster(a, b) else "not faster than")
    slower, slower_evidence = _comparisons(
        stats, [(DLRT, DENSE)], lambda a, b: faster(b, a), _seconds,
        lambda a, b: "slower than" if faster(b, a) else "not slower than")
    return [
        Claim("vanilla_fastest", STUDY, "Vanilla low-rank trains fastest.",
              "Vanilla r=20 trains in less time than dense and than DLRT beyond the spread of the seeds' times, "
              "in (a) and (g).", fastest_evidence, verdict(fastest)),
        Claim("dlrt_slower", STUDY, "DLRT needs more training time than dense.",
              "DLRT tau=0.1 trains longer than dense beyond the spread of the seeds' times, in (a) and (g).",
              slower_evidence, verdict(slower)),
    ]


def claims_table(claims: list[Claim]) -> pd.DataFrame:
    """One row per claim: its source, the claim, the criterion, the verdict and the evidence."""
    rows = [asdict(claim) for claim in claims]
    return pd.DataFrame(rows).drop(columns="key")[["source", "claim", "criterion", "verdict", "evidence"]]


def claim_values(claims: list[Claim], prefix: str) -> dict[str, summary.Text]:
    """``{prefix}_{key}_verdict`` and ``{prefix}_{key}_evidence`` of every claim, for the book's prose."""
    values = {}
    for claim in claims:
        values[f"{prefix}_{claim.key}_verdict"] = summary.Text(claim.verdict)
        values[f"{prefix}_{claim.key}_evidence"] = summary.Text(claim.evidence)
    return values


#: The columns of :func:`results_table`: :func:`lowrank.engine.plots.seed_table`'s, named to fit the page.
RESULT_COLUMNS = {"test accuracy (%)": "test acc. (%)", "± (half-range)": "±", "seeds": "seeds",
                  "parameters": "params", "compression (%)": "fewer (%)", "hidden ranks": "hidden ranks",
                  "training time": "time"}


def results_table(figures: dict[str, list]) -> pd.DataFrame:
    """Every model of the report, one row per model and figure (``figures``: ``{figure: results}``, in order):
    mean test accuracy, its half-range over the seeds (0 for a single run), seeds, parameters, compression,
    final hidden ranks (lowest to highest over the seeds) and mean training time, indexed by the figure's
    letter and the model (:data:`RESULT_COLUMNS`)."""
    tables = [seed_table(results).reset_index().assign(figure=figure.removeprefix("fig_"))
              for figure, results in figures.items()]
    table = pd.concat(tables, ignore_index=True).set_index(["figure", "model"])
    return table[list(RESULT_COLUMNS)].rename(columns=RESULT_COLUMNS)


def training_costs(figures: dict[str, list]) -> pd.DataFrame:
    """What each figure's own models took to train: the number of trainings (models x seeds), their epochs and
    the sum of their training times (data loading and evaluation excluded; a model that two figures show counts once, in the
    first), and a last row ``all``."""
    seen: set[str] = set()
    rows = []
    for figure, results in figures.items():
        own = [r for r in results if r.config.cache_key() not in seen]
        seen |= {r.config.cache_key() for r in own}
        rows.append({"figure": figure.removeprefix("fig_"), "trainings": len(own),
                     "epochs": sum(int(r.history["epoch"].iloc[-1]) for r in own),
                     "seconds": sum(float(r.history["train_seconds_cum"].iloc[-1]) for r in own)})
    table = pd.DataFrame(rows).set_index("figure")
    table.loc["all"] = table.sum()
    table["training time"] = [str(summary.Seconds(seconds)) for seconds in table.pop("seconds")]
    return table.astype({"trainings": int, "epochs": int})


#: The column of :func:`repeated_trainings` that measures the timing noise.
TIME_NOISE = "half-range (% of mean)"


def repeated_trainings(figures: dict[str, list]) -> pd.DataFrame:
    """Trainings of one configuration under different model names (the same layers, settings and seed; each
    cache key once, ``figures``: ``{figure: results}``): one row per configuration trained more than once, with
    the figure and name of each training, its time, and the half-range of the times as a percentage of their
    mean, the run-to-run noise of a training time on the machine of the record (:data:`TIME_NOISE`)."""
    groups: dict[str, dict[str, tuple[str, object]]] = {}
    for figure, results in figures.items():
        for result in results:
            anonymous = replace(result.config, name="").cache_key()
            groups.setdefault(anonymous, {}).setdefault(result.config.cache_key(), (figure, result))
    rows = []
    for trainings in groups.values():
        if len(trainings) < 2:
            continue
        seconds = [float(result.history["train_seconds_cum"].iloc[-1]) for _, result in trainings.values()]
        mean = sum(seconds) / len(seconds)
        rows.append({"trainings": "; ".join(f"({figure.removeprefix('fig_')}) {result.config.name}"
                                            for figure, result in trainings.values()),
                     "training times": ", ".join(str(summary.Seconds(t)) for t in seconds),
                     TIME_NOISE: round(100 * (max(seconds) - min(seconds)) / 2 / mean, 1)})
    return pd.DataFrame(rows, columns=["trainings", "training times", TIME_NOISE]).set_index("trainings")


def timing_noise(table: pd.DataFrame) -> summary.Text:
    """The largest :data:`TIME_NOISE` of :func:`repeated_trainings` as the book states it: ``"±15 %"``."""
    if table.empty:
        return summary.Text("unknown (no configuration of the record was trained twice)")
    return summary.Text(f"±{table[TIME_NOISE].max():.0f} %")
