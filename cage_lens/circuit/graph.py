"""The cross-layer attribution graph as a result object (docs/graphs.md): :class:`LevelNodes` (the
nodes of one level), :class:`EdgeSet` (the kept edges of one transition) and :class:`CircuitGraph`
(queries, paths, export). It is built by :func:`cage_lens.circuit.builder.circuit_graph`, pruned by
:mod:`cage_lens.circuit.pruning`, drawn by :mod:`cage_lens.views.graphs`; its metrics are
:func:`cage_lens.metrics.graph_metrics`.

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

from cage_lens.core.rulesets import BUILT_IN_RULES, RuleSet
from cage_lens.errors import InputError
from cage_lens.inputs import as_int
from cage_lens.persist import Saveable
from cage_lens.views.graphs import node_label
from cage_lens.views.terminal import printable

__all__ = ["CircuitGraph", "LevelNodes", "EdgeSet"]


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


# ---------------------------------------------------------------------------- the graph
@dataclass
class CircuitGraph(Saveable):
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
    #: the rule set's values (``rules`` is its name); filled from the built-in of that name when not given
    rule_set: RuleSet | None = None
    meta: dict = field(default_factory=dict)
    _alive: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        self.rule_set = self.rule_set or BUILT_IN_RULES.get(self.rules)

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
        """Per transition of the pruned graph: nodes, edges, fan-in/out, Gini of edges and nodes,
        verticality, tokens covering 90 % of the mass, hubs and look-back distance (see
        :func:`cage_lens.metrics.graph_metrics`)."""
        from cage_lens.metrics import graph_metrics

        return graph_metrics(self)

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
            "rule_set": None if self.rule_set is None else self.rule_set.to_dict(), "method": self.method, "levels": self.levels, "level_mode": self.level_mode,
            "tokens": self.str_tokens, "position": self.position, "settings": self.settings,
            "nodes": nodes, "links": links,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_html(self, path: str | Path | None = None) -> str:
        """Self-contained interactive HTML page (levels as rows, tokens as columns; hover, click,
        threshold slider; a static SVG where scripts do not run). Written to ``path`` when given; the
        HTML string is returned either way."""
        from cage_lens.views.graphs import graph_html

        page = graph_html(self)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        from cage_lens.views.graphs import graph_fragment

        return graph_fragment(self)

    def prune(self, **rule) -> "CircuitGraph":
        """A new graph pruned without recomputation: ``top_p=``, ``edge_threshold=`` or
        ``influence=True`` (circuit-tracer's node 0.8 / edge 0.98); see :func:`cage_lens.circuit.pruning.prune`."""
        from cage_lens.circuit.pruning import prune

        return prune(self, **rule)

    def influence(self, unpruned: bool | None = None) -> dict[str, Float[torch.Tensor, "node"]]:
        """circuit-tracer's node influence on the target, per level (see :func:`cage_lens.circuit.pruning.node_influence`)."""
        from cage_lens.circuit.pruning import node_influence

        return node_influence(self, unpruned)

    def to_circuit_tracer(self, directory, slug: str = "cage-lens-graph", **options) -> Path:
        """Write ``{slug}.json`` and ``graph-metadata.json`` for circuit-tracer's viewer (docs/results.md)."""
        from cage_lens.circuit.export import to_circuit_tracer

        return to_circuit_tracer(self, directory, slug, **options)

    def plot(self, **kwargs):
        """Matplotlib figure of the graph (needs ``cage-lens[plot]``)."""
        from cage_lens.views.plots import plot_circuit

        return plot_circuit(self, **kwargs)

    def summary(self) -> str:
        n_nodes = sum(int(a.sum()) for a in self.alive.values())
        n_edges = sum(len(es) for es in self.edges())
        return printable(f"CircuitGraph({self.level_mode}, {len(self.levels)} levels, {self.n_pos} tokens, "
                         f"rules={self.rules!r}, method={self.method!r}): {n_nodes} nodes, {n_edges} edges; target "
                         f"{self.target_description} = {self.target_value:.4g} at position {self.position} "
                         f"({self.str_tokens[self.position]!r})")

    def __repr__(self) -> str:
        return self.summary()


def _nonzero(x: float) -> float:
    return x if x != 0 else 1e-30
