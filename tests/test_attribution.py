"""LRP engine: conservation, agreement with independent references, targets, batching, hygiene."""

from __future__ import annotations

import json

import pytest
import torch

import cage_lens
from cage_lens.core.adapter import adapt
from cage_lens.core.hooks import has_position_embedding
from cage_lens.core.engine import run_attribution
from cage_lens.inputs import to_token_batch
from cage_lens.targets import Target
from conftest import PROMPT, cached_model, hook_count, tol


def plain_gradient_x_input(model, tokens, position, target_id):
    """Independent reference for rules="gxi": one hook on hook_embed (and hook_pos_embed), plain autograd."""
    store = {}

    def grab(name):
        def hook(t, hook):
            t = t.detach().requires_grad_(True)
            store[name] = t
            return t
        return hook

    names = ["hook_embed"] + (["hook_pos_embed"] if has_position_embedding(adapt(model)) else [])
    with model.hooks(fwd_hooks=[(n, grab(n)) for n in names]):
        logits = model(tokens)
    value = logits[0, position, target_id]
    grads = torch.autograd.grad(value, [store[n] for n in names])
    return [(store[n] * g).sum(-1)[0].detach() for n, g in zip(names, grads)]


# ---------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("rules", ["cplrp"])
def test_cplrp_conserves_exactly_on_bias_free_models(bias_free_model, rules):
    a = cage_lens.attribute(bias_free_model, [PROMPT, "the dog sat"], target=" mat", rules=rules)
    # every resid_pre / resid_mid / resid_post and the embeddings sum to the target (float64)
    assert a.conservation.max_error() < 1e-10
    for name, rel in a.node_relevance.items():
        assert torch.allclose(rel.sum(-1), a.target_value, rtol=1e-10, atol=1e-12), name
    assert torch.allclose(a.conservation.absorbed, torch.zeros_like(a.conservation.absorbed), atol=1e-10)


def test_biases_absorb_relevance_and_report_says_how_much(kind):
    a = cage_lens.attribute(cached_model(kind, biases=True), PROMPT, rules="cplrp")
    report = a.conservation
    # sums telescope: input sum + everything absorbed on the way = target
    assert torch.allclose(report.sums[:, 0] + report.absorbed.sum(-1), a.target_value, atol=1e-10)
    assert report.points[0] == "embeddings" and report.points[-1] == "target"
    assert "absorbed" in report.table()


# ---------------------------------------------------------------------------- references
def test_gxi_equals_plain_autograd_gradient_x_input(model):
    tokens = model.to_tokens(PROMPT)
    a = cage_lens.attribute(model, tokens, target=7, rules="gxi")
    ref = plain_gradient_x_input(model, tokens, -1, 7)
    assert torch.allclose(a.token_relevance[0], ref[0], rtol=1e-10, atol=1e-12)
    if a.position_relevance is not None:
        assert torch.allclose(a.position_relevance[0], ref[1], rtol=1e-10, atol=1e-12)


def test_attnlrp_differs_from_gxi_and_is_deterministic(model):
    a1 = cage_lens.attribute(model, PROMPT, target=7, rules="attnlrp")
    a2 = cage_lens.attribute(model, PROMPT, target=7, rules="attnlrp")
    g = cage_lens.attribute(model, PROMPT, target=7, rules="gxi")
    assert torch.equal(a1.token_relevance, a2.token_relevance)
    assert not torch.allclose(a1.token_relevance, g.token_relevance, rtol=1e-3)


# ---------------------------------------------------------------------------- forward & hooks
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "gxi"])
def test_forward_unchanged_and_hooks_removed(model, rules):
    tokens = model.to_tokens(PROMPT)
    before = model(tokens)
    assert hook_count(model) == 0
    with cage_lens.lrp(model, rules):
        inside = model(tokens)
        _, cache = model.run_with_cache(tokens)
    assert torch.equal(before, inside)
    assert "blocks.0.hook_resid_post" in cache
    assert hook_count(model) == 0
    cage_lens.attribute(model, tokens, rules=rules)
    assert hook_count(model) == 0
    assert torch.equal(before, model(tokens))


def test_hooks_removed_after_exceptions(model):
    with pytest.raises(RuntimeError, match="boom"):
        with cage_lens.lrp(model, "attnlrp"):
            raise RuntimeError("boom")
    assert hook_count(model) == 0

    def bad_target(logits):
        raise RuntimeError("target exploded")

    with pytest.raises(RuntimeError, match="target exploded"):
        cage_lens.attribute(model, PROMPT, target=bad_target)
    assert hook_count(model) == 0


def test_user_backward_runs_under_rules(model):
    """The context manager composes with a hand-written gradient × input."""
    tokens = model.to_tokens(PROMPT)
    store = {}

    def grab(t, hook):
        t = t.detach().requires_grad_(True)
        store["embed"] = t
        return t

    with cage_lens.lrp(model, "attnlrp"), model.hooks(fwd_hooks=[("hook_embed", grab)]):
        logits = model(tokens)
        (grad,) = torch.autograd.grad(logits[0, -1, 7], store["embed"])
    mine = (store["embed"] * grad).sum(-1)[0]
    ours = cage_lens.attribute(model, tokens, target=7, rules="attnlrp").token_relevance[0]
    assert torch.allclose(mine, ours, rtol=1e-12, atol=1e-14)


def test_no_parameter_gradients_written(model):
    for p in model.parameters():
        p.grad = None
    cage_lens.attribute(model, PROMPT)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- targets
def _logits_at(model, text, position=-1):
    with torch.no_grad():
        return model(model.to_tokens(text))[0, position]


