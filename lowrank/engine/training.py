"""The training manager: train one :class:`~lowrank.engine.config.ModelConfig`, keep its history, cache the result.

    from lowrank.engine import config, training
    study = config.load("notebooks/configs/fig.toml")
    result = training.train(study.models[0])       # trains, or returns the cached result
    result.history                                 # pandas DataFrame, one row per epoch
    result.test_accuracy, result.test_loss, result.model, result.path

The loop, per batch ``(x, y)`` (the optimiser contract of :func:`lowrank.optim.build_optimizer`)::

    def closure():
        optimizer.zero_grad(); loss = cross_entropy(model(x), y)
        (loss + penalty(model)).backward(); return loss
    loss = optimizer.step(closure)      # DLRT's "kls" integrator calls the closure twice

``penalty`` is :func:`lowrank.regularizers.penalty` with the settings ``factor_decay`` and
``frobenius_decay`` (L2 on the factors / Frobenius decay of the lowrank layers), left out when both are 0;
the history's losses are the cross-entropy alone, as with the optimiser's ``weight_decay``.

Warm start (``settings.warm_start_epochs = k > 0``): epochs ``1..k`` train the dense twin of the network
(:meth:`lowrank.engine.config.ModelConfig.dense_twin`, every layer dense, from the same seed); at the end of
epoch ``k``, :func:`warm_start` sets each factorised layer of rank ``r`` to the truncated SVD of the
trained dense ``W = P Sigma Q^T``: ``U = P_r, S = Sigma_r, V = Q_r`` (``U = P_r Sigma_r^{1/2}``,
``V = Q_r Sigma_r^{1/2}`` for ``W = U V^T``), copies the biases and the dense layers, and starts a new
optimiser; epochs ``k+1..num_epochs`` train the factorised network. The warm-up is part of the run:
its epochs are rows of the history (``phase`` ``"warm-up"``), its time is in the timing columns, and the
SVD is timed into epoch ``k``.

Fine-tuning (``settings.fine_tune_epochs = m > 0``), the second phase of the protocol of Schotthöfer et al.:
after the ``num_epochs`` epochs, ``m`` more epochs in which every rank-adaptive dynamical layer is trained at
the rank it reached, by the fixed-rank DLRT step (no augmentation, no truncation; optimiser state carried
on); the other layers train as before. Their rows have ``phase`` ``"fine-tune"``.

History (:attr:`TrainingResult.history`), one row per epoch; row 0 is the untrained network (evaluation
only, timings 0), so curves start at the initial loss:

``epoch``
    0 before training, then 1..num_epochs + fine_tune_epochs.
``train_loss``, ``train_accuracy``
    over the epoch's batches *as trained* (each batch's loss and predictions before its step), weighted by
    batch size, i.e. the mean over the training images. Row 0: the untrained network on the training set.
``val_loss``, ``val_accuracy``
    the network at the end of the epoch on the validation set.
``train_seconds``, ``train_seconds_cum``
    time inside ``optimizer.step`` (forward, backward, update; with ``torch.cuda.synchronize`` on cuda),
    data loading and evaluation excluded; and its running sum.
``epoch_seconds``, ``epoch_seconds_cum``
    wall time of the training pass over the data, data loading included, evaluation excluded; running sum.
``parameters``, ``compression``, ``flops_per_sample``
    :mod:`lowrank.metrics` of the network at the end of the epoch (they change with the ranks).
``rank_0``, ``rank_1``, ...
    each layer's rank at the end of the epoch (``min(n_in, n_out)`` for dense layers).
``erank_0``, ... and ``epsrank_0``, ...
    each layer's effective rank (Roy & Vetterli) and epsilon-rank ``#{i : sigma_i / ||W||_F > 1e-3}`` at
    the end of the epoch (:mod:`lowrank.metrics`; factorised layers from their ``r x r`` core).
``phase``
    ``"warm-up"`` for the epochs that trained the dense twin of a warm start (row 0 too: the network it
    starts from; at the end of the last warm-up epoch the network is already factorised, its columns above
    say so), ``"fine-tune"`` for the fixed-rank epochs after ``num_epochs``, ``"train"`` otherwise.
``nc1_0``, ... (only with ``settings.track_layers``)
    the within-class variability NC1 (:func:`lowrank.metrics.nc1`) of each layer's input features, on
    the first :data:`FEATURE_SAMPLE` training images (``nc1_0``: the pixels).

Results cache: a finished run lives in ``<results_dir>/<name>-<cache key>/`` (:mod:`lowrank.engine.store`: the run
folder, its files, the lock, the checkpoint and the atomic writes). While training, ``checkpoint.pt`` holds
the state after the last finished epoch (model, optimiser, history, RNG states); ``train`` resumes from it
and deletes it when the run is done.

Several processes (``torchrun --nproc_per_node=N -m lowrank train``): data-parallel, each process on its shard
of every batch of ``N * batch_size`` images, gradients averaged after each backward pass; rank 0 writes the
files, in ``<name>-<cache key>-<N>proc/``. See :mod:`lowrank.engine.distributed`.

Reproducibility (:mod:`lowrank.engine.determinism`): the seed is set before the model is built and every epoch's
batch order is a function of ``(seed, epoch)``, so a run resumed at an epoch boundary sees the same batches as
an uninterrupted one and its history is identical except for the timing columns. Training runs on ``threads``
CPU threads (default 1: faster for these small networks) with deterministic algorithms; both settings, and
the caller's global RNG state, are restored afterwards.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lowrank import __version__, metrics, regularizers
from lowrank.engine import distributed, store
from lowrank.engine.config import IMAGE_SHAPES, ModelConfig
from lowrank.engine.determinism import (default_dtype, resolve_device, rng_state, run_settings, seed_epoch,
                                        set_rng_state)
from lowrank.network import NeuralNetwork
from lowrank.optim import Optimizers, build_optimizer

TIMING_COLUMNS = ("train_seconds", "epoch_seconds", "train_seconds_cum", "epoch_seconds_cum")
#: With ``settings.track_layers``: the number of training images (the first ones, in stored order) whose
#: features give the ``nc1_*`` columns.
FEATURE_SAMPLE = 2000


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; names the model, epoch, batch and learning rate."""

    def __init__(self, model: str, epoch: int, batch: int | None, learning_rate: float, loss: float | str) -> None:
        self.model, self.epoch, self.batch, self.learning_rate, self.loss = model, epoch, batch, learning_rate, loss
        where = f"batch {batch}" if batch is not None else "the evaluation after its last batch"
        super().__init__(
            f'model "{model}" diverged in epoch {epoch}, {where}: loss = {loss} with learning_rate = '
            f"{learning_rate:g}; try a smaller learning_rate"
        )

    def __reduce__(self):  # picklable (e.g. across worker processes) despite the custom __init__
        return type(self), (self.model, self.epoch, self.batch, self.learning_rate, self.loss)


