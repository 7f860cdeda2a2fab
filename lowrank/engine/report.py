"""The examples report: every figure notebook executed by papermill from its TOML, then the book.

Each figure is a pair ``notebooks/fig_X.ipynb`` + ``notebooks/configs/fig_X.toml``. The runner validates
every TOML first (a config error stops before any training; a figure that is not a network study names
its ``[figure] kind`` and is checked by that kind's loader, :data:`FIGURE_KINDS`), trains every model of
every figure (``--jobs N`` at a time, the most work first, each on one thread: :func:`train_models`),
executes the notebooks with papermill into ``book/figures/`` (``--jobs N`` at a time, each kernel on one
thread), shows which figure, model and epoch is running, and finally runs ``jb build book/``. Trained models are cached by
their config's hash in the results folder, so a second run only re-executes the notebooks; ``force``
retrains.

Notebooks call :func:`train_figure`, which trains (or reads) every model of a TOML and, when the runner
set ``LOWRANK_PROGRESS``, appends one JSON line per epoch to that file for the runner to display.
"""

from __future__ import annotations

import json
import os
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


from lowrank.engine import config as cfg

PROGRESS_ENV = "LOWRANK_PROGRESS"
#: Figures that are not network studies say so in ``[figure] kind`` of their TOML; the loader named here
#: validates such a file instead of :func:`lowrank.engine.config.load` (which needs models). No ``kind``, or
#: ``kind = "network"``, is a study of :mod:`lowrank.engine.config`.
FIGURE_KINDS = {"matrix-ode": "lowrank.engine.experiments.matrix_ode:load_experiment", "adapters": "lowrank.engine.experiments.adapters:load_experiment",
                "step-benchmark": "lowrank.engine.experiments.benchmark:load_experiment"}
#: The figure shown in the README: its first plot, saved by a full-size run.
README_FIGURE = ("fig_a", Path("book/images/fig_a.png"))
#: Where an executed figure notebook of the record keeps what it was computed from and on what
#: (``notebook.metadata["lowrank"]["record"]``, written by :func:`stamp_record`).
RECORD_METADATA = "lowrank"


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


def figure_models(config: str | Path, quick: bool = False) -> list[cfg.ModelConfig]:
    """The models of a figure's TOML and of the figures it ``uses``, in file order, each model once."""
    study = cfg.load(config)
    models = [m for used in study.figure.get("uses", ()) for m in figure_models(Path(config).parent / used)]
    models = [cfg.quick_settings(m) if quick else m for m in [*models, *study.models]]
    return list({m.cache_key(): m for m in models}.values())


def train_figure(
    config: str | Path,
    quick: bool = False,
    force: bool = False,
    results_dir: str | Path | None = None,
    diverged: dict[str, str] | None = None,
):
    """Train (or read from the cache) every model of a figure; returns their ``TrainingResult`` list.

    A model whose loss becomes NaN or infinite raises :class:`lowrank.engine.training.TrainingDivergedError`,
    unless a ``diverged`` dict is given: then its message is stored there under the model's name and the
    model is left out of the returned list.
    """
    from lowrank.engine.training import TrainingDivergedError, train

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


def train_used_figures(config: str | Path, quick: bool = False, force: bool = False,
                       results_dir: str | Path | None = None) -> dict[str, list]:
    """``{figure: results}`` for every TOML that ``config``'s ``[figure] uses`` names, in its order
    (:func:`train_figure` of each; a model that diverges is left out, as figure (e) shows it)."""
    folder = Path(config).parent
    return {Path(used).stem: train_figure(folder / used, quick, force, results_dir, diverged={})
            for used in cfg.load(config).figure.get("uses", ())}


def figure_keys(figure: Figure) -> dict[str, str]:
    """What a full-size run of ``figure`` is computed from: ``{model name: cache key}`` of every model it
    trains or reads (:func:`figure_models`; a name that recurs is followed by its key), or for a figure that is not a network study
    ``{"config": key}``, a hash of lowrank's version and its TOML tables (not its comments or layout). A record
    whose keys differ from these is stale: a configuration or the library version changed since it was made.
    """
    import hashlib

    from lowrank import __version__

    if figure_kind(figure.config) == "network":
        keys: dict[str, str] = {}
        for model in figure_models(figure.config):  # two figures it uses may name different models alike
            keys[model.name if model.name not in keys else f"{model.name} ({model.cache_key()})"] = model.cache_key()
        return keys
    tables = json.dumps(tomllib.loads(figure.config.read_text(encoding="utf-8")), sort_keys=True)
    return {"config": hashlib.sha256(f"{__version__}\n{tables}".encode()).hexdigest()[:16]}


