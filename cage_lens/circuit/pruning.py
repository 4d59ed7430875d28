"""Pruning of cross-layer attribution graphs, without recomputation (see docs/results.md#pruning).

Three rules, each applied by :meth:`cage_lens.CircuitGraph.prune` to the graph's *unpruned* computed
rows and returning a new graph:

- **top-p per transition** (the default of ``circuit_graph``): keep the smallest set of largest-|A|
  edges holding at least ``top_p`` of the transition's |A| mass (ties broken by order of computation);
- **edge threshold**: keep the edges with ``|A| > edge_threshold · |target|``;
- **cumulative influence** (circuit-tracer's rule, node 0.8 / edge 0.98): the influence of a node is
  the total weight of all paths from it into the target node in the graph whose rows are normalised
  to ``|A| / Σ_row |A|``; keep the most influential nodes holding ``node_influence`` of the total
  influence, then the edges (scored ``|A|/Σ_row · (influence of their target + target weight)``)
  holding ``edge_influence`` of the total edge score, then drop, until nothing changes, every inner
  node without an outgoing edge and every node with a computed row but no incoming edge.
  Input tokens and the target node are always kept.

The unpruned rows are the graph's dense matrices (kept up to ``dense_limit`` tokens) or its stored
edges when the graph was built without edge pruning (``top_p=None``). A graph that kept only pruned
edges can still be pruned further with an edge threshold at or above the smallest stored edge (the
result is then the same as pruning the unpruned rows); anything else is refused with the way out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, NamedTuple

import torch
from jaxtyping import Float, Int

from cage_lens.errors import InputError

__all__ = ["prune_edges", "prune_chunks", "prune", "node_influence", "cumulative_influence", "find_threshold", "EdgeList"]


# ---------------------------------------------------------------------------- one transition
def prune_edges(matrix: Float[torch.Tensor, "row source"], rows: Int[torch.Tensor, "row"], *,
                top_p: float | None, edge_threshold: float | None, scale: float):
    """Pruned sparse edges ``(targets, sources, values)`` of computed rows of one transition, and the
    transition's total |A| mass (see the module docstring for the rules)."""
    return prune_chunks([(0, matrix)], rows, top_p=top_p, edge_threshold=edge_threshold, scale=scale)


def prune_chunks(chunks: Iterable[tuple[int, Float[torch.Tensor, "chunk source"]]], rows: Int[torch.Tensor, "row"], *,
                 top_p: float | None, edge_threshold: float | None, scale: float):
    """:func:`prune_edges` of the matrix whose rows ``start:start + n`` are each ``(start, block)`` of
    ``chunks`` (in row order), holding one block at a time: only the non-zero edges are kept between
    blocks (a value and a flat index each), and with an edge threshold only those above it
    (docs/graphs.md#long-prompts). Same result as :func:`prune_edges` on the whole matrix. The blocks'
    device does the work (a GPU's edges are sorted there); the kept edges come back on the CPU."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    values, flat, row_mass, n_source = [], [], [], 1
    for start, block in chunks:
        n_source = max(1, block.shape[1])
        row_mass += block.abs().sum(dim=1, dtype=torch.float64).tolist()
        nz = block.nonzero(as_tuple=True)
        v = block[nz]
        magnitude = v.abs()
        index = (nz[0] + start) * n_source + nz[1]
        if edge_threshold is not None:
            keep = magnitude > edge_threshold * scale
            v, index = v[keep], index[keep]
        values.append(v)
        flat.append(index)
        del block, nz, magnitude
    values = torch.cat(values) if values else torch.zeros(0)
    flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)
    total = math.fsum(row_mass)   # exactly rounded: the same however the rows were chunked
    if edge_threshold is None and top_p is not None and top_p < 1.0 and len(values):
        keep = _top_p_order(values.abs(), top_p * total)
        values, flat = values[keep], flat[keep]
    values, flat = values.cpu(), flat.cpu()
    return rows[flat // n_source], flat % n_source, values, total


#: entries above which the top-p cut first narrows the candidates by a threshold instead of sorting all
TOP_P_SORT_LIMIT = 2**20


def _top_p_order(magnitude: torch.Tensor, mass: float) -> torch.Tensor:
    """Indices of the smallest set of largest entries whose sum reaches ``mass``, largest first (ties
    in the order given: the order of computation). Past :data:`TOP_P_SORT_LIMIT` entries only the
    candidates at or above a threshold whose entries already reach ``mass`` are sorted: the kept ones are
    among them (the smallest kept entry is at least that threshold), and the candidates' sorted prefix sums
    are the full sort's, so the cut is the same, without sorting (and copying) every edge."""
    if len(magnitude) > TOP_P_SORT_LIMIT:
        candidates = (magnitude >= _reaching_threshold(magnitude, mass)).nonzero().squeeze(1)
        kept = _largest_reaching(magnitude[candidates], mass, whole=False)
        if kept is not None:
            return candidates[kept]
    return _largest_reaching(magnitude, mass, whole=True)


