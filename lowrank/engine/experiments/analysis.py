"""Analysis of trained networks (figure i): truncation to the epsilon-rank, and its cost in accuracy.

The within-class variability NC1 of a layer's features is :func:`lowrank.metrics.nc1`.

Figure (i)'s claims (Galanti et al.; Zangrando & Tudisco), judged on the total epsilon-rank ``R`` (the sum
over the layers of ``#{i : sigma_i / ||W||_F > 1e-3}`` at the end of training): ``R`` falls as the weight
decay grows (:data:`DECAY_RUNS`), is lower at the smaller batch (:data:`BATCH_RUNS`) and falls as the
learning rate grows (:data:`RATE_RUNS`), each strictly; and lower ranks come with lower within-class
variability of the layer's input, judged by the sign of Spearman's correlation
(:func:`rank_collapse_correlation`).

Truncation: the best rank-``k`` approximation of ``W = P Sigma Q^T`` in every unitarily invariant norm is
``W_k = P_k Sigma_k Q_k^T`` (Eckart-Young), with ``||W - W_k||_F^2 = sum_{i > k} sigma_i^2``. Truncating to the
epsilon-rank ``k = #{i : sigma_i / ||W||_F > eps}`` therefore changes ``W`` by at most
``eps sqrt(min(n_in, n_out) - k) ||W||_F`` in Frobenius norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowrank import metrics
from lowrank.engine import summary
from lowrank.engine.config import SPLIT_SIZES
from lowrank.layers import Dense, LowRank
from lowrank.linalg import truncated_svd
from lowrank.network import NeuralNetwork, effective_weight

if TYPE_CHECKING:
    import pandas as pd

#: Tolerances of figure (i)'s truncation: every layer truncated to its epsilon-rank at each.
TOLERANCES = (1e-3, 1e-2, 3e-2, 1e-1)
#: Figure (i)'s sweeps: weight decay, batch size (at decay 0.01) and learning rate (at decay 0.01), and what
#: the claim predicts of the total epsilon-rank along each (module docstring).
DECAY_RUNS = ("wd 0", "wd 0.003", "wd 0.01", "wd 0.02")
BATCH_RUNS = ("wd 0.01", "wd 0.01, batch 128")
RATE_RUNS = ("wd 0.01, lr 0.03", "wd 0.01", "wd 0.01, lr 0.2")
#: Within-class variability below this counts as collapsed.
COLLAPSED_NC1 = 0.1


@torch.no_grad()
def truncated_network(model: NeuralNetwork, ranks: Sequence[int]) -> NeuralNetwork:
    """A dense copy of ``model`` whose layer ``l`` has the weight ``W_l`` truncated to rank ``ranks[l]``.

    Every layer (dense or factorised) becomes a :class:`Dense` layer with ``W_k = P_k Sigma_k Q_k^T`` and the
    same bias and activation, so the copy computes what the truncated network computes; ``model`` is unchanged.
    """
    if len(ranks) != len(model.layers):
        raise ValueError(f"{len(ranks)} ranks for {len(model.layers)} layers")
    layers = []
    for layer, rank in zip(model.layers, ranks):
        weight = effective_weight(layer).cpu()
        dense = Dense(layer.in_features, layer.out_features, bias=layer.bias is not None).to(weight.dtype)
        p, sigma, q = truncated_svd(weight, rank)
        dense.weight.copy_((p * sigma) @ q.T)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.detach().cpu())
        layers.append(dense)
    copy = NeuralNetwork(layers, ["identity"] * len(layers))
    copy.activations = deepcopy(model.activations)
    return copy.eval()


def epsilon_ranks(model: nn.Module, eps: float = metrics.EPSILON_RANK_TOL, relative_to: str = "frobenius") -> list[int]:
    """:func:`lowrank.metrics.epsilon_rank` of every affine layer's ``W`` (default: ``sigma_i / ||W||_F > eps``)."""
    return [metrics.epsilon_rank(metrics.layer_singular_values(layer), eps, relative_to) for layer in metrics.affine_layers(model)]


