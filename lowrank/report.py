"""The examples report: every figure notebook executed by papermill from its TOML, then the book.

Each figure is a pair ``notebooks/fig_X.ipynb`` + ``notebooks/configs/fig_X.toml``. The runner validates
every TOML first (a config error stops before any training; a figure that is not a network study names
its ``[figure] kind`` and is checked by that kind's loader, :data:`FIGURE_KINDS`), executes the notebooks
with papermill into ``book/figures/`` (``--jobs N`` at a time, each kernel on one thread), shows which
figure, model and epoch is running, and finally runs ``jb build book/``. Trained models are cached by
their config's hash in the results folder, so a second run only re-executes the notebooks; ``force``
retrains.

Notebooks call :func:`train_figure`, which trains (or reads) every model of a TOML and, when the runner
set ``LOWRANK_PROGRESS``, appends one JSON line per epoch to that file for the runner to display.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lowrank import config as cfg

#: Settings of a ``--quick`` run: a small training subset and one epoch without fine-tuning (validation
#: and test stay full), in float64, so that the stored outputs that nbval compares do not depend on the
#: CPU's kernels (``book/reproducibility.md``: rounding differences that rank-adaptive runs amplify stay
#: below the digits shown for one epoch, not for two where ranks grow).
QUICK = {"subset": 1000, "num_epochs": 1, "fine_tune_epochs": 0, "dtype": "float64"}
PROGRESS_ENV = "LOWRANK_PROGRESS"
#: Figures that are not network studies say so in ``[figure] kind`` of their TOML; the loader named here
#: validates such a file instead of :func:`lowrank.config.load` (which needs models). No ``kind``, or
#: ``kind = "network"``, is a study of :mod:`lowrank.config`.
FIGURE_KINDS = {"matrix-ode": "lowrank.dlra:load_experiment", "adapters": "lowrank.adapters:load_experiment",
                "step-benchmark": "lowrank.benchmark:load_experiment"}
#: The figure shown in the README: its first plot, saved by a full-size run.
README_FIGURE = ("fig_a", Path("book/images/fig_a.png"))
#: Where an executed figure notebook of the record keeps what it was computed from and on what
#: (``notebook.metadata["lowrank"]["record"]``, written by :func:`stamp_record`).
RECORD_METADATA = "lowrank"


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


def glue_names(key: str, names) -> None:
    """Glue a list of names as ``"a, b and c"`` (``"none"`` when empty) under ``key``."""
    from myst_nb import glue

    names = list(names)
    text = "none" if not names else names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    glue(key, Text(text), display=False)


def slug(name: str) -> str:
    """``"dynamical tau=0.1"`` -> ``"dynamical_tau_0_1"``: a model name as part of a glue key."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def hidden_rank_columns(history) -> list[str]:
    """The ``rank_<i>`` columns of a history for every layer but the output layer."""
    return [c for c in history.columns if c.startswith("rank_")][:-1]


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


def glue_rank_limits(key: str, result) -> None:
    """Glue ``{key}_initial_ranks`` (the hidden ranks of the untrained network), ``{key}_max_ranks``
    (:func:`max_rank` of each hidden layer) and ``{key}_epochs_at_max_rank`` (:func:`epochs_at_max_rank`)."""
    from myst_nb import glue

    hidden = hidden_rank_columns(result.history)
    glue(f"{key}_initial_ranks", [int(result.history.iloc[0][c]) for c in hidden], display=False)
    glue(f"{key}_max_ranks", [max_rank(layer) for layer in result.config.layers[:-1]], display=False)
    glue(f"{key}_epochs_at_max_rank", epochs_at_max_rank(result), display=False)


def seed_groups(results) -> dict[str, list]:
    """The results of a figure with ``[figure] seeds``, by model: ``{"dense": [seed 0, seed 1], ...}`` in file
    order (a name without a ``" seed=<s>"`` suffix is a group of one)."""
    groups: dict[str, list] = {}
    for result in results:
        groups.setdefault(re.sub(r" seed=\d+$", "", result.config.name), []).append(result)
    return groups


