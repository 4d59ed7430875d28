"""Base methods of cage_lens.generation.methods: common signature, causality, and each against a direct computation."""

from __future__ import annotations

import functools

import pytest
import torch

from cage_lens import methods
from cage_lens.errors import CageLensError, InputError
from cage_lens.testing import random_model


PROMPT = "the cat sat on the mat ."
COMPLETION = [19, 23, 24]  # john went to


@functools.lru_cache(maxsize=None)
def setup():
    model = random_model("gpt2", n_layers=2, dtype=torch.float64)
    prompt = model.to_tokens(PROMPT).cpu()
    tokens = torch.cat([prompt, torch.tensor([COMPLETION])], dim=1)
    return model, tokens, prompt.shape[1]


def _logprob(model, tokens, p, embed_hook=None):
    hooks = [] if embed_hook is None else [("hook_embed", embed_hook)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(tokens[:, :p])[0, -1].double().log_softmax(-1)


def test_registry_and_unknown_name():
    assert set(methods.METHODS) == {
        "attnlrp", "cplrp", "input_x_gradient", "integrated_gradients", "attention", "attention_x_ig", "occlusion", "clp"}
    with pytest.raises(CageLensError, match="unknown attribution method 'shap'.*attnlrp"):
        methods.get_method("shap")
    fn = lambda model, tokens, n_prompt: None  # noqa: E731
    assert methods.get_method(fn) is fn


@pytest.mark.parametrize("name", ["attnlrp", "cplrp", "input_x_gradient", "integrated_gradients", "attention", "occlusion", "clp"])
def test_shape_and_causality(name):
    model, tokens, P = setup()
    options = {"attention": {}, "integrated_gradients": {"steps": 4, "chunk_size": 16}}.get(name, {"chunk_size": 16})
    table = methods.METHODS[name](model, tokens, P, **options)
    Y, T = len(COMPLETION), tokens.shape[1]
    assert table.shape == (Y, T) and torch.isfinite(table).all()
    for t in range(Y):
        assert (table[t, P + t :] == 0).all()
        assert table[t, : P + t].abs().sum() > 0


def test_integrated_gradients_completeness():
    """Σ_j IG = f(x) − f(baseline) with the token embeddings replaced by the EOS embedding."""
    model, tokens, P = setup()
    table = methods.integrated_gradients(model, tokens, P, steps=20, chunk_size=64)
    eos = methods.eos_id(model)
    x0 = model.W_E[eos].detach()
    for t in range(len(COMPLETION)):
        target = int(tokens[0, P + t])
        f_x = _logprob(model, tokens, P + t)[target]
        f_0 = _logprob(model, tokens, P + t, lambda x, hook: x0.expand_as(x).clone())[target]
        assert float(table[t].sum()) == pytest.approx(float(f_x - f_0), rel=1e-4, abs=1e-6)


def test_attention_is_mean_pattern_row():
    model, tokens, P = setup()
    table = methods.attention(model, tokens, P)
    _, cache = model.run_with_cache(tokens)
    mean = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(2)]).mean((0, 1)).double()
    for t in range(len(COMPLETION)):
        torch.testing.assert_close(table[t, : P + t], mean[P + t - 1, : P + t].cpu())
    torch.testing.assert_close(table.sum(-1), torch.ones(len(COMPLETION), dtype=torch.float64))


def test_attention_x_ig_is_the_product():
    model, tokens, P = setup()
    product = methods.attention(model, tokens, P) * methods.integrated_gradients(model, tokens, P, steps=3, chunk_size=64)
    torch.testing.assert_close(methods.attention_x_ig(model, tokens, P, steps=3, chunk_size=64), product)


def test_occlusion_and_clp_equal_per_step_loop():
    model, tokens, P = setup()
    eos = methods.eos_id(model)
    occ = methods.occlusion(model, tokens, P, chunk_size=5)
    kl = methods.clp(model, tokens, P, chunk_size=5)
    for t in (0, len(COMPLETION) - 1):
        p, target = P + t, int(tokens[0, P + t])
        clean = _logprob(model, tokens, p)
        for j in range(p):
            ablated = tokens.clone()
            ablated[0, j] = eos
            pert = _logprob(model, ablated, p)
            assert float(occ[t, j]) == pytest.approx(float(clean[target] - pert[target]), abs=1e-10)
            assert float(kl[t, j]) == pytest.approx(float((clean.exp() * (clean - pert)).sum()), abs=1e-10)
    assert (kl >= -1e-12).all()


def test_occlusion_spans_spread_uniformly():
    model, tokens, P = setup()
    spans = [(0, 3), (3, P), (P, tokens.shape[1])]
    occ = methods.occlusion(model, tokens, P, spans=spans)
    eos = methods.eos_id(model)
    ablated = tokens.clone()
    ablated[0, 0:3] = eos
    t = 1
    target = int(tokens[0, P + t])
    expected = _logprob(model, tokens, P + t)[target] - _logprob(model, ablated, P + t)[target]
    assert float(occ[t, 0:3].sum()) == pytest.approx(float(expected), abs=1e-10)
    assert occ[t, 0] == occ[t, 2]
    with pytest.raises(InputError, match="tile"):
        methods.occlusion(model, tokens, P, spans=[(0, 3), (4, tokens.shape[1])])


def test_bad_sequences():
    model, tokens, P = setup()
    with pytest.raises(InputError, match="continuation is empty"):
        methods.attnlrp(model, tokens[:, :P], P)
    with pytest.raises(InputError, match=r"\[1, T\]"):
        methods.attnlrp(model, tokens.repeat(2, 1), P)
    with pytest.raises(InputError, match="chunk_size"):
        methods.attnlrp(model, tokens, P, chunk_size=0)
    with pytest.raises(InputError, match="steps"):
        methods.integrated_gradients(model, tokens, P, steps=0)