def truncation_table(model: NeuralNetwork, x: Tensor, y: Tensor, tolerances: Sequence[float],
                     relative_to: str = "frobenius") -> "pd.DataFrame":
    """Accuracy of ``model`` on ``(x, y)`` after truncating every layer to its epsilon-rank, per tolerance.

    One row per ``eps`` in ``tolerances``: ``eps``, the ranks (``rank_0``, ...), the kept fraction of
    parameters of a factorised copy (``sum r (n_in + n_out) / sum n_in n_out`` over the layers, biases
    excluded), ``accuracy`` and ``accuracy_lost = accuracy(model) - accuracy`` (fractions, not %).
    """
    import pandas as pd

    full = metrics.model_accuracy(model, x, y)
    dims = [(layer.in_features, layer.out_features) for layer in model.layers]
    rows = []
    for eps in tolerances:
        ranks = epsilon_ranks(model, eps, relative_to)
        truncated = metrics.model_accuracy(truncated_network(model, ranks), x, y)
        factors = sum(r * (n + m) for r, (n, m) in zip(ranks, dims)) / sum(n * m for n, m in dims)
        rows.append({"eps": eps, **{f"rank_{i}": r for i, r in enumerate(ranks)}, "factor_fraction": factors,
                     "accuracy": truncated, "accuracy_lost": full - truncated})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Figure (i): the low-rank bias of SGD and weight decay

def test_truncation(results: Sequence, tolerances: Sequence[float] = TOLERANCES) -> dict[str, "pd.DataFrame"]:
    """:func:`truncation_table` of every run's model on its dataset's test images, by model name."""
    from lowrank.engine import data

    tables = {}
    for result in results:
        arrays = data.load_arrays(result.config.settings.dataset)
        x, y = torch.from_numpy(arrays["test_x"].copy()), torch.from_numpy(arrays["test_y"].copy())
        tables[result.config.name] = truncation_table(result.model, x, y, tolerances)
    return tables


def final(result, column: str, layers: Sequence[int]) -> list[float]:
    """The last epoch's ``<column><l>`` of each layer ``l`` (``epsrank_``, ``erank_``, ``nc1_``)."""
    last = result.history.iloc[-1]
    return [float(last[f"{column}{i}"]) for i in layers]


def decay_table(results: Sequence, truncation: dict[str, "pd.DataFrame"], prefix: str
                ) -> tuple[dict[str, object], "pd.DataFrame"]:
    """One row per run: its steps ``T``, ``eta lambda T``, accuracy, final epsilon- and effective ranks and NC1,
    and the accuracy after truncation at the first tolerance; with what each run glues, in glue order."""
    import pandas as pd

    values, rows = {}, []
    for r in results:
        s, layers = r.config.settings, range(len(r.model.layers))
        steps = s.num_epochs * math.ceil((s.subset or SPLIT_SIZES["train"]) / s.batch_size)  # subset <= the split
        at = truncation[r.config.name].iloc[0]
        eps_ranks = [int(v) for v in final(r, "epsrank_", layers)]
        rows.append({
            "run": r.config.name, "steps T": steps,
            "eta lambda T": round(s.learning_rate * s.weight_decay * steps, 2),
            "test accuracy (%)": round(100 * r.test_accuracy, 2),
            "eps-ranks": str(eps_ranks),
            "effective ranks": str([round(v, 1) for v in final(r, "erank_", layers)]),
            "NC1 (inputs)": str([round(v, 2) for v in final(r, "nc1_", layers)]),
            "truncated accuracy (%)": round(100 * float(at["accuracy"]), 2),
            "lost (points)": round(100 * float(at["accuracy_lost"]), 2) + 0.0,  # + 0.0: no "-0.0"
        })
        key = f"{prefix}_{summary.slug(r.config.name)}"
        values.update({f"{key}_eta_lambda_t": rows[-1]["eta lambda T"], f"{key}_eps_ranks": eps_ranks,
                       f"{key}_lost": rows[-1]["lost (points)"]})
    return values, pd.DataFrame(rows).set_index("run")