def seed_statistics(members) -> dict:
    """Over the seeds of one model: test accuracy (%) mean and half-range (``spread``), final hidden ranks of
    each seed, mean compression (%) and mean training seconds."""
    accuracy = [100 * r.test_accuracy for r in members]
    lasts = [r.history.iloc[-1] for r in members]
    hidden = hidden_rank_columns(members[0].history)
    return {"test_accuracy": sum(accuracy) / len(accuracy), "spread": (max(accuracy) - min(accuracy)) / 2,
            "ranks": [[int(last[c]) for c in hidden] for last in lasts], "seeds": len(members),
            "compression": 100 * sum(float(last["compression"]) for last in lasts) / len(lasts),
            "seconds": sum(float(last["train_seconds_cum"]) for last in lasts) / len(lasts)}


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
    ``compression`` (%, 1 decimal), ``seconds`` (mean training time), and ``initial_ranks`` / ``max_ranks``
    as :func:`glue_results` (the same for every seed)."""
    from myst_nb import glue

    for name, members in seed_groups(results).items():
        key, stats = f"{prefix}_{slug(name)}", seed_statistics(members)
        glue(f"{key}_test_accuracy", round(stats["test_accuracy"], 2), display=False)
        glue(f"{key}_spread", round(stats["spread"], 2), display=False)
        glue(f"{key}_ranks", Text(seed_ranks_text(stats)), display=False)
        glue(f"{key}_compression", round(stats["compression"], 1), display=False)
        glue(f"{key}_seconds", Seconds(stats["seconds"]), display=False)
        glue_rank_limits(key, members[0])


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


#: Issue 13's bar for a low-rank network against dense: no more training time, at most this many points lower.
DENSE_ACCURACY_MARGIN = 0.3
#: The columns of :func:`basis_interval_table` that depend on the machine's speed (not compared by nbval).
TIME_COLUMNS = ["train s", "time / dense", "as fast as dense"]


def basis_interval_table(stats: dict[str, dict], models: dict[int, str], dense: str,
                         margin: float = DENSE_ACCURACY_MARGIN) -> pd.DataFrame:
    """Each basis interval ``k`` of ``models`` (``{k: model name}``, ``k = 1`` among them) judged against ``k = 1``
    and against ``dense``, from :func:`seed_statistics` of every model (``stats``). One row per ``k``:

    - ``test accuracy (%)``, ``spread``, ``ranks`` (each seed's), ``train s`` (mean over the seeds, as :class:`Seconds` prints it);
    - ``vs k=1``: :func:`compare` of the accuracies; ``ranks vs k=1``: ``"differ"`` when :func:`ranks_differ`;
    - ``time / dense``: training time over dense's; ``points below dense``: dense's accuracy minus this one;
    - ``as fast as dense``: ``"met"`` when ``time / dense <= 1`` and ``points below dense <= margin``.

    The last three depend on the machine's speed (:data:`TIME_COLUMNS`).
    """
    baseline, reference = stats[models[1]], stats[dense]
    rows = []
    for k, name in sorted(models.items()):
        model = stats[name]
        ratio = model["seconds"] / reference["seconds"]
        below = reference["test_accuracy"] - model["test_accuracy"]
        rows.append({
            "k": k, "test accuracy (%)": round(model["test_accuracy"], 2), "spread": round(model["spread"], 2),
            "ranks": seed_ranks_text(model),
            "train s": str(Seconds(model["seconds"])),
            "vs k=1": compare((model["test_accuracy"], model["spread"]), (baseline["test_accuracy"], baseline["spread"])),
            "ranks vs k=1": "differ" if ranks_differ(model, baseline) else "do not differ",
            "time / dense": round(ratio, 2), "points below dense": round(below, 2),
            "as fast as dense": "met" if ratio <= 1 and below <= margin else "missed",
        })
    return pd.DataFrame(rows).set_index("k")


def largest_equivalent_interval(table: pd.DataFrame) -> int:
    """The largest ``k`` of a :func:`basis_interval_table` whose accuracy is not below ``k = 1``'s beyond the seed
    spread and whose ranks do not differ from ``k = 1``'s (1 if no other ``k`` is)."""
    same = table[(table["vs k=1"] != "below") & (table["ranks vs k=1"] == "do not differ")]
    return int(same.index.max())


def max_rank(layer: cfg.LayerConfig) -> int:
    """The largest rank ``layer`` can have: ``r_max`` (dynamical), ``rank`` (lowrank), ``min(dims)`` (dense)."""
    return {"dynamical": layer.r_max, "lowrank": layer.rank}.get(layer.type, min(layer.dims))


class FigureFailed(RuntimeError):
    """A figure notebook raised; the message names the notebook that holds the traceback."""


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its notebook, its config and the executed copy in the book."""

    name: str
    notebook: Path
    config: Path
    output: Path

    @property
    def uses(self) -> tuple[str, ...]:
        """Figures whose trained models this one reads (its ``[figure] uses`` list)."""
        if figure_kind(self.config) != "network":
            return ()
        return tuple(Path(p).stem for p in cfg.load(self.config).figure.get("uses", ()))


def figure_kind(config: str | Path) -> str:
    """``[figure] kind`` of a figure's TOML: ``"network"`` when absent (or when the file does not parse)."""
    try:
        figure = tomllib.loads(Path(config).read_text(encoding="utf-8")).get("figure", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "network"  # cfg.load reports the problem
    return figure.get("kind", "network") if isinstance(figure, dict) else "network"


def validate(config: str | Path):
    """Validate a figure's TOML with the loader of its kind (:data:`FIGURE_KINDS`); returns what it read."""
    import importlib

    kind = figure_kind(config)
    if kind == "network":
        return cfg.load(config)
    if kind not in FIGURE_KINDS:
        allowed = " | ".join(f'"{k}"' for k in ("network", *FIGURE_KINDS))
        raise cfg.ConfigError(f'{config}: figure.kind = "{kind}" is unknown; allowed: {allowed}')
    module, name = FIGURE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)(config)


def quick_settings(model: cfg.ModelConfig) -> cfg.ModelConfig:
    """``model`` with the :data:`QUICK` overrides (never more epochs or images than it asks for); a warm start
    keeps its dense epochs and gets :data:`QUICK`'s epochs after them."""
    subset = min(QUICK["subset"], model.settings.subset or QUICK["subset"])
    settings = model.settings
    epochs = min(settings.warm_start_epochs + QUICK["num_epochs"], settings.num_epochs)
    return model.with_settings(subset=subset, num_epochs=epochs,
                               fine_tune_epochs=min(QUICK["fine_tune_epochs"], settings.fine_tune_epochs),
                               dtype=QUICK["dtype"])


def figure_models(config: str | Path, quick: bool = False) -> list[cfg.ModelConfig]:
    """The models of a figure's TOML and of the figures it ``uses``, in file order, each model once."""
    study = cfg.load(config)
    models = [m for used in study.figure.get("uses", ()) for m in figure_models(Path(config).parent / used)]
    models = [quick_settings(m) if quick else m for m in [*models, *study.models]]
    return list({m.cache_key(): m for m in models}.values())


def train_figure(
    config: str | Path,
    quick: bool = False,
    force: bool = False,
    results_dir: str | Path | None = None,
    diverged: dict[str, str] | None = None,
):
    """Train (or read from the cache) every model of a figure; returns their ``TrainingResult`` list.

    A model whose loss becomes NaN or infinite raises :class:`lowrank.training.TrainingDivergedError`,
    unless a ``diverged`` dict is given: then its message is stored there under the model's name and the
    model is left out of the returned list.
    """
    from lowrank.training import TrainingDivergedError, train

    progress = os.environ.get(PROGRESS_ENV)
    results = []
    for model in figure_models(config, quick):

        def report_epoch(row, model=model) -> None:
            if progress:
                line = {"model": model.name, "epoch": int(row["epoch"]), "epochs": model.settings.total_epochs}
                with open(progress, "a") as stream:
                    stream.write(json.dumps(line) + "\n")

        try:
            results.append(train(model, results_dir=results_dir, force=force, on_epoch=report_epoch))
        except TrainingDivergedError as error:
            if diverged is None:
                raise
            diverged[model.name] = str(error)
    return results


def figure_keys(figure: Figure) -> dict[str, str]:
    """What a full-size run of ``figure`` is computed from: ``{model name: cache key}`` of every model it
    trains or reads (:func:`figure_models`), or for a figure that is not a network study
    ``{"config": key}``, a hash of lowrank's version and its TOML text. A record whose keys differ from these
    is stale: a configuration or the library version changed since it was made.
    """
    import hashlib

    from lowrank import __version__

    if figure_kind(figure.config) == "network":
        return {m.name: m.cache_key() for m in figure_models(figure.config)}
    text = figure.config.read_text(encoding="utf-8")
    return {"config": hashlib.sha256(f"{__version__}\n{text}".encode()).hexdigest()[:16]}


def machine() -> dict[str, str | int]:
    """The machine and software a run is executed on: CPU, cores, torch threads, kernels and versions."""
    import platform

    import numpy
    import torch

    from lowrank import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            cpu = next((line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = next((line.strip(" -") for line in torch.__config__.show().splitlines()
                 if "Math Kernel Library" in line or "OpenBLAS" in line), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 1)),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": numpy.__version__, "blas": blas, "lowrank": __version__}


def stamp_record(path: Path, figure: Figure, seconds: float, trained_epochs: int | None) -> None:
    """Store in the executed notebook at ``path`` what it was computed from and on what, and show it.

    The metadata (:data:`RECORD_METADATA`) holds :func:`figure_keys`, :func:`machine`, the UTC time, the
    wall time and ``trained_epochs``, the epochs this execution trained (0: every model came from the
    results cache, and the wall time is that of reading them; ``None`` for a figure that is not a network
    study); a last markdown cell states the same for the reader of the book.
    """
    import datetime

    import nbformat

    record = {"keys": figure_keys(figure), "machine": machine(), "wall_seconds": round(seconds, 1),
              "trained_epochs": trained_epochs,
              "executed": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata[RECORD_METADATA] = {"record": record}
    notebook.cells = [c for c in notebook.cells if "record" not in c.metadata.get("tags", [])]
    notebook.cells.append(nbformat.v4.new_markdown_cell(record_text(record, figure.name), metadata={"tags": ["record"]}))
    nbformat.write(notebook, path)


def record_text(record: dict, name: str) -> str:
    """The "Record of this page" box of figure ``name`` for the ``record`` metadata of :func:`stamp_record`."""
    m, epochs = record["machine"], record["trained_epochs"]
    trained = ("" if epochs is None else f" ({epochs} epochs trained in this run)" if epochs
               else " (every model read from the results cache of an earlier run)")
    return (f":::{{admonition}} Record of this page\n"
            f"Executed {record['executed']} in {record['wall_seconds']:.0f} s of wall time{trained} on {m['cpu']} "
            f"({m['cores']} cores, {m['torch_threads']} torch thread per figure, ATen {m['cpu_kernels']} kernels): "
            f"Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, {m['blas']}, lowrank {m['lowrank']}. "
            f"Reproduce it with `python -m lowrank report --only {name}` "
            f"(see [Reproducing this report](../reproducibility.md)).\n:::")


def discover(root: Path) -> list[Figure]:
    """The figures under ``root/notebooks`` (``fig_*.ipynb`` with a ``configs/fig_*.toml``), sorted."""
    notebooks = root / "notebooks"
    figures = []
    for notebook in sorted(notebooks.glob("fig_*.ipynb")):
        config = notebooks / "configs" / f"{notebook.stem}.toml"
        if not config.exists():
            raise FileNotFoundError(f"{notebook}: no config {config}")
        figures.append(Figure(notebook.stem, notebook, config, root / "book" / "figures" / notebook.name))
    if not figures:
        raise FileNotFoundError(f"no figure notebooks (fig_*.ipynb) in {notebooks}; run from the repository root")
    return figures


def execute(figure: Figure, quick: bool, force: bool, results_dir: Path, progress_file: Path) -> Path:
    """Run one figure notebook with papermill (in the notebook's folder, one thread)."""
    import papermill

    os.environ[PROGRESS_ENV] = str(progress_file)
    with open(progress_file, "a") as stream:
        stream.write(json.dumps({"started": figure.notebook.name}) + "\n")
    os.environ["OMP_NUM_THREADS"] = "1"
    figure.output.parent.mkdir(parents=True, exist_ok=True)
    parameters = {"config": str(figure.config.resolve()), "quick": quick, "force": force, "results_dir": str(results_dir)}
    start = time.perf_counter()
    try:
        with kernel_sockets() as config:
            papermill.execute_notebook(
                figure.notebook, figure.output, parameters=parameters, kernel_name="python3",
                cwd=str(figure.notebook.parent), progress_bar=False, config=config,
            )
    except papermill.PapermillExecutionError as error:
        raise FigureFailed(f"{figure.name} failed; the executed notebook with the traceback is {figure.output}\n{error}") from None
    hide_parameter_cells(figure.output)
    if not quick:
        epochs = trained_epochs(progress_file) if figure_kind(figure.config) == "network" else None
        stamp_record(figure.output, figure, time.perf_counter() - start, epochs)
    return figure.output


@contextmanager
def kernel_sockets():
    """A traitlets ``Config`` under which a notebook's kernel talks to its client over Unix sockets.

    Jupyter's default transport is TCP on localhost, readable by any local user and announced by a
    warning of every ipykernel; with ``KernelManager.transport = "ipc"`` the sockets are files named
    ``<ip>-<port>`` in a private temporary folder, removed when the block ends.
    """
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="lowrank-kernel-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": str(Path(folder) / "kernel")}})


