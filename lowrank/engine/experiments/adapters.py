"""Low-rank adapters on a pretrained network, and bilevel rank selection by a stochastic Frank-Wolfe method.

An adapter keeps a pretrained dense layer ``z = x W_0 + b`` frozen and adds a low-rank correction

.. math::  z = x \\big( W_0 + U \\operatorname{diag}(s) V^T \\big) + b,

``U`` ``(n_in, r)`` and ``V`` ``(n_out, r)`` with unit-norm columns (stored unnormalised, normalised in the
forward pass), ``s`` ``(r,)`` the weights of the ``r`` rank-one terms. With ``s = 0`` the layer is the
pretrained one; the rank of the correction is the number of non-zero ``s_i``; and
``||U diag(s) V^T||_* <= sum_i |s_i|``, so a bound on ``sum s`` bounds the nuclear norm of the correction.

Bilevel rank selection (after dEBORA, Zangrando et al. 2025): the training images of the new task are split
into two halves. The lower level trains ``U``, ``V`` and the biases on one half (loss ``f_1``) for given
``s``; the upper level chooses the vector ``s`` of all layers together in

.. math::  C_\\tau = \\{ s : s \\ge 0, \\ \\textstyle\\sum_i s_i \\le \\tau \\}

to minimise the loss ``f_2`` on the other half. The budget ``tau`` is shared by all layers, so the method
decides how much rank each layer gets. The two are alternated: ``inner_steps`` Adam steps on ``f_1``, then
one stochastic away-step Frank-Wolfe step on ``s`` with the gradient ``d f_2 / d s`` of one batch of the
other half. Simplification: that gradient is the partial derivative at the current ``U``, ``V``; the
implicit term ``(d U^* / d s)^T d f_2 / d U`` of the exact hypergradient is left out (no implicit
differentiation, as in dEBORA, but without its justification of the approximation).

Frank-Wolfe on ``C_tau``: its vertices are ``0`` and ``tau e_i``, so the linear minimisation oracle
(:func:`lmo`) is ``tau e_i`` for the most negative gradient entry ``g_i``, or ``0`` when no entry is
negative. The away step (:func:`frank_wolfe_step`) moves away from the active vertex with the largest
``<g, v>``; its largest step sets a coordinate exactly to zero (a *drop step*), which is how ranks fall.
Every iterate is a convex combination of vertices, so it stays feasible without a projection. Frank-Wolfe
steps shrink the weights they do not choose without zeroing them, so after a finite run many ``s_i`` are
tiny: :func:`selected_ranks` and :func:`prune` count or delete those below a threshold.

The experiment of the book's figure (k) is a TOML file read by :func:`load_experiment` and run by
:func:`run_experiment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank.engine import config as cfg
from lowrank.engine import summary
from lowrank.engine.determinism import default_dtype, torch_threads
from lowrank.layers import Dense, dense_product, random_orthonormal, skinny_mm
from lowrank.metrics import model_accuracy
from lowrank.network import ACTIVATION_MODULES, NeuralNetwork

SHIFTS = ("permuted-labels", "fashion-mnist")
KIND = "adapters"


# ---------------------------------------------------------------------------------------------
# The adapter layer

class Adapter(nn.Module):
    """A frozen dense layer plus a low-rank correction: ``z = x (W_0 + U diag(s) V^T) + b``.

    Args:
        base: the pretrained :class:`lowrank.layers.Dense` layer; ``W_0`` is copied into a buffer (frozen),
            its bias into a trainable parameter.
        rank: ``r``, ``0 <= r <= min(n_in, n_out)`` (0: no correction, the pretrained layer with a trainable bias).
        s: the initial weights ``s`` (a float for all ``r``, default 0: the adapter starts as ``W_0``).

    ``U``, ``V`` start as random orthonormal columns; the forward pass normalises each column, so only
    their directions matter. Trainable: ``U``, ``V``, ``s``, ``bias`` (freeze ``s`` with
    ``s.requires_grad_(False)`` when it is set by another method). Parameters of the correction
    ``r (n_in + n_out + 1)``; extra cost per sample ``2 r (n_in + n_out + 1)`` operations.
    """

    def __init__(self, base: Dense, rank: int, s: float = 0.0) -> None:
        super().__init__()
        n_in, n_out = base.in_features, base.out_features
        if not 0 <= rank <= min(n_in, n_out):
            raise ValueError(f"rank = {rank} must be in 0..min(n_in, n_out) = {min(n_in, n_out)}")
        self.in_features, self.out_features, self.rank_max = n_in, n_out, rank
        self.register_buffer("weight0", base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone()) if base.bias is not None else None
        self.U = nn.Parameter(random_orthonormal(n_in, rank))
        self.V = nn.Parameter(random_orthonormal(n_out, rank))
        self.s = nn.Parameter(torch.full((rank,), float(s)))

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(U, V)`` with unit-norm columns."""
        return self.U / self.U.norm(dim=0), self.V / self.V.norm(dim=0)

    def forward(self, x: Tensor, frozen: Tensor | None = None) -> Tensor:
        """``x (W_0 + U diag(s) V^T) + b``; ``frozen``, if given, is ``x W_0`` computed beforehand."""
        u, v = self.factors()
        if frozen is None:
            base = dense_product(x, self.weight0, self.bias)
        else:
            base = frozen + self.bias if self.bias is not None else frozen
        return base + skinny_mm(skinny_mm(x, u) * self.s, v.T)

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The correction ``U diag(s) V^T``, ``(n_in, n_out)``."""
        u, v = self.factors()
        return (u * self.s) @ v.T

    @property
    def rank(self) -> int:
        """The number of non-zero ``s_i``: the rank of the correction (for independent columns)."""
        return int(torch.count_nonzero(self.s.detach()))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank<={self.rank_max}"


def adapt(model: NeuralNetwork, ranks: list[int], s: float = 0.0) -> NeuralNetwork:
    """A copy of a network of :class:`Dense` layers with an :class:`Adapter` of ``ranks[l]`` on layer ``l``.

    The pretrained weights are copied; the activations are the same.
    """
    layers = list(model.layers)
    if len(ranks) != len(layers) or not all(isinstance(layer, Dense) for layer in layers):
        raise ValueError(f"need one rank per Dense layer: {len(layers)} layers, ranks {ranks}")
    names = {cls: name for name, cls in ACTIVATION_MODULES.items()}
    activations = [names[type(a)] for a in model.activations]
    return NeuralNetwork([Adapter(layer, r, s) for layer, r in zip(layers, ranks)], activations)


def adapters(model: nn.Module) -> list[Adapter]:
    """The :class:`Adapter` layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, Adapter)]


