"""Cross-layer attribution graphs (docs/graphs.md): nodes are (level, token) states, edges carry relevance.

``circuit_graph(model, prompt, target=..., contrast=...)`` runs one forward and one backward pass under
the LRP rules, computes the edges between consecutive levels (closed form by default, or the reference
batch-packed backpropagation) and prunes them:

1. **Node threshold.** Edges are computed only *into* target nodes with ``|R| > node_threshold·|target|``.
2. **Edge pruning per transition.** With ``edge_threshold``: keep ``|A| > edge_threshold·|target|``.
   Otherwise with ``top_p``: keep the smallest set of largest-|A| edges holding at least ``top_p`` of
   the transition's total |A| mass (ties broken by order of computation). ``top_p=None`` keeps all.
3. **Ancestors.** Keep the nodes from which the target node (last level, explained position) is
   reachable along kept edges, and the kept edges between them.

The unpruned matrices stay available through :meth:`CircuitGraph.edge_matrix` for inputs up to
``dense_limit`` tokens; above that only the pruned edges are stored (no dense ``[pos, pos]`` is kept).

Identities (docs/graphs.md#identities, tested): with every row computed, the edges leaving a node sum to its relevance,
``Σ_j A[j, i] = R_s(i)`` (the chain rule; for head/neuron graphs summed over all transitions leaving the
level). The edges entering a node sum to ``R_t(j) − absorbed(j)``: nothing is absorbed under CP-LRP on
a bias-free model; with biases an attention transition absorbs ``⟨attn_out(x = 0), g_t(j)⟩`` under
CP-LRP (the output bias plus the norm/value biases sent through ``W_V W_O``), an MLP half absorbs
``R_post(j) − R_mid(j)`` (its biases), AttnLRP's softmax absorbs part of the query/key paths, and
under gxi the norm scale (not detached) absorbs most of what enters through the attention inputs.
Head graphs add the residual connection as its own transition (``source → resid_mid``); neuron graphs
drop the neurons outside each token's top-k (their relevance is not drawn).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from jaxtyping import Float, Int

from cage_lens import engine
from cage_lens import graph as E
from cage_lens.adapter import adapt
from cage_lens.errors import InputError
from cage_lens.persist import provenance
from cage_lens.pruning import prune_edges
from cage_lens.inputs import as_int, resolve_positions, to_token_batch
from cage_lens.rules import RuleSet, resolve_rules
from cage_lens.targets import Target

__all__ = ["circuit_graph", "CircuitGraph", "EdgeSet", "METHODS", "gini", "node_label"]

METHODS = ("fast", "autograd")


# ---------------------------------------------------------------------------- containers
@dataclass
class LevelNodes:
    """All nodes of one level, flattened: node ``n`` sits at token ``pos[n]``; ``unit[n]`` is its head
    or neuron index (``-1`` for residual states)."""

    name: str
    kind: str
    layer: int
    relevance: Float[torch.Tensor, "node"]
    pos: Int[torch.Tensor, "node"]
    unit: Int[torch.Tensor, "node"]

    @property
    def size(self) -> int:
        return self.relevance.shape[0]

    def key(self, n: int) -> tuple:
        p, u = int(self.pos[n]), int(self.unit[n])
        return (self.name, p) if u < 0 else (self.name, u, p)


@dataclass
class EdgeSet:
    """The kept edges of one transition: ``values[e]`` flows from source node ``sources[e]`` into
    target node ``targets[e]`` (flat node indices of the two levels)."""

    source: str
    target: str
    kind: str
    targets: Int[torch.Tensor, "edge"]
    sources: Int[torch.Tensor, "edge"]
    values: Float[torch.Tensor, "edge"]
    computed_rows: Int[torch.Tensor, "row"]
    total_mass: float
    dense: Float[torch.Tensor, "target source"] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    def subset(self, keep: torch.Tensor) -> "EdgeSet":
        return EdgeSet(self.source, self.target, self.kind, self.targets[keep], self.sources[keep],
                       self.values[keep], self.computed_rows, self.total_mass, self.dense)


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative values (0: all equal, → 1: one value holds everything)."""
    x = x.flatten().double().sort().values
    n = x.numel()
    if n == 0 or float(x.sum()) == 0.0:
        return 0.0
    index = torch.arange(1, n + 1, dtype=x.dtype)
    return float(((2 * index - n - 1) * x).sum() / (n * x.sum()))