def _largest_reaching(magnitude: torch.Tensor, mass: float, whole: bool) -> torch.Tensor | None:
    """The largest entries, largest first (stable), up to the first whose prefix sum reaches ``mass``; all
    when none does if ``whole``, else None (a threshold's candidates that rounding left short)."""
    order = magnitude.argsort(descending=True, stable=True)
    cumulative = magnitude[order].cumsum(0, dtype=torch.float64)
    if not whole and not (len(cumulative) and float(cumulative[-1]) >= mass):
        return None
    count = int(torch.searchsorted(cumulative, torch.tensor(mass, dtype=torch.float64, device=cumulative.device))) + 1
    return order[: min(count, len(order))]


def _reaching_threshold(magnitude: torch.Tensor, mass: float, steps: int = 32) -> float:
    """A threshold whose entries at or above it sum to at least ``mass``, as high as ``steps`` bisections
    between 0 and the largest entry find (0 when only all entries reach it)."""
    low, high = 0.0, float(magnitude.max())
    for _ in range(steps):
        middle = (low + high) / 2
        mass_above = float(torch.where(magnitude >= middle, magnitude, 0).sum(dtype=torch.float64))
        low, high = (middle, high) if mass_above >= mass else (low, middle)
    return low


class EdgeList(NamedTuple):
    """Edges of one transition: ``values[e]`` flows from source node ``sources[e]`` into target node
    ``targets[e]`` (flat node indices of the two levels)."""

    targets: Int[torch.Tensor, "edge"]
    sources: Int[torch.Tensor, "edge"]
    values: Float[torch.Tensor, "edge"]


# ---------------------------------------------------------------------------- what is stored
def _edge_pruning_applied(settings: dict) -> bool:
    top_p = settings.get("top_p")
    return (settings.get("pruning") is not None or settings.get("edge_threshold") is not None
            or (top_p is not None and top_p < 1.0))


def unpruned_matrix(graph, es) -> Float[torch.Tensor, "row source"] | None:
    """The unpruned computed rows ``[row, source]`` of one transition (rows ``es.computed_rows``),
    or ``None`` when the graph kept only pruned edges."""
    if es.dense is not None:
        return es.dense[es.computed_rows]
    if _edge_pruning_applied(graph.settings):
        return None
    source_size = graph.nodes[es.source].size
    full = torch.zeros(graph.nodes[es.target].size, source_size, dtype=es.values.dtype)
    full[es.targets, es.sources] = es.values
    return full[es.computed_rows]


def _unpruned_or_refuse(graph, what: str) -> list[torch.Tensor]:
    matrices = [unpruned_matrix(graph, es) for es in graph.edge_sets]
    if any(m is None for m in matrices):
        s = graph.settings
        raise InputError(
            f"{what} needs the unpruned edge rows, but this graph keeps only its pruned edges "
            f"({graph.n_pos} tokens > dense_limit={s.get('dense_limit')}, edges pruned with "
            f"top_p={s.get('top_p')}, edge_threshold={s.get('edge_threshold')}, pruning={s.get('pruning')}). "
            "Recompute with circuit_graph(..., dense_limit=<number of tokens>) or top_p=None, "
            "or prune further with an edge_threshold (see docs/results.md#pruning)."
        )
    return matrices


