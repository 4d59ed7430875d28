"""Cross-layer attribution graphs: fast closed form == autograd reference, identities, pruning, export."""

from __future__ import annotations

import functools
import json
import re

import networkx as nx
import pytest
import torch

from cage_lens.core.adapter import adapt
from cage_lens.circuit.graph import CircuitGraph
from cage_lens.circuit import closed_form
from cage_lens.circuit.builder import circuit_graph
from cage_lens.metrics import gini
from cage_lens.circuit.pruning import prune_edges
from cage_lens.errors import InputError, UnsupportedModelError
from cage_lens.testing import MODEL_KINDS, random_model
from conftest import float32_inside



PROMPT = "the cat sat on the mat and john"
TARGET = " mary"
ALL = dict(node_threshold=None, top_p=None)


def graph_tol(model) -> float:
    """Closed form vs autograd, float64: ~1e-14 where everything is float64; bridges whose Hugging Face
    modules compute in float32 inside (eager softmax, RMSNorm; see conftest) give the autograd side
    float32 rounding (measured ≤ 3e-7)."""
    return 1e-6 if float32_inside(model) else 1e-12


@functools.lru_cache(maxsize=None)
def model_of(kind: str, biases: bool = True):
    return random_model(kind, biases=biases)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def scaled_error(fast: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """Max error relative to the larger of the matrix's own scale and ``scale`` (a node-relevance scale:
    under gxi with RMSNorm the per-head edges are ~ε/σ² small, below the float32-softmax noise floor)."""
    return float((fast - ref).abs().max() / max(float(ref.abs().max()), scale, 1e-30))


def transitions_of(graph: CircuitGraph):
    return [(es.source, es.target) for es in graph.edge_sets]


# ---------------------------------------------------------------------------- fast == autograd
def _assert_agreement(fast: CircuitGraph, ref: CircuitGraph, tolerance: float) -> None:
    assert fast.levels == ref.levels
    for source, target in transitions_of(fast):
        scale = float(fast.node_relevance(source).abs().max())
        error = scaled_error(fast.edge_matrix(source, target), ref.edge_matrix(source, target), scale)
        assert error < tolerance, (fast.level_mode, source, target, error)


@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "gxi"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fast_equals_autograd(kind, rules):
    model = model_of(kind)
    for levels in ("half", "block", "heads") + (() if kind == "attn_only" else ("neurons",)):
        options = dict(rules=rules, levels=levels, neurons_top_k=3, **ALL)
        fast = circuit_graph(model, PROMPT, TARGET, **options)
        _assert_agreement(fast, circuit_graph(model, PROMPT, TARGET, method="autograd", batch_size=64, **options),
                          graph_tol(model))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_block_edges_are_the_attention_edges_of_the_half_graph(kind):
    """Block edges (resid_post → resid_post) equal the attention edges of the half graph (g taken at
    resid_mid, docs/graphs.md#levels); the autograd reference checks both independently."""
    model = model_of(kind)
    for rules in ("attnlrp", "cplrp", "gxi"):
        block = circuit_graph(model, PROMPT, TARGET, rules=rules, levels="block", **ALL)
        half = circuit_graph(model, PROMPT, TARGET, rules=rules, levels="half", **ALL)
        for layer in range(2):
            source = "embeddings" if layer == 0 else f"resid_post.{layer - 1}"
            inner = f"resid_post.{layer}" if kind == "attn_only" else f"resid_mid.{layer}"
            assert torch.equal(block.edge_matrix(source, f"resid_post.{layer}"), half.edge_matrix(source, inner))


def test_long_context_graph_equals_the_default_graph(kind):
    model = model_of(kind)
    one = circuit_graph(model, PROMPT, TARGET, levels="half", long_context=False, **ALL)
    long = circuit_graph(model, PROMPT, TARGET, levels="half", long_context=True, **ALL)
    for source, target in transitions_of(one):
        torch.testing.assert_close(long.edge_matrix(source, target), one.edge_matrix(source, target),
                                   rtol=0, atol=1e-12)  # float64: rounding of the row-chunked attention
    assert torch.is_grad_enabled()


def test_a_chunk_of_rows_reads_only_the_keys_its_rows_see():
    """Causal: none after the last row; a window of W: none W or more before the first row."""
    rows = torch.tensor([7, 8, 9])
    assert closed_form._key_range(rows, None) == slice(0, 10)
    assert closed_form._key_range(rows, 3) == slice(5, 10)      # row 7 sees 5, 6, 7
    assert closed_form._key_range(rows, 100) == slice(0, 10)



@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_the_pass_records_q_and_k_once_as_they_enter_the_scores(family):
    """Where the rotated queries and keys fire, the unrotated ones are not recorded (every layer's copy
    was a fifth of a long-context graph's memory); without rotary the plain q and k are the ones."""
    from cage_lens.circuit import state
    from cage_lens.core.hooks import fires

    adapter = adapt(random_model(family))
    site = adapter.layer(0)
    names = state._attention_names(adapter, 0)
    rotated = adapter.arch.positional == "rotary" and fires(adapter, site.rot_q) and fires(adapter, site.rot_k)
    expected = [site.v, site.z] + ([site.rot_q, site.rot_k] if rotated else [site.q, site.k])
    assert names[:4] == expected and len(set(names)) == len(names)
    assert rotated == (family != "gpt2")   # both TL lines expose hook_rot_q/k for Llama and Qwen3

@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@pytest.mark.parametrize("window", [3, 11, 12])
@pytest.mark.parametrize("rows_per_chunk", ["all", "one"])
def test_fast_equals_autograd_under_a_sliding_window(family, window, rows_per_chunk, monkeypatch):
    """A sliding window of W positions hides the keys W or more back (Mistral: every layer; Gemma-2:
    every other layer, with soft-caps): the closed form masks them as the model does, so on a 12-token
    prompt it equals the autograd reference for windows shorter than the prompt and as long as it. With
    one row per chunk, each chunk reads only the keys its row sees (``_key_range``)."""
    tokens = torch.arange(3, 15)
    model = random_model(family, sliding_window=window)
    assert adapt(model).attention_window(0) == window
    reference = {rules: circuit_graph(model, tokens, 5, method="autograd", batch_size=64, rules=rules, levels="half",
                                      **ALL) for rules in ("attnlrp", "cplrp")}
    if rows_per_chunk == "one":
        monkeypatch.setattr(closed_form, "EDGE_BUDGET", 1)
    for rules in ("attnlrp", "cplrp"):
        _assert_agreement(circuit_graph(model, tokens, 5, rules=rules, levels="half", **ALL), reference[rules],
                          graph_tol(model))
    if window < len(tokens):   # the window matters: the closed form without it is refused by its own check
        with pytest.raises(UnsupportedModelError, match="method='fast' cannot reproduce this model's attention"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(adapt(model).__class__, "attention_window", lambda self, layer: None)
                circuit_graph(model, tokens, 5, **ALL)


# ---------------------------------------------------------------------------- identities (docs/graphs.md#identities)
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "gxi"])
def test_outgoing_edges_sum_to_source_relevance(kind, rules):
    graph = circuit_graph(model_of(kind), PROMPT, TARGET, rules=rules, levels="half", **ALL)
    for source, target in transitions_of(graph):
        outgoing = graph.edge_matrix(source, target).sum(0)
        assert relative_error(outgoing, graph.node_relevance(source)) < graph_tol(model_of(kind))