def holds(ok: bool) -> summary.Text:
    return summary.Text("holds" if ok else "does not hold")


def rank_collapse_correlation(results: Sequence) -> float:
    """Spearman's correlation, over the runs with weight decay and the layers fed by hidden features, of the
    input's final NC1 and the layer's final epsilon-rank as a fraction of ``min(dims)``."""
    import pandas as pd

    pairs = pd.DataFrame([
        {"nc1": float(r.history[f"nc1_{i}"].iloc[-1]),
         "rank": int(r.history[f"epsrank_{i}"].iloc[-1]) / min(r.model.layers[i].in_features,
                                                                r.model.layers[i].out_features)}
        for r in results if r.config.settings.weight_decay > 0 for i in range(1, len(r.model.layers))
    ])
    return float(pairs["nc1"].rank().corr(pairs["rank"].rank()))


def decay_findings(results: Sequence, truncation: dict[str, "pd.DataFrame"], prefix: str
                   ) -> tuple[dict[str, object], "pd.DataFrame"]:
    """The verdicts of figure (i) (module docstring) and the numbers its text quotes, in glue order, and the
    accuracy lost by truncation at each tolerance (one row per run)."""
    import pandas as pd

    runs = {r.config.name: r for r in results}
    layers = range(len(results[0].model.layers))

    def total_rank(name: str) -> int:
        return sum(int(v) for v in final(runs[name], "epsrank_", layers))

    decays, batches, rates = ([total_rank(n) for n in names] for names in (DECAY_RUNS, BATCH_RUNS, RATE_RUNS))
    rho = rank_collapse_correlation(results)
    penultimate = [float(r.history[f"nc1_{layers[-1]}"].iloc[-1]) for r in results]
    centre = runs["wd 0.01"].history
    tolerances = list(next(iter(truncation.values()))["eps"])
    lost = {eps: [100 * float(t.loc[t["eps"] == eps, "accuracy_lost"].iloc[0]) for t in truncation.values()]
            for eps in tolerances}
    kept = {eps: [100 * float(t.loc[t["eps"] == eps, "factor_fraction"].iloc[0]) for t in truncation.values()]
            for eps in tolerances}
    values = {
        f"{prefix}_decay_eranks": [round(sum(final(runs[n], "erank_", layers)), 1) for n in DECAY_RUNS],
        f"{prefix}_decay_ranks": decays,
        f"{prefix}_decay_verdict": holds(all(a > b for a, b in zip(decays, decays[1:]))),
        f"{prefix}_batch_ranks": batches,
        f"{prefix}_batch_verdict": holds(batches[0] < batches[1]),
        f"{prefix}_lr_ranks": rates,
        f"{prefix}_lr_verdict": holds(rates[0] > rates[1] > rates[2]),
        f"{prefix}_nc1_rank_rho": round(rho, 2),
        f"{prefix}_nc1_rank_verdict": summary.Text("positive, as the claim predicts" if rho > 0 else "not positive"),
        f"{prefix}_nc1_reading": summary.Text(
            "At this scale lower ranks do come with lower within-class variability of the layer's input." if rho > 0
            else "At this scale lower ranks do not come with lower within-class variability: the rank follows how "
                 "long and how strongly the weight decay acts, not the variability of the features."),
        f"{prefix}_nc1_min": round(min(penultimate), 2),
        f"{prefix}_nc1_max": round(max(penultimate), 2),
        f"{prefix}_nc1_state": summary.Text(
            f"far from collapsed (NC1 of {COLLAPSED_NC1:g} or more everywhere)" if min(penultimate) >= COLLAPSED_NC1
            else f"close to collapse in some runs (NC1 below {COLLAPSED_NC1:g})"),
        **{f"{prefix}_{summary.slug(name)}_train_accuracy": round(100 * float(runs[name].history["train_accuracy"].iloc[-1]), 2)
           for name in (DECAY_RUNS[0], DECAY_RUNS[-1])},
        f"{prefix}_centre_nc1_start": round(float(centre[f"nc1_{layers[-1]}"].iloc[1]), 2),
        f"{prefix}_centre_nc1_end": round(float(centre[f"nc1_{layers[-1]}"].iloc[-1]), 2),
        **{f"{prefix}_lost_max_{label}": round(max(lost[eps]), 2) + 0.0
           for eps, label in ((1e-3, "1e3"), (1e-2, "1e2"), (1e-1, "1e1"))},
        **{f"{prefix}_kept_{end}_{label}": round(pick(kept[eps]), 1)
           for eps, label in ((1e-3, "1e3"), (1e-2, "1e2"), (1e-1, "1e1")) for end, pick in (("min", min), ("max", max))},
        # Compressed: the factors r (n_in + n_out) of every layer hold fewer numbers than the dense matrices.
        **{f"{prefix}_compressed_{label}": summary.names_text(name for name, fraction in zip(truncation, kept[eps])
                                                              if fraction < 100)
           for eps, label in ((1e-3, "1e3"), (1e-2, "1e2"), (1e-1, "1e1"))},
        f"{prefix}_total_seconds": summary.total_seconds(results),
    }
    table = pd.DataFrame({f"lost at {eps:g} (points)": [round(v, 2) + 0.0 for v in lost[eps]] for eps in tolerances},
                         index=list(truncation))
    return values, table


