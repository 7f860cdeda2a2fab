"""Kamalakara et al.'s recipes for factorised training, judged on the models of figure (h).

Figure (h) trains, on each dataset, a dense model and factorised models ``W = U V^T`` that differ in one
recipe: the initialisation (random, with a Gaussian core; random, flat, with equal singular values; spectral;
spectral-ones), the regulariser (L2 on the factors or Frobenius decay of ``U V^T``) or a warm start from dense
training; ``random`` is trained from two seeds, whose difference is the yardstick. Model names are
``"<dataset>: <recipe>"``. The four claims of Kamalakara et al. and the chapter's own question, with their
criteria (``d`` the seed spread of the test accuracy, ``e`` that of the mean hidden effective rank):

- c1, spectral initialisation beats random: ``acc(spectral) - acc(random) > d``;
- c2, only the singular vectors matter: ``|acc(spectral-ones) - acc(spectral)| <= d``;
- c3, Frobenius decay lowers the rank less than L2 on the factors:
  ``erank(Frobenius decay) - erank(L2 on factors) > e``;
- c4, a warm start beats training factorised from the start: ``acc(warm start) - max(acc(random),
  acc(spectral)) > d``;
- bias, factorised training without a regulariser lowers the effective rank by itself:
  ``erank(random, flat at epoch 0) - erank(random, flat) > e``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from lowrank.engine import summary
from lowrank.layers import LowRank
from lowrank.network import effective_weight

DATASETS = ("MNIST", "Fashion-MNIST")
CLAIMS = ("c1", "c2", "c3", "c4", "bias")
#: The initialisations whose ``||W||_F^2`` the chapter compares, on its 784 x 256 layer of rank 64.
NORM_INITS = ("kaiming", "spectral", "spectral-ones")


def by_dataset(results: Sequence) -> dict[str, list]:
    """``{dataset: its results}`` from model names ``"<dataset>: <recipe>"``."""
    return {name: [r for r in results if r.config.name.startswith(name + ": ")] for name in DATASETS}


def hidden_erank(result, epoch: int = -1) -> float:
    """Mean effective rank of the two hidden layers after ``epoch`` (history row; -1: the end of training,
    0: the untrained network)."""
    row = result.history.iloc[epoch]
    return (row["erank_0"] + row["erank_1"]) / 2


def verdict(holds: dict[str, bool]) -> summary.Text:
    """The verdict over the datasets, from ``{dataset: whether the claim holds there}``."""
    yes = [name for name, value in holds.items() if value]
    if len(yes) == len(holds):
        return summary.Text("holds on both datasets")
    return summary.Text(f"holds on {yes[0]} only" if yes else "holds on neither dataset")


def dataset_comparison(members: Sequence) -> tuple[dict[str, float], dict[str, bool]]:
    """The differences the claims are judged on, for one dataset's models, rounded as the book shows them, and
    whether each claim holds (module docstring)."""
    by = {r.config.name.split(": ", 1)[1]: r for r in members}
    accuracy = {recipe: 100 * r.test_accuracy for recipe, r in by.items()}
    erank = {recipe: hidden_erank(r) for recipe, r in by.items()}
    spread = abs(accuracy["random"] - accuracy["random, seed 1"])
    erank_spread = abs(erank["random"] - erank["random, seed 1"])
    row = {
        "seed spread (points)": spread,
        "spectral - random (points)": accuracy["spectral"] - accuracy["random"],
        "spectral-ones - spectral (points)": accuracy["spectral-ones"] - accuracy["spectral"],
        "Frobenius - L2 (points)": accuracy["spectral + Frobenius decay"] - accuracy["spectral + L2 on factors"],
        "warm start - best of random, spectral (points)":
            accuracy["warm start"] - max(accuracy["random"], accuracy["spectral"]),
        "erank seed spread": erank_spread,
        "erank random at epoch 0": hidden_erank(by["random"], 0),
        "erank random": erank["random"],
        "erank random, flat at epoch 0": hidden_erank(by["random, flat"], 0),
        "erank random, flat": erank["random, flat"],
        "erank spectral": erank["spectral"],
        "erank spectral-ones": erank["spectral-ones"],
        "erank L2 on factors": erank["spectral + L2 on factors"],
        "erank Frobenius decay": erank["spectral + Frobenius decay"],
    }
    holds = {
        "c1": row["spectral - random (points)"] > spread,
        "c2": abs(row["spectral-ones - spectral (points)"]) <= spread,
        "c3": erank["spectral + Frobenius decay"] - erank["spectral + L2 on factors"] > erank_spread,
        "c4": row["warm start - best of random, spectral (points)"] > spread,
        "bias": row["erank random, flat at epoch 0"] - erank["random, flat"] > erank_spread,
    }
    return {key: round(float(value), 2) + 0.0 for key, value in row.items()}, holds  # + 0.0: no "-0.0"


def warm_switch(members: Sequence) -> dict[str, float]:
    """At the epoch the warm start factorises: its validation accuracy, and the dense model's effective rank of
    the first layer and validation accuracy at that epoch."""
    by = {r.config.name.split(": ", 1)[1]: r for r in members}
    warm, dense = by["warm start"].history, by["dense"].history
    switch = int(warm["epoch"][warm["phase"] == "warm-up"].max())
    return {"warm_switch_accuracy": round(100 * float(warm["val_accuracy"][switch]), 2),
            "dense_epoch_erank": round(float(dense["erank_0"][switch]), 1),
            "dense_epoch_accuracy": round(100 * float(dense["val_accuracy"][switch]), 2)}


def initial_norms() -> dict[str, float]:
    """``||W||_F^2`` of a 784 x 256 ``U V^T`` layer of rank 64 under each of :data:`NORM_INITS`, drawn from seed 0."""
    norms = {}
    for init in NORM_INITS:
        torch.manual_seed(0)
        norms[init] = float(effective_weight(LowRank(784, 256, 64, factorization="uv", init=init)).square().sum())
    return norms


def findings(results: Sequence, prefix: str) -> tuple[dict[str, object], pd.DataFrame]:
    """Everything figure (h) glues, as ``{key: value}`` in glue order, and the table of differences
    (one column per dataset)."""
    values, rows, holds = {}, {}, {claim: {} for claim in CLAIMS}
    for dataset, members in by_dataset(results).items():
        rows[dataset], dataset_holds = dataset_comparison(members)
        for claim, value in dataset_holds.items():
            holds[claim][dataset] = value
        key = f"{prefix}_{summary.slug(dataset)}"
        values.update({f"{key}_{summary.slug(name)}": value for name, value in rows[dataset].items()})
        values.update({f"{key}_{name}": value for name, value in warm_switch(members).items()})
    values.update({f"{prefix}_{claim}_verdict": verdict(dataset_holds) for claim, dataset_holds in holds.items()})
    values.update({f"{prefix}_norm_{summary.slug(init)}": round(norm, 1) for init, norm in initial_norms().items()})
    values[f"{prefix}_models"] = len(results)
    values[f"{prefix}_total_seconds"] = summary.total_seconds(results)
    return values, pd.DataFrame(rows)