def test_head_graph_outgoing_edges_sum_to_source_relevance(kind):
    graph = circuit_graph(model_of(kind), PROMPT, TARGET, levels="heads", **ALL)
    outgoing: dict[str, torch.Tensor] = {}
    for es in graph.edge_sets:
        outgoing[es.source] = outgoing.get(es.source, 0) + graph.edge_matrix(es.source, es.target).sum(0)
    for level, total in outgoing.items():
        assert relative_error(total, graph.nodes[level].relevance) < graph_tol(model_of(kind))
    heads = graph.node_relevance("heads.0")
    assert heads.shape == (4, graph.n_pos)
    assert all(len(k) == 3 for k in graph.to_networkx().nodes if k[0].startswith("heads"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_neuron_graph_keeps_top_k_neurons_per_token(kind):
    graph = circuit_graph(model_of(kind), PROMPT, TARGET, levels="neurons", neurons_top_k=2, **ALL)
    level = graph.nodes["neurons.0"]
    assert level.size == 2 * graph.n_pos and torch.equal(level.pos, torch.arange(graph.n_pos).repeat_interleave(2))
    outgoing: dict[str, torch.Tensor] = {}
    for es in graph.edge_sets:
        outgoing[es.source] = outgoing.get(es.source, 0) + graph.edge_matrix(es.source, es.target).sum(0)
    for name in ("embeddings", "neurons.0", "resid_post.0"):  # every outgoing edge kept: the chain rule holds
        assert relative_error(outgoing[name], graph.nodes[name].relevance) < graph_tol(model_of(kind))
    keys = [k for k in graph.to_networkx().nodes if k[0].startswith("neurons")]
    assert all(len(k) == 3 for k in keys)


def test_attention_only_models_have_no_neuron_level():
    with pytest.raises(InputError, match="attention-only"):
        circuit_graph(model_of("attn_only"), PROMPT, TARGET, levels="neurons")


def test_incoming_edges_sum_to_target_relevance_for_cplrp_without_biases(kind):
    graph = circuit_graph(model_of(kind, biases=False), PROMPT, TARGET, rules="cplrp", levels="half", **ALL)
    for source, target in transitions_of(graph):
        incoming = graph.edge_matrix(source, target).sum(1)
        assert relative_error(incoming, graph.node_relevance(target)) < graph_tol(model_of(kind, biases=False))


def _attention_bias_output(model, layer: int) -> torch.Tensor:
    """Attention output for an all-zero residual input: b_O + Σ_h (b_ln W_V + b_V) W_O."""
    out = {}
    hooks = [(f"blocks.{layer}.hook_resid_pre", lambda t, hook: torch.zeros_like(t)),
             (f"blocks.{layer}.hook_attn_out", lambda t, hook: out.setdefault("a", t.detach()))]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(torch.zeros((1, 1), dtype=torch.long))
    return out["a"][0, 0]


def test_biases_absorb_exactly_the_bias_output_under_cplrp():
    """With biases, CP-LRP: R_t(j) − Σ_i A[j, i] = ⟨attention output at zero input, g_t(j)⟩ for attention
    transitions (output bias and value biases), and R_post(j) − R_mid(j) for the MLP half."""
    from cage_lens.circuit.state import capture_state
    from cage_lens.targets import Target

    model = model_of("gpt2")
    graph = circuit_graph(model, PROMPT, TARGET, rules="cplrp", levels="half", **ALL)
    adapter = adapt(model)
    state = capture_state(adapter, graph.tokens, graph.position, Target.build(model, 1, TARGET), "cplrp")
    for layer in range(adapter.arch.n_layers):
        source = "embeddings" if layer == 0 else f"resid_post.{layer - 1}"
        target = f"resid_mid.{layer}"
        absorbed = graph.node_relevance(target) - graph.edge_matrix(source, target).sum(1)
        g_mid = state.resid[f"blocks.{layer}.hook_resid_mid"][1]
        expected = g_mid @ _attention_bias_output(model, layer)
        assert relative_error(absorbed, expected) < 1e-10
        assert expected.abs().max() > 1e-3  # the biases really do absorb something here


# ---------------------------------------------------------------------------- pruning
def test_node_threshold_restricts_computed_rows():
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, node_threshold=0.05, top_p=None)
    scale = abs(graph.target_value)
    for es in graph.edge_sets:
        relevance = graph.node_relevance(es.target)
        expected = (relevance.abs() > 0.05 * scale).nonzero().flatten()
        assert torch.equal(es.computed_rows, expected)
        dense = graph.edge_matrix(es.source, es.target)
        skipped = torch.ones(len(relevance), dtype=torch.bool)
        skipped[expected] = False
        assert (dense[skipped] == 0).all()


def test_top_p_keeps_smallest_set_holding_the_mass():
    graph = circuit_graph(model_of("llama"), PROMPT, TARGET, levels="half", node_threshold=None, top_p=0.7)
    for es in graph.edge_sets:
        full = graph.edge_matrix(es.source, es.target).abs().flatten()
        full = full[full > 0].sort(descending=True).values
        kept = es.values.abs()
        assert kept.sum() >= 0.7 * full.sum() - 1e-12
        assert len(kept) == 1 or kept.sum() - kept.min() < 0.7 * full.sum()  # minimal
        assert torch.allclose(kept.sort(descending=True).values, full[: len(kept)])  # the largest ones


def test_edge_threshold_keeps_exactly_the_edges_above_it():
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, node_threshold=None, edge_threshold=0.02)
    for es in graph.edge_sets:
        dense = graph.edge_matrix(es.source, es.target)
        expected = dense.abs() > 0.02 * abs(graph.target_value)
        assert torch.equal(graph.edge_matrix(es.source, es.target, pruned=True) != 0, expected)


