"""Experiment configuration: TOML files -> validated, frozen dataclasses.

One TOML file describes one study (one figure of the report). Two shapes are accepted:

    # one model, named after the file       # several models (one figure)
    [settings]                              [figure]                  # free-form metadata
    learning_rate = 0.001                   title = "DLRT vs dense"
    num_epochs = 10                         [settings]
                                            num_epochs = 10
    [[layer]]                               [[model]]
    type = "dynamical"                      name = "dlrt"
    dims = [784, 512]                       [model.settings]          # overrides [settings] key by key
    tau = 0.1                               learning_rate = 0.01
    [[layer]]                               [[model.layer]]
    type = "dense"                          type = "dynamical"
    dims = [512, 10]                        dims = [784, 10]
    activation = "identity"                 activation = "identity"

``[figure]`` is free-form except for two keys: ``uses = ["fig_a.toml", ...]`` (a figure that also reads
other figures' models) and ``seeds = [0, 1, 2]`` (every model is trained once per seed, named
``"<name> seed=<s>"``).

Every option is one dataclass field below: its type hint, its default and its metadata (choices,
bounds, the layer types that use it, a help line) drive the checks in `_values`; the checks between
fields (ranks against dims, layers that must chain, ...) are written out in `_layer`, `_layers` and
`_settings`. Each problem raises one ConfigError that names the file, the key path and what is allowed:

    notebooks/configs/fig_a.toml: model[1].layer[2].rank = 600 is larger than min(dims) = 512; allowed: 1..512

Indices in key paths count from 0, in the order of the tables in the file.

Figures that are not network studies (``[figure] kind = "matrix-ode"``, ...) declare their keys the same way,
as fields of their own dataclass with ``option(..., table="run")``; :func:`experiment_tables` and
:func:`table_values` check such a file with the same rules and messages, ``[quick]`` included.
"""

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lowrank import __version__
from lowrank.choices import (ACTIVATIONS, BASIS_STATES, DENSE_INITS, DYNAMICAL_INIT_SCALE, FACTORIZATIONS, INITS,
                             INTEGRATORS, LAYER_TYPES, NEW_COORDINATES, OPTIMIZERS, RANK_TESTS)

#: The environment variable that names the results cache (:func:`default_results_dir`).
RESULTS_ENV = "LOWRANK_RESULTS"
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float32", "float64")
# (inputs, classes) of each dataset: the first layer takes the inputs, the last gives the classes.
DATASETS = {"mnist": (784, 10), "fashion-mnist": (784, 10)}
# (channels, height, width) of each dataset's images, as a first convolution takes them.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28)}
#: Images of each split of both datasets, split the classic way (lowrank.engine.data): the first 50,000 of the
#: 60,000 training images train, the last 10,000 validate.
SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
# camelCase keys of the student study's template -> our names
SETTINGS_ALIASES = {"learningRate": "learning_rate", "batchSize": "batch_size", "numEpochs": "num_epochs"}


class ConfigError(ValueError):
    """A problem in a configuration; the message names the file, the key path and the allowed values."""


