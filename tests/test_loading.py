"""Model families on the installed TL line: TL logits equal HF logits, clear refusals, seeded weights.

Runs in both venvs: on TL 2.18 over the families with a HookedTransformer conversion, on TL 4.x over
all of them; the families a line cannot load must raise ``UnsupportedModelError`` (tested apart,
never skipped).
"""

from __future__ import annotations

import functools

import pytest
import torch

from cage_lens import UnsupportedModelError
from cage_lens.loading import from_hf_model, has_hooked_transformer
from cage_lens.testing import (
    FAMILIES, FAMILY_SUPPORT, random_hf_model, random_model, supported_families, tiny_tokenizer,
)

HOOKED = has_hooked_transformer()
LINE = "HookedTransformer" if HOOKED else "TransformerBridge"
TOKENS = torch.tensor([[0, 5, 9, 17, 33, 40, 7, 2, 11, 60, 8, 9, 4, 71, 23, 5]])

# Relative max-abs error of TL logits against HF logits, float64. Exact agreement (1e-12) where both
# compute in float64. Hugging Face computes the attention softmax in float32 for every family but
# GPT-2 (eager_attention_forward: softmax(..., dtype=torch.float32)), and RMSNorm and the rotary
# tables in float32, even in a float64 model; HookedTransformer computes them in float64, and so does
# the bridge's own joint-QKV attention (GPT-NeoX, Phi-3). Those pairs agree to float32 rounding
# (measured ≤ 3e-7), so they get 1e-6; a wrong mapping (eps, rotary dim, scale, cap) is ≥ 1e-5 off.
FLOAT32_IN_HF = 1e-6
EXACT = 1e-12
if HOOKED:
    TOLERANCE = {f: FLOAT32_IN_HF for f in FAMILIES} | {"gpt2": EXACT}
else:
    TOLERANCE = {f: EXACT for f in FAMILIES} | {"gpt_neox": FLOAT32_IN_HF, "phi3": FLOAT32_IN_HF}


@functools.lru_cache(maxsize=None)
def _pair(family: str, biases: bool = True):
    hf = random_hf_model(family, biases=biases)
    return hf, from_hf_model(hf, tiny_tokenizer())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_family_table_matches_the_line():
    # TL 2.18 has no HookedTransformer conversion for OLMo-2/3 or Qwen3-MoE; the bridge loads all
    expected = set(FAMILIES) - {"olmo2", "olmo3", "qwen3_moe"} if HOOKED else set(FAMILIES)
    assert set(supported_families()) == expected
    assert {f for f, lines in FAMILY_SUPPORT.items() if LINE in lines} == expected
    assert all("TransformerBridge" in lines for lines in FAMILY_SUPPORT.values())


@pytest.mark.parametrize("family", supported_families())
def test_tl_logits_equal_hf_logits(family):
    hf, model = _pair(family)
    assert model.cfg.dtype == torch.float64
    with torch.no_grad():
        hf_logits = hf(TOKENS).logits
        tl_logits = model(TOKENS)
    assert tl_logits.shape == hf_logits.shape
    assert _rel(tl_logits, hf_logits) <= TOLERANCE[family], _rel(tl_logits, hf_logits)


def test_unsupported_families_raise_naming_family_and_way_out():
    unsupported = [f for f in FAMILIES if f not in supported_families()]
    assert bool(unsupported) == HOOKED
    for family in unsupported:
        with pytest.raises(UnsupportedModelError, match=rf"TransformerLens 2\.18.* {family}; use TransformerLens >= 4"):
            random_model(family)
        with pytest.raises(UnsupportedModelError, match=family):
            from_hf_model(random_hf_model(family), tiny_tokenizer())


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_in_every_dtype(family):
    wide = random_hf_model(family, dtype=torch.float64, seed=4).state_dict()
    narrow = random_hf_model(family, dtype=torch.float32, seed=4).state_dict()
    other = random_hf_model(family, dtype=torch.float64, seed=5).state_dict()
    assert wide.keys() == narrow.keys()
    for name, w in wide.items():
        if w.is_floating_point() and w.ndim >= 2:  # every matrix: identical draws, cast
            assert torch.equal(w.to(torch.float32), narrow[name]), name
            assert not torch.equal(w, other[name]), name


def test_same_seed_same_weights_in_tl_models():
    for family in ("gpt2", "attn_only"):
        wide = random_model(family, dtype=torch.float64, seed=2).state_dict()
        narrow = random_model(family, dtype=torch.float32, seed=2).state_dict()
        params = [k for k, v in wide.items() if v.is_floating_point() and v.ndim >= 2 and "mask" not in k.lower()]
        assert params
        for k in params:
            assert torch.equal(wide[k].to(torch.float32), narrow[k]), (family, k)


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_free_means_every_bias_zero(family):
    with_biases = random_hf_model(family, biases=True)
    free = random_hf_model(family, biases=False)
    bias_names = [n for n, _ in free.named_parameters() if n.endswith("bias")]
    assert all(not p.any() for n, p in free.named_parameters() if n.endswith("bias"))
    # the same matrices either way: only the biases change
    wide = dict(with_biases.named_parameters())
    assert all(torch.equal(p, wide[n]) for n, p in free.named_parameters() if not n.endswith("bias"))
    if bias_names:
        assert any(wide[n].any() for n in bias_names)


def test_bias_free_tl_model_has_zero_biases():
    for family in supported_families():
        if family in ("gpt2", "gpt_neox", "opt", "bloom", "gptj", "qwen2"):
            _, model = _pair(family, biases=False)
            biases = {n: p for n, p in model.named_parameters() if n.split(".")[-1].startswith("b") or "bias" in n}
            assert biases and all(not p.any() for p in biases.values()), family


def test_gemma2_soft_caps_bend():
    """Both caps change the output at this init scale (a cap that never bends tests nothing)."""
    hf = random_hf_model("gemma2")
    with torch.no_grad():
        capped = hf(TOKENS).logits
        hf.config.final_logit_softcapping = None
        no_final_cap = hf(TOKENS).logits
        hf.config.attn_logit_softcapping = None
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        no_caps = hf(TOKENS).logits
    assert capped.abs().max() < 3.0 < no_final_cap.abs().max()
    assert _rel(no_caps, no_final_cap) > 1e-2


def test_moe_selects_two_of_four_experts():
    for family in ("mixtral", "qwen3_moe"):
        hf = random_hf_model(family)
        cfg = hf.config
        assert (getattr(cfg, "num_local_experts", None) or cfg.num_experts) == 4 and cfg.num_experts_per_tok == 2


def test_random_hf_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_hf_model("llama")
    assert torch.equal(torch.rand(3), expected)
