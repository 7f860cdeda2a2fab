"""Data-parallel training over several processes on ``torch.distributed``.

    torchrun --nproc_per_node=2 -m lowrank train notebooks/configs/fig_a.toml

torchrun starts N copies of the command and describes the group in their environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`launch` joins it with
``torch.distributed.init_process_group`` and leaves it at the end. Every process builds the same network from
the same seed, trains on its own shard of each batch, and averages gradients with the others after every
backward pass, so every process takes the same step: the step of one process whose batch is the union of the
shards. Without a group of two or more processes (``WORLD_SIZE`` unset or 1) :meth:`World.current` is
:data:`SINGLE`, whose methods return their inputs, and training does exactly what it did before.

Why not ``DistributedDataParallel``: DDP assigns each parameter's gradient a fixed slot in its buckets when it
wraps the model, and a rank-adaptive DLRT layer gives ``U``, ``S``, ``V`` another shape at every step; the
K- and L-step gradients ``G V`` and ``G^T U`` are not parameter gradients at all but live in the layer's
:class:`~lowrank.layers.GradientSink`. So this module does DDP's arithmetic by hand, ``all_reduce(SUM) / N``:

- after each backward pass (:meth:`World.average_gradients`, called by the training loop's closure): every
  parameter's ``.grad`` (dense weights, biases, vanilla low-rank factors, and ``S.grad``, which the ``"kls"``
  integrator's second pass reads), each dynamical layer's ``sink.k_grad`` and ``sink.l_grad``, and the loss
  (so the divergence check agrees on every process); all in one flat buffer per dtype, one ``all_reduce``;
- in the ``"single-pass"`` integrator, the S-step gradient ``U_hat^T G V_hat``, which
  :meth:`lowrank.optim.DLRT.step` forms from each process's own recorded activations: a ``2r x 2r`` matrix per
  layer, averaged by ``DLRT.gradient_average``, which :meth:`World.prepare` sets to :meth:`World.average_`.

``all_reduce`` leaves the same bits on every process, and each process runs the same deterministic QR, SVD and
truncation on one thread, so the bases, ranks and optimiser states stay bitwise identical (the tests check
it). :meth:`World.prepare` also broadcasts rank 0's parameters once at the start, as DDP does.

Data (:meth:`World.shard`): with ``settings.batch_size = B`` per process, the loader draws global batches of
``N B`` images in the seeded order, the same on every process, and process ``k`` trains on rows
``[k B, (k + 1) B)``. The mean of N equal-sized shard means is the mean of the global batch, so a step of N
processes equals a step of one process with ``batch_size = N B``. The last, partial global batch of ``m``
images is cut into N equal shards of ``m // N``; the ``m mod N < N`` images left over are not trained on that
epoch (a batch with ``m < N`` is skipped). A run of N processes therefore equals the one-process run with
``batch_size = N B`` when the number of training images is a multiple of N, up to float rounding (sums are
taken in another order), which the truncation leaves at ~1e-6 (tested to 1e-5 from a spectral init): it keeps
or drops clusters of nearly equal singular values whole, so rounding does not choose among them
(:func:`lowrank.optim.truncated_rank`).

Metrics: the training loss and accuracy are sums over each process's shards, added up over processes at the
end of the epoch; :func:`lowrank.engine.training.evaluate` lets each process evaluate every N-th batch and adds up the
sums; the timing columns are the slowest process's. Every process returns the same
:class:`~lowrank.engine.training.TrainingResult`.

Files: rank 0 alone writes checkpoints and the result; the others wait for it at the end. Every process reads
the same checkpoint to resume, so the results directory must be shared (one machine, or a shared file system).
A run of N > 1 processes lives in ``<name>-<cache key>-<N>proc/`` (:func:`lowrank.engine.store.run_dir`): its
global batch is N times ``batch_size``, so it must not be taken for the one-process run of the same config;
``result.json`` records ``"processes": N``.

Backend: gloo for CPU tensors, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"`` where CUDA is available, and
process ``k`` of a machine uses ``cuda:LOCAL_RANK``: one process per GPU). Each process runs torch on
``threads`` (default 1) CPU threads, as a single-process run does.

Cost: one ``all_reduce`` per backward pass (two with ``"kls"``), one more per step for single-pass S-gradients,
a few per epoch for the metrics. On a 2-core CPU machine 2 processes were no faster than 1 (gloo took ~5 ms to
average the 2.7 MB of gradients of a 784-512-512-10 dense net, and a half batch is slower per image); the gain is
for machines with cores or GPUs to spare.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowrank.layers import DynamicalLowRank


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` in ``0..size-1`` of ``size`` processes.

    Every method is collective when ``size > 1``: all processes must call it, in the same order. With
    ``size == 1`` (:data:`SINGLE`) each returns its input and communicates nothing.
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The default process group of ``torch.distributed``, or :data:`SINGLE` if there is none (or one process)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return SINGLE

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints."""
        return self.rank == 0

    # -- gradients -------------------------------------------------------------------------------

    @torch.no_grad()
    def average_(self, tensors: list[Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in place: ``all_reduce(SUM) / size``.

        The tensors are packed into one flat buffer per dtype and device (one ``all_reduce`` each, like DDP's
        buckets); non-contiguous tensors (``G V`` is a transposed view) are written back through their strides.
        """
        if self.size == 1 or not tensors:
            return

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat)
            flat.div_(self.size)

        _through_buffers(tensors, mean)

    def average_gradients(self, model: nn.Module, loss: Tensor) -> Tensor:
        """Average the gradients of the last backward pass over the processes; return the mean ``loss``.

        Averaged: every parameter's ``.grad`` that is set, and each dynamical layer's ``sink.k_grad`` and
        ``sink.l_grad`` (``G V``, ``G^T U``) when the pass left them. ``loss`` (this process's, a scalar) travels
        in the same buffer; the returned mean is the loss of the global batch. With one process: ``loss``.
        """
        if self.size == 1:
            return loss
        tensors = [param.grad for param in model.parameters() if param.grad is not None]
        for layer in model.modules():
            if isinstance(layer, DynamicalLowRank) and layer.sink.k_grad is not None:
                tensors += [layer.sink.k_grad, layer.sink.l_grad]
        mean = loss.detach().reshape(1).clone()
        self.average_(tensors + [mean])
        return mean[0]

    def prepare(self, model: nn.Module, optimizer: Any) -> None:
        """Start a run: rank 0's parameters and buffers to every process (as DDP does), and the DLRT hook.

        ``optimizer`` is a :class:`lowrank.optim.Optimizers`; its DLRT step averages the single-pass S-gradients
        with :meth:`average_`. The broadcast needs the same shapes everywhere (same config and checkpoint).
        """
        if self.size == 1:
            return
        with torch.no_grad():
            _through_buffers([t.data for t in (*model.parameters(), *model.buffers())],
                             lambda flat: dist.broadcast(flat, src=0))
        if getattr(optimizer, "dlrt", None) is not None:
            optimizer.dlrt.gradient_average = self.average_

    # -- metrics and synchronisation -------------------------------------------------------------

    def all_sum(self, *values: float) -> tuple[float, ...]:
        """The sums over the processes of Python numbers (in float64; exact for counts below 2**53)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def all_max(self, *values: float) -> tuple[float, ...]:
        """The maxima over the processes of Python numbers."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: tuple[float, ...], op) -> tuple[float, ...]:
        if self.size == 1:
            return values
        buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)  # CPU: gloo, on any backend
        dist.all_reduce(buffer, op=op)
        return tuple(buffer.tolist())

    def barrier(self) -> None:
        """Wait until every process gets here (an ``all_reduce`` of a CPU scalar: gloo, whatever the device)."""
        if self.size > 1:
            self.all_sum(0.0)

    # -- data ------------------------------------------------------------------------------------

    def shard(self, batches: Iterable) -> Iterable:
        """This process's shard of each global batch ``(x, y)``: rows ``[k n, (k + 1) n)`` with ``n = len(y) // size``.

        The ``len(y) mod size`` last rows of a batch are dropped, and a batch smaller than ``size`` is skipped,
        so every process trains on shards of the same size. With one process: ``batches`` itself.
        """
        return batches if self.size == 1 else _Shards(batches, self.rank, self.size)

    def strided(self, batches: Iterable) -> Iterator:
        """Every ``size``-th batch, starting at ``rank`` (whole batches, for evaluation; all batches are visited)."""
        if self.size == 1:
            return iter(batches)
        return (batch for index, batch in enumerate(batches) if index % self.size == self.rank)


SINGLE = World()
"""The world of a process on its own: rank 0 of 1."""


def _through_buffers(tensors: list[Tensor], communicate: Callable[[Tensor], None]) -> None:
    """``communicate`` one flat buffer per dtype and device holding ``tensors``, then copy the result back into them."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        communicate(flat)
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()


class _Shards:
    """Iterable of :meth:`World.shard`; ``len`` is the number of batches this process trains on."""

    def __init__(self, batches: Iterable, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator:
        for x, y in self.batches:
            n = len(y) // self.size
            if n:
                yield x[self.rank * n : (self.rank + 1) * n], y[self.rank * n : (self.rank + 1) * n]

    def __len__(self) -> int:
        count = len(self.batches)
        # lowrank.engine.data's loaders batch with a BatchSampler as their sampler: the last batch holds the rest.
        batch_size = getattr(getattr(self.batches, "sampler", None), "batch_size", None)
        dataset = getattr(self.batches, "dataset", None)
        if count and isinstance(batch_size, int) and dataset is not None:
            count -= len(dataset) - (count - 1) * batch_size < self.size
        return count


@contextmanager
def launch() -> Iterator[World]:
    """Join the process group that torchrun describes in the environment; leave it at the end.

    ``WORLD_SIZE`` unset or 1, or a group already joined by the caller: nothing to do (yields
    :meth:`World.current`). Otherwise ``init_process_group`` with ``init_method="env://"`` (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo, or ``"cpu:gloo,cuda:nccl"`` where CUDA is available,
    after ``torch.cuda.set_device(LOCAL_RANK)`` so that ``device = "cuda"`` means this process's GPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield World.current()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one process per GPU
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method="env://")
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()