def option(default=dataclasses.MISSING, help="", **checks):
    """A dataclass field whose metadata drives validation.

    checks: choices=(...) allowed values; min= / max= inclusive bounds; above= / below= exclusive
    bounds; multiple_of=k; pattern=(regex, description) a string that matches; for a ``tuple[X, ...]``
    field (a TOML list) each check applies to every element, and empty=True allows ``[]``;
    types=(...) the layer types that use the key (default: all); table="name" the TOML table an
    experiment's key is read from (:func:`experiment_tables`, :func:`table_values`).
    """
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class Settings:
    """How a model is trained: the [settings] table, and a model's [model.settings] overrides."""

    learning_rate: float = option(0.001, "step size h", above=0)
    batch_size: int = option(232, "training images per step", min=1)
    num_epochs: int = option(10, "passes over the training images", min=1)
    optimizer: str = option("adam", "optimiser of the dense/low-rank weights (DLRT factors use h)", choices=OPTIMIZERS)
    momentum: float = option(0.0, "SGD momentum; sgd only", min=0, below=1)
    weight_decay: float = option(0.0, "L2 penalty on the weights", min=0)
    seed: int = option(0, "seed of the initialisation and the batch order", min=0)
    dataset: str = option("mnist", "training and test images", choices=tuple(DATASETS))
    subset: int | None = option(None, "train on N training images drawn with the seed; unset = all", min=1)
    device: str = option("cpu", "where to train; auto = cuda if available", choices=DEVICES)
    dtype: str = option(
        "float32",
        "floating-point type of weights, data and steps; float64 makes results independent of the CPU's "
        "kernels to the digits shown (the quick regression runs use it)",
        choices=DTYPES,
    )
    integrator: str = option(
        "kls",
        "DLRT step: kls = classic, an extra forward/backward for the S-step; "
        "single-pass = S-step gradient from the first pass",
        choices=INTEGRATORS,
    )
    basis_state: str = option(
        "project", "DLRT optimiser state when bases change: project = carry Adam's moments to the new bases; "
                   "reset = drop them every step", choices=BASIS_STATES)
    basis_interval: int = option(
        5, "DLRT: cycles of k steps (augmented local iterations): augment the bases on the first, S-steps on the "
           "augmented bases, truncate after the k-th; 1 = the classic step", min=1)
    rank_test: str = option(
        "per-step", "DLRT: the rank kept at the end of a cycle; per-step = the new block counted as one step's "
                    "(divided by sqrt(k)); accumulated = as it is", choices=RANK_TESTS)
    new_coordinates: str = option(
        "shared", "DLRT with adam: the step count of the coefficients S; shared = one per tensor (torch.optim); "
                  "per-coordinate = one per coefficient, 0 for those the augmentation adds", choices=NEW_COORDINATES)
    factor_decay: float = option(
        0.0, "L2 on the factors of lowrank layers: (lambda/2)(||U||² + ||S||² + ||V||²) added to the loss", min=0)
    frobenius_decay: float = option(
        0.0, "Frobenius decay of lowrank layers: (lambda/2)||U S Vᵀ||_F² added to the loss (W never formed)", min=0)
    fine_tune_epochs: int = option(
        0, "after num_epochs, N more epochs at the ranks reached: rank-adaptive dynamical layers turn fixed-rank "
           "(the second phase of Schotthöfer et al.'s protocol); other layers train on", min=0)
    warm_start_epochs: int = option(
        0, "train the dense twin for the first N of num_epochs epochs, then factorise its weights by SVD", min=0)
    track_layers: bool = option(
        False, "after every epoch, store each layer's singular values (spectra.csv) and the within-class "
               "variability of its input (history nc1_*)")

    @property
    def total_epochs(self) -> int:
        """``num_epochs + fine_tune_epochs``: the epochs of the whole run."""
        return self.num_epochs + self.fine_tune_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerConfig:
    """One layer: a [[layer]] table. `init_scale`, and `rank` and `r_max` of a dynamical layer, are resolved (never None)."""

    type: str = option(help="dense: z = a W + b; lowrank: W = U S Vᵀ at fixed rank; dynamical: DLRT", choices=LAYER_TYPES)
    dims: tuple[int, int] = option(help="(in_features, out_features); a convolution's (in_channels, out_channels)",
                                   min=1)
    activation: str = option("relu", "applied after the layer; identity for the output layer", choices=ACTIVATIONS)
    bias: bool = option(True, "add a bias b")
    init: str = option(
        "kaiming",
        "kaiming (factorised: Gaussian S); kaiming-flat = S = c I, lowrank 0.1's default; normal = plain "
        "N(0, 1), the student study's; spectral = SVD of a dense kaiming init; spectral-ones = the same with "
        "singular values 1 (all but kaiming and normal for lowrank/dynamical only)",
        choices=INITS,
    )
    init_scale: float | None = option(
        None,
        "multiplies the initial W; default 0.2 for a dynamical layer with init = kaiming (training, not the draw, "
        "then sets the spectrum the truncation ranks), 1 for every other layer and init",
        above=0,
    )
    rank: int | None = option(
        None,
        "lowrank: the rank r, required, 1..min(dims); dynamical: the initial rank, "
        "r_min..r_max, default max(r_min, r_max // 2)",
        min=1, types=("lowrank", "dynamical"),
    )
    factorization: str = option("usv", "usv: W = U S Vᵀ; uv: W = U Vᵀ", choices=FACTORIZATIONS, types=("lowrank",))
    tau: float = option(0.1, "relative truncation tolerance: drop ||d[r:]|| <= tau ||d||", min=0, below=1, types=("dynamical",))
    r_max: int | None = option(None, "largest rank, 1..min(dims); default min(dims)", min=1, types=("dynamical",))
    r_min: int = option(1, "smallest rank after truncation, 1..r_max", min=1, types=("dynamical",))
    adaptive: bool = option(True, "augment and truncate (rank-adaptive) or keep the rank fixed", types=("dynamical",))
    grow: bool = option(True, "the truncation may keep more than the rank its step or cycle started from; false = "
                              "never (the DLRT authors' LeNet5 code)", types=("dynamical",))
    kernel_size: int | None = option(
        None, "a k x k convolution (lowrank.conv) with dims = [in_channels, out_channels] and the matrix "
              "W of (in_channels k k) x out_channels; unset: a linear layer", min=1, convolution=True)
    padding: int = option(0, "convolutions: zeros added on each side of the image", min=0, convolution=True)
    stride: int = option(1, "convolutions: the step of the kernel", min=1, convolution=True)
    pool: int = option(1, "convolutions: max-pool over pool x pool windows after the activation; 1 = none", min=1,
                       convolution=True)

    @property
    def convolution(self) -> bool:
        return self.kernel_size is not None

    @property
    def matrix_dims(self) -> tuple[int, int]:
        """``(n_in, n_out)`` of the layer's matrix ``W``: ``dims``, or ``(in_channels k k, out_channels)``."""
        if not self.convolution:
            return self.dims
        return self.dims[0] * self.kernel_size ** 2, self.dims[1]

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this layer's output (after its pooling) for an input of ``shape``: ``(n,)`` or ``(C, H, W)``."""
        if not self.convolution:
            return (self.dims[1],)
        return (self.dims[1], *(n // self.pool for n in self._kernel_grid(shape)))

    def positions(self, shape: tuple[int, ...]) -> int:
        """How often ``W`` multiplies a column per sample for an input of ``shape``: the ``H' W'`` positions of a
        convolution's kernel (before pooling), 1 for a linear layer."""
        return math.prod(self._kernel_grid(shape)) if self.convolution else 1

    def _kernel_grid(self, shape: tuple[int, ...]) -> list[int]:
        """``[H', W']``: the kernel's positions along each image axis, ``(n + 2 padding - k) // stride + 1``."""
        return [(n + 2 * self.padding - self.kernel_size) // self.stride + 1 for n in shape[1:]]

    def to_dict(self) -> dict:
        """The keys this layer's type uses (others are irrelevant and stay out of the cache key; so are the
        convolution keys of a linear layer)."""
        return {f.name: list(v) if f.name == "dims" else v
                for f in dataclasses.fields(self)
                if _uses(self.type, f) and (self.convolution or not f.metadata.get("convolution"))
                for v in [getattr(self, f.name)]}


@dataclass(frozen=True)
class ModelConfig:
    """One trained model: a name, its settings (file's [settings] + its overrides) and its layers."""

    name: str
    settings: Settings
    layers: tuple[LayerConfig, ...]

    def to_dict(self) -> dict:
        """Plain JSON-able dict with every default resolved."""
        return {"name": self.name, "settings": self.settings.to_dict(),
                "layers": [layer.to_dict() for layer in self.layers]}

    def cache_key(self) -> str:
        """First 16 hex digits of sha256 over the canonical JSON of to_dict() and lowrank's version."""
        blob = json.dumps({"lowrank": __version__, "model": self.to_dict()},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def dense_twin(self) -> "ModelConfig":
        """The same network with every layer dense (same dims, activation and bias; Kaiming init).

        What a warm start (``settings.warm_start_epochs``) trains first, and what ``compression`` compares to.
        """
        layers = tuple(LayerConfig("dense", layer.dims, layer.activation, layer.bias,
                                   "normal" if layer.init == "normal" else "kaiming", 1.0, kernel_size=layer.kernel_size,
                                   padding=layer.padding, stride=layer.stride, pool=layer.pool)
                       for layer in self.layers)
        return ModelConfig(self.name, dataclasses.replace(self.settings, warm_start_epochs=0), layers)

    def with_seed(self, seed: int) -> "ModelConfig":
        """The same model trained from ``seed``, named ``"<name> seed=<seed>"`` (``[figure] seeds``)."""
        return ModelConfig(f"{self.name} seed={seed}", dataclasses.replace(self.settings, seed=seed), self.layers)

    def with_settings(self, **overrides) -> "ModelConfig":
        """A copy with some settings replaced (e.g. num_epochs=1 from the CLI), validated again."""
        file = f'model "{self.name}"'
        settings = _settings(overrides, file, "settings", base=self.settings)
        layers = _layers([layer.to_dict() for layer in self.layers], settings, file, "")
        return ModelConfig(self.name, settings, layers)


@dataclass(frozen=True)
class Study:
    """One TOML file = one figure/experiment: its [settings], its models and its [figure] metadata."""

    path: Path | None
    settings: Settings
    models: tuple[ModelConfig, ...]
    figure: dict = field(default_factory=dict)


#: Settings of a ``--quick`` run: a small training subset and one epoch without fine-tuning (validation
#: and test stay full), in float64, so that the stored outputs that nbval compares do not depend on the
#: CPU's kernels (``book/reproducibility.md``: rounding differences that rank-adaptive runs amplify stay
#: below the digits shown for one epoch, not for two where ranks grow).
QUICK = {"subset": 1000, "num_epochs": 1, "fine_tune_epochs": 0, "dtype": "float64"}


def quick_settings(model: ModelConfig) -> ModelConfig:
    """``model`` with the :data:`QUICK` overrides (never more epochs or images than it asks for); a warm start
    keeps its dense epochs and gets :data:`QUICK`'s epochs after them."""
    subset = min(QUICK["subset"], model.settings.subset or QUICK["subset"])
    settings = model.settings
    epochs = min(settings.warm_start_epochs + QUICK["num_epochs"], settings.num_epochs)
    return model.with_settings(subset=subset, num_epochs=epochs,
                               fine_tune_epochs=min(QUICK["fine_tune_epochs"], settings.fine_tune_epochs),
                               dtype=QUICK["dtype"])


def count(text: str) -> int:
    """An argparse type of the command lines: an integer >= 1 (an ``argparse.ArgumentTypeError`` that says so)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def default_results_dir(root: str | Path = ".") -> Path:
    """Where trained runs are cached (``lowrank.engine.store``): ``$LOWRANK_RESULTS`` if set, else ``<root>/results``
    (``root``: the working folder, or the repository root for the report)."""
    return Path(os.environ.get(RESULTS_ENV) or Path(root) / "results")


# ---------------------------------------------------------------------------------------------
# Reading files

def load(path: str | Path) -> Study:
    """Read and validate the TOML file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the file ({e})") from None
    return loads(text, path)


def read_toml(path: str | Path) -> dict:
    """The table of a TOML file; a missing file or a syntax error (:func:`parse_toml`) is a ConfigError naming the
    file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    return parse_toml(text, str(path))


#: What to do about the parser's errors that hand-edited configs meet most, by the start of tomllib's message.
TOML_ADVICE = {
    "Cannot overwrite a value": "a key is set twice in one table; allowed: each key once per table (remove one "
                                "of the two; a further layer or model is a new [[layer]] or [[model]] table, with "
                                "two brackets)",
    "Cannot declare": "a table is declared twice; allowed: each [table] once (several layers or models are "
                      "[[layer]] or [[model]] tables, with two brackets)",
}


def parse_toml(text: str, file: str) -> dict:
    """``tomllib.loads(text)``; a syntax error is a ConfigError that names ``file``, the line (quoted), the parser's
    reason and what to do (:data:`TOML_ADVICE`, else the TOML syntax)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        reason, _, position = str(error).partition(" (at ")
        found, lines = re.match(r"line (\d+), column \d+\)", position), text.splitlines()
        line = int(found[1]) if found else 0
        source = f" ({lines[line - 1].strip()})" if 0 < line <= len(lines) else ""
        advice = next((advice for start, advice in TOML_ADVICE.items() if reason.startswith(start)),
                      "allowed: TOML, key = value lines under [table] headers, strings in quotes (https://toml.io)")
        raise _error(file, f"line {line}{source}: invalid TOML: {reason}: {advice}" if line else
                     f"invalid TOML: {reason}: {advice}") from None


def experiment_tables(data: dict, kind: str, file: str, *classes, extra: tuple[str, ...] = ()) -> dict:
    """Check an experiment TOML of ``kind`` (a figure that is not a network study) against the dataclasses
    that read it, and return its ``[figure]`` table.

    Each field of ``classes`` declared with ``option(table=...)`` is a key of that table; ``[quick]`` may
    set any of them (the quick run's values); ``extra`` names tables read by other means (``[pretrain]``).
    The file may have no other top-level key, and ``figure.kind`` must be ``kind``. Each problem is a
    ConfigError that names the file, the key and what is allowed. Values are read by :func:`table_values`.
    """
    keys = _table_keys(classes)
    tables = ("figure", *keys, "quick", *extra)
    unknown = sorted(set(data) - set(tables))
    if unknown:
        raise _error(file, f"unknown top-level key {unknown[0]!r}; allowed: {', '.join(f'[{t}]' for t in tables)}")
    figure = data.get("figure", {})
    if not isinstance(figure, dict) or figure.get("kind") != kind:
        given = figure.get("kind") if isinstance(figure, dict) else figure
        raise _error(file, f'figure.kind = {_show(given)} is not allowed; allowed: "{kind}"')
    for table, names in (*keys.items(), ("quick", [n for names in keys.values() for n in names])):
        _check_keys(_table(data, table, file), names, file, table, f"[{table}]")
    return figure


def table_values(cls, data: dict, file: str, quick: bool = False) -> dict:
    """The values of ``cls``'s ``option(table=...)`` fields that an experiment TOML sets, each checked like any
    option; with ``quick``, ``[quick]``'s values of them replace those. Unknown keys are
    :func:`experiment_tables`'s to report (several classes may read one file)."""
    keys = _table_keys([cls])
    own = [name for names in keys.values() for name in names]
    values = {}
    for table in (*keys, *(("quick",) if quick else ())):
        given = {key: value for key, value in _table(data, table, file).items() if key in own}
        values.update(_values(cls, given, file, table, names=own, what=f"[{table}]"))
    return values


def _table_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "table" in f.metadata]


def _table_keys(classes) -> dict[str, list[str]]:
    """``{table: [its keys]}`` of the ``option(table=...)`` fields of ``classes``, in declaration order."""
    keys = {}
    for cls in classes:
        for f in _table_fields(cls):
            keys.setdefault(f.metadata["table"], []).append(f.name)
    return keys


def loads(text: str, path: str | Path | None = None) -> Study:
    """Validate TOML text; `path` names the file in messages and the single model."""
    return parse(parse_toml(text, _label(path)), path)


def parse(data: dict, path: str | Path | None = None) -> Study:
    """Validate a dict shaped like the TOML file (see the module docstring)."""
    file = _label(path)
    _check_keys(data, ("settings", "figure", "layer", "model"), file, "", "top-level")
    settings = _settings(_table(data, "settings", file), file, "settings")
    figure = _table(data, "figure", file)
    if "layer" in data and "model" in data:
        raise _error(file, "give either [[layer]] tables (one model) or [[model]] tables (several), not both")

    uses = _uses_list(figure, path, file)
    if uses and "model" not in data and "layer" not in data:  # a figure made only of other figures' models
        models = ()
    elif "model" not in data:  # one model, named after the file
        name = Path(path).stem if path is not None else "model"
        layers = _layers(_array(data, "layer", file, ""), settings, file, "")
        models = (ModelConfig(name, settings, layers),)
    else:
        tables = _array(data, "model", file, "")
        if not tables:
            raise _error(file, "model: the file has no models; allowed: one or more [[model]] tables")
        models = tuple(_model(table, settings, file, f"model[{i}]") for i, table in enumerate(tables))
        seen = {}
        for i, model in enumerate(models):
            if model.name in seen:
                raise _error(file, f'model[{i}].name = "{model.name}" is already the name of model[{seen[model.name]}]; '
                                   f"allowed: a name not used yet, not {_choices(list(seen))}")
            seen[model.name] = i
    seeds = _seeds_list(figure, file)
    if seeds:
        models = tuple(model.with_seed(seed) for model in models for seed in seeds)
    return Study(Path(path) if path is not None else None, settings, models, figure)


# ---------------------------------------------------------------------------------------------
# Tables

def _seeds_list(figure: dict, file: str) -> list[int]:
    """[figure] seeds = [0, 1, 2]: train every model once per seed (its ``settings.seed``), as ``"<name> seed=<s>"``."""
    seeds = figure.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise _error(file, f"figure.seeds = {_show(seeds)} is not a list of seeds; allowed: integers >= 0, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise _error(file, f"figure.seeds = {_show(seeds)} repeats a seed; allowed: distinct integers >= 0")
    return seeds


def _uses_list(figure: dict, path, file: str) -> list[str]:
    """[figure] uses = ["fig_a.toml", ...]: other configs (relative to this one) whose models a figure reads."""
    uses = figure.get("uses", [])
    if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses):
        raise _error(file, f"figure.uses = {_show(uses)} is not a list of file names; allowed: e.g. [\"fig_a.toml\"]")
    base = Path(path).parent if path is not None else Path(".")
    for i, used in enumerate(uses):
        if not (base / used).is_file():
            raise _error(file, f'figure.uses[{i}] = "{used}": no such file in {base}; allowed: TOML files beside this one')
    return uses


def _model(table, base: Settings, file: str, where: str) -> ModelConfig:
    """One [[model]] table: name, optional [model.settings] overrides, [[model.layer]] tables."""
    if not isinstance(table, dict):
        raise _error(file, f"{where} is {_show(table)}; allowed: a table [[model]]")
    _check_keys(table, ("name", "settings", "layer"), file, where, "[[model]]")
    name = table.get("name")
    if name is None:
        raise _error(file, f"{where}.name is missing; allowed: a non-empty string")
    if not isinstance(name, str) or not name.strip():
        raise _error(file, f"{where}.name = {_show(name)} is not a name; allowed: a non-empty string")
    settings = _settings(_table(table, "settings", file, where), file, f"{where}.settings", base)
    layers = _layers(_array(table, "layer", file, where), settings, file, f"{where}.")
    return ModelConfig(name, settings, layers)


def _settings(table: dict, file: str, where: str, base: Settings = Settings()) -> Settings:
    """`base` with the keys of `table` replaced, checked alone and together."""
    settings = dataclasses.replace(base, **_values(Settings, table, file, where, SETTINGS_ALIASES))
    if settings.momentum != 0 and settings.optimizer != "sgd":
        raise _error(file, f'{where}.momentum = {_show(settings.momentum)} is used by optimizer = "sgd" only, '
                           f'not "{settings.optimizer}"; allowed: 0, or set optimizer = "sgd"')
    if settings.warm_start_epochs >= settings.num_epochs:
        raise _error(file, f"{where}.warm_start_epochs = {settings.warm_start_epochs} leaves no low-rank epoch of "
                           f"num_epochs = {settings.num_epochs}; allowed: 0..{settings.num_epochs - 1}")
    train = SPLIT_SIZES["train"]
    if settings.subset is not None and settings.subset > train:
        raise _error(file, f'{where}.subset = {settings.subset} is larger than the training split of dataset = '
                           f'"{settings.dataset}" ({train} images; the last {SPLIT_SIZES["val"]} of its '
                           f'{train + SPLIT_SIZES["val"]} training images validate); allowed: 1..{train}, or leave '
                           f"subset out to train on all")
    return settings


def _layers(tables, settings: Settings, file: str, prefix: str) -> tuple[LayerConfig, ...]:
    """The layers of one model: each checked, then the chain of dims against each other and the dataset."""
    if not tables:
        table = "model.layer" if prefix else "layer"
        raise _error(file, f"{prefix}layer: the model has no layers; allowed: one or more [[{table}]] tables")
    layers = tuple(_layer(table, file, f"{prefix}layer[{i}]") for i, table in enumerate(tables))
    if any(layer.convolution for layer in layers):
        _check_shapes(layers, IMAGE_SHAPES[settings.dataset], file, prefix)
    for i in range(1, len(layers)):
        have, want = layers[i].dims[0], layers[i - 1].dims[1]
        if have != want and not layers[i - 1].convolution:
            raise _error(file, f"{prefix}layer[{i}].dims[0] = {have} but {prefix}layer[{i - 1}].dims[1] = {want}; "
                               f"the output of a layer is the input of the next; allowed: {want}")
    factorised = [layer.type for layer in layers if layer.type != "dense"]
    for key in ("factor_decay", "frobenius_decay"):
        if getattr(settings, key) > 0 and "lowrank" not in factorised:
            raise _error(file, f"{_join(prefix.rstrip('.'), 'settings')}.{key} = {_show(getattr(settings, key))} "
                               f"regularises lowrank layers and the model has none; allowed: 0 (dense layers: "
                               f"weight_decay; dynamical layers: weight_decay, which acts on W)")
    if settings.warm_start_epochs > 0 and not factorised:
        raise _error(file, f"{_join(prefix.rstrip('.'), 'settings')}.warm_start_epochs = {settings.warm_start_epochs} "
                           f"needs a lowrank or dynamical layer to factorise; allowed: 0 for a dense model")
    inputs, classes = DATASETS[settings.dataset]
    first, last = layers[0].dims[0], layers[-1].dims[1]
    if first != inputs and not layers[0].convolution:
        raise _error(file, f'{prefix}layer[0].dims[0] = {first} but dataset = "{settings.dataset}" has '
                           f"{inputs} inputs; allowed: {inputs}")
    if last != classes:
        raise _error(file, f'{prefix}layer[{len(layers) - 1}].dims[1] = {last} but dataset = "{settings.dataset}" has '
                           f"{classes} classes; allowed: {classes}")
    return layers


def _check_shapes(layers: tuple[LayerConfig, ...], image: tuple[int, int, int], file: str, prefix: str) -> None:
    """A network with convolutions: each layer's input, from the image on, is what it expects; a convolution
    follows only the image or convolutions, and leaves at least one pixel."""
    shape = image
    for i, layer in enumerate(layers):
        where = f"{prefix}layer[{i}]"
        if layer.convolution:
            if len(shape) == 1:
                raise _error(file, f"{where} is a convolution after a linear layer; allowed: convolutions first, "
                                   f"then linear layers")
            if layer.dims[0] != shape[0]:
                raise _error(file, f"{where}.dims[0] = {layer.dims[0]} but its input has {shape[0]} channels "
                                   f"({' x '.join(map(str, shape))}); allowed: {shape[0]}")
            output = layer.output_shape(shape)
            if min(output[1:]) < 1:
                raise _error(file, f"{where}: kernel_size = {layer.kernel_size}, stride = {layer.stride}, padding = "
                                   f"{layer.padding} and pool = {layer.pool} leave no pixel of its "
                                   f"{' x '.join(map(str, shape[1:]))} input; allowed: a smaller kernel, stride or pool")
            shape = output
        else:
            features = math.prod(shape)
            if layer.dims[0] != features:
                raise _error(file, f"{where}.dims[0] = {layer.dims[0]} but its input has {features} values "
                                   f"({' x '.join(map(str, shape))}); allowed: {features}")
            shape = layer.output_shape(shape)


def _layer(table, file: str, where: str) -> LayerConfig:
    """One [[layer]] table as a LayerConfig, with its init_scale and a dynamical layer's rank and r_max resolved."""
    if not isinstance(table, dict):
        raise _error(file, f"{where} is {_show(table)}; allowed: a table [[layer]]")
    values = _values(LayerConfig, table, file, where)
    for name in ("type", "dims"):
        if name not in values:
            raise _error(file, f"{where}.{name} is missing; allowed: {_allowed(LayerConfig, name)}")
    kind = values["type"]
    for f in dataclasses.fields(LayerConfig):
        if f.name in table and not _uses(kind, f):
            keys = ", ".join(g.name for g in dataclasses.fields(LayerConfig) if _uses(kind, g))
            raise _error(file, f'{where}.{f.name} is not used by a {kind} layer (only by {" and ".join(f.metadata["types"])}); '
                               f"allowed keys of a {kind} layer: {keys}")
    layer = LayerConfig(**values)
    if not layer.convolution:
        for f in dataclasses.fields(LayerConfig):
            if f.metadata.get("convolution") and f.name in table:
                raise _error(file, f"{where}.{f.name} is used by convolutions only; allowed: set kernel_size, "
                                   f"or leave out {f.name}")
    if layer.init_scale is None:
        small = kind == "dynamical" and layer.init == "kaiming"
        layer = dataclasses.replace(layer, init_scale=DYNAMICAL_INIT_SCALE if small else 1.0)

    n = min(layer.matrix_dims)
    bound = "min(dims)" if not layer.convolution else "min(in_channels * kernel_size², out_channels)"
    if layer.init not in DENSE_INITS and layer.type == "dense":
        raise _error(file, f'{where}.init = "{layer.init}" needs a lowrank or dynamical layer; '
                           f"allowed for a dense layer: {_choices(DENSE_INITS)}")
    if layer.type == "lowrank":
        if layer.rank is None:
            raise _error(file, f"{where}.rank is missing; a lowrank layer needs its rank; allowed: 1..{n}")
        if layer.rank > n:
            raise _error(file, f"{where}.rank = {layer.rank} is larger than {bound} = {n}; allowed: 1..{n}")
    if layer.type == "dynamical":
        r_max = n if layer.r_max is None else layer.r_max
        if r_max > n:
            raise _error(file, f"{where}.r_max = {r_max} is larger than {bound} = {n}; allowed: 1..{n}")
        if layer.r_min > r_max:
            raise _error(file, f"{where}.r_min = {layer.r_min} is larger than r_max = {r_max}; allowed: 1..{r_max}")
        rank = max(layer.r_min, r_max // 2) if layer.rank is None else layer.rank
        if not layer.r_min <= rank <= r_max:
            raise _error(file, f"{where}.rank = {rank} is outside r_min..r_max; allowed: {layer.r_min}..{r_max}")
        layer = dataclasses.replace(layer, rank=rank, r_max=r_max)
    return layer


# ---------------------------------------------------------------------------------------------
# Checking values against the dataclass fields

def _values(cls, table: dict, file: str, where: str, aliases: dict | None = None,
            names: Iterable[str] | None = None, what: str | None = None) -> dict:
    """The keys of `table` as field values of `cls`: names, types, choices and bounds checked.

    names: the fields the table may set (default: all); what: the table in messages (default
    ``[settings]`` or ``[[layer]]``)."""
    aliases = aliases or {}
    if not isinstance(table, dict):
        raise _error(file, f"{where} is {_show(table)}; allowed: a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if names is None or f.name in names}
    hints = typing.get_type_hints(cls)
    values, given_as = {}, {}
    for key, value in table.items():
        name = aliases.get(key, key)
        if name not in fields:
            what = what or ("[settings]" if cls is Settings else "[[layer]]")
            raise _unknown(key, list(fields) + list(aliases), file, where, what)
        if name in values:
            raise _error(file, f"{where}.{given_as[name]} and {where}.{key} are the same setting; allowed: one of them")
        values[name] = _value(value, hints[name], fields[name].metadata, file, f"{where}.{key}")
        given_as[name] = key
    return values


def _value(value, hint, meta: dict, file: str, key: str):
    """`value` checked against a type hint and the field's checks; ints become floats and lists tuples where asked."""
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is tuple:
        return _sequence(value, hint, meta, file, key)
    if not _has_type(value, hint):
        raise _error(file, f"{key} = {_show(value)} has the wrong type; allowed: {_describe(hint, meta)}")
    value = float(value) if hint is float else value
    _check_value(value, hint, meta, file, key, key)
    return value


def _sequence(value, hint, meta: dict, file: str, key: str) -> tuple:
    """A TOML list as a tuple: ``tuple[int, int]`` a pair (``dims``), ``tuple[X, ...]`` any length, each element
    of type X and within the field's checks."""
    elements = typing.get_args(hint)
    variadic = elements[-1] is Ellipsis
    element = elements[0]
    ok = isinstance(value, list | tuple) and (len(value) == len(elements) if not variadic
                                               else len(value) > 0 or meta.get("empty", False))
    if not ok or not all(_has_type(v, element) for v in value):
        raise _error(file, f"{key} = {_show(value)} has the wrong type; allowed: {_describe(hint, meta)}")
    value = tuple(float(v) if element is float else v for v in value)
    for i, v in enumerate(value):
        _check_value(v, hint, meta, file, f"{key}[{i}]", key)
    return value


def _has_type(value, hint) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return {bool: isinstance(value, bool), int: is_int, float: is_int or isinstance(value, float),
            str: isinstance(value, str)}[hint]


def _check_value(value, hint, meta: dict, file: str, at: str, key: str) -> None:
    """One value (or list element, at ``key[i]``) against choices, pattern, bounds and multiple_of."""
    if "choices" in meta and value not in meta["choices"]:
        raise _error(file, f"{at} = {_show(value)} is unknown{_suggest(value, meta['choices'])}; "
                           f"allowed: {_describe(hint, meta)}")
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        raise _error(file, f"{at} = {_show(value)} is unknown; allowed: {_describe(hint, meta)}")
    low = ("min" in meta and value < meta["min"]) or ("above" in meta and value <= meta["above"])
    high = ("max" in meta and value > meta["max"]) or ("below" in meta and value >= meta["below"])
    if low or high:
        raise _error(file, f"{at} = {_show(value)} is too {'small' if low else 'large'}; allowed: {_describe(hint, meta)}")
    if "multiple_of" in meta and value % meta["multiple_of"]:
        raise _error(file, f"{at} = {_show(value)} is not a multiple of {meta['multiple_of']}; "
                           f"allowed: {_describe(hint, meta)}")


def _describe(hint, meta: dict) -> str:
    """What a field allows, e.g. 'an integer >= 1', 'a number >= 0 and < 1', '"sgd" | "adam"',
    'a non-empty list of integers >= 1'."""
    if isinstance(hint, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    elements = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    if elements and elements[-1] is not Ellipsis:
        return "a pair of positive integers [in_features, out_features]"
    element = elements[0] if elements else hint
    if "choices" in meta:
        kind = _choices(meta["choices"])
    elif "pattern" in meta:
        kind = meta["pattern"][1]
    else:
        names = {bool: ("true or false", "true or false"), int: ("an integer", "integers"),
                 float: ("a number", "numbers"), str: ("a string", "strings")}
        kind = names[element][1 if elements else 0]
        bounds = [f"{op} {meta[k]}" for k, op in (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<"))
                  if k in meta]
        if "multiple_of" in meta:
            bounds.append(f"multiple{'s' if elements else ''} of {meta['multiple_of']}")
        kind = f"{kind} {' and '.join(bounds)}" if bounds else kind
    if not elements:
        return kind
    return f"a {'' if meta.get('empty') else 'non-empty '}list of {kind}"


def _allowed(cls, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = typing.get_type_hints(cls)[name]
    return _describe(hint, f.metadata)


# ---------------------------------------------------------------------------------------------
# Small helpers

def _uses(kind: str, f: dataclasses.Field) -> bool:
    """Whether a layer of type `kind` uses the LayerConfig field `f`."""
    return kind in f.metadata.get("types", LAYER_TYPES)


def _label(path) -> str:
    return "<config>" if path is None else str(path)


def _error(file: str, message: str) -> ConfigError:
    return ConfigError(f"{file}: {message}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(table: dict, allowed, file: str, where: str, what: str):
    for key in table:
        if key not in allowed:
            raise _unknown(key, allowed, file, where, what)


def _unknown(key: str, allowed, file: str, where: str, what: str) -> ConfigError:
    return _error(file, f"{_join(where, key)} is not a key of {what}{_suggest(key, allowed)}; "
                        f"allowed keys: {', '.join(allowed)}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _table(data: dict, key: str, file: str, where: str = "") -> dict:
    """data[key] if it is a table, {} if absent."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _error(file, f"{_join(where, key)} = {_show(value)} is not a table; allowed: a table [{_join(where, key)}]")
    return value


def _array(data: dict, key: str, file: str, where: str) -> list:
    """data[key] if it is an array of tables ([[key]]), [] if absent."""
    value = data.get(key, [])
    if not isinstance(value, list):
        table = _join("model" if where else "", key)
        raise _error(file, f"{_join(where, key)} is {'a single table' if isinstance(value, dict) else _show(value)}; "
                           f"allowed: an array of tables, written [[{table}]]")
    return value


def _choices(options) -> str:
    return " | ".join(f'"{o}"' for o in options)


def _show(value) -> str:
    """A value as TOML writes it (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)
