"""Model adapter and hook probe: architecture discovery and hooks that exist and fire, on both TL versions."""

from __future__ import annotations

import gc
import weakref

import pytest

import cage_lens

from cage_lens.core.adapter import adapt
from cage_lens.core.hooks import fired_hooks, has_position_embedding
from cage_lens.loading import has_hooked_transformer
from cage_lens.testing import random_model
from conftest import cached_model

EXPECTED = {
    "gpt2": dict(normalization="LN", positional="standard", gated_mlp=False, attn_only=False, n_kv_heads=4),
    "llama": dict(normalization="RMS", positional="rotary", gated_mlp=True, attn_only=False, n_kv_heads=2),
    "attn_only": dict(normalization="LN", positional="standard", gated_mlp=False, attn_only=True, n_kv_heads=4),
}


def test_architecture_is_discovered(kind):
    arch = adapt(cached_model(kind)).arch
    for field, value in EXPECTED[kind].items():
        assert getattr(arch, field) == value, field
    assert (arch.n_layers, arch.n_heads, arch.d_model, arch.d_head) == (2, 4, 32, 8)
    assert arch.grouped_query == (kind == "llama")
    assert arch.is_bridge == (not has_hooked_transformer())
    assert ("attention-only" in arch.describe()) == (kind == "attn_only")


def test_fired_hooks(kind):
    adapter = adapt(cached_model(kind))
    fired = fired_hooks(adapter)
    assert set(adapter.required_hooks()) <= fired
    # rotary models list hook_pos_embed on some TL versions but it never fires (docs/architectures.md#transformerlens-facts)
    assert has_position_embedding(adapter) == (kind != "llama")
    resid = adapter.resid_hooks()
    assert resid[0] == "blocks.0.hook_resid_pre" and resid[-1] == "blocks.1.hook_resid_post"
    assert ("blocks.0.hook_resid_mid" in resid) == (kind != "attn_only")


def test_adapters_of_one_model_share_their_caches_and_the_registry_keeps_no_model_alive():
    m = cached_model("gpt2")
    assert adapt(m).__dict__ is adapt(m).__dict__ and adapt(adapt(m)).__dict__ is adapt(m).__dict__
    assert adapt(m).model is m and "model" not in adapt(m).__dict__  # the shared caches never refer to the model
    model = random_model("gpt2", n_layers=1)
    cage_lens.attribute(model, "the cat sat", target=5)
    held, gone = adapt(model), weakref.ref(model)
    del model
    gc.collect()
    assert gone() is not None and held.certificate.passed  # an adapter keeps its model alive …
    del held
    gc.collect()
    assert gone() is None  # … the registry does not (its entry goes with the model)


def test_silent_hook_is_an_error(monkeypatch):
    from cage_lens.core.adapter import ModelAdapter
    from cage_lens.errors import UnsupportedModelError

    adapter = ModelAdapter(cached_model("llama"))
    monkeypatch.setattr(ModelAdapter, "required_hooks", lambda self: ["hook_embed", "hook_pos_embed"])
    with pytest.raises(UnsupportedModelError, match="never fire"):
        fired_hooks(adapter)