def hide_parameter_cells(path: Path) -> None:
    """Tag the ``parameters`` and papermill's ``injected-parameters`` cells ``remove-cell`` for the book."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if {"parameters", "injected-parameters"} & set(tags) and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(notebook, path)


def trained_epochs(progress_file: Path) -> int:
    """The epochs (``epoch >= 1``) that the figure notebooks reported in ``progress_file`` (:func:`train_figure`)."""
    with open(progress_file) as stream:
        events = [json.loads(line) for line in stream if line.endswith("\n")]
    return sum(1 for event in events if event.get("epoch", 0) >= 1)


class ProgressBoard:
    """Prints one line per finished epoch, read from the JSON lines the notebooks append."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.offsets = dict.fromkeys(files, 0)
        for path in files.values():
            path.write_text("")

    def poll(self) -> None:
        for name, path in self.files.items():
            with open(path) as stream:
                stream.seek(self.offsets[name])
                while (line := stream.readline()).endswith("\n"):  # a line still being written waits
                    self.offsets[name] = stream.tell()
                    event = json.loads(line)
                    if "started" in event:
                        print(f"{name}: started {event['started']}", flush=True)
                    else:
                        print(f"  {name}: {event['model']}: epoch {event['epoch']}/{event['epochs']}", flush=True)