# ---------------------------------------------------------------------------- the graph
@dataclass
class CircuitGraph:
    """Pruned cross-layer attribution graph of one prompt. Levels run input → output; the target node
    is ``(levels[-1], position)``. All relevance values are signed (positive supports the target,
    with a contrast: the target *over* the contrast)."""

    str_tokens: list[str]
    tokens: Int[torch.Tensor, "pos"]
    position: int
    rules: str
    method: str
    level_mode: str
    target_description: str
    target_value: float
    nodes: dict[str, LevelNodes]
    edge_sets: list[EdgeSet]
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    _alive: dict[str, torch.Tensor] | None = None

    # -------------------------------------------------------------- basic views
    @property
    def levels(self) -> list[str]:
        return list(self.nodes)

    @property
    def n_pos(self) -> int:
        return len(self.str_tokens)

    @property
    def target_node(self) -> tuple:
        return (self.levels[-1], self.position)

    def _level(self, level: str) -> LevelNodes:
        if level not in self.nodes:
            raise InputError(f"unknown level {level!r}; levels are {self.levels}")
        return self.nodes[level]

    def node_relevance(self, level: str) -> Float[torch.Tensor, "..."]:
        """Relevance of every node of ``level`` (unpruned): ``[pos]``, or ``[unit, pos]`` for heads."""
        nodes = self._level(level)
        if int(nodes.unit.max()) < 0:
            return nodes.relevance.clone()
        out = torch.zeros(int(nodes.unit.max()) + 1, self.n_pos, dtype=nodes.relevance.dtype)
        out[nodes.unit, nodes.pos] = nodes.relevance
        return out

    def _edge_set(self, source_level: str, target_level: str) -> EdgeSet:
        for es in self.edge_sets:
            if es.source == source_level and es.target == target_level:
                return es
        pairs = [(es.source, es.target) for es in self.edge_sets]
        raise InputError(f"no transition {source_level!r} → {target_level!r}; transitions are {pairs}")

    def edge_matrix(self, source_level: str, target_level: str, pruned: bool = False) -> Float[torch.Tensor, "target source"]:
        """Dense edges ``[j, i]`` from source node i to target node j (flat node indices: the token
        position for residual levels, ``unit·pos + pos`` otherwise). ``pruned=False`` (default) gives
        the unpruned matrix — rows of target nodes under the node threshold are zero — available up to
        ``dense_limit`` tokens; ``pruned=True`` gives the kept edges before the ancestor filter."""
        es = self._edge_set(source_level, target_level)
        if not pruned:
            if es.dense is None:
                raise InputError(
                    f"the unpruned matrix is only kept for inputs up to dense_limit="
                    f"{self.settings.get('dense_limit')} tokens; use pruned=True or raise dense_limit"
                )
            return es.dense.clone()
        out = torch.zeros(self.nodes[target_level].size, self.nodes[source_level].size, dtype=es.values.dtype)
        out[es.targets, es.sources] = es.values
        return out

    # -------------------------------------------------------------- ancestors
    @property
    def alive(self) -> dict[str, torch.Tensor]:
        """Per level, a boolean mask of the nodes that reach the target node along kept edges."""
        if self._alive is None:
            alive = {name: torch.zeros(nodes.size, dtype=torch.bool) for name, nodes in self.nodes.items()}
            last = self.nodes[self.levels[-1]]
            alive[last.name][(last.pos == self.position) & (last.unit < 0)] = True
            for es in sorted(self.edge_sets, key=lambda e: self.levels.index(e.target), reverse=True):
                reached = alive[es.target][es.targets]
                alive[es.source][es.sources[reached]] = True
            self._alive = alive
        return self._alive

    def edges(self) -> list[EdgeSet]:
        """The graph's edges: pruned and restricted to ancestors of the target node, per transition."""
        return [es.subset(self.alive[es.target][es.targets]) for es in self.edge_sets]

    def node_list(self) -> list[tuple[tuple, float]]:
        """``(key, relevance)`` of every node of the graph (ancestors of the target node)."""
        out = []
        for name, nodes in self.nodes.items():
            for n in self.alive[name].nonzero().flatten().tolist():
                out.append((nodes.key(n), float(nodes.relevance[n])))
        return out

    def ancestors(self, node: tuple | None = None) -> nx.DiGraph:
        """The subgraph of nodes with a path into ``node`` (default: the target node)."""
        g = self.to_networkx()
        node = self.target_node if node is None else node
        if node not in g:
            raise InputError(f"node {node!r} is not in the pruned graph")
        return g.subgraph(nx.ancestors(g, node) | {node}).copy()

    # -------------------------------------------------------------- paths
    def top_paths(self, k: int = 5) -> list[tuple[float, list[tuple]]]:
        """The ``k`` paths from input-token nodes to the target node with the largest |flow|. The flow
        of a path is ``R_target · Π_e A_e / R_{head(e)}``: the relevance it carries if every node
        splits its relevance over its incoming edges in proportion to their values."""
        if as_int(k) is None or as_int(k) < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        k = as_int(k)
        incoming: dict[tuple, list[tuple[tuple, float]]] = {}
        for es in self.edges():
            src, tgt = self.nodes[es.source], self.nodes[es.target]
            for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist()):
                share = v / _nonzero(float(tgt.relevance[t]))
                incoming.setdefault(tgt.key(t), []).append((src.key(s), share))
        target = self.target_node
        best: dict[tuple, list[tuple[float, list[tuple]]]] = {target: [(self.target_value_at_target, [target])]}
        finished: list[tuple[float, list[tuple]]] = []
        for level in reversed(self.levels):
            for key in [key for key in best if key[0] == level]:
                for flow, path in best[key]:
                    if level == self.levels[0]:
                        finished.append((flow, path[::-1]))
                        continue
                    for src, share in incoming.get(key, []):
                        best.setdefault(src, []).append((flow * share, path + [src]))
            for key in [key for key in best if key[0] != level and self.levels.index(key[0]) < self.levels.index(level)]:
                best[key] = sorted(best[key], key=lambda fp: -abs(fp[0]))[:k]
        return sorted(finished, key=lambda fp: -abs(fp[0]))[:k]

    @property
    def target_value_at_target(self) -> float:
        last = self.nodes[self.levels[-1]]
        return float(last.relevance[(last.pos == self.position) & (last.unit < 0)].sum())

    # -------------------------------------------------------------- metrics
    def metrics(self) -> list[dict]:
        """Per transition of the pruned graph: ``nodes`` (graph nodes of the target level — a node under
        the node threshold can be in the graph as a source without incoming edges), edge count, mean
        fan-in/out (over nodes with at least one edge in this transition), Gini of |edge| and
        |node| relevance, verticality (share of |A| mass from the same token position), the number of
        source tokens covering 90 % of the mass, hubs (top-3 source tokens by outgoing mass) and the
        mean look-back distance (|A|-weighted mean of j − i in token positions)."""
        rows = []
        for es in self.edges():
            src, tgt = self.nodes[es.source], self.nodes[es.target]
            mass = es.values.abs()
            total = float(mass.sum())
            src_pos, tgt_pos = src.pos[es.sources], tgt.pos[es.targets]
            per_token = torch.zeros(self.n_pos, dtype=mass.dtype).index_add_(0, src_pos, mass)
            share = per_token.sort(descending=True).values.cumsum(0) / _nonzero(total)
            alive_t = self.alive[es.target]
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
                "hubs": [(p, self.str_tokens[p], float(per_token[p]) / _nonzero(total)) for p in hubs if per_token[p] > 0],
                "look_back": float((mass * (tgt_pos - src_pos)).sum()) / _nonzero(total),
            })
        return rows

    def metrics_table(self) -> str:
        head = f"{'transition':<34}{'nodes':>6}{'edges':>7}{'fan-in':>7}{'fan-out':>8}{'gini_e':>7}{'gini_n':>7}{'vert':>6}{'tok90':>6}{'lookback':>9}  hubs"
        lines = [head]
        for m in self.metrics():
            hubs = ", ".join(f"{t!r}@{p}" for p, t, _ in m["hubs"])
            lines.append(
                f"{m['transition']:<34}{m['nodes']:>6}{m['edges']:>7}{m['fan_in']:>7.2f}{m['fan_out']:>8.2f}"
                f"{m['gini_edges']:>7.2f}{m['gini_nodes']:>7.2f}{m['verticality']:>6.2f}{m['tokens_90']:>6}"
                f"{m['look_back']:>9.2f}  {hubs}"
            )
        return "\n".join(lines)

    # -------------------------------------------------------------- export
    def to_networkx(self) -> nx.DiGraph:
        """The pruned ancestor graph. Node keys ``(level, pos)`` (``(level, unit, pos)`` for head or
        neuron levels) with attributes ``relevance``, ``token``, ``layer``; edge attribute ``weight``
        (signed relevance flowing along the edge)."""
        g = nx.DiGraph(target=self.target_description, rules=self.rules, target_value=self.target_value)
        for name, nodes in self.nodes.items():
            for n in self.alive[name].nonzero().flatten().tolist():
                g.add_node(nodes.key(n), relevance=float(nodes.relevance[n]), level=name, layer=nodes.layer,
                           pos=int(nodes.pos[n]), token=self.str_tokens[int(nodes.pos[n])])
        for es in self.edges():
            src, tgt = self.nodes[es.source], self.nodes[es.target]
            for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist()):
                g.add_edge(src.key(s), tgt.key(t), weight=v)
        return g

    def to_dict(self) -> dict:
        """JSON-ready dict, schema::

            {"target": str, "target_value": float, "rules": str, "method": str, "levels": [str, ...],
             "level_mode": str, "tokens": [str, ...], "position": int, "settings": {...},
             "nodes": [{"id": str, "level": str, "layer": int, "pos": int, "unit": int | null,
                        "token": str, "relevance": float}, ...],
             "links": [{"source": id, "target": id, "value": float}, ...]}

        Node ids are ``"{level}@{pos}"`` or ``"{level}:{unit}@{pos}"``; ``layer`` is -1 for the
        embeddings; ``value`` is the signed relevance flowing along the link. Only the pruned ancestor
        graph is exported (d3/networkx "node-link" layout)."""
        node_id = node_label
        g = self.to_networkx()
        nodes = [
            {"id": node_id(k), "level": d["level"], "layer": d["layer"], "pos": d["pos"],
             "unit": k[1] if len(k) == 3 else None, "token": d["token"], "relevance": d["relevance"]}
            for k, d in g.nodes(data=True)
        ]
        links = [{"source": node_id(a), "target": node_id(b), "value": d["weight"]} for a, b, d in g.edges(data=True)]
        return {
            "target": self.target_description, "target_value": self.target_value, "rules": self.rules,
            "method": self.method, "levels": self.levels, "level_mode": self.level_mode,
            "tokens": self.str_tokens, "position": self.position, "settings": self.settings,
            "nodes": nodes, "links": links,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_html(self, path: str | Path | None = None) -> str:
        """Self-contained interactive HTML page (levels as rows, tokens as columns; hover, click,
        threshold slider; a static SVG where scripts do not run). Written to ``path`` when given; the
        HTML string is returned either way."""
        from cage_lens.graph_view import graph_html

        page = graph_html(self)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        from cage_lens.graph_view import graph_fragment

        return graph_fragment(self)

    def save(self, path) -> Path:
        """Write to one safetensors file with provenance (docs/results.md); read back with :meth:`load`."""
        from cage_lens.persist import save

        return save(self, path)

    @classmethod
    def load(cls, path) -> "CircuitGraph":
        """Read a graph written by :meth:`save` (refuses other result kinds and newer schemas)."""
        from cage_lens.persist import load

        return load(path, expect=cls)

    def prune(self, **rule) -> "CircuitGraph":
        """A new graph pruned without recomputation: ``top_p=``, ``edge_threshold=`` or
        ``influence=True`` (circuit-tracer's node 0.8 / edge 0.98); see :func:`cage_lens.pruning.prune`."""
        from cage_lens.pruning import prune

        return prune(self, **rule)

    def influence(self, unpruned: bool | None = None) -> dict[str, Float[torch.Tensor, "node"]]:
        """circuit-tracer's node influence on the target, per level (see :func:`cage_lens.pruning.node_influence`)."""
        from cage_lens.pruning import node_influence

        return node_influence(self, unpruned)

    def to_circuit_tracer(self, directory, slug: str = "cage-lens-graph", **options) -> Path:
        """Write ``{slug}.json`` and ``graph-metadata.json`` for circuit-tracer's viewer (docs/results.md)."""
        from cage_lens.export import to_circuit_tracer

        return to_circuit_tracer(self, directory, slug, **options)

    def plot(self, **kwargs):
        """Matplotlib figure of the graph (needs ``cage-lens[plot]``)."""
        from cage_lens.plots import plot_circuit

        return plot_circuit(self, **kwargs)

    def summary(self) -> str:
        n_nodes = sum(int(a.sum()) for a in self.alive.values())
        n_edges = sum(len(es) for es in self.edges())
        return (f"CircuitGraph({self.level_mode}, {len(self.levels)} levels, {self.n_pos} tokens, rules={self.rules!r}, "
                f"method={self.method!r}): {n_nodes} nodes, {n_edges} edges; target {self.target_description} "
                f"= {self.target_value:.4g} at position {self.position} ({self.str_tokens[self.position]!r})")

    def __repr__(self) -> str:
        return self.summary()


def node_label(key: tuple) -> str:
    """``"level@pos"`` or ``"level:unit@pos"`` (the node ids of :meth:`CircuitGraph.to_json`)."""
    return f"{key[0]}@{key[-1]}" if len(key) == 2 else f"{key[0]}:{key[1]}@{key[2]}"


def _nonzero(x: float) -> float:
    return x if x != 0 else 1e-30


# ---------------------------------------------------------------------------- building
def _check_options(levels, method, node_threshold, top_p, edge_threshold, batch_size, dense_limit) -> None:
    if levels not in E.LEVEL_MODES:
        raise InputError(f"unknown levels {levels!r}; choose one of {', '.join(E.LEVEL_MODES)}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if node_threshold is not None and not (isinstance(node_threshold, (int, float)) and node_threshold >= 0):
        raise InputError(f"node_threshold must be a non-negative number or None, got {node_threshold!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if edge_threshold is not None and not (isinstance(edge_threshold, (int, float)) and edge_threshold >= 0):
        raise InputError(f"edge_threshold must be a non-negative number or None, got {edge_threshold!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(dense_limit, int) or dense_limit < 0:
        raise InputError(f"dense_limit must be a non-negative int, got {dense_limit!r}")


def _single_prompt(model, inputs, prepend_bos):
    batch = to_token_batch(model, inputs, prepend_bos)
    if batch.batch != 1:
        raise InputError(f"circuit_graph explains one prompt at a time; got a batch of {batch.batch}")
    return batch


def _kept_rows(relevance: torch.Tensor, node_threshold: float | None, scale: float) -> torch.Tensor:
    if not node_threshold:
        return torch.arange(relevance.shape[0])
    return (relevance.abs() > node_threshold * scale).nonzero().flatten()


def circuit_graph(
    model,
    inputs,
    target=None,
    contrast=None,
    *,
    rules: "str | RuleSet" = "attnlrp",
    levels: str = "block",
    method: str = "fast",
    mode: str = "logit",
    position: int = -1,
    node_threshold: float | None = 0.01,
    top_p: float | None = 0.85,
    edge_threshold: float | None = None,
    neurons_top_k: int = 4,
    batch_size: int = 16,
    dense_limit: int = 512,
    low_memory: bool | None = None,
    prepend_bos: bool | None = None,
    strict: bool = True,
) -> CircuitGraph:
    """Cross-layer attribution graph of one prompt (docs/graphs.md).

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        inputs: one prompt (string) or a ``[pos]`` / ``[1, pos]`` token tensor.
        target, contrast, mode, position: what is explained, as in :func:`cage_lens.attribute`
            (``target`` must be one token; default: the model's top-1 prediction).
        rules: ``"attnlrp"``, ``"cplrp"``, ``"gxi"`` or a :class:`cage_lens.RuleSet`.
        levels: ``"block"`` (embeddings, then each block's output), ``"half"`` (also the state between
            attention and MLP), ``"heads"`` (attention split into per-head nodes) or ``"neurons"``
            (MLPs split into their ``neurons_top_k`` most relevant neurons per token).
        method: ``"fast"`` (closed form, docs/graphs.md#closed-form) or ``"autograd"`` (reference batch-packed
            backpropagation, ``batch_size`` target rows per backward call). Same numbers.
        node_threshold: edges only into target nodes with ``|R| > node_threshold·|target|``
            (``None``/0: every node).
        top_p: keep per transition the smallest set of edges holding this fraction of |A| mass.
        edge_threshold: instead of ``top_p``, keep edges with ``|A| > edge_threshold·|target|``.
        dense_limit: keep the unpruned edge matrices (for :meth:`CircuitGraph.edge_matrix`) up to
            this many tokens.
        low_memory: differentiate one block at a time (memory of one layer's attention instead of
            all layers', at O(layers²) forward time); default: for inputs over 1024 tokens.
        strict: refuse a model the completeness certificate does not pass (docs/rules.md);
            ``False`` computes anyway and records the reason in ``settings["warnings"]``.
    """
    _check_options(levels, method, node_threshold, top_p, edge_threshold, batch_size, dense_limit)
    adapter = adapt(model)
    rule_set = resolve_rules(rules)
    adapter.check_eval_mode()
    if levels == "neurons" and adapter.arch.attn_only:
        raise InputError("levels='neurons' needs MLPs but the model is attention-only")
    if levels == "neurons" and (adapter.arch.moe or adapter.arch.parallel):
        structure = "a mixture of experts" if adapter.arch.moe else "parallel attention + MLP blocks"
        raise InputError(f"levels='neurons' is not available for {structure}; use 'block', 'half' or 'heads'")
    warnings = engine.certify_or_warn(adapter, strict)
    batch = _single_prompt(model, inputs, prepend_bos)
    (pos,) = resolve_positions(position, batch.lengths)
    spec = Target.build(model, 1, target, contrast, mode)
    tokens = batch.tokens[0]
    state = E.capture_state(adapter, tokens, pos, spec, rule_set, low_memory, neurons=levels == "neurons")
    scale = abs(state.value)
    plan = E.plan(adapter, state, levels, neurons_top_k)
    nodes = {lv.name: LevelNodes(lv.name, lv.kind, lv.layer, lv.relevance, lv.pos, lv.unit) for lv in plan.levels}
    edge_sets = []
    keep_dense = tokens.shape[0] <= dense_limit
    for tr in plan.transitions:
        rows = _kept_rows(nodes[tr.target.name].relevance, node_threshold, scale)
        if method == "fast":
            matrix = E.fast_edge_rows(state, tr, rows)
        else:
            matrix = E.autograd_edge_rows(adapter, state, tr, rows, batch_size)
        matrix = matrix.cpu()
        t_idx, s_idx, values, total = prune_edges(matrix, rows, top_p=top_p, edge_threshold=edge_threshold, scale=scale)
        dense = None
        if keep_dense:
            dense = torch.zeros(nodes[tr.target.name].size, matrix.shape[1], dtype=matrix.dtype)
            dense[rows] = matrix
        edge_sets.append(EdgeSet(tr.source.name, tr.target.name, tr.kind, t_idx, s_idx, values, rows, total, dense))
        del matrix
    str_tokens = list(model.to_str_tokens(tokens))
    graph = CircuitGraph(
        str_tokens=str_tokens, tokens=tokens, position=pos, rules=rule_set.name, method=method, level_mode=levels,
        target_description=spec.describe(model), target_value=state.value, nodes=nodes, edge_sets=edge_sets,
        settings={"node_threshold": node_threshold, "top_p": top_p, "edge_threshold": edge_threshold,
                  "dense_limit": dense_limit, "neurons_top_k": neurons_top_k, "mode": mode},
        meta=provenance(model, function="circuit_graph", rules=rule_set.name, target=spec.describe(model), target_ids=spec.target_ids, contrast_ids=spec.contrast_ids, levels=levels, method=method, mode=mode, position=position, node_threshold=node_threshold, top_p=top_p, edge_threshold=edge_threshold, neurons_top_k=neurons_top_k, batch_size=batch_size, dense_limit=dense_limit, low_memory=low_memory, prepend_bos=prepend_bos, strict=strict),
    )
    graph.settings["rule_set"] = rule_set.to_dict()
    if warnings:
        graph.settings["warnings"] = warnings
    return graph
