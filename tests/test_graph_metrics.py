"""Graph metrics, ancestors and path flows pinned on small hand-built ``CircuitGraph`` objects (no model):
every expected value is computed by hand in the comments (definitions: docs/metrics.md#graph-metrics)."""

from __future__ import annotations

import pytest
import torch

from cage_lens.circuit.graph import CircuitGraph, EdgeSet, LevelNodes
from cage_lens.metrics import gini


def level(name: str, layer: int, relevance, pos, unit=None) -> LevelNodes:
    unit = [-1] * len(pos) if unit is None else unit
    return LevelNodes(name, "resid" if min(unit) < 0 else "heads", layer, torch.tensor(relevance, dtype=torch.float64),
                      torch.tensor(pos), torch.tensor(unit))


def edges(source: str, target: str, triples) -> EdgeSet:
    """``triples``: (target node, source node, value)."""
    t, s, v = zip(*triples)
    values = torch.tensor(v, dtype=torch.float64)
    return EdgeSet(source, target, "hand", torch.tensor(t), torch.tensor(s), values, torch.tensor(sorted(set(t))),
                   float(values.abs().sum()))


def graph(tokens, position, nodes, edge_sets) -> CircuitGraph:
    return CircuitGraph(
        str_tokens=tokens, tokens=torch.arange(len(tokens)), position=position, rules="hand", method="hand",
        level_mode="hand", target_description="hand", target_value=float(nodes[-1].relevance[position]),
        nodes={lv.name: lv for lv in nodes}, edge_sets=edge_sets,
    )


# ---------------------------------------------------------------------------- three residual levels
# tokens a b c, target node (post, pos 2)
#   emb  relevance [0.5, 1.0, 2.0]
#   mid  relevance [0.2, 1.5, 3.0]
#   post relevance [0.1, 0.4, 4.0]
# emb → mid: mid2 ← emb0 2.0, mid2 ← emb1 −1.0, mid2 ← emb2 4.0,
#            mid1 ← emb1 0.5, mid1 ← emb0 0.5, mid0 ← emb0 0.2
# mid → post: post2 ← mid2 3.0, post2 ← mid1 1.0, post1 ← mid1 0.4
# Ancestors of post2: mid2, mid1 (edges into post2), then emb0, emb1, emb2; mid0 and post1 are not ancestors,
# so the edges mid0 ← emb0 and post1 ← mid1 leave the graph.
def residual_graph() -> CircuitGraph:
    return graph(
        ["a", "b", "c"], 2,
        [level("emb", -1, [0.5, 1.0, 2.0], [0, 1, 2]),
         level("mid", 0, [0.2, 1.5, 3.0], [0, 1, 2]),
         level("post", 0, [0.1, 0.4, 4.0], [0, 1, 2])],
        [edges("emb", "mid", [(2, 0, 2.0), (2, 1, -1.0), (2, 2, 4.0), (1, 1, 0.5), (1, 0, 0.5), (0, 0, 0.2)]),
         edges("mid", "post", [(2, 2, 3.0), (2, 1, 1.0), (1, 1, 0.4)])],
    )


def test_ancestors_and_kept_edges_by_hand():
    g = residual_graph()
    assert {k: v.tolist() for k, v in g.alive.items()} == {
        "emb": [True, True, True], "mid": [False, True, True], "post": [False, False, True]}
    kept = g.edges()
    assert kept[0].values.tolist() == [2.0, -1.0, 4.0, 0.5, 0.5]  # mid0 ← emb0 dropped
    assert kept[1].values.tolist() == [3.0, 1.0]  # post1 ← mid1 dropped
    nx_graph = g.to_networkx()
    assert nx_graph.number_of_nodes() == 6 and nx_graph.number_of_edges() == 7
    assert nx_graph.edges[("emb", 1), ("mid", 2)]["weight"] == -1.0


def test_residual_metrics_by_hand():
    emb_mid, mid_post = residual_graph().metrics()
    # emb → mid, kept |A| = [2, 1, 4, .5, .5], total 8
    assert emb_mid["transition"] == "emb → mid"
    assert emb_mid["nodes"] == 2  # mid1, mid2
    assert emb_mid["edges"] == 5
    assert emb_mid["fan_in"] == pytest.approx(5 / 2)  # 5 edges into 2 target nodes
    assert emb_mid["fan_out"] == pytest.approx(5 / 3)  # 5 edges out of 3 source nodes
    # sorted |A| [.5, .5, 1, 2, 4], weights 2i − n − 1 = [−4, −2, 0, 2, 4]: (−2 − 1 + 0 + 4 + 16) / (5 · 8)
    assert emb_mid["gini_edges"] == pytest.approx(17 / 40)
    # |R| of the graph's mid nodes [1.5, 3]: (−1.5 + 3) / (2 · 4.5)
    assert emb_mid["gini_nodes"] == pytest.approx(1 / 6)
    # same position: mid2 ← emb2 (4) and mid1 ← emb1 (.5): 4.5 / 8
    assert emb_mid["verticality"] == pytest.approx(4.5 / 8)
    # mass per source token: a 2 + .5 = 2.5, b 1 + .5 = 1.5, c 4; sorted shares .5, .8125, 1 → 3 tokens reach 90 %
    assert emb_mid["tokens_90"] == 3
    assert emb_mid["hubs"] == [(2, "c", 0.5), (0, "a", 0.3125), (1, "b", 0.1875)]
    # Σ |A| (j − i) / Σ |A| = (2·2 + 1·1 + 4·0 + .5·0 + .5·1) / 8
    assert emb_mid["look_back"] == pytest.approx(5.5 / 8)

    # mid → post, kept |A| = [3, 1], total 4
    assert (mid_post["nodes"], mid_post["edges"]) == (1, 2)
    assert (mid_post["fan_in"], mid_post["fan_out"]) == (2.0, 1.0)
    assert mid_post["gini_edges"] == pytest.approx(0.25)  # (−1 + 3) / (2 · 4)
    assert mid_post["gini_nodes"] == 0.0  # one node
    assert mid_post["verticality"] == pytest.approx(0.75)  # post2 ← mid2
    assert mid_post["tokens_90"] == 2  # shares: c .75, then b 1.0
    assert mid_post["hubs"] == [(2, "c", 0.75), (1, "b", 0.25)]  # a carries nothing: not a hub
    assert mid_post["look_back"] == pytest.approx(0.25)  # 1 · (2 − 1) / 4