# Per-sample cost of a rank-adaptive DLRT layer relative to r (n_in + n_out) multiply-adds: the augmented rank
# 2r, the second pass of kls and the step's own QRs, SVD and products (measured: figure (a)'s DLRT network
# trains about 2.5x as long as its dense twin at start rank 128).
DLRT_COST_FACTOR = 6.0


def estimated_work(figure: Figure) -> float:
    """A figure's training work in multiply-adds, for ordering (:func:`schedule`): over its own models, epochs x
    training images x the per-sample cost of each layer (dense ``n_in n_out``, vanilla ``r (n_in + n_out + r)``,
    dynamical ``DLRT_COST_FACTOR r (n_in + n_out)`` at the start rank). 0 for a figure that trains no networks."""
    from lowrank.data import SPLIT_SIZES

    if figure_kind(figure.config) != "network":
        return 0.0
    work = 0.0
    for model in cfg.load(figure.config).models:
        per_sample = 0.0
        for layer in model.layers:
            n_in, n_out = layer.dims
            per_sample += {"dense": n_in * n_out,
                           "lowrank": (layer.rank or 0) * (n_in + n_out + (layer.rank or 0)),
                           "dynamical": DLRT_COST_FACTOR * (layer.rank or 0) * (n_in + n_out)}[layer.type]
        images = model.settings.subset or SPLIT_SIZES["train"]
        work += model.settings.total_epochs * images * per_sample
    return work