def _stored_cutoff(graph, es) -> float:
    """Every edge that pruning dropped from ``es`` had ``|A| ≤`` this value."""
    s = graph.settings
    if s.get("pruning") is not None:
        return float("inf")  # influence pruning drops edges by score, not by size
    if s.get("edge_threshold") is not None:
        return float(s["edge_threshold"]) * abs(graph.target_value)
    return float(es.values.abs().min()) if len(es) else (0.0 if es.total_mass == 0 else float("inf"))


# ---------------------------------------------------------------------------- influence
def _global_index(graph) -> tuple[dict[str, int], int]:
    offsets, total = {}, 0
    for name, nodes in graph.nodes.items():
        offsets[name] = total
        total += nodes.size
    return offsets, total


def _target_index(graph, offsets) -> int:
    last = graph.nodes[graph.levels[-1]]
    where = ((last.pos == graph.position) & (last.unit < 0)).nonzero().flatten()
    return offsets[last.name] + int(where[0])


def _influence(graph, lists: list[EdgeList], offsets, n_nodes: int, target: int):
    """circuit-tracer's influence ``w (Â + Â² + …)`` with ``w`` the one-hot target and ``Â`` the
    row-normalised |A|, by one sweep over the levels from the target down (the graph is layered:
    every transition runs from an earlier level to a later one). Returns (influence, per-edge
    normalised weight |A|/Σ_row, per-edge total weight of the edge's target node)."""
    level_index = {name: i for i, name in enumerate(graph.levels)}
    dtype = next((l.values.dtype for l in lists if len(l.values)), torch.float64)
    row_mass = torch.zeros(n_nodes, dtype=dtype)
    globals_ = [(offsets[es.target] + l.targets, offsets[es.source] + l.sources) for es, l in zip(graph.edge_sets, lists)]
    for (tgt, _), l in zip(globals_, lists):
        row_mass.index_add_(0, tgt, l.values.abs().to(dtype))
    denom = row_mass.clamp_min(1e-10)  # circuit-tracer's guard for empty rows
    total = torch.zeros(n_nodes, dtype=dtype)
    total[target] = 1.0
    normalised = [l.values.abs().to(dtype) / denom[tgt] for (tgt, _), l in zip(globals_, lists)]
    order = sorted(range(len(lists)), key=lambda k: level_index[graph.edge_sets[k].target], reverse=True)
    for k in order:
        tgt, src = globals_[k]
        total.index_add_(0, src, normalised[k] * total[tgt])
    weight = torch.zeros(n_nodes, dtype=dtype)
    weight[target] = 1.0
    return total - weight, normalised, [total[tgt] for tgt, _ in globals_]


def _all_edges(graph, matrices) -> list[EdgeList]:
    out = []
    for es, matrix in zip(graph.edge_sets, matrices):
        nz = matrix.nonzero(as_tuple=True)
        out.append(EdgeList(es.computed_rows[nz[0]], nz[1], matrix[nz]))
    return out


def node_influence(graph, unpruned: bool | None = None) -> dict[str, Float[torch.Tensor, "node"]]:
    """circuit-tracer's node influence on the target node, per level (flat node order).

    ``unpruned=True`` uses the unpruned computed rows (refused when the graph kept only pruned edges),
    ``False`` the graph's kept edges (``graph.edges()``), ``None`` the unpruned rows when they exist."""
    offsets, n_nodes = _global_index(graph)
    if unpruned is None:
        unpruned = all(unpruned_matrix(graph, es) is not None for es in graph.edge_sets)
    if unpruned:
        lists = _all_edges(graph, _unpruned_or_refuse(graph, "influence on the unpruned graph"))
    else:
        lists = [EdgeList(es.targets, es.sources, es.values) for es in graph.edges()]
    influence, _, _ = _influence(graph, lists, offsets, n_nodes, _target_index(graph, offsets))
    return {name: influence[offsets[name]: offsets[name] + nodes.size] for name, nodes in graph.nodes.items()}


def find_threshold(scores: Float[torch.Tensor, "n"], fraction: float) -> float:
    """The smallest score among the largest scores that together hold ``fraction`` of the total
    (circuit-tracer's cut: the first index where the cumulative share reaches ``fraction``)."""
    if scores.numel() == 0:
        return float("inf")
    ordered = scores.sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return float(ordered[-1])
    cumulative = ordered.cumsum(0) / total
    index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)))
    return float(ordered[min(index, len(ordered) - 1)])