@pytest.mark.parametrize(
    "mode,contrast,expected",
    [
        ("logit", None, lambda l: l[7]),
        ("logit", 9, lambda l: l[7] - l[9]),
        ("logprob", None, lambda l: l.log_softmax(-1)[7]),
        ("logprob", 9, lambda l: l[7] - l[9]),
        ("demean", None, lambda l: l[7] - l.mean()),
        ("topk_avg", None, lambda l: l[7] - l.topk(10).values.mean()),
    ],
)
def test_target_modes_explain_the_right_value(model, mode, contrast, expected):
    a = cage_lens.attribute(model, PROMPT, target=7, contrast=contrast, mode=mode)
    assert torch.allclose(a.target_value[0], expected(_logits_at(model, PROMPT)), rtol=1e-10)


def test_contrast_relevance_is_difference_of_relevances(model):
    """Rules act linearly on the backward pass, so R(t − c) = R(t) − R(c) exactly."""
    both = cage_lens.attribute(model, PROMPT, target=7, contrast=9)
    t = cage_lens.attribute(model, PROMPT, target=7)
    c = cage_lens.attribute(model, PROMPT, target=9)
    assert torch.allclose(both.token_relevance, t.token_relevance - c.token_relevance, **tol(model))


def test_default_target_is_top1_and_strings_resolve(model):
    logits = _logits_at(model, PROMPT)
    a = cage_lens.attribute(model, PROMPT)
    assert a.target_ids == [int(logits.argmax())]
    by_string = cage_lens.attribute(model, PROMPT, target=" cat")
    by_id = cage_lens.attribute(model, PROMPT, target=model.to_single_token(" cat") if hasattr(model, "to_single_token") else 5)
    assert torch.allclose(by_string.token_relevance, by_id.token_relevance)


def test_callable_target(model):
    a = cage_lens.attribute(model, PROMPT, target=lambda logits: logits[:, 3] + logits[:, 4])
    l = _logits_at(model, PROMPT)
    assert torch.allclose(a.target_value[0], l[3] + l[4], rtol=1e-10)


def test_explained_position(model):
    a = cage_lens.attribute(model, PROMPT, target=7, position=3)
    assert torch.allclose(a.target_value[0], _logits_at(model, PROMPT, 3)[7], rtol=1e-10)
    assert torch.all(a.token_relevance[0, 4:] == 0)  # causal: later tokens cannot matter


# ---------------------------------------------------------------------------- batching
def test_padded_batch_equals_single_prompts(model):
    prompts = [PROMPT, "the dog", "mary went to the store"]
    batch = cage_lens.attribute(model, prompts, target=7, contrast=9)
    for i, p in enumerate(prompts):
        single = cage_lens.attribute(model, p, target=7, contrast=9)
        n = single.lengths[0]
        assert torch.allclose(batch.token_relevance[i, :n], single.token_relevance[0], **tol(model))
        assert torch.all(batch.token_relevance[i, n:] == 0)
        assert torch.allclose(batch.target_value[i], single.target_value[0], **tol(model))


# ---------------------------------------------------------------------------- heads and neurons
def _captured_relevance(model, text, name, rules, target=7):
    adapter = adapt(model)
    batch = to_token_batch(model, text)
    value, capture, grads = run_attribution(
        adapter, batch, [batch.lengths[0] - 1], Target.build(model, 1, target), rules, [name]
    )
    return capture.relevance(grads, name).sum(-1)[0]


def test_head_relevance_sums_to_attention_output_relevance(kind):
    m = cached_model(kind, biases=False)
    a = cage_lens.attribute(m, PROMPT, target=7, rules="attnlrp")
    assert a.head_relevance.shape == (1, 2, 4, a.tokens.shape[1])
    for layer in range(2):
        attn_out = _captured_relevance(m, PROMPT, f"blocks.{layer}.hook_attn_out", "attnlrp")
        assert torch.allclose(a.head_relevance[0, layer].sum(0), attn_out, **tol(m))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_neuron_relevance_all_and_topk(kind):
    m = cached_model(kind, biases=False)
    full = cage_lens.attribute(m, PROMPT, target=7, neurons="all")
    top = cage_lens.attribute(m, PROMPT, target=7, neurons=3)
    d_mlp = m.cfg.d_mlp
    assert full.neuron_relevance.values.shape[-1] == d_mlp and top.neuron_relevance.values.shape[-1] == 3
    dense = full.neuron_relevance.dense(d_mlp)
    assert torch.allclose(dense.gather(-1, top.neuron_relevance.indices), top.neuron_relevance.values)
    # the kept neurons are the largest by |R|
    assert torch.allclose(top.neuron_relevance.values.abs().min(-1).values, dense.abs().topk(3, -1).values.min(-1).values)
    for layer in range(2):
        mlp_out = _captured_relevance(m, PROMPT, f"blocks.{layer}.hook_mlp_out", "attnlrp")
        assert torch.allclose(dense[0, layer].sum(-1), mlp_out, **tol(m))


# ---------------------------------------------------------------------------- results
def test_result_object_exports(model):
    a = cage_lens.attribute(model, [PROMPT, "the dog"], target=7)
    d = json.loads(a.to_json())
    assert d["token_relevance"][1] == pytest.approx(a.token_relevance[1, :3].tolist())
    assert len(d["str_tokens"][0]) == a.lengths[0]
    g = a.to_networkx()
    n_points = 1 + len(a.node_relevance)
    assert g.number_of_nodes() == n_points * a.lengths[0]
    assert g.nodes[("tokens", 1)]["relevance"] == pytest.approx(float(a.input_relevance[0, 1]))
    assert "Attribution(rules='attnlrp'" in repr(a)
    assert "<span" in a._repr_html_()
    norm = a.normalized(0)
    assert float(norm[1:].abs().max()) == pytest.approx(1.0)
    assert len(a.top_tokens(3)) == 3
