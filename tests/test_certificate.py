"""The completeness certificate turns a missing rule into a refusal naming where relevance leaks
(docs/rules.md#completeness-certificate): never numbers for a model the rules do not cover."""

from __future__ import annotations

import pytest
import torch

import cage_lens
from cage_lens.core import certificate as C
from cage_lens.core import realise as R
from cage_lens.core.adapter import adapt
from cage_lens.core.certificate import certify
from cage_lens.circuit.builder import circuit_graph
from cage_lens.errors import UnsupportedModelError
from cage_lens.loading import has_hooked_transformer
from cage_lens.testing import random_model, supported_families
from conftest import hook_count

PROMPT = "the cat sat on the mat"


def fresh(family: str = "gpt2", **kwargs):
    """A new model: the certificate is cached per model."""
    return random_model(family, n_layers=2, **kwargs)


def test_certificate_is_computed_once_per_model_and_reports_its_cost():
    model = fresh("llama")
    cert = certify(adapt(model))
    assert cert.passed and cert.reason == "certified" and cert.seconds > 0
    assert certify(adapt(model)) is cert
    assert set(cert.errors) == {"embeddings", *adapt(model).resid_hooks()}


def test_float32_models_are_certified_at_float32_precision():
    cert = certify(adapt(fresh("llama", dtype=torch.float32)))
    assert cert.passed and cert.tolerance == 1e-4 and cert.max_error < 1e-5


def _leaky(model):
    """An extra non-linearity on the second MLP's output that no rule knows about (a permanent hook,
    as a user or a library might add)."""
    model.add_perma_hook("blocks.1.hook_mlp_out", lambda t, hook: t + 0.5 * torch.tanh(t))
    return model


def test_an_unknown_non_linearity_is_refused_with_its_place():
    model = _leaky(fresh())
    with pytest.raises(UnsupportedModelError, match=r"not conserved between blocks\.1\.hook_resid_mid and "
                                                   r"blocks\.1\.hook_resid_post.*strict=False"):
        cage_lens.attribute(model, PROMPT)
    with pytest.raises(UnsupportedModelError, match="not conserved"):
        circuit_graph(model, PROMPT, 5)
    with pytest.raises(UnsupportedModelError, match="not conserved"):
        with cage_lens.lrp(model):
            pass
    with pytest.raises(UnsupportedModelError, match="not conserved"):
        cage_lens.generation.methods.attnlrp(model, model.to_tokens(PROMPT), 3)
    model.reset_hooks(including_permanent=True)


def test_strict_false_computes_and_records_the_warning():
    model = _leaky(fresh())
    with pytest.warns(UserWarning, match="uncertified model"):
        a = cage_lens.attribute(model, PROMPT, target=5, strict=False)
    assert "between blocks.1.hook_resid_mid" in a.meta["warnings"][0]
    with pytest.warns(UserWarning):
        graph = circuit_graph(model, PROMPT, 5, strict=False)
    assert graph.settings["warnings"] == a.meta["warnings"]
    model.reset_hooks(including_permanent=True)
    assert hook_count(model) == 0


@pytest.mark.parametrize("missing", ["norms", "activations"])
def test_a_missing_rule_is_caught(monkeypatch, missing):
    """Were a rule forgotten in the realisation, the certificate would refuse the model."""
    if missing == "norms":
        monkeypatch.setattr(R, "_norm_hooks", lambda adapter: [])
        where = r"between blocks\.0\.hook_resid_pre and blocks\.0\.hook_resid_mid \(and 4 later segments\)"
    else:
        monkeypatch.setattr(R, "_mlp_hooks", lambda mlp, rules: [])
        where = r"between blocks\.0\.hook_resid_mid and blocks\.0\.hook_resid_post \(and 1 later segment\)"
    with pytest.raises(UnsupportedModelError, match=where):
        cage_lens.attribute(fresh(), PROMPT)


@pytest.mark.skipif("gemma2" not in supported_families(), reason="no Gemma-2 conversion on this TL line")
def test_a_missing_soft_cap_rule_is_caught(monkeypatch):
    monkeypatch.setattr(R, "_logit_softcap_hooks", lambda adapter, cap: [])
    with pytest.raises(UnsupportedModelError, match="between blocks.1.hook_resid_post and the logits"):
        cage_lens.attribute(fresh("gemma2"), PROMPT)


def test_an_unknown_mlp_type_is_refused_by_name():
    model = fresh()
    mlp = model.blocks[0].mlp
    if has_hooked_transformer():
        mlp.__class__ = type("SwiGLUVariant", (type(mlp),), {})
        match = "blocks.0.mlp is a SwiGLUVariant, which has no LRP rule here"
    else:
        inner = mlp.original_component
        act_name = next(n for n, m in inner.named_children() if "Activation" in type(m).__name__)
        setattr(inner, act_name, type("StrangeActivation", (torch.nn.Module,), {"forward": lambda self, x: x * torch.sin(x)})())
        match = "no single element-wise activation module cage_lens knows"
    with pytest.raises(UnsupportedModelError, match=match):
        cage_lens.attribute(model, PROMPT)


def test_an_unrecognised_norm_is_refused_by_name():
    model = fresh()
    model.blocks[0].add_module("qk_scalenorming", type("ScaleNormalizer", (torch.nn.Module,), {})())
    cert = certify(adapt(model))
    assert not cert.passed
    assert "qk_scalenorming (ScaleNormalizer) looks like a normalisation but carries no identity rule" in cert.reason
    with pytest.raises(UnsupportedModelError, match="ScaleNormalizer"):
        cage_lens.attribute(model, PROMPT)


@pytest.mark.skipif(has_hooked_transformer(), reason="bridge components exist on TransformerBridge only")
def test_an_unknown_bridge_component_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(C, "KNOWN_BRIDGE_COMPONENTS", C.KNOWN_BRIDGE_COMPONENTS - {"MLPBridge"})
    with pytest.raises(UnsupportedModelError, match="is a MLPBridge, a TransformerLens component cage_lens has no LRP rule"):
        cage_lens.attribute(fresh(), PROMPT)