def test_prune_edges_on_a_known_matrix():
    matrix = torch.tensor([[4.0, 0.0, -3.0], [2.0, 1.0, 0.0]])
    rows = torch.tensor([5, 7])
    t, s, v, total = prune_edges(matrix, rows, top_p=0.7, edge_threshold=None, scale=1.0)
    assert total == 10.0 and v.tolist() == [4.0, -3.0] and t.tolist() == [5, 5] and s.tolist() == [0, 2]
    t, s, v, _ = prune_edges(matrix, rows, top_p=None, edge_threshold=1.5, scale=1.0)
    assert sorted(v.tolist()) == [-3.0, 2.0, 4.0]


def test_ancestors_are_exactly_the_nodes_reaching_the_target():
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, levels="half", top_p=0.6)
    kept = nx.DiGraph()
    for es in graph.edge_sets:
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        for t, s in zip(es.targets.tolist(), es.sources.tolist()):
            kept.add_edge(src.key(s), tgt.key(t))
    target = graph.target_node
    expected = (nx.ancestors(kept, target) | {target}) if target in kept else {target}
    g = graph.to_networkx()
    assert set(g.nodes) == expected
    assert set(g.edges) == {e for e in kept.edges if e[1] in expected}
    assert set(graph.ancestors().nodes) == expected