#: Figure (b)'s models that test why a larger vanilla rank can end below a smaller one (:func:`vanilla_rank_findings`).
RANK_REMEDIES = {"half_lr": ("vanilla r=100 (lr 0.0005)", "half the learning rate"),
                 "flat": ("vanilla r=100 (flat start)", "the flat start")}


def initial_core_condition(rank: int, in_features: int = 784, out_features: int = 512, init: str = "kaiming",
                           seed: int = 0) -> float:
    """Condition number ``sigma_max(S) / sigma_min(S)`` of the core of a freshly initialised
    :class:`~lowrank.layers.LowRank` layer (seeded): ``W = U S V^T`` with orthonormal ``U``, ``V`` has the
    singular values of ``S``."""
    torch.manual_seed(seed)
    core = LowRank(in_features, out_features, rank, init=init).S.detach().double()
    return float(torch.linalg.cond(core))


def final_gap(members: Sequence) -> float:
    """Training minus validation accuracy after the last epoch, in points, averaged over the seeds (training
    accuracy as trained, over the epoch's batches: it lags, so the gap understates over-fitting)."""
    return sum(100 * float(r.history["train_accuracy"].iloc[-1] - r.history["val_accuracy"].iloc[-1])
               for r in members) / len(members)


def vanilla_rank_findings(results: Sequence, prefix: str) -> dict[str, object]:
    """Why vanilla rank 100 does not end above rank 50 (figure b), as glue values: the condition number of the
    initial Gaussian core at both ranks (:func:`initial_core_condition`), the train-validation gap of both
    (:func:`final_gap`), and each remedy of :data:`RANK_REMEDIES` (half the learning rate; a flat core, condition
    number 1) against rank 100 and rank 50 (:func:`lowrank.engine.summary.versus`), and the remedies that lift
    rank 100 above its default beyond the seed spread."""
    groups = summary.seed_groups(results)
    stats = {name: summary.seed_statistics(members) for name, members in groups.items()}
    values: dict[str, object] = {f"{prefix}_condition_r{r}": round(initial_core_condition(r)) for r in (50, 100)}
    values.update({f"{prefix}_gap_r{r}": round(final_gap(groups[f"vanilla r={r}"]), 2) + 0.0 for r in (50, 100)})
    lifted = []
    for key, (name, remedy) in RANK_REMEDIES.items():
        for reference in (100, 50):
            values[f"{prefix}_{key}_vs_r{reference}"] = summary.versus(stats, name, f"vanilla r={reference}")
        if repr(values[f"{prefix}_{key}_vs_r100"]) == "above":
            lifted.append(remedy)
    values[f"{prefix}_remedies"] = summary.names_text(lifted)
    return values
