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
from cage_lens.generation import methods
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
        methods.attnlrp(model, model.to_tokens(PROMPT), 3)
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


# ---------------------------------------------------------------------------- a certificate that follows the model
@pytest.fixture
def certifications(monkeypatch):
    """How many times the identity was checked."""
    count = [0]
    real = C._certify

    def counting(adapter):
        count[0] += 1
        return real(adapter)

    monkeypatch.setattr(C, "_certify", counting)
    return count


def test_a_hook_added_after_the_first_call_is_certified_again(certifications):
    """A permanent ``tanh`` on ``blocks.1.hook_resid_pre`` added after a first call made CP-LRP on a
    bias-free model leak most of the target silently (the certificate was cached on the model): now the
    next call certifies the changed model once and refuses it, and removing the hook makes it exact again."""
    model = fresh(biases=False)
    first = cage_lens.attribute(model, PROMPT, target=5, rules="cplrp")
    assert first.conservation.max_error() < 1e-12 and certifications[0] == 1
    model.add_perma_hook("blocks.1.hook_resid_pre", lambda t, hook: torch.tanh(t))
    with pytest.raises(UnsupportedModelError, match=r"not conserved between blocks\.0\.hook_resid_post and "
                                                   r"blocks\.1\.hook_resid_pre .*strict=False"):
        cage_lens.attribute(model, PROMPT, target=5, rules="cplrp")
    with pytest.warns(UserWarning, match="uncertified model"):
        leaky = cage_lens.attribute(model, PROMPT, target=5, rules="cplrp", strict=False)
    assert certifications[0] == 2  # once per change, not once per call
    share = float(leaky.conservation.input_share()[0])
    assert abs(share - 1) > 0.1 and "uncertified model" in leaky.meta["warnings"][0]  # what used to come back silently
    model.reset_hooks(including_permanent=True)
    again = cage_lens.attribute(model, PROMPT, target=5, rules="cplrp")
    assert certifications[0] == 3 and torch.equal(again.token_relevance, first.token_relevance)
    assert hook_count(model) == 0


def _replace(model, old, new) -> None:
    """Put ``new`` wherever the module tree holds ``old`` (a bridge holds its components twice: as
    ``blocks.1.ln2`` and inside the Hugging Face block it runs)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def test_what_the_certificate_watches(certifications):
    """Module tree, hooks on any module, a replaced forward, dtype: each change certifies once; a call's
    own hooks, other calls and parameter values (the identity holds for any weights) do not."""
    model = fresh(biases=False)
    cage_lens.attribute(model, PROMPT, target=5)
    cage_lens.circuit_graph(model, PROMPT, 5)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    cage_lens.attribute(model, PROMPT, target=5)
    assert certifications[0] == 1
    handle = model.blocks[0].mlp.register_forward_hook(lambda module, args, out: out * 2)  # linear: still certified
    cage_lens.attribute(model, PROMPT, target=5)
    assert certifications[0] == 2
    handle.remove()
    ln = model.blocks[1].ln2
    _replace(model, ln, torch.nn.Tanh())  # a module replaced by one no rule covers: the sites are read again
    with pytest.raises(UnsupportedModelError, match=r"not conserved between blocks\.1\.hook_resid_mid"):
        cage_lens.attribute(model, PROMPT, target=5)
    _replace(model, model.blocks[1].ln2, ln)
    cage_lens.attribute(model, PROMPT, target=5)
    assert adapt(model).input_norm(1, "mlp").module is ln and certifications[0] == 4
    point = model.hook_dict["blocks.1.hook_mlp_out"]
    point.forward = torch.tanh  # a forward replaced on the instance
    with pytest.raises(UnsupportedModelError, match="not conserved"):
        cage_lens.attribute(model, PROMPT, target=5)
    del point.forward
    cage_lens.attribute(model, PROMPT, target=5)
    assert certifications[0] == 6
    model.to(torch.float32)
    assert certify(adapt(model)).dtype == "torch.float32" and certify(adapt(model)).tolerance == 1e-4
    assert certifications[0] == 7


def test_the_state_leaves_out_a_calls_own_hooks():
    model = fresh()
    cage_lens.attribute(model, PROMPT, target=5)  # a bridge wires some hooks of its own in its first forward
    adapter = adapt(model)
    state = adapter.current_state()
    with cage_lens.lrp(model, "attnlrp"):  # the rule hooks of an active block are cage_lens's own
        assert adapt(model).current_state() == state
    model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda t, hook: t, is_permanent=True)
    assert adapter.current_state() != state