# ---------------------------------------------------------------------------- queries, metrics, export
def test_top_paths_start_at_tokens_and_end_at_target():
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, levels="half", top_p=0.9)
    paths = graph.top_paths(3)
    assert 1 <= len(paths) <= 3
    flows = [abs(f) for f, _ in paths]
    assert flows == sorted(flows, reverse=True)
    g = graph.to_networkx()
    for flow, path in paths:
        assert path[0][0] == "embeddings" and path[-1] == graph.target_node
        assert [n[0] for n in path] == graph.levels
        assert all(g.has_edge(a, b) for a, b in zip(path[:-1], path[1:]))


def test_top_paths_flow_on_a_chain_is_the_product_of_shares():
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, levels="block", top_p=None, node_threshold=None)
    (flow, path), = graph.top_paths(1)
    expected = graph.target_value_at_target
    for (sl, i), (tl, j) in zip(path[:-1], path[1:]):
        expected *= float(graph.edge_matrix(sl, tl)[j, i]) / float(graph.node_relevance(tl)[j])
    assert abs(flow - expected) < 1e-10 * max(1.0, abs(expected))


def test_metrics_are_consistent():
    graph = circuit_graph(model_of("llama"), PROMPT, TARGET, levels="half")
    rows = graph.metrics()
    assert len(rows) == len(graph.edge_sets)
    for row, es in zip(rows, graph.edges()):
        assert row["edges"] == len(es)
        assert 0 <= row["verticality"] <= 1 and 0 <= row["gini_edges"] <= 1
        assert 1 <= row["tokens_90"] <= graph.n_pos or row["edges"] == 0
        assert row["look_back"] >= 0
    local = [r for r in rows if "resid_mid" in r["transition"].split(" → ")[0]]
    assert all(abs(r["verticality"] - 1) < 1e-12 and r["look_back"] == 0 for r in local)
    assert "transition" in graph.metrics_table()
    assert gini(torch.tensor([1.0, 1.0, 1.0])) == 0 and gini(torch.tensor([0.0, 0.0, 5.0])) > 0.6