@dataclass
class TrainingResult:
    """A finished run.

    Attributes:
        config: the model's configuration.
        history: one row per epoch (module docstring); ``history.attrs`` holds ``name``, ``cache_key``,
            ``test_loss`` and ``test_accuracy`` too.
        test_loss, test_accuracy: the final network on the test set.
        model: the trained network, on the CPU, in eval mode.
        path: the run folder in the results cache.
        cached: whether the result was read from the cache instead of trained.
        spectra: with ``settings.track_layers``, every layer's singular values after every epoch (columns
            ``epoch``, ``layer``, ``index``, ``value``); otherwise ``None``.
    """

    config: ModelConfig
    history: pd.DataFrame
    test_loss: float
    test_accuracy: float
    model: NeuralNetwork
    path: Path
    cached: bool = False
    spectra: pd.DataFrame | None = None


# ---------------------------------------------------------------------------------------------
# Public helpers

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` over every image of ``loader``, in eval mode.

    In a :mod:`lowrank.engine.distributed` group this is collective: each process evaluates every N-th batch and the
    sums are added up, so every process returns the same numbers.
    """
    world = distributed.World.current()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in world.strided(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
        count += len(y)
    loss_sum, correct, count = world.all_sum(loss_sum.item(), correct.item(), count)
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return loss_sum / count, correct / count


def load_result(config: ModelConfig, results_dir: str | Path | None = None) -> TrainingResult | None:
    """The cached result of ``config``, or ``None`` if its run has not finished."""
    folder = store.run_dir(config, results_dir)
    if (run := store.read_run(folder)) is None:
        return None
    info, history, state, spectra = run
    with torch.random.fork_rng(devices=[]), default_dtype(config.settings.dtype):  # building draws an init
        model = NeuralNetwork.from_config(config.layers, IMAGE_SHAPES[config.settings.dataset])
    model.load_state_dict(state)
    _enter_phase(model, config.settings, config.settings.total_epochs)
    model.eval()
    return _result(config, history, info["test_loss"], info["test_accuracy"], model, folder, cached=True,
                   spectra=spectra)


# ---------------------------------------------------------------------------------------------
# Training

def train(
    config: ModelConfig,
    results_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    threads: int = 1,
    data_root: str | Path | None = None,
) -> TrainingResult:
    """Train ``config``'s model for ``settings.total_epochs`` epochs, or return its cached result.

    Args:
        config: the model and its settings.
        results_dir: root of the results cache (default :func:`lowrank.engine.config.default_results_dir`).
        force: train again even if a result or a checkpoint exists (both are replaced).
        progress: show a tqdm bar per epoch (loss, ranks); default: only if stderr is a terminal.
        on_epoch: called with each history row (a dict; epoch 0 included) after its checkpoint is saved.
        threads: ``torch.set_num_threads`` during training (restored afterwards).
        data_root: a folder of IDX files to read instead of :mod:`lowrank.engine.data`'s cache (``root=`` there).

    Raises:
        TrainingDivergedError: the loss became NaN or infinite (the checkpoint of the last good epoch stays).
    """
    world = distributed.World.current()  # this process and the others of a torchrun group (lowrank.engine.distributed)
    folder = store.run_dir(config, results_dir, world.size)
    if not force and (cached := load_result(config, results_dir)) is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    with store.run_lock(folder, hold=world.main):
        if not force and (cached := load_result(config, results_dir)) is not None:
            return cached  # another process trained it while this one waited for the lock
        if force:
            store.remove_checkpoint(folder)
        return _train(config, folder, world, progress, on_epoch, threads, data_root)


def _train(
    config: ModelConfig,
    folder: Path,
    world: distributed.World,
    progress: bool | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    threads: int,
    data_root: str | Path | None,
) -> TrainingResult:
    """The body of :func:`train` once the cache missed and the run's lock is held: train, resume, save."""
    show = sys.stderr.isatty() if progress is None else progress
    settings = config.settings
    device = resolve_device(settings.device)
    from lowrank.engine import data  # imported here: the data module is only needed to train

    warm_up = settings.warm_start_epochs  # epochs 1..warm_up train the dense twin
    with run_settings(threads, device), default_dtype(settings.dtype):
        torch.manual_seed(settings.seed)
        model = _built(config.dense_twin() if warm_up else config, device)
        splits = data.loaders(settings.dataset, batch_size=settings.batch_size * world.size, seed=settings.seed,
                              subset=settings.subset, root=data_root, device=str(device),
                              dtype=torch.get_default_dtype())
        probe = _feature_sample(splits.train) if settings.track_layers else None
        checkpoint = store.load_checkpoint(folder, config)
        if checkpoint is None:  # epoch 0: the untrained network
            optimizer, spectra = _prepared(world, model, settings), [] if settings.track_layers else None
            seed_epoch(splits.train, settings.seed, 0)
            history = [_row(model, 0, evaluate(model, splits.train, device), evaluate(model, splits.val, device),
                            0.0, 0.0, None, _phase(settings, 0), probe, spectra)]
            _save_checkpoint(world, folder, config, model, optimizer, history, splits.train, spectra)
            if on_epoch is not None:
                on_epoch(dict(history[0]))
        else:
            model, optimizer, history, spectra = _resumed(checkpoint, world, model, config, device, splits.train)

        for epoch in range(history[-1]["epoch"] + 1, settings.total_epochs + 1):
            seed_epoch(splits.train, settings.seed, epoch)
            _enter_phase(model, settings, epoch)
            bar = tqdm(world.shard(splits.train), desc=f"{config.name} {epoch}/{settings.total_epochs}",
                       disable=not show or not world.main, leave=True, dynamic_ncols=True)
            trained, train_seconds, epoch_seconds = _train_epoch(world, model, optimizer, bar, device, config, epoch)
            if epoch == warm_up:  # the end of the dense warm-up: factorise, a new optimiser (timed into this epoch)
                model, optimizer, switch = _factorised(world, config, model, device)
                train_seconds, epoch_seconds = train_seconds + switch, epoch_seconds + switch
            validated = evaluate(model, splits.val, device)
            if not np.isfinite(validated[0]):
                raise TrainingDivergedError(config.name, epoch, None, settings.learning_rate, validated[0])
            history.append(_row(model, epoch, trained, validated, train_seconds, epoch_seconds, history[-1],
                                _phase(settings, epoch), probe, spectra))
            _save_checkpoint(world, folder, config, model, optimizer, history, splits.train, spectra)
            if on_epoch is not None:
                on_epoch(dict(history[-1]))

        test_loss, test_accuracy = evaluate(model, splits.test, device)
    model = model.cpu().eval()
    spectra = pd.DataFrame(spectra, columns=["epoch", "layer", "index", "value"]) if spectra is not None else None
    result = _result(config, pd.DataFrame(history), test_loss, test_accuracy, model, folder, spectra=spectra)
    if world.main:  # one writer; the other processes wait for its files
        _save_result(result, device, threads, world.size)
        store.remove_checkpoint(folder)
    world.barrier()
    return result


def warm_start(config: ModelConfig, dense: NeuralNetwork) -> NeuralNetwork:
    """``config``'s network with its factorised layers set from the trained dense twin ``dense`` by SVD.

    For a layer of rank ``r`` and the dense weight ``W = P Sigma Q^T``: ``U = P_r``, ``S = Sigma_r``,
    ``V = Q_r`` (``W = U S V^T``), or the balanced ``U = P_r Sigma_r^{1/2}``, ``V = Q_r Sigma_r^{1/2}``
    (``W = U V^T``); either way ``U S V^T`` is the best rank-``r`` approximation of ``W``
    (:meth:`lowrank.network.NeuralNetwork.copy_from_dense`). Dense layers and all biases are copied. Returned on
    the CPU, in training mode; ``dense`` and the caller's RNG are unchanged.
    """
    with torch.random.fork_rng(devices=[]):  # building the network draws an initialisation, overwritten below
        model = _built(config, torch.device("cpu"))
    return model.copy_from_dense(dense).train()


def _prepared(world: distributed.World, model: NeuralNetwork, settings) -> Optimizers:
    """The optimisers of ``model`` (:func:`lowrank.optim.build_optimizer`), joined to the process group: rank 0's
    weights everywhere, DLRT's gradient averaging hooked in."""
    optimizer = build_optimizer(model, settings)
    world.prepare(model, optimizer)
    return optimizer


def _resumed(checkpoint: dict, world: distributed.World, model: NeuralNetwork, config: ModelConfig,
             device: torch.device, batches) -> tuple[NeuralNetwork, Optimizers, list[dict], list | None]:
    """The network, optimisers, history and spectra of an interrupted run, and its batch order, as saved."""
    settings = config.settings
    if settings.warm_start_epochs and checkpoint["epoch"] >= settings.warm_start_epochs:  # after the switch
        model = _built(config, device)
    model.load_state_dict(checkpoint["model"])  # before the optimiser: dynamical layers resize
    optimizer = _prepared(world, model, settings)
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_state(checkpoint["rng"], batches)
    return model, optimizer, checkpoint["history"], checkpoint.get("spectra") if settings.track_layers else None


def _factorised(world: distributed.World, config: ModelConfig, dense: NeuralNetwork, device: torch.device
                ) -> tuple[NeuralNetwork, Optimizers, float]:
    """The end of a dense warm-up: the configured network set from ``dense`` (:func:`warm_start`), its new
    optimisers, and the seconds the switch took."""
    _synchronize(device)
    start = time.perf_counter()
    model = warm_start(config, dense).to(device)
    optimizer = _prepared(world, model, config.settings)
    _synchronize(device)
    return model, optimizer, time.perf_counter() - start


def _phase(settings, epoch: int) -> str:
    """The phase of ``epoch`` (0 = the untrained network): ``"warm-up"``, ``"train"`` or ``"fine-tune"``."""
    if epoch > settings.num_epochs:
        return "fine-tune"
    if settings.warm_start_epochs and epoch <= settings.warm_start_epochs:
        return "warm-up"
    return "train"


def _enter_phase(model: NeuralNetwork, settings, epoch: int) -> None:
    """Before training ``epoch``: in the fine-tuning phase every dynamical layer keeps its rank (``adaptive`` off)."""
    if _phase(settings, epoch) == "fine-tune":
        for layer in model.dynamical_layers():
            layer.adaptive = False


def _built(config: ModelConfig, device: torch.device) -> NeuralNetwork:
    return NeuralNetwork.from_config(config.layers, IMAGE_SHAPES[config.settings.dataset]).to(device)


def _feature_sample(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The first :data:`FEATURE_SAMPLE` training images and labels, in stored order (the ``nc1_*`` probe)."""
    x, y = loader.dataset.tensors
    return x[:FEATURE_SAMPLE], y[:FEATURE_SAMPLE]


def _train_epoch(world: distributed.World, model, optimizer, batches, device, config: ModelConfig, epoch: int):
    """One pass over the training batches: ``((loss, accuracy) as trained, step seconds, epoch seconds)``."""
    model.train()
    loss_sum, correct, count, step_seconds = 0.0, 0, 0, 0.0
    lr = config.settings.learning_rate
    factor_decay, frobenius_decay = config.settings.factor_decay, config.settings.frobenius_decay
    regularised = factor_decay > 0 or frobenius_decay > 0
    start = time.perf_counter()
    for batch, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        first_logits = []

        def closure():
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not first_logits:
                first_logits.append(logits.detach())
            penalty = regularizers.penalty(model, factor_decay, frobenius_decay) if regularised else None
            (loss if penalty is None else loss + penalty).backward()
            # Several processes: gradients and loss averaged over them, so all agree on the check (lowrank.engine.distributed).
            mean_loss = world.average_gradients(model, loss)
            if not torch.isfinite(mean_loss):
                raise TrainingDivergedError(config.name, epoch, batch, lr, mean_loss.item())
            return loss

        _synchronize(device)
        step_start = time.perf_counter()
        try:
            loss = optimizer.step(closure).item()
        except torch.linalg.LinAlgError as error:  # NaN/inf gradients make the DLRT QR/SVD fail
            raise TrainingDivergedError(config.name, epoch, batch, lr, f"finite, but {error}") from error
        _synchronize(device)
        step_seconds += time.perf_counter() - step_start

        loss_sum += loss * len(y)
        correct += metrics.correct_predictions(first_logits[0], y)
        count += len(y)
        if not getattr(batches, "disable", True):
            batches.set_postfix(loss=f"{loss:.4f}", ranks=",".join(map(str, model.ranks())), refresh=False)
    # A DLRT cycle (basis_interval > 1) ends with the epoch: evaluation, ranks and checkpoints see truncated factors.
    _synchronize(device)
    step_start = time.perf_counter()
    optimizer.finish_cycle()
    _synchronize(device)
    step_seconds += time.perf_counter() - step_start
    epoch_seconds = time.perf_counter() - start
    if hasattr(batches, "close"):
        batches.close()
    loss_sum, correct, count = world.all_sum(loss_sum, correct, count)  # this process's shards -> all images
    step_seconds, epoch_seconds = world.all_max(step_seconds, epoch_seconds)  # the slowest process
    return (loss_sum / count, correct / count), step_seconds, epoch_seconds


def _row(model: NeuralNetwork, epoch: int, trained: tuple[float, float], validated: tuple[float, float],
         train_seconds: float, epoch_seconds: float, previous: dict | None, phase: str = "train",
         probe: tuple[torch.Tensor, torch.Tensor] | None = None, spectra: list | None = None) -> dict[str, Any]:
    """One history row of plain Python numbers (so checkpoints load with ``weights_only=True``).

    With a ``probe`` (images, labels), the row gets the ``nc1_*`` columns; a ``spectra`` list gets this
    epoch's ``(epoch, layer, index, value)`` rows appended.
    """
    row = {
        "epoch": epoch,
        "train_loss": float(trained[0]),
        "train_accuracy": float(trained[1]),
        "val_loss": float(validated[0]),
        "val_accuracy": float(validated[1]),
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "train_seconds_cum": train_seconds + (previous["train_seconds_cum"] if previous else 0.0),
        "epoch_seconds_cum": epoch_seconds + (previous["epoch_seconds_cum"] if previous else 0.0),
        "parameters": metrics.parameter_count(model),
        "compression": metrics.compression(model),
        "flops_per_sample": metrics.flops_per_sample(model),
    }
    row.update({f"rank_{i}": int(rank) for i, rank in enumerate(model.ranks())})
    sigmas = [metrics.layer_singular_values(layer) for layer in model.layers]
    row.update({f"erank_{i}": metrics.effective_rank(sigma) for i, sigma in enumerate(sigmas)})
    row.update({f"epsrank_{i}": metrics.epsilon_rank(sigma, metrics.EPSILON_RANK_TOL, "frobenius")
                for i, sigma in enumerate(sigmas)})
    row["phase"] = phase
    if probe is not None:
        features = model.layer_inputs(probe[0])
        row.update({f"nc1_{i}": metrics.nc1(h, probe[1]) for i, h in enumerate(features)})
    if spectra is not None:
        spectra.extend((epoch, i, k, value) for i, sigma in enumerate(sigmas) for k, value in enumerate(sigma.tolist()))
    return row


def _result(config, history, test_loss, test_accuracy, model, folder, cached=False, spectra=None) -> TrainingResult:
    history.attrs.update(name=config.name, cache_key=config.cache_key(), test_loss=test_loss,
                         test_accuracy=test_accuracy)
    return TrainingResult(config, history, test_loss, test_accuracy, model, folder, cached, spectra)


# ---------------------------------------------------------------------------------------------
# Devices

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Saving (lowrank.engine.store)

def _save_checkpoint(world: distributed.World, folder: Path, config: ModelConfig, model, optimizer,
                     history: list[dict], loader, spectra: list | None = None) -> None:
    """The state after the last finished epoch: model, optimiser, history, RNG states (and spectra)."""
    if not world.main:  # one writer (lowrank.engine.distributed)
        return
    checkpoint = {
        "config": config.to_dict(),
        "epoch": history[-1]["epoch"],
        "model": store.cpu_state(model),
        "optimizer": store.cpu_state(optimizer),
        "history": history,
        "rng": rng_state(loader),
    }
    if spectra is not None:
        checkpoint["spectra"] = spectra
    store.save_checkpoint(folder, checkpoint)


def _save_result(result: TrainingResult, device: torch.device, threads: int, processes: int) -> None:
    config = result.config
    info = {
        "name": config.name,
        "cache_key": config.cache_key(),
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "epochs": int(result.history["epoch"].max()),
        "train_seconds": float(result.history["train_seconds"].sum()),
        "config": config.to_dict(),
        "lowrank_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": threads,
        "processes": processes,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.save_run(result.path, info, result.model.state_dict(), result.history, result.spectra)
