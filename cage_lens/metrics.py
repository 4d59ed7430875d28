"""Evaluation metrics for context attribution (definitions: docs/metrics.md), each choice documented
where it is made.

Faithfulness by deletion (CAGE's protocol): prompt spans are ranked by attribution and replaced one by
one, most relevant first, by the same number of EOS tokens; after each step the summed log-probability
of the *whole original generation* (teacher-forced) is recorded. From that curve: RISE, MAS and
RISE+AP (all "lower is better" for deletion). Plus attribution coverage, ground-truth precision@k and
AUROC, bootstrap confidence intervals and paired win counts. Graph metrics of a cross-layer
attribution graph (:func:`graph_metrics`, what ``CircuitGraph.metrics()`` returns; docs/metrics.md#graph-metrics):
per transition, fan-in/out, Gini coefficients, verticality, tokens covering 90 %, hubs, look-back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from cage_lens.errors import InputError
from cage_lens.generation.methods import baseline_id, check_sequence, sequence_logprobs
from cage_lens.generation.spans import Span

__all__ = [
    "ranking", "deletion_logprobs", "normalize_curve", "auc", "rise", "attribution_density", "mas", "rise_ap",
    "DeletionResult", "deletion_metrics", "attribution_coverage", "precision_at_k", "auroc",
    "bootstrap_ci", "paired_wins", "gini", "graph_metrics",
]


def _vector(x, name: str = "scores") -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise InputError(f"{name} contain NaN or inf")
    return a


def ranking(scores) -> list[int]:
    """Indices by decreasing score; ties keep index order (a stable, reproducible choice)."""
    a = _vector(scores)
    return np.argsort(-a, kind="stable").tolist()


# ---------------------------------------------------------------------------- deletion curves
def deletion_logprobs(
    model, tokens: Int[torch.Tensor, "1 pos"], n_prompt: int, spans: Sequence[Span], scores, *,
    baseline: str | int = "eos", chunk_size: int = 8,
) -> Float[torch.Tensor, "row"]:
    """``s_0 … s_n``: the summed log-probability of the original generation ``tokens[P:]`` after
    replacing the ``i`` most relevant spans by EOS tokens (``s_0`` = nothing replaced). All ``n + 1``
    perturbed sequences run in batched forwards."""
    tokens, _ = check_sequence(model, tokens, n_prompt)
    if len(spans) != len(_vector(scores)):
        raise InputError(f"got {len(_vector(scores))} scores for {len(spans)} spans")
    if any(b > n_prompt or a < 0 or b <= a for a, b in spans):
        raise InputError("deletion spans must be non-empty ranges inside the prompt")
    base = baseline_id(model, baseline)
    current, rows = tokens.clone(), [tokens.clone()]
    for i in ranking(scores):
        a, b = spans[i]
        current[0, a:b] = base
        rows.append(current.clone())
    return sequence_logprobs(model, torch.cat(rows), n_prompt, chunk_size, targets=tokens).sum(-1)


def normalize_curve(logprobs) -> np.ndarray:
    """``(s_i − s_last) / |s_0 − s_last|``, clipped to [0, 1], then made non-increasing with a running
    minimum (docs/metrics.md#deletion-curves). When deleting everything changes nothing
    (``s_0 = s_last``) the curve is all zeros (the deletion is uninformative; every method scores the
    same on that sample)."""
    s = _vector(logprobs, "log-probabilities")
    scale = abs(s[0] - s[-1])
    curve = (s - s[-1]) / scale if scale > 0 else np.zeros_like(s)
    return np.minimum.accumulate(np.clip(curve, 0.0, 1.0))


def auc(curve) -> float:
    """Trapezoidal area over steps ``0..n`` divided by ``n`` (the curve's x-axis scaled to [0, 1])."""
    c = _vector(curve, "curve")
    if len(c) < 2:
        raise InputError("a deletion curve needs at least two points (one span)")
    return float((c.sum() - (c[0] + c[-1]) / 2) / (len(c) - 1))


def rise(curve) -> float:
    """RISE for deletion: AUC of the normalised curve (lower = faster drop = more faithful)."""
    return auc(curve)


def attribution_density(scores, order: Sequence[int] | None = None) -> np.ndarray:
    """``density_i = 1 − (share of attribution removed after i steps)`` in the deletion order. Shares
    use |score| (MAS measures how much attribution *magnitude* was removed; negative scores are mass
    too). All-zero scores: a uniform share per span."""
    a = np.abs(_vector(scores))
    order = ranking(scores) if order is None else list(order)
    mass = a[order]
    total = mass.sum()
    removed = np.cumsum(mass) / total if total > 0 else np.arange(1, len(a) + 1) / len(a)
    return np.concatenate([[1.0], 1.0 - removed])


def _penalised(curve, scores) -> np.ndarray:
    c = _vector(curve, "curve")
    d = attribution_density(scores)
    if len(d) != len(c):
        raise InputError(f"the curve has {len(c)} points but {len(d) - 1} spans were scored")
    return c + np.abs(c - d)


def mas(curve, scores) -> float:
    """MAS (Walker et al. 2024): AUC of ``clip(minmax(curve + |curve − density|), 0, 1)``. Min–max
    scaling over the curve's own points; a constant curve scales to zeros."""
    m = _penalised(curve, scores)
    span = m.max() - m.min()
    m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
    return auc(np.clip(m, 0.0, 1.0))


def rise_ap(curve, scores) -> float:
    """RISE+AP: AUC of ``curve + |curve − density|``, neither clipped nor scaled."""
    return auc(_penalised(curve, scores))


@dataclass
class DeletionResult:
    """Raw log-probabilities ``s``, the normalised curve and the three deletion scores (lower is better)."""

    order: list[int]
    logprobs: np.ndarray
    curve: np.ndarray
    rise: float
    mas: float
    rise_ap: float


def deletion_metrics(model, tokens, n_prompt: int, spans: Sequence[Span], scores, **kwargs) -> DeletionResult:
    """RISE, MAS and RISE+AP of one attribution vector over prompt ``spans`` (docs/metrics.md#curve-scores)."""
    s = deletion_logprobs(model, tokens, n_prompt, spans, scores, **kwargs).numpy()
    curve = normalize_curve(s)
    return DeletionResult(ranking(scores), s, curve, rise(curve), mas(curve, scores), rise_ap(curve, scores))


# ---------------------------------------------------------------------------- coverage and ground truth
def attribution_coverage(scores, ground_truth: Sequence[int]) -> dict[str, float]:
    """Attribution coverage (the CAGE paper's AC; docs/metrics.md#attribution-coverage): with K
    ground-truth spans and E = 1/K, a ground-truth span is covered when its share of the total
    |attribution| (over all spans) lies in [E/2, 3E/2] (``"double"``, two-sided), is > E/2 (``"lower"``)
    or is > E (``"mean"``). Returns the fraction covered for each bound; zero attribution covers
    nothing."""
    a = np.abs(_vector(scores))
    gt = sorted(set(int(i) for i in ground_truth))
    if not gt:
        raise InputError("attribution coverage needs at least one ground-truth span")
    if gt[0] < 0 or gt[-1] >= len(a):
        raise InputError(f"ground-truth index out of range [0, {len(a)})")
    total = a.sum()
    share = a[gt] / total if total > 0 else np.zeros(len(gt))
    E = 1.0 / len(gt)
    return {
        "double": float(np.mean((share >= E / 2) & (share <= 1.5 * E))),
        "lower": float(np.mean(share > E / 2)),
        "mean": float(np.mean(share > E)),
    }


def _truth_mask(n: int, truth: Sequence[int], candidates: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n) if candidates is None else np.asarray(sorted(set(int(c) for c in candidates)), dtype=int)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise InputError(f"candidate index out of range [0, {n})")
    truth = set(int(t) for t in truth)
    if not truth <= set(idx.tolist()):
        raise InputError("every ground-truth index must be a candidate")
    return idx, np.array([i in truth for i in idx.tolist()])


def precision_at_k(scores, truth: Sequence[int], k: int | None = None, candidates: Sequence[int] | None = None) -> float:
    """Fraction of the top-``k`` candidates (by score, ties by index) that are true sources; ``k``
    defaults to the number of true sources (then precision = recall = R-precision)."""
    a = _vector(scores)
    idx, is_true = _truth_mask(len(a), truth, candidates)
    k = int(is_true.sum()) if k is None else k
    if k < 1 or k > len(idx):
        raise InputError(f"k must lie in [1, {len(idx)}], got {k}")
    top = np.argsort(-a[idx], kind="stable")[:k]
    return float(is_true[top].mean())


def auroc(scores, truth: Sequence[int], candidates: Sequence[int] | None = None) -> float:
    """Area under the ROC curve of true sources vs the other candidates: the probability that a random
    true source outscores a random other candidate, ties counting ½ (Mann–Whitney U / (n₊ n₋))."""
    a = _vector(scores)
    idx, is_true = _truth_mask(len(a), truth, candidates)
    pos, neg = a[idx][is_true], a[idx][~is_true]
    if len(pos) == 0 or len(neg) == 0:
        raise InputError("AUROC needs at least one true source and one other candidate")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------- aggregation
def bootstrap_ci(values, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap confidence interval: ``n`` resamples of the values with
    replacement (numpy ``default_rng(seed)``), interval = the (1 ± level)/2 quantiles of their means."""
    v = _vector(values, "values")
    if len(v) == 0:
        raise InputError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_wins(a, b, *, higher_is_better: bool = True, tol: float = 0.0) -> dict[str, int]:
    """Per-sample comparison of method ``a`` against ``b``: ``wins`` (a better by more than ``tol``),
    ``losses`` and ``ties``."""
    x, y = _vector(a, "a"), _vector(b, "b")
    if len(x) != len(y):
        raise InputError(f"paired_wins needs equal lengths, got {len(x)} and {len(y)}")
    d = (x - y) if higher_is_better else (y - x)
    return {"wins": int((d > tol).sum()), "losses": int((d < -tol).sum()), "ties": int((np.abs(d) <= tol).sum())}


# ---------------------------------------------------------------------------- graph metrics
def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative values (0: all equal, → 1: one value holds everything)."""
    x = x.flatten().double().sort().values
    n = x.numel()
    if n == 0 or float(x.sum()) == 0.0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=x.dtype)
    return float(((2 * index - n - 1) * x).sum() / (n * x.sum()))


def graph_metrics(graph) -> list[dict]:
    """Per transition of the pruned graph: ``nodes`` (graph nodes of the target level — a node under
    the node threshold can be in the graph as a source without incoming edges), edge count, mean
    fan-in/out (over nodes with at least one edge in this transition), Gini of |edge| and
    |node| relevance, verticality (share of |A| mass from the same token position), the number of
    source tokens covering 90 % of the mass, hubs (top-3 source tokens by outgoing mass) and the
    mean look-back distance (|A|-weighted mean of j − i in token positions)."""
    rows = []
    for es in graph.edges():
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        mass = es.values.abs()
        total = float(mass.sum())
        src_pos, tgt_pos = src.pos[es.sources], tgt.pos[es.targets]
        per_token = torch.zeros(graph.n_pos, dtype=mass.dtype).index_add_(0, src_pos, mass)
        share = per_token.sort(descending=True).values.cumsum(0) / _nonzero(total)
        alive_t = graph.alive[es.target]
        hubs = per_token.argsort(descending=True)[:3].tolist()
        rows.append({
            "transition": f"{es.source} → {es.target}",
            "nodes": int(alive_t.sum()),
            "edges": len(es),
            "fan_in": len(es) / max(1, int(es.targets.unique().numel())),
            "fan_out": len(es) / max(1, int(es.sources.unique().numel())),
            "gini_edges": gini(mass),
            "gini_nodes": gini(tgt.relevance[alive_t].abs()),
            "verticality": float(mass[src_pos == tgt_pos].sum()) / _nonzero(total),
            "tokens_90": int((share < 0.9 - 1e-12).sum()) + 1 if total > 0 else 0,
            "hubs": [(p, graph.str_tokens[p], float(per_token[p]) / _nonzero(total)) for p in hubs if per_token[p] > 0],
            "look_back": float((mass * (tgt_pos - src_pos)).sum()) / _nonzero(total),
        })
    return rows


def _nonzero(x: float) -> float:
    return x if x != 0 else 1e-30