def test_exports():
    graph = circuit_graph(model_of("attn_only"), PROMPT, TARGET, levels="half")
    g = graph.to_networkx()
    assert graph.target_node in g and all(isinstance(k, tuple) and len(k) == 2 for k in g.nodes)
    data = json.loads(graph.to_json())
    assert {"nodes", "links", "levels", "tokens", "target"} <= set(data)
    ids = {n["id"] for n in data["nodes"]}
    assert all(l["source"] in ids and l["target"] in ids for l in data["links"])
    assert len(data["links"]) == g.number_of_edges()
    assert "CircuitGraph" in repr(graph)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, message", [
    (dict(levels="layers"), "unknown levels"),
    (dict(method="magic"), "unknown method"),
    (dict(top_p=1.5), "top_p"),
    (dict(node_threshold=-1), "node_threshold"),
    (dict(rules="lrp-eps"), "unknown rule set"),
    (dict(target=" mary john"), "not a single token"),
    (dict(position=50), "outside the prompt"),
])
def test_bad_inputs_raise_clear_errors(kwargs, message):
    kwargs = {"target": TARGET, **kwargs}
    with pytest.raises(ValueError, match=message):
        circuit_graph(model_of("gpt2"), PROMPT, **kwargs)


def test_batch_and_too_long_prompts_are_refused():
    model = model_of("gpt2")
    with pytest.raises(InputError, match="one prompt at a time"):
        circuit_graph(model, [PROMPT, PROMPT], TARGET)
    with pytest.raises(InputError, match="n_ctx"):
        circuit_graph(model, torch.zeros(100, dtype=torch.long), TARGET)
    graph = circuit_graph(model, PROMPT, TARGET, dense_limit=2)
    assert all(es.dense is None for es in graph.edge_sets)  # only the pruned sparse edges are stored
    assert graph.edge_matrix("embeddings", "resid_post.0", pruned=True).abs().sum() > 0
    with pytest.raises(InputError, match="dense_limit"):
        graph.edge_matrix("embeddings", "resid_post.0")
    with pytest.raises(InputError, match="unknown level"):
        graph.node_relevance("resid_post.9")


# ---------------------------------------------------------------------------- HTML view
def test_html_view_is_self_contained(tmp_path):
    graph = circuit_graph(model_of("gpt2"), PROMPT, TARGET, levels="half")
    path = tmp_path / "graph.html"
    page = graph.to_html(path)
    assert path.read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script src" not in page  # scripts inline only
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    # the graph as built (the page may also hold a "show more" tier: elements marked data-tier)
    assert len(re.findall(r"<circle data-i='\d+' cx", page)) == graph.to_networkx().number_of_nodes()
    assert len(re.findall(r"<line data-e='\d+' x1", page)) == graph.to_networkx().number_of_edges()


# ---------------------------------------------------------------------------- explain_failure
def test_explain_failure_on_a_random_model():
    from cage_lens.failure import explain_failure

    model = model_of("gpt2")
    e = explain_failure(model, PROMPT, wrong=TARGET, correct=" store")
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    expected = logits[model.to_single_token(TARGET)] - logits[model.to_single_token(" store")]
    assert abs(e.delta - float(expected)) < 1e-10
    assert e.excluded == [0]  # BOS
    assert abs(float(e.heatmap[1:].abs().max()) - 1.0) < 1e-12
    assert e.trace.shape == (len(e.trace_points), tokens.shape[1])
    assert e.trace_points[0] == "embeddings" and torch.allclose(e.trace[0], e.relevance)
    assert e.graph.target_description.startswith("logit") and "−" in e.graph.target_description
    assert "Δℓ" in repr(e) and "<svg" in e.to_html()
    with pytest.raises(InputError, match="same token"):
        explain_failure(model, PROMPT, wrong=TARGET, correct=TARGET)
    top1 = model.to_string(logits.argmax()[None])
    default = explain_failure(model, PROMPT, correct=" store")
    assert default.wrong == top1 and default.delta > 0
    with pytest.raises(InputError, match="no failure"):
        explain_failure(model, PROMPT, correct=top1)


def test_explain_failure_on_the_ioi_zoo_model():
    zoo = pytest.importorskip("cage_lens.zoo")
    from cage_lens.failure import explain_failure

    try:
        model = zoo.load("ioi")
    except Exception as err:  # noqa: BLE001 - the zoo may not ship weights in every checkout
        pytest.skip(f"no ioi zoo model: {err}")
    prompt = "then , amy and dan went to the station . dan gave a pen to"
    e = explain_failure(model, prompt, wrong=" dan", correct=" amy")
    assert e.graph.target_node in e.graph.to_networkx()
    assert len(e.prompt_tokens) == e.heatmap.shape[0]