def ranks(model: nn.Module) -> list[int]:
    """The rank (non-zero ``s_i``) of every adapter."""
    return [a.rank for a in adapters(model)]


def adapter_parameters(model: nn.Module) -> int:
    """Scalars of the corrections at their current ranks: ``sum_l r_l (n_in + n_out + 1)``.

    Columns with ``s_i = 0`` are not counted (they can be deleted); biases are not counted either.
    """
    return sum(a.rank * (a.in_features + a.out_features + 1) for a in adapters(model))


@torch.no_grad()
def prune(model: nn.Module, threshold: float) -> list[int]:
    """Set every ``s_i`` with ``|s_i| <= threshold`` to zero; returns the ranks left."""
    for a in adapters(model):
        a.s[a.s.abs() <= threshold] = 0.0
    return ranks(model)


def selected_ranks(model: nn.Module, threshold: float) -> list[int]:
    """``#{i : s_i > threshold}`` of every adapter (what :func:`prune` would leave)."""
    return [int((a.s.detach().abs() > threshold).sum()) for a in adapters(model)]


def uniform_ranks(total: int, caps: list[int]) -> list[int]:
    """``total`` split as evenly as possible over layers, each at most its cap (earlier layers first).

    ``uniform_ranks(20, [32, 32, 10]) == [7, 7, 6]``, ``uniform_ranks(40, [32, 32, 10]) == [15, 15, 10]``.
    """
    if not 0 <= total <= sum(caps):
        raise ValueError(f"total rank {total} must be in 0..{sum(caps)} for caps {caps}")
    out, left = [0] * len(caps), total
    while left:
        open_ = [i for i in range(len(caps)) if out[i] < caps[i]]
        share = max(1, left // len(open_))
        for i in open_:
            give = min(share, caps[i] - out[i], left)
            out[i] += give
            left -= give
            if not left:
                break
    return out


# ---------------------------------------------------------------------------------------------
# Frank-Wolfe on C_tau = {s >= 0, sum s <= tau}

def lmo(gradient: Tensor, tau: float) -> Tensor:
    """The vertex of ``C_tau`` that minimises ``<g, v>``: ``tau e_i`` with ``i = argmin g`` if ``g_i < 0``, else 0."""
    vertex = torch.zeros_like(gradient)
    i = int(torch.argmin(gradient))
    if gradient[i] < 0:
        vertex[i] = tau
    return vertex


def frank_wolfe_step(s: Tensor, gradient: Tensor, tau: float, step: float) -> tuple[Tensor, str]:
    """One away-step Frank-Wolfe step on ``C_tau`` from a feasible ``s``: ``(new s, kind)``.

    ``s`` is the convex combination ``sum_i (s_i / tau) tau e_i + (1 - sum s / tau) 0`` of the vertices.
    Frank-Wolfe direction ``d_FW = lmo(g) - s``; away direction ``d_A = s - a`` for the active vertex ``a``
    (``tau e_j`` with ``s_j > 0``, or ``0`` if ``sum s < tau``) with the largest ``<g, a>``. The direction
    with the larger decrease ``<-g, d>`` is taken, with step ``min(step, gamma_max)``: ``gamma_max = 1``
    for Frank-Wolfe, ``lambda_a / (1 - lambda_a)`` (``lambda_a`` the weight of ``a``) for an away step,
    which at ``gamma_max`` removes ``a`` (``kind = "drop"``: ``s_j`` becomes exactly 0, or ``sum s = tau``).
    ``kind`` is ``"fw"``, ``"away"``, ``"drop"`` or ``"none"`` (``s`` is stationary: both decreases <= 0).
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    s, g = s.detach(), gradient.detach()
    d_fw = lmo(g, tau) - s
    active = torch.nonzero(s > 0).flatten()
    weights = {int(j): float(s[j]) / tau for j in active}  # vertex tau e_j -> lambda_j
    slack = 1.0 - float(s.sum()) / tau  # the weight of the vertex 0
    candidates = [(tau * float(g[j]), j) for j in weights]
    if slack > 0:
        candidates.append((0.0, None))
    if not candidates:
        return s.clone(), "none"
    value, j = max(candidates, key=lambda c: c[0])
    away = torch.zeros_like(s)
    if j is not None:
        away[j] = tau
    d_away = s - away
    decrease_fw, decrease_away = -float(g @ d_fw), -float(g @ d_away)
    if max(decrease_fw, decrease_away) <= 0:
        return s.clone(), "none"
    if decrease_fw >= decrease_away:
        return (s + step * d_fw).clamp_(min=0), "fw"
    weight = weights[j] if j is not None else slack
    gamma_max = weight / (1 - weight) if weight < 1 else math.inf
    if step < gamma_max:
        return (s + step * d_away).clamp_(min=0), "away"
    new = s + gamma_max * d_away
    if j is not None:
        new[j] = 0.0  # exactly: the vertex left the active set
    return new.clamp_(min=0), "drop"


# ---------------------------------------------------------------------------------------------
# Data of the shifted task

@dataclass(frozen=True)
class Task:
    """Images and labels of the shifted task: ``train_x``, ``test_x`` ``float32 (N, 784)``; ``train_y``,
    ``test_y`` ``int64 (N,)``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def shifted_task(shift: str, train_images: int, seed: int = 0) -> Task:
    """The new task, ``train_images`` training images drawn with ``seed``, the full test set.

    ``"permuted-labels"``: MNIST with every label ``y`` replaced by ``(y + 1) mod 10``. The pretrained
    network is then wrong on almost every image, and the exact fix is known: the output layer's ``W_3``
    becomes ``W_3 P`` (``P`` the cyclic permutation matrix) and ``b_3`` becomes ``b_3 P``; ``W_3 (P - I)`` has
    rank 9. ``"fashion-mnist"``: Fashion-MNIST, a new input distribution and new classes.
    """
    from lowrank.engine import data

    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r} is not one of {SHIFTS}")
    arrays = data.load_arrays("mnist" if shift == "permuted-labels" else "fashion-mnist")
    train_x, train_y, test_x, test_y = (arrays[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    if shift == "permuted-labels":
        train_y, test_y = (train_y + 1) % 10, (test_y + 1) % 10
    index = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:train_images].numpy()
    images = torch.get_default_dtype()  # float64 under the quick runs' default_dtype (run_experiment)
    return Task(torch.tensor(train_x[index], dtype=images), torch.tensor(train_y[index]),
                torch.tensor(test_x, dtype=images), torch.tensor(test_y))


def label_shift_correction(weight: Tensor) -> Tensor:
    """``W (P - I)`` for an output layer's ``W`` ``(n_in, C)``: the change of ``W`` that turns logits ``z`` into
    ``z P``, ``(z P)_j = z_{j - 1 mod C}``, the exact fix for labels shifted by one (``"permuted-labels"``)."""
    shift = torch.roll(torch.eye(weight.shape[1], dtype=weight.dtype), 1, dims=1)
    return weight @ shift - weight


@torch.no_grad()
def frozen_products(model: NeuralNetwork, x: Tensor) -> Tensor:
    """``x W_0`` of the first adapter for all images ``x``: it does not change while adapters train.

    It is the largest product of a training step (``784 x 256`` multiply-adds per image for the
    784-256-256-10 network); computed once per image instead of at every step, it saved about a sixth of
    the CPU time of a step at batch 128 in our measurements.
    """
    return dense_product(x, model.layers[0].weight0)


def forward(model: NeuralNetwork, x: Tensor, frozen: Tensor | None = None) -> Tensor:
    """``model(x)``, with ``frozen = x W_0`` of the first adapter given (:func:`frozen_products`): the first
    layer uses it, the network's own forward does the rest."""
    first = model.activations[0](model.layers[0](x.flatten(1), frozen))
    return model(first, start=1)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of indices into ``range(n)`` (reshuffled at each pass)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


# ---------------------------------------------------------------------------------------------
# Training

def train_fixed(model: NeuralNetwork, x: Tensor, y: Tensor, steps: int, batch_size: int = 128,
                learning_rate: float = 3e-3, seed: int = 0) -> list[float]:
    """Adapter training at fixed ranks: Adam on every trainable parameter (``U``, ``V``, ``s``, biases).

    Returns the loss of each step.
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=learning_rate, fused=True)
    batches, losses, frozen = _batches(len(y), batch_size, generator), [], frozen_products(model, x)
    model.train()
    for _ in range(steps):
        index = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(model, x[index], frozen[index]), y[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@dataclass(frozen=True)
class Bilevel:
    """The settings of :func:`train_bilevel`: the ``[bilevel]`` table of an adapters TOML, and ``seed``, which
    splits the images into the two halves (``[adaptation] seed``)."""

    tau: float = cfg.option(25.0, "budget: the sum of s over every rank-one term", above=0, table="bilevel")
    outer_steps: int = cfg.option(300, "Frank-Wolfe steps on s", min=1, table="bilevel")
    inner_steps: int = cfg.option(4, "Adam steps on the factors per outer step", min=1, table="bilevel")
    batch_size: int = cfg.option(128, "images per step", min=1, table="bilevel")
    learning_rate: float = cfg.option(3e-3, "Adam's step size of the inner steps", above=0, table="bilevel")
    fw_step: float = cfg.option(0.1, "Frank-Wolfe step size gamma", above=0, max=1, table="bilevel")
    seed: int = 0


def train_bilevel(model: NeuralNetwork, x: Tensor, y: Tensor, settings: Bilevel) -> pd.DataFrame:
    """Bilevel rank selection (module docstring) on ``(x, y)``, split into two halves by ``settings.seed``.

    ``s`` of every adapter starts at ``tau / N`` (``N`` the number of rank-one terms of all adapters: the
    centre of the face ``sum s = tau``). Each outer step: ``inner_steps`` Adam steps on ``U``, ``V`` and the
    biases on batches of the first half; then the gradient of the loss of one batch of the second half
    with respect to all ``s`` (concatenated), and one :func:`frank_wolfe_step`.

    Returns one row per outer step: ``step``, ``lower_loss`` (mean over its inner steps), ``upper_loss``,
    ``kind`` of the Frank-Wolfe step, ``budget`` (``sum s``), then for each adapter ``i`` ``mass_i`` (the sum
    of its ``s``) and ``rank_i`` (its non-zero ``s``), after the step.
    """
    layers = adapters(model)
    sizes = [a.rank_max for a in layers]
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(y), generator=generator)
    lower, upper = order[: len(y) // 2], order[len(y) // 2:]
    with torch.no_grad():
        for a in layers:
            a.s.fill_(settings.tau / sum(sizes))
    inner = [p for name, p in model.named_parameters() if not name.endswith(".s")]
    optimizer = torch.optim.Adam(inner, lr=settings.learning_rate, fused=True)
    lower_batches = _batches(len(lower), settings.batch_size, generator)
    upper_batches = _batches(len(upper), settings.batch_size, generator)
    rows, frozen = [], frozen_products(model, x)
    model.train()
    for step in range(1, settings.outer_steps + 1):
        for a in layers:
            a.s.requires_grad_(False)
        lower_losses = []
        for _ in range(settings.inner_steps):
            index = lower[next(lower_batches)]
            optimizer.zero_grad()
            loss = F.cross_entropy(forward(model, x[index], frozen[index]), y[index])
            loss.backward()
            optimizer.step()
            lower_losses.append(loss.item())
        for a in layers:
            a.s.requires_grad_(True)
        index = upper[next(upper_batches)]
        upper_loss = F.cross_entropy(forward(model, x[index], frozen[index]), y[index])
        gradients = torch.autograd.grad(upper_loss, [a.s for a in layers])
        s_new, kind = frank_wolfe_step(torch.cat([a.s.detach() for a in layers]), torch.cat(gradients),
                                       settings.tau, settings.fw_step)
        with torch.no_grad():
            for a, part in zip(layers, torch.split(s_new, sizes)):
                a.s.copy_(part)
        rows.append(dict(step=step, lower_loss=float(np.mean(lower_losses)), upper_loss=upper_loss.item(),
                         kind=kind, budget=float(s_new.sum()),
                         **{f"mass_{i}": float(a.s.detach().sum()) for i, a in enumerate(layers)},
                         **{f"rank_{i}": a.rank for i, a in enumerate(layers)}))
    for a in layers:
        a.s.requires_grad_(False)
    model.eval()
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The experiment of figure (k)

@dataclass(frozen=True)
class AdapterExperiment:
    """One TOML file of kind ``"adapters"``.

    ``pretrain``: the pretrained network, a :class:`lowrank.engine.config.ModelConfig` read from the ``[pretrain]``
    table (``[pretrain.settings]`` and ``[[pretrain.layer]]`` of dense layers, as in any study). The other
    fields are the keys of ``[adaptation]``, and ``bilevel`` those of ``[bilevel]``; ``[quick]`` may replace
    any of them.
    """

    pretrain: cfg.ModelConfig
    shift: str = cfg.option("permuted-labels", "the new task", choices=SHIFTS, table="adaptation")
    train_images: int = cfg.option(10_000, "training images of the new task", min=2, max=cfg.SPLIT_SIZES["train"], table="adaptation")
    max_rank: int = cfg.option(32, "largest adapter rank of a layer (capped at min(n_in, n_out))", min=1, table="adaptation")
    threshold: float = cfg.option(0.01, "terms with s below threshold * tau are pruned (a fraction of tau)", min=0, below=1,
                              table="adaptation")
    oracle_ranks: tuple[int, ...] = cfg.option((), "ranks known to suffice, one per layer; [] = none", min=0, empty=True,
                                           table="adaptation")
    seed: int = cfg.option(0, "seed of the task, the split and the adapters", min=0, table="adaptation")
    repeats: int = cfg.option(3, "trainings (seeds) of each fixed-rank model", min=1, table="adaptation")
    bilevel: Bilevel = Bilevel()
    figure: dict = field(default_factory=dict, compare=False)

    @property
    def caps(self) -> list[int]:
        """The largest adapter rank of each layer: ``min(max_rank, n_in, n_out)``."""
        return [min(self.max_rank, *layer.dims) for layer in self.pretrain.layers]


def parse_experiment(data: dict, path: str | Path | None = None, quick: bool = False) -> AdapterExperiment:
    """Validate a dict shaped like the TOML file; ``quick`` applies ``[quick]`` and the report's quick
    pretraining (:func:`lowrank.engine.config.quick_settings`: 1,000 images, at most 1 epoch)."""
    file = "<config>" if path is None else str(path)
    figure = cfg.experiment_tables(data, KIND, file, AdapterExperiment, Bilevel, extra=("pretrain",))
    pretrain = data.get("pretrain")
    if not isinstance(pretrain, dict):
        raise cfg.ConfigError(f"{file}: pretrain is missing; allowed: a table [pretrain] with [pretrain.settings] "
                              "and [[pretrain.layer]] tables, as in a one-model study")
    try:
        model = cfg.parse(pretrain, path).models[0]
    except cfg.ConfigError as error:  # name the key paths from the top of the file
        raise cfg.ConfigError(str(error).replace(f"{file}: ", f"{file}: pretrain.", 1)) from None
    model = cfg.ModelConfig("pretrained", model.settings, model.layers)
    if any(layer.type != "dense" for layer in model.layers):
        raise cfg.ConfigError(f'{file}: pretrain.layer: every layer must have type = "dense"; allowed: "dense"')
    experiment = AdapterExperiment(cfg.quick_settings(model) if quick else model,
                                   **cfg.table_values(AdapterExperiment, data, file, quick), figure=dict(figure))
    bilevel = Bilevel(**cfg.table_values(Bilevel, data, file, quick), seed=experiment.seed)
    experiment = replace(experiment, bilevel=bilevel)
    if experiment.oracle_ranks and (len(experiment.oracle_ranks) != len(model.layers) or any(
            r > cap for r, cap in zip(experiment.oracle_ranks, experiment.caps))):
        raise cfg.ConfigError(f"{file}: adaptation.oracle_ranks = {list(experiment.oracle_ranks)} needs one rank per "
                              f"layer, each at most {experiment.caps}; allowed: such a list, or []")
    return experiment


def load_experiment(path: str | Path, quick: bool = False) -> AdapterExperiment:
    """Read and validate a TOML file of kind ``"adapters"`` (``notebooks/configs/fig_k.toml``).

    Errors (:class:`lowrank.engine.config.ConfigError`) name the file, the key and the allowed values.
    """
    return parse_experiment(cfg.read_toml(path), path, quick)


@dataclass
class AdapterResults:
    """What :func:`run_experiment` found.

    ``models``: one row per adapted model: ``model``, ``ranks`` (per layer), ``total_rank``, ``parameters``
    (``sum_l r_l (n_in + n_out + 1)``, as :func:`adapter_parameters`), ``test_accuracy`` on the shifted task
    (the mean over ``runs`` seeds) with ``accuracy_min`` and ``accuracy_max``. ``history``:
    :func:`train_bilevel`'s table. ``weights``: the final ``s``: ``layer``, ``index`` (largest first), ``s``.
    ``pretrained_accuracy``: the pretrained network on its own test set and on the shifted one. ``seconds``:
    wall time of each part (of one run for the trainings at fixed ranks).
    ``exact_fix``: for ``"permuted-labels"``, the singular values of :func:`label_shift_correction` of the
    pretrained output layer (else ``None``).
    """

    models: pd.DataFrame
    history: pd.DataFrame
    weights: pd.DataFrame
    pretrained_accuracy: dict[str, float]
    seconds: dict[str, float]
    experiment: AdapterExperiment
    exact_fix: Tensor | None = None


def run_experiment(experiment: AdapterExperiment, results_dir: str | Path | None = None,
                   force: bool = False) -> AdapterResults:
    """Pretrain (or read from the results cache), then adapt to the shifted task four ways.

    1. ``bilevel``: :func:`train_bilevel` from adapters of rank ``caps`` on every layer; its ranks are the
       ``s_i > 0``. ``bilevel, pruned``: the same model with ``s_i <= threshold * tau`` set to 0 (the
       *selected* ranks), not retrained.
    2. ``selected ranks``: fresh adapters of the selected ranks, trained by :func:`train_fixed` on all the
       training images (both halves) for ``outer_steps * inner_steps`` steps, once for each of the
       ``repeats`` seeds ``seed, seed + 1, ...`` (initialisation and batch order).
    3. ``uniform ranks``: the same at the same total rank spread evenly over the layers (:func:`uniform_ranks`).
    4. ``oracle ranks`` (if given): the same at ``oracle_ranks``.

    The rows of ``models`` give the mean ``test_accuracy`` over the seeds and its ``accuracy_min`` and
    ``accuracy_max`` (one run, hence all equal, for the bilevel models), and ``runs``.
    """
    import time

    from lowrank.engine import training

    seconds, rows = {}, []
    # Adapters, their optimiser state and the task's images take the pretrained network's dtype.
    with torch_threads(1), default_dtype(experiment.pretrain.settings.dtype):
        start = time.perf_counter()
        pretrained = training.train(experiment.pretrain, results_dir=results_dir, force=force, progress=False)
        seconds["pretraining"] = time.perf_counter() - start
        task = shifted_task(experiment.shift, experiment.train_images, experiment.seed)
        base = pretrained.model
        accuracies = {"pretraining task": float(pretrained.test_accuracy),
                      "shifted task": model_accuracy(base, task.test_x, task.test_y)}
        exact_fix = None
        if experiment.shift == "permuted-labels":
            exact_fix = torch.linalg.svdvals(label_shift_correction(base.layers[-1].weight.detach().double()))

        def record(name: str, layer_ranks: list[int], models: list[nn.Module]) -> None:
            scores = [model_accuracy(model, task.test_x, task.test_y) for model in models]
            rows.append(dict(model=name, ranks=layer_ranks, total_rank=sum(layer_ranks),
                             parameters=sum(r * (n + k + 1) for r, (n, k) in zip(layer_ranks, dims)),
                             test_accuracy=float(np.mean(scores)), accuracy_min=min(scores),
                             accuracy_max=max(scores), runs=len(scores)))

        dims = [layer.dims for layer in experiment.pretrain.layers]

        start = time.perf_counter()
        torch.manual_seed(experiment.seed)
        model = adapt(base, experiment.caps)
        history = train_bilevel(model, task.train_x, task.train_y, experiment.bilevel)
        seconds["bilevel"] = time.perf_counter() - start
        record("bilevel", ranks(model), [model])
        weights = pd.DataFrame(
            [(i, k, value) for i, a in enumerate(adapters(model))
             for k, value in enumerate(sorted(a.s.detach().tolist(), reverse=True))],
            columns=["layer", "index", "s"])
        selected = prune(model, experiment.threshold * experiment.bilevel.tau)
        record("bilevel, pruned", selected, [model])

        steps = experiment.bilevel.outer_steps * experiment.bilevel.inner_steps
        fixed = {"selected ranks": selected, "uniform ranks": uniform_ranks(sum(selected), experiment.caps)}
        if experiment.oracle_ranks:
            fixed["oracle ranks"] = list(experiment.oracle_ranks)
        for name, layer_ranks in fixed.items():
            start, models = time.perf_counter(), []
            for seed in range(experiment.seed, experiment.seed + experiment.repeats):
                torch.manual_seed(seed)
                models.append(adapt(base, layer_ranks))
                train_fixed(models[-1], task.train_x, task.train_y, steps, experiment.bilevel.batch_size,
                            experiment.bilevel.learning_rate, seed)
            seconds[name] = (time.perf_counter() - start) / experiment.repeats  # per run
            record(name, layer_ranks, models)
    return AdapterResults(pd.DataFrame(rows), history, weights, accuracies, seconds, experiment, exact_fix)


# ---------------------------------------------------------------------------------------------
# What figure (k) concludes

#: Singular values of the exact correction below this times the largest count as zero (its rank).
FIX_RANK_RTOL = 1e-6
#: Test images of the shifted task, for the standard error of an accuracy.
TEST_IMAGES = 10_000


def fix_rank(results: AdapterResults) -> int:
    """The rank of the exact correction of the pretrained output layer (:func:`label_shift_correction`)."""
    fix = results.exact_fix
    return int((fix > FIX_RANK_RTOL * fix.max()).sum())


def layer_names(experiment: AdapterExperiment) -> list[str]:
    """``"layer 1 (784 x 256)"``, ...: each pretrained layer by its place and shape."""
    return [f"layer {i + 1} ({n} x {m})" for i, (n, m) in enumerate(layer.dims for layer in experiment.pretrain.layers)]


def setting_values(results: AdapterResults, prefix: str) -> dict[str, object]:
    """The wall time of each part, the settings the text quotes, the pretrained accuracies and the exact
    correction's rank and nuclear norm, to glue in this order."""
    experiment, bilevel = results.experiment, results.experiment.bilevel
    values = {f"{prefix}_seconds_{summary.slug(part)}": summary.Seconds(s) for part, s in results.seconds.items()}
    settings = dict(tau=bilevel.tau, outer=bilevel.outer_steps, inner=bilevel.inner_steps,
                    train_images=experiment.train_images, max_rank=experiment.max_rank,
                    threshold=round(100 * experiment.threshold, 2), fixed_steps=bilevel.outer_steps * bilevel.inner_steps,
                    pretrain_epochs=experiment.pretrain.settings.num_epochs, gamma=bilevel.fw_step,
                    repeats=experiment.repeats)
    values.update({f"{prefix}_{key}": value for key, value in settings.items()})
    values[f"{prefix}_pretrained_mnist"] = round(100 * results.pretrained_accuracy["pretraining task"], 2)
    values[f"{prefix}_pretrained_shifted"] = round(100 * results.pretrained_accuracy["shifted task"], 2)
    values[f"{prefix}_fix_rank"] = fix_rank(results)
    values[f"{prefix}_fix_nuclear"] = round(float(results.exact_fix.sum()), 1)
    return values


def model_values(results: AdapterResults, prefix: str) -> dict[str, object]:
    """Each adapted model's ranks, total rank, adapter parameters, mean accuracy and its range over the seeds."""
    values = {}
    for name, row in results.models.set_index("model").iterrows():
        key = f"{prefix}_{summary.slug(name)}"
        values.update({f"{key}_ranks": list(row.ranks), f"{key}_total": int(row.total_rank),
                       f"{key}_parameters": int(row.parameters), f"{key}_accuracy": round(100 * row.test_accuracy, 2),
                       f"{key}_range": summary.Text(f"{100 * row.accuracy_min:.2f} to {100 * row.accuracy_max:.2f}")})
    return values


def model_table(results: AdapterResults) -> pd.DataFrame:
    """The adapted models as the book shows them: ranks, total rank, parameters, runs, accuracy and its range."""
    models = results.models.set_index("model")
    shown = models[["ranks", "total_rank", "parameters", "runs"]].assign(
        accuracy=(100 * models.test_accuracy).round(2),
        range=[f"{100 * lo:.2f} - {100 * hi:.2f}" for lo, hi in zip(models.accuracy_min, models.accuracy_max)])
    shown.columns = ["ranks", "total rank", "adapter parameters", "runs", "test accuracy % (mean)", "min - max %"]
    return shown


def findings(results: AdapterResults, prefix: str) -> dict[str, object]:
    """The verdicts of figure (k) and the numbers its text quotes, in glue order.

    Criteria: the budget went where the exact correction lives if the output layer holds more than half of
    the final ``sum s``; one set of fixed ranks is ahead of another with every seed if its worst run beats the
    other's best, and the two overlap otherwise; the pruned bilevel model is ahead of training at fixed ranks
    if its accuracy beats the best of them.
    """
    history, models = results.history, results.models.set_index("model")
    layers = range(len(results.experiment.caps))
    mass = np.array([history[f"mass_{i}"].iloc[-1] for i in layers])
    share = 100 * mass / mass.sum()
    values = {f"{prefix}_share_{i}": round(float(share[i]), 1) for i in layers}
    values[f"{prefix}_allocation_verdict"] = summary.Text(
        "most of the budget went where the exact correction lives" if share[-1] > 50 else
        "the budget did not go mainly where the exact correction lives")
    values[f"{prefix}_drops"] = int((history.kind == "drop").sum())
    values[f"{prefix}_fw_steps"] = int((history.kind == "fw").sum())
    acc = 100 * models.test_accuracy
    values[f"{prefix}_prune_change"] = round(float(acc["bilevel, pruned"] - acc["bilevel"]), 2)
    values[f"{prefix}_gap"] = round(float(acc["selected ranks"] - acc["uniform ranks"]), 2)
    selected, uniform = models.loc["selected ranks"], models.loc["uniform ranks"]
    ahead = selected.accuracy_min > uniform.accuracy_max
    behind = selected.accuracy_max < uniform.accuracy_min
    values[f"{prefix}_gap_verdict"] = summary.Text(
        "the selected ranks are ahead with every seed" if ahead else
        "the uniform ranks are ahead with every seed" if behind else "the accuracies of the two overlap across the seeds")
    oracle = float(acc["oracle ranks"] - acc["selected ranks"])
    values[f"{prefix}_oracle_gap"] = round(abs(oracle), 2)
    values[f"{prefix}_oracle_verdict"] = summary.Text("more" if oracle > 0 else "less")
    fixed_best = max(acc[name] for name in ("selected ranks", "uniform ranks", "oracle ranks"))
    values[f"{prefix}_bilevel_vs_fixed"] = summary.Text(
        "ahead of every training at fixed ranks" if acc["bilevel, pruned"] > fixed_best else
        "not ahead of the best training at fixed ranks")
    output_rank, exact_rank = models.loc["bilevel, pruned"].ranks[-1], fix_rank(results)
    values[f"{prefix}_output_rank"] = int(output_rank)
    values[f"{prefix}_output_rank_verdict"] = summary.Text(
        "below" if output_rank < exact_rank else "equal to" if output_rank == exact_rank else "above")
    p = models.test_accuracy["selected ranks"]
    values[f"{prefix}_standard_error"] = round(float(100 * np.sqrt(p * (1 - p) / TEST_IMAGES)), 2)
    values[f"{prefix}_opening"] = summary.Text(
        f"On a task whose answer is known, the method {'moved' if share[-1] > 50 else 'did not move'} the shared "
        "budget to the layer where the correction lives")
    values[f"{prefix}_closing"] = summary.Text(
        "Trained from scratch, the selected ranks beat uniform ranks of the same total with every seed, so the "
        "selection can serve as an architecture choice for ordinary adapter training" if ahead else
        "Trained from scratch, the selected ranks fall behind uniform ranks of the same total with every seed, so "
        "here the selection does not carry over to ordinary adapter training" if behind else
        "Trained from scratch, the selected ranks and uniform ranks of the same total lie within each other's "
        "spread over the seeds: the selection is not shown to be better than an even split")
    return values