def write_notebook(notebook, path: Path) -> None:
    """Write ``notebook`` to ``path`` as ``nbformat.write`` does, atomically (:func:`lowrank.engine.store.atomic_write`):
    an interrupted write leaves the previous notebook, never half of one."""
    import nbformat

    from lowrank.engine.store import atomic_write  # imports torch, which the command-line parser must not

    text = nbformat.writes(notebook)
    with atomic_write(path) as file:
        file.write((text if text.endswith("\n") else text + "\n").encode("utf-8"))


def stamp_record(path: Path, figure: Figure, seconds: float, trained_epochs: int | None) -> None:
    """Store in the executed notebook at ``path`` what it was computed from and on what, and show it.

    The metadata (:data:`RECORD_METADATA`) holds :func:`figure_keys`, :func:`machine`, the UTC time, the
    notebook's wall time and ``trained_epochs``, the epochs this run of the report trained for the figure (its first
    phase, :func:`train_models`, or the notebook; 0: every model came from the results cache of an earlier run;
    ``None`` for a figure that is not a network
    study); a last markdown cell states the same for the reader of the book.
    """
    import datetime

    import nbformat

    from lowrank.engine import determinism  # imports torch

    record = {"keys": figure_keys(figure), "machine": determinism.machine(), "wall_seconds": round(seconds, 1),
              "trained_epochs": trained_epochs,
              "executed": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata[RECORD_METADATA] = {"record": record}
    notebook.cells = [c for c in notebook.cells if "record" not in c.metadata.get("tags", [])]
    notebook.cells.append(nbformat.v4.new_markdown_cell(record_text(record, figure.name), metadata={"tags": ["record"]}))
    write_notebook(notebook, path)


def record_text(record: dict, name: str) -> str:
    """The "Record of this page" box of figure ``name`` for the ``record`` metadata of :func:`stamp_record`."""
    m, epochs = record["machine"], record["trained_epochs"]
    trained = ("" if epochs is None else f" (its models trained by this run of the report: {epochs} epochs)" if epochs
               else " (every model read from the results cache of an earlier run)")
    return (f":::{{admonition}} Record of this page\n"
            f"Executed {record['executed']}, the notebook in {record['wall_seconds']:.0f} s of wall time{trained}, on "
            f"{machine_text(m)}. "
            f"Reproduce it with `python -m lowrank report --only {name}` "
            f"(see [Reproducing this report](../reproducibility.md)).\n:::")


def machine_text(m: dict) -> str:
    """The machine and versions of :func:`lowrank.engine.determinism.machine` in one line, as the book states them."""
    return (f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch thread per figure, ATen {m['cpu_kernels']} "
            f"kernels): Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, {m['blas']}, lowrank {m['lowrank']}")


def discover(root: Path) -> list[Figure]:
    """The pages of the report under ``root/notebooks``: every notebook with a config of its name
    (``fig_a.ipynb`` + ``configs/fig_a.toml``, ``conclusion.ipynb`` + ``configs/conclusion.toml``), sorted; a
    ``fig_*.ipynb`` without its config is an error."""
    notebooks = root / "notebooks"
    figures = []
    for notebook in sorted(notebooks.glob("*.ipynb")):
        config = notebooks / "configs" / f"{notebook.stem}.toml"
        if not config.exists():
            if notebook.stem.startswith("fig_"):
                raise FileNotFoundError(f"{notebook}: no config {config}")
            continue
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
    write_notebook(notebook, path)


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


def model_work(model: cfg.ModelConfig) -> float:
    """A model's training work in multiply-adds, for ordering (:func:`schedule`, :func:`train_models`): epochs x
    training images x the per-sample cost of each layer (dense ``n_in n_out``, vanilla ``r (n_in + n_out + r)``,
    dynamical ``DLRT_COST_FACTOR r (n_in + n_out)`` at the start rank), times a convolution's kernel positions."""
    from lowrank.engine.data import SPLIT_SIZES

    per_sample, shape = 0.0, cfg.IMAGE_SHAPES[model.settings.dataset]
    for layer in model.layers:
        n_in, n_out = layer.matrix_dims
        rank = layer.rank or 0
        per_sample += layer.positions(shape) * {"dense": n_in * n_out, "lowrank": rank * (n_in + n_out + rank),
                                                "dynamical": DLRT_COST_FACTOR * rank * (n_in + n_out)}[layer.type]
        shape = layer.output_shape(shape)
    return model.settings.total_epochs * (model.settings.subset or SPLIT_SIZES["train"]) * per_sample


def estimated_work(figure: Figure) -> float:
    """A figure's training work in multiply-adds (:func:`model_work` over its own models); 0 for a figure that
    trains no networks."""
    if figure_kind(figure.config) != "network":
        return 0.0
    return sum(model_work(model) for model in cfg.load(figure.config).models)


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


def training_queue(figures: list[Figure], quick: bool) -> list[tuple[Figure, cfg.ModelConfig]]:
    """Every model the network figures among ``figures`` train or read, each once (by cache key, under the first
    figure that trains it itself, else the first that reads it), the most work (:func:`model_work`) first: the
    order of :func:`train_models`."""
    networks = [f for f in figures if figure_kind(f.config) == "network"]
    queue: dict[str, tuple[Figure, cfg.ModelConfig]] = {}
    for figure in networks:
        for model in cfg.load(figure.config).models:
            model = cfg.quick_settings(model) if quick else model
            queue.setdefault(model.cache_key(), (figure, model))
    for figure in networks:
        for model in figure_models(figure.config, quick):
            queue.setdefault(model.cache_key(), (figure, model))
    return sorted(queue.values(), key=lambda item: model_work(item[1]), reverse=True)


def train_model(model: cfg.ModelConfig, force: bool, results_dir: Path, progress_file: Path) -> str | None:
    """Train one model into the results cache (one thread), reporting each epoch as :func:`train_figure` does;
    returns the message of a :class:`~lowrank.engine.training.TrainingDivergedError` (the figure notebook that
    shows the model reports it), else ``None``."""
    from lowrank.engine.training import TrainingDivergedError, train

    def report_epoch(row) -> None:
        with open(progress_file, "a") as stream:
            stream.write(json.dumps({"model": model.name, "epoch": int(row["epoch"]),
                                     "epochs": model.settings.total_epochs}) + "\n")

    try:
        train(model, results_dir=results_dir, force=force, on_epoch=report_epoch)
    except TrainingDivergedError as error:
        return str(error)
    return None


def train_models(pool: ProcessPoolExecutor, figures: list[Figure], quick: bool, force: bool, results_dir: Path,
                 board: ProgressBoard) -> None:
    """The report's first phase: every model of :func:`training_queue`, as many at a time as ``pool`` has
    workers, so that a figure's models train side by side and the notebooks then read them from the cache."""
    running = {pool.submit(train_model, model, force, results_dir, board.files[figure.name]): (figure, model)
               for figure, model in training_queue(figures, quick)}
    while running:
        finished, _ = wait(running, timeout=2, return_when=FIRST_COMPLETED)
        board.poll()
        for future in finished:
            figure, model = running.pop(future)
            diverged = future.result()
            print(f"{figure.name}: {model.name}: {'diverged (' + diverged + ')' if diverged else 'trained'}", flush=True)


def run(
    root: Path = Path("."),
    quick: bool = False,
    force: bool = False,
    jobs: int = 1,
    only: Iterable[str] = (),
    build: bool = True,
    results_dir: Path | None = None,
) -> list[Path]:
    """Train the models of the figures (all, or those named in ``only``) ``jobs`` at a time
    (:func:`train_models`), execute their notebooks ``jobs`` at a time (:func:`schedule`), build the book."""
    root = root.resolve()
    figures = [f for f in discover(root) if not only or f.name in set(only)]
    for figure in figures:
        validate(figure.config)  # validate every config before any training
    results_dir = Path(results_dir or cfg.default_results_dir(root)).resolve()
    progress_dir = results_dir / "progress"
    progress_dir.mkdir(parents=True, exist_ok=True)
    board = ProgressBoard({f.name: progress_dir / f"{f.name}.jsonl" for f in figures})
    outputs = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        train_models(pool, figures, quick, force, results_dir, board)
        print(f"all models trained in {time.perf_counter() - start:.0f} s", flush=True)
        for wave in schedule(figures):
            running: dict[Future, Figure] = {}
            for figure in wave:
                print(f"{figure.name}: queued ({'quick' if quick else 'full size'})", flush=True)
                # force=False: the first phase retrained what force asked for; the notebooks read it
                running[pool.submit(execute, figure, quick, False, results_dir, board.files[figure.name])] = figure
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


#: How a PNG appears among a notebook's outputs: shown by its cell, or glued (``myst_nb.glue``) for a ``{glue:figure}``.
PNG_OUTPUTS = ("image/png", "application/papermill.record/image/png")


def save_first_image(notebook: Path, path: Path) -> None:
    """Write the first PNG output (shown or glued) of an executed notebook to ``path`` (atomically)."""
    import base64

    import nbformat

    from lowrank.engine.store import atomic_write  # imports torch, which the command-line parser must not

    for cell in nbformat.read(notebook, as_version=4).cells:
        for output in cell.get("outputs", []):
            png = next((output["data"][key] for key in PNG_OUTPUTS if key in output.get("data", {})), None)
            if png is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as file:
                    file.write(base64.b64decode(png))
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
        write_notebook(notebook, figure.notebook)
        refreshed.append(figure.notebook)
    return refreshed