def cumulative_influence(influence: Float[torch.Tensor, "node"]) -> Float[torch.Tensor, "node"]:
    """Per node, the share of the total influence held by it and every node more influential than it
    (circuit-tracer's ``influence`` field: small = important; a viewer keeps nodes ``≤`` a cut)."""
    order = influence.argsort(descending=True, stable=True)
    out = torch.zeros_like(influence)
    total = influence.sum()
    out[order] = influence[order].cumsum(0) / (total if total > 0 else 1)
    return out


# ---------------------------------------------------------------------------- prune
def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must be a number between 0.0 and 1.0, got {value!r}")
    return float(value)


def _restricted_rows(graph, es, node_threshold: float | None) -> Int[torch.Tensor, "row"]:
    if node_threshold is None:
        return es.computed_rows
    relevance = graph.nodes[es.target].relevance[es.computed_rows]
    return es.computed_rows[relevance.abs() > node_threshold * abs(graph.target_value)]


def _check_node_threshold(graph, node_threshold) -> None:
    if node_threshold is None:
        return
    if isinstance(node_threshold, bool) or not isinstance(node_threshold, (int, float)) or node_threshold < 0:
        raise InputError(f"node_threshold must be a non-negative number or None, got {node_threshold!r}")
    stored = graph.settings.get("node_threshold") or 0.0
    if node_threshold < stored:
        raise InputError(
            f"node_threshold={node_threshold} is below the graph's node_threshold={stored}: rows under it "
            "were never computed. Recompute with circuit_graph(..., node_threshold=...) to lower it."
        )


def _with_rows(es, rows):
    """``es`` restricted to the computed ``rows`` (its dense matrix with the other rows zeroed)."""
    dense = es.dense
    if dense is not None and len(rows) != len(es.computed_rows):
        dense = torch.zeros_like(es.dense)
        dense[rows] = es.dense[rows]
    return dense


def prune(graph, *, top_p: float | None = None, edge_threshold: float | None = None, influence: bool = False,
          node_influence: float = 0.8, edge_influence: float = 0.98, node_threshold: float | None = None):
    """A new :class:`~cage_lens.CircuitGraph` pruned by one rule (see the module docstring); the
    original is unchanged and the new graph keeps the unpruned rows, so it can be pruned again.

    Args:
        top_p: keep per transition the smallest set of edges holding this fraction of |A| mass.
        edge_threshold: keep edges with ``|A| > edge_threshold · |target|``.
        influence: circuit-tracer's cumulative-influence pruning with ``node_influence`` (0.8) and
            ``edge_influence`` (0.98).
        node_threshold: also restrict the computed rows to nodes with ``|R| > node_threshold·|target|``
            (at or above the graph's own node threshold).
    """
    rules = [top_p is not None, edge_threshold is not None, bool(influence)]
    if sum(rules) != 1:
        raise InputError("prune() takes exactly one rule: top_p=..., edge_threshold=... or influence=True")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must lie in (0, 1], got {top_p!r}")
    if edge_threshold is not None and (isinstance(edge_threshold, bool) or not isinstance(edge_threshold, (int, float)) or edge_threshold < 0):
        raise InputError(f"edge_threshold must be a non-negative number, got {edge_threshold!r}")
    _check_node_threshold(graph, node_threshold)
    if influence:
        new_sets = _prune_by_influence(graph, _check_fraction("node_influence", node_influence),
                                       _check_fraction("edge_influence", edge_influence), node_threshold)
        pruning = {"rule": "influence", "node_influence": node_influence, "edge_influence": edge_influence}
        settings = dict(graph.settings, top_p=None, edge_threshold=None, pruning=pruning)
    else:
        new_sets = _prune_by_size(graph, top_p, edge_threshold, node_threshold)
        settings = dict(graph.settings, top_p=top_p, edge_threshold=edge_threshold, pruning=None)
    if node_threshold is not None:
        settings["node_threshold"] = node_threshold
    return dataclasses.replace(graph, edge_sets=new_sets, settings=settings, _alive=None)


