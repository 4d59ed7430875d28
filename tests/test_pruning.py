"""CircuitGraph.prune: hand-built graphs with exact kept edges and influences, re-pruning equals building
with the same rule, and a dense reference of circuit-tracer's cumulative-influence pruning."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from cage_lens.circuit.graph import CircuitGraph, EdgeSet, LevelNodes
from cage_lens.circuit.builder import circuit_graph
from cage_lens.circuit.pruning import prune_edges
from cage_lens.errors import InputError
from cage_lens.circuit.pruning import cumulative_influence, find_threshold
from conftest import cached_model

PROMPT = "the cat sat on the mat and john"


# ---------------------------------------------------------------------------- hand-built graphs
def level(name, kind, pos, unit=None, relevance=None):
    pos = torch.tensor(pos)
    unit = torch.full_like(pos, -1) if unit is None else torch.tensor(unit)
    rel = torch.ones(len(pos), dtype=torch.float64) if relevance is None else torch.tensor(relevance, dtype=torch.float64)
    return LevelNodes(name, kind, -1 if kind == "embeddings" else 0, rel, pos, unit)


def hand_graph(levels, transitions, position, target_value, n_pos, settings=None):
    """``transitions``: (source, target, {(target node, source node): value}, computed rows)."""
    nodes = {lv.name: lv for lv in levels}
    edge_sets = []
    for source, target, values, rows in transitions:
        dense = torch.zeros(nodes[target].size, nodes[source].size, dtype=torch.float64)
        for (t, s), v in values.items():
            dense[t, s] = v
        rows = torch.tensor(rows)
        t_idx, s_idx, vals, total = prune_edges(dense[rows], rows, top_p=None, edge_threshold=None, scale=1.0)
        edge_sets.append(EdgeSet(source, target, "hand", t_idx, s_idx, vals, rows, total, dense))
    return CircuitGraph(
        str_tokens=[f"t{i}" for i in range(n_pos)], tokens=torch.arange(n_pos), position=position, rules="cplrp",
        method="hand", level_mode="hand", target_description="hand", target_value=target_value, nodes=nodes,
        edge_sets=edge_sets, settings=dict(settings or {"node_threshold": None, "top_p": None, "edge_threshold": None}),
    )


def twelve_node_graph() -> CircuitGraph:
    """circuit-tracer's 12-node test graph as a layered graph. Their nodes → ours: tokens 9, 10 →
    embeddings@0, @1; nodes 0, 1, 6, 8 → a[0..3] (rows of 0 and 1 computed; 6 and 8 are leaves, like
    their error nodes); node 3 → b[0]; the logit 11 → the target node out@1. Every edge is 10."""
    levels = [level("embeddings", "embeddings", [0, 1]), level("a", "heads", [0, 1, 0, 1], [0, 0, 1, 1]),
              level("b", "heads", [1], [0]), level("out", "resid_post", [0, 1])]
    transitions = [
        ("embeddings", "a", {(0, 0): 10, (1, 0): 10, (1, 1): 10}, [0, 1]),   # 0 ← 9; 1 ← 9, 10
        ("a", "b", {(0, 0): 10, (0, 1): 10, (0, 2): 10}, [0]),             # 3 ← 0, 1, 6
        ("a", "out", {(1, 1): 10, (1, 2): 10, (1, 3): 10}, [1]),           # 11 ← 1, 6, 8
        ("b", "out", {(1, 0): 10}, [1]),                                    # 11 ← 3
    ]
    return hand_graph(levels, transitions, position=1, target_value=40.0, n_pos=2)


def kept(graph) -> set:
    """Kept edges as ``(source key, target key)``."""
    out = set()
    for es in graph.edges():
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        out |= {(src.key(s), tgt.key(t)) for t, s in zip(es.targets.tolist(), es.sources.tolist())}
    return out


E0, E1 = ("embeddings", 0), ("embeddings", 1)
A0, A1, A2, A3 = ("a", 0, 0), ("a", 0, 1), ("a", 1, 0), ("a", 1, 1)
B0, OUT = ("b", 0, 1), ("out", 1)


def test_node_influence_of_the_twelve_node_graph_is_exact():
    influence = twelve_node_graph().influence()
    f = lambda *x: torch.tensor([float(Fraction(v)) for v in x], dtype=torch.float64)  # noqa: E731
    # circuit-tracer's values: node 9: 1/4, 10: 1/6; 0: 1/12, 1: 1/3, 6: 1/3, 8: 1/4; 3: 1/4; logit: 0
    assert torch.allclose(influence["embeddings"], f("1/4", "1/6"), rtol=0, atol=1e-15)
    assert torch.allclose(influence["a"], f("1/12", "1/3", "1/3", "1/4"), rtol=0, atol=1e-15)
    assert torch.allclose(influence["b"], f("1/4"), rtol=0, atol=1e-15)
    assert torch.equal(influence["out"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("node_influence, edge_influence, expected", [
    # node cut 1/4 drops a0 (1/12); edge scores 1/4 (into out) ×4, 3/16 ×2 (into a1), 1/8 ×2 (into b)
    (0.8, 0.98, {(A1, OUT), (A2, OUT), (A3, OUT), (B0, OUT), (A1, B0), (A2, B0), (E0, A1), (E1, A1)}),
    # edge cut 3/16 drops the edges into b; b has a computed row and no input left, so it goes too
    (0.8, 0.8, {(A1, OUT), (A2, OUT), (A3, OUT), (E0, A1), (E1, A1)}),
    # edge cut 1/4 keeps only the edges into out; a1 and b lose their inputs; the leaves a2, a3 stay
    (0.8, 0.6, {(A2, OUT), (A3, OUT)}),
    # node cut 1/3 keeps a1, a2; pruned scores: into out 1/2 each, into a1 1/4 each: all kept
    (0.3, 0.98, {(A1, OUT), (A2, OUT), (E0, A1), (E1, A1)}),
])
def test_influence_pruning_of_the_twelve_node_graph(node_influence, edge_influence, expected):
    graph = twelve_node_graph()
    pruned = graph.prune(influence=True, node_influence=node_influence, edge_influence=edge_influence)
    assert kept(pruned) == expected
    assert pruned.settings["pruning"] == {"rule": "influence", "node_influence": node_influence, "edge_influence": edge_influence}
    assert len(kept(graph)) == 10  # the original is unchanged


def test_find_threshold_and_cumulative_influence_match_circuit_tracer():
    scores = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    assert find_threshold(scores, 0.5) == 0.3     # 0.4 + 0.3 = 0.7 ≥ 0.5
    assert find_threshold(scores, 0.4) == 0.4     # exactly reached at the first
    assert find_threshold(scores, 1.0) == 0.1
    assert torch.allclose(cumulative_influence(scores), torch.tensor([1.0, 0.4, 0.9, 0.7], dtype=torch.float64))


def test_top_p_and_edge_threshold_on_a_hand_built_transition():
    levels = [level("embeddings", "embeddings", [0, 1, 2]), level("out", "resid_post", [0, 1, 2])]
    values = {(2, 0): 4.0, (2, 1): -3.0, (2, 2): 2.0, (1, 0): 1.0, (1, 1): 0.5}
    graph = hand_graph(levels, [("embeddings", "out", values, [1, 2])], position=2, target_value=3.0, n_pos=3)
    # top-p 0.65: mass 10.5, the two largest (4, 3) hold 7 ≥ 6.825
    top = graph.prune(top_p=0.65)
    assert kept(top) == {(E0, OUT[:1] + (2,)), (("embeddings", 1), ("out", 2))}
    assert top.edge_sets[0].total_mass == 10.5 and top.settings["top_p"] == 0.65
    # threshold 0.5 · |target| = 1.5: 4, -3 and 2 stay, 1 and 0.5 go (and are not ancestors anyway)
    by_size = graph.prune(edge_threshold=0.5)
    assert sorted(by_size.edge_sets[0].values.tolist()) == [-3.0, 2.0, 4.0]
    # node threshold 0.5 · 3 = 1.5 on |R| = 1 for every node: only rows above it are computed
    rows = graph.prune(top_p=1.0, node_threshold=0.5)
    assert rows.edge_sets[0].computed_rows.tolist() == [] and len(rows.edge_sets[0]) == 0
    assert rows.edge_sets[0].total_mass == 0.0


# ---------------------------------------------------------------------------- re-pruning == building
def same_edges(a: CircuitGraph, b: CircuitGraph) -> None:
    assert len(a.edge_sets) == len(b.edge_sets)
    for x, y in zip(a.edge_sets, b.edge_sets):
        assert (x.source, x.target) == (y.source, y.target)
        assert torch.equal(x.targets, y.targets) and torch.equal(x.sources, y.sources)
        assert torch.equal(x.values, y.values) and torch.equal(x.computed_rows, y.computed_rows)
        assert x.total_mass == y.total_mass


@pytest.mark.parametrize("levels", ["half", "heads"])
def test_pruning_again_equals_building_with_the_rule(levels):
    model = cached_model("gpt2")
    base = circuit_graph(model, PROMPT, " mary", levels=levels, node_threshold=0.01, top_p=None)
    same_edges(base.prune(top_p=0.7), circuit_graph(model, PROMPT, " mary", levels=levels, top_p=0.7))
    same_edges(base.prune(edge_threshold=0.02), circuit_graph(model, PROMPT, " mary", levels=levels, edge_threshold=0.02))
    same_edges(base.prune(top_p=0.8, node_threshold=0.05),
               circuit_graph(model, PROMPT, " mary", levels=levels, node_threshold=0.05, top_p=0.8))
    # a pruned graph keeps its unpruned rows: pruning it again goes back to the same edges
    same_edges(base.prune(top_p=0.3).prune(top_p=0.7), base.prune(top_p=0.7))


def test_a_loaded_graph_prunes_like_the_original(tmp_path):
    graph = circuit_graph(cached_model("llama"), PROMPT, " mary", levels="half")
    loaded = CircuitGraph.load(graph.save(tmp_path / "g.safetensors"))
    same_edges(loaded.prune(top_p=0.5), graph.prune(top_p=0.5))
    same_edges(loaded.prune(influence=True), graph.prune(influence=True))


def test_graphs_that_kept_only_pruned_edges():
    model = cached_model("gpt2")
    graph = circuit_graph(model, PROMPT, " mary", dense_limit=2, top_p=0.85)
    assert all(es.dense is None for es in graph.edge_sets)
    for rule in (dict(top_p=0.5), dict(influence=True), dict(edge_threshold=0.0)):
        with pytest.raises(InputError, match="keeps only its pruned edges.*dense_limit"):
            graph.prune(**rule)
    # an edge threshold at or above every transition's smallest stored edge is exact
    scale = abs(graph.target_value)
    tau = max(float(es.values.abs().min()) for es in graph.edge_sets) / scale
    same_edges(graph.prune(edge_threshold=tau), circuit_graph(model, PROMPT, " mary", dense_limit=2, edge_threshold=tau))
    with pytest.raises(InputError, match="node_threshold"):
        graph.prune(edge_threshold=tau, node_threshold=0.2)
    # without edge pruning the stored edges are the unpruned rows
    unpruned = circuit_graph(model, PROMPT, " mary", dense_limit=2, top_p=None)
    same_edges(unpruned.prune(top_p=0.6), circuit_graph(model, PROMPT, " mary", dense_limit=2, top_p=0.6))


@pytest.mark.parametrize("rule, message", [
    ({}, "exactly one rule"),
    (dict(top_p=0.5, edge_threshold=0.1), "exactly one rule"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(edge_threshold=-1), "non-negative"),
    (dict(influence=True, node_influence=1.2), "node_influence must be a number between 0.0 and 1.0"),
    (dict(top_p=0.5, node_threshold=0.001), "below the graph's node_threshold=0.01"),
])
def test_bad_rules_are_refused(rule, message):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary")
    with pytest.raises(InputError, match=message):
        graph.prune(**rule)


# ---------------------------------------------------------------------------- dense reference
def reference_influence_pruning(graph, node_fraction, edge_fraction) -> set:
    """circuit-tracer's algorithm on one dense global adjacency (matrix power series), independent
    of cage_lens.circuit.pruning."""
    names = graph.levels
    offsets, n = {}, 0
    for name in names:
        offsets[name] = n
        n += graph.nodes[name].size
    A = torch.zeros(n, n, dtype=torch.float64)
    computed = torch.zeros(n, dtype=torch.bool)
    for es in graph.edge_sets:
        o_t, o_s = offsets[es.target], offsets[es.source]
        A[o_t: o_t + graph.nodes[es.target].size, o_s: o_s + graph.nodes[es.source].size] = es.dense
        computed[o_t + es.computed_rows] = True
    last = graph.nodes[names[-1]]
    target = offsets[names[-1]] + int(((last.pos == graph.position) & (last.unit < 0)).nonzero()[0])
    w = torch.zeros(n, dtype=torch.float64)
    w[target] = 1

    def influence(M):
        Mn = M.abs() / M.abs().sum(1, keepdim=True).clamp(min=1e-10)
        total, current = torch.zeros(n, dtype=torch.float64), w @ Mn
        while current.any():
            total, current = total + current, current @ Mn
        return total, Mn

    def cut(scores, fraction):
        s = scores.sort(descending=True).values
        c = s.cumsum(0) / s.sum()
        return s[min(int(torch.searchsorted(c, torch.tensor(fraction, dtype=c.dtype))), len(s) - 1)]

    node_inf, _ = influence(A)
    always = torch.zeros(n, dtype=torch.bool)
    always[: graph.nodes[names[0]].size] = True
    always[target] = True
    node_mask = (node_inf >= cut(node_inf, node_fraction)) | always
    P = A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    pruned_inf, Pn = influence(P)
    scores = Pn * (pruned_inf + w)[:, None]
    exists = P != 0
    edge_mask = exists & (scores >= cut(scores[exists], edge_fraction))
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        new = node_mask & ~(~always & ~edge_mask.any(0)) & ~(~always & computed & ~edge_mask.any(1))
        if torch.equal(new, node_mask):
            break
        node_mask = new
    keys = [graph.nodes[name].key(i) for name in names for i in range(graph.nodes[name].size)]
    return {(keys[s], keys[t]) for t, s in edge_mask.nonzero().tolist()}


@pytest.mark.parametrize("kind, levels", [("gpt2", "half"), ("llama", "heads"), ("attn_only", "block")])
@pytest.mark.parametrize("fractions", [(0.8, 0.98), (0.5, 0.9)])
def test_influence_pruning_equals_a_dense_reference(kind, levels, fractions):
    graph = circuit_graph(cached_model(kind), PROMPT, " mary", levels=levels, top_p=None)
    pruned = graph.prune(influence=True, node_influence=fractions[0], edge_influence=fractions[1])
    expected = reference_influence_pruning(graph, *fractions)
    assert kept(pruned) == expected and 0 < len(expected) < len(kept(graph))


# ---------------------------------------------------------------------------- streamed (docs/graphs.md#long-prompts)
def _chunks_of(matrix, sizes):
    start = 0
    for size in sizes:
        yield start, matrix[start:start + size]
        start += size


@pytest.mark.parametrize("rule", [dict(top_p=0.7, edge_threshold=None), dict(top_p=None, edge_threshold=0.3),
                                  dict(top_p=None, edge_threshold=None), dict(top_p=1.0, edge_threshold=None)])
def test_pruning_chunk_by_chunk_keeps_the_edges_of_the_whole_matrix(rule):
    from cage_lens.circuit.pruning import prune_chunks

    gen = torch.Generator().manual_seed(3)
    matrix = torch.randn(23, 17, generator=gen, dtype=torch.float64).tril()
    matrix[4, :3] = 0.5                          # ties: the order of computation decides
    matrix[9, 2] = -0.5
    rows = torch.arange(23) * 3 + 1
    whole = prune_edges(matrix, rows, scale=2.0, **rule)
    for sizes in ([23], [1] * 23, [5, 7, 0, 11], [22, 1]):
        streamed = prune_chunks(_chunks_of(matrix, sizes), rows, scale=2.0, **rule)
        for a, b in zip(whole[:3], streamed[:3]):
            assert torch.equal(a, b)
        assert streamed[3] == whole[3]   # the total |A| mass, summed exactly per row
    prunes = rule["edge_threshold"] is not None or rule["top_p"] not in (None, 1.0)
    assert (len(whole[2]) < int((matrix != 0).sum())) == prunes


def test_a_graph_above_dense_limit_keeps_the_edges_of_the_dense_path():
    """Above ``dense_limit`` the rows come a chunk at a time and are pruned as they come (no matrix is
    formed): the same kept edges as pruning the whole matrices."""
    import cage_lens.circuit.closed_form as closed_form

    model = cached_model("llama")
    original = closed_form.EDGE_BUDGET
    closed_form.EDGE_BUDGET = 3 * 4 * 8 * 16 * 6     # a few rows per chunk, in both paths (the same numbers)
    try:
        for options in (dict(top_p=0.85), dict(edge_threshold=0.01), dict(top_p=None), dict(node_threshold=None, top_p=0.5)):
            dense = circuit_graph(model, PROMPT, " mary", levels="half", dense_limit=100, **options)
            streamed = circuit_graph(model, PROMPT, " mary", levels="half", dense_limit=2, **options)
            assert all(es.dense is None for es in streamed.edge_sets)
            same_edges(dense, streamed)
    finally:
        closed_form.EDGE_BUDGET = original


@pytest.mark.parametrize("mass_fraction", [0.0, 0.3, 0.85, 0.999, 1.0])
def test_the_top_p_cut_past_the_sort_limit_keeps_what_sorting_every_edge_keeps(monkeypatch, mass_fraction):
    """Past ``TOP_P_SORT_LIMIT`` edges the cut sorts only the candidates at or above a threshold whose
    edges reach the mass (docs/graphs.md#long-prompts): the same edges in the same order as sorting all,
    ties (many equal magnitudes, taken in the order of computation) included, on the CPU's float64 and
    float32 magnitudes."""
    from cage_lens.circuit import pruning

    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float64, torch.float32):
        magnitude = (torch.randn(5000, generator=gen, dtype=dtype) ** 4).abs()
        magnitude[::7] = magnitude[3]                       # a tied block straddling the cut
        mass = mass_fraction * float(magnitude.sum(dtype=torch.float64))
        monkeypatch.setattr(pruning, "TOP_P_SORT_LIMIT", 10**9)
        every = pruning._top_p_order(magnitude, mass)
        monkeypatch.setattr(pruning, "TOP_P_SORT_LIMIT", 100)
        narrowed = pruning._top_p_order(magnitude, mass)
        assert torch.equal(every, narrowed)
        assert float(magnitude[every].cumsum(0, dtype=torch.float64)[-1]) >= mass or len(every) == len(magnitude)