def test_top_paths_flows_by_hand():
    # flow = R_target · Π A_e / R_head(e); R_post2 = 4, R_mid2 = 3, R_mid1 = 1.5
    # c→mid2→post2: 4 · (3/4) · (4/3) = 4;  a→mid2: 4 · 3/4 · 2/3 = 2;  b→mid2: 4 · 3/4 · (−1/3) = −1
    # a→mid1: 4 · (1/4) · (.5/1.5) = 1/3;  b→mid1: 1/3
    paths = residual_graph().top_paths(5)
    assert [flow for flow, _ in paths] == pytest.approx([4.0, 2.0, -1.0, 1 / 3, 1 / 3])
    assert paths[0][1] == [("emb", 2), ("mid", 2), ("post", 2)]
    assert paths[2][1] == [("emb", 1), ("mid", 2), ("post", 2)]


# ---------------------------------------------------------------------------- a head level
# tokens x y, target (post, pos 1); head nodes n = (unit, pos): 0 (0, 0), 1 (1, 0), 2 (0, 1), 3 (1, 1)
#   emb  [2.0, 2.0];  heads [0.1, 0.2, 1.0, 3.0];  post [0.5, 4.0]
# emb → heads: h2 ← emb0 1, h3 ← emb0 1, h3 ← emb1 3, h0 ← emb0 .5
# heads → post: post1 ← h2 1, post1 ← h3 3, post0 ← h0 .5
def head_graph() -> CircuitGraph:
    return graph(
        ["x", "y"], 1,
        [level("emb", -1, [2.0, 2.0], [0, 1]),
         level("attn.0", 0, [0.1, 0.2, 1.0, 3.0], [0, 0, 1, 1], unit=[0, 1, 0, 1]),
         level("post", 0, [0.5, 4.0], [0, 1])],
        [edges("emb", "attn.0", [(2, 0, 1.0), (3, 0, 1.0), (3, 1, 3.0), (0, 0, 0.5)]),
         edges("attn.0", "post", [(1, 2, 1.0), (1, 3, 3.0), (0, 0, 0.5)])],
    )


def test_head_level_metrics_by_hand():
    g = head_graph()
    assert g.alive["attn.0"].tolist() == [False, False, True, True]
    assert g.node_relevance("attn.0").tolist() == [[0.1, 1.0], [0.2, 3.0]]  # [unit, pos]
    assert ("attn.0", 1, 1) in g.to_networkx()
    emb_heads, heads_post = g.metrics()
    # emb → heads, kept |A| = [1, 1, 3], total 5
    assert (emb_heads["nodes"], emb_heads["edges"]) == (2, 3)
    assert emb_heads["fan_in"] == pytest.approx(1.5) and emb_heads["fan_out"] == pytest.approx(1.5)
    assert emb_heads["gini_edges"] == pytest.approx(4 / 15)  # sorted [1, 1, 3]: (−2 + 0 + 6) / (3 · 5)
    assert emb_heads["gini_nodes"] == pytest.approx(0.25)  # [1, 3]: (−1 + 3) / (2 · 4)
    assert emb_heads["verticality"] == pytest.approx(3 / 5)  # h3 (pos 1) ← emb1
    assert emb_heads["tokens_90"] == 2  # y 3/5 = .6, then x: 1.0
    assert emb_heads["hubs"] == [(1, "y", 0.6), (0, "x", 0.4)]
    assert emb_heads["look_back"] == pytest.approx(2 / 5)  # (1·1 + 1·1 + 3·0) / 5
    # heads → post: both heads sit at token y, so one token holds all the mass
    assert (heads_post["fan_in"], heads_post["fan_out"]) == (2.0, 1.0)  # 2 edges, 1 target, 2 head sources
    assert heads_post["tokens_90"] == 1 and heads_post["hubs"] == [(1, "y", 1.0)]
    assert heads_post["verticality"] == 1.0 and heads_post["look_back"] == 0.0


def test_gini_by_hand():
    assert gini(torch.tensor([1.0, 1.0, 1.0])) == 0.0
    assert gini(torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(2 / 3)  # weights [−2, 0, 2]: 10 / (3 · 5)
    assert gini(torch.tensor([3.0, 1.0])) == pytest.approx(0.25)  # order does not matter
    assert gini(torch.tensor([])) == 0.0 and gini(torch.zeros(4)) == 0.0