#: Figure kinds that measure time: they run last, in a wave of their own, so that no other figure shares the CPU.
TIMING_KINDS = ("step-benchmark",)


def schedule(figures: list[Figure]) -> list[list[Figure]]:
    """Waves of figures: a figure runs after every selected figure it ``uses``; within a wave the figures with
    the most work (:func:`estimated_work`) come first, so that with ``--jobs N`` the longest does not start last.
    Figures of :data:`TIMING_KINDS` form the last wave alone."""
    timing = [f for f in figures if figure_kind(f.config) in TIMING_KINDS]
    selected = {f.name for f in figures}
    done: set[str] = set()
    waves, pending = [], [f for f in figures if f not in timing]
    while pending:
        wave = [f for f in pending if all(used in done or used not in selected for used in f.uses)]
        if not wave:
            raise ValueError(f"figures that use each other: {[f.name for f in pending]}")
        waves.append(sorted(wave, key=estimated_work, reverse=True))
        done |= {f.name for f in wave}
        pending = [f for f in pending if f not in wave]
    return waves + ([timing] if timing else [])


def run(
    root: Path = Path("."),
    quick: bool = False,
    force: bool = False,
    jobs: int = 1,
    only: Iterable[str] = (),
    build: bool = True,
    results_dir: Path | None = None,
) -> list[Path]:
    """Execute the figure notebooks (all, or those named in ``only``) and build the book."""
    root = root.resolve()
    figures = [f for f in discover(root) if not only or f.name in set(only)]
    for figure in figures:
        validate(figure.config)  # validate every config before any training
    results_dir = (results_dir or Path(os.environ.get("LOWRANK_RESULTS", root / "results"))).resolve()
    progress_dir = results_dir / "progress"
    progress_dir.mkdir(parents=True, exist_ok=True)
    board = ProgressBoard({f.name: progress_dir / f"{f.name}.jsonl" for f in figures})
    outputs = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for wave in schedule(figures):
            running: dict[Future, Figure] = {}
            for figure in wave:
                print(f"{figure.name}: queued ({'quick' if quick else 'full size'})", flush=True)
                running[pool.submit(execute, figure, quick, force, results_dir, board.files[figure.name])] = figure
            while running:
                finished, _ = wait(running, timeout=2, return_when=FIRST_COMPLETED)
                board.poll()
                for future in finished:
                    figure = running.pop(future)
                    outputs.append(future.result())
                    print(f"{figure.name}: done -> {figure.output.relative_to(root)}", flush=True)
    print(f"all figures in {time.perf_counter() - start:.0f} s", flush=True)
    if not quick and any(f.name == README_FIGURE[0] for f in figures):
        save_first_image(root / "book" / "figures" / f"{README_FIGURE[0]}.ipynb", root / README_FIGURE[1])
    if build:
        build_book(root)
    return outputs