def _prune_by_size(graph, top_p, edge_threshold, node_threshold) -> list:
    scale = abs(graph.target_value)
    matrices = [unpruned_matrix(graph, es) for es in graph.edge_sets]
    out = []
    for es, matrix in zip(graph.edge_sets, matrices):
        rows = _restricted_rows(graph, es, node_threshold)
        if matrix is not None:
            matrix = matrix[torch.isin(es.computed_rows, rows)]
            t, s, v, total = prune_edges(matrix, rows, top_p=top_p, edge_threshold=edge_threshold, scale=scale)
        elif (edge_threshold is not None and edge_threshold * scale >= _stored_cutoff(graph, es)
              and len(rows) == len(es.computed_rows)):
            keep = (es.values.abs() > edge_threshold * scale).nonzero().flatten()
            keep = keep[(es.targets[keep] * graph.nodes[es.source].size + es.sources[keep]).argsort()]  # row-major, as built
            t, s, v, total = es.targets[keep], es.sources[keep], es.values[keep], es.total_mass
        else:
            _unpruned_or_refuse(graph, "top_p pruning" if top_p is not None else "a new node_threshold"
                                if len(rows) != len(es.computed_rows) else
                                f"edge_threshold={edge_threshold} (below the smallest stored edge)")
        out.append(dataclasses.replace(es, targets=t, sources=s, values=v, computed_rows=rows, total_mass=total,
                                       dense=_with_rows(es, rows)))
    return out


def _prune_by_influence(graph, node_fraction: float, edge_fraction: float, node_threshold) -> list:
    matrices = _unpruned_or_refuse(graph, "influence pruning")
    rows = [_restricted_rows(graph, es, node_threshold) for es in graph.edge_sets]
    matrices = [m[torch.isin(es.computed_rows, r)] for es, m, r in zip(graph.edge_sets, matrices, rows)]
    restricted = [dataclasses.replace(es, computed_rows=r) for es, r in zip(graph.edge_sets, rows)]
    lists = _all_edges(dataclasses.replace(graph, edge_sets=restricted), matrices)
    offsets, n_nodes = _global_index(graph)
    target = _target_index(graph, offsets)
    always = torch.zeros(n_nodes, dtype=torch.bool)
    always[offsets[graph.levels[0]]: offsets[graph.levels[0]] + graph.nodes[graph.levels[0]].size] = True
    always[target] = True

    influence, _, _ = _influence(graph, lists, offsets, n_nodes, target)
    node_mask = (influence >= find_threshold(influence, node_fraction)) | always

    ends = [(offsets[es.target] + l.targets, offsets[es.source] + l.sources) for es, l in zip(graph.edge_sets, lists)]
    pruned = [EdgeList(l.targets[m], l.sources[m], l.values[m])
              for l, m in ((l, node_mask[t] & node_mask[s]) for l, (t, s) in zip(lists, ends))]
    pruned_influence, normalised, target_total = _influence(graph, pruned, offsets, n_nodes, target)
    scores = [n * t for n, t in zip(normalised, target_total)]  # |A|/Σ_row · (influence + weight) of the target
    cut = find_threshold(torch.cat(scores) if scores else torch.zeros(0), edge_fraction)
    kept_ends = [(offsets[es.target] + l.targets, offsets[es.source] + l.sources) for es, l in zip(graph.edge_sets, pruned)]
    edge_masks = [s >= cut for s in scores]

    computed = torch.zeros(n_nodes, dtype=torch.bool)
    for es in restricted:
        computed[offsets[es.target] + es.computed_rows] = True
    inner = ~always
    while True:
        edge_masks = [m & node_mask[t] & node_mask[s] for m, (t, s) in zip(edge_masks, kept_ends)]
        has_out = torch.zeros(n_nodes, dtype=torch.bool)
        has_in = torch.zeros(n_nodes, dtype=torch.bool)
        for m, (t, s) in zip(edge_masks, kept_ends):
            has_out[s[m]] = True
            has_in[t[m]] = True
        new_mask = node_mask & ~(inner & ~has_out) & ~(inner & computed & ~has_in)
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask

    out = []
    for es, matrix, l, m, r in zip(graph.edge_sets, matrices, pruned, edge_masks, rows):
        total = float(matrix.abs().sum())
        out.append(dataclasses.replace(es, targets=l.targets[m], sources=l.sources[m], values=l.values[m],
                                       computed_rows=r, total_mass=total, dense=_with_rows(es, r)))
    return out