def save_first_image(notebook: Path, path: Path) -> None:
    """Write the first PNG output of an executed notebook to ``path`` (atomically)."""
    import base64

    import nbformat

    from lowrank.store import atomic_write  # imports torch, which the command-line parser must not

    for cell in nbformat.read(notebook, as_version=4).cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as file:
                    file.write(base64.b64decode(output["data"]["image/png"]))
                return
    raise ValueError(f"{notebook} has no PNG output")


def build_book(root: Path) -> None:
    """``jb build book/`` with warnings as errors."""
    jb = Path(sys.executable).with_name("jb")
    subprocess.run([str(jb), "build", "-W", "-n", "--keep-going", str(root / "book")], check=True)


def refresh_notebooks(root: Path = Path("."), only: Iterable[str] = ()) -> list[Path]:
    """Re-execute the figure notebooks in place with their default (quick) parameters.

    The stored outputs are what ``pytest --nbval notebooks/`` compares against: run this after a change
    that alters them, and commit the notebooks.
    """
    import nbformat
    from nbclient import NotebookClient

    refreshed = []
    for figure in discover(root.resolve()):
        if only and figure.name not in set(only):
            continue
        print(f"{figure.name}: executing {figure.notebook}", flush=True)
        notebook = nbformat.read(figure.notebook, as_version=4)
        with kernel_sockets() as config:
            NotebookClient(notebook, kernel_name="python3", resources={"metadata": {"path": str(figure.notebook.parent)}},
                           config=config).execute()
        nbformat.write(notebook, figure.notebook)
        refreshed.append(figure.notebook)
    return refreshed
