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
    FAMILIES, FAMILY_SUPPORT, FLOAT32_AGREEMENT, logits_tolerance, random_hf_model, random_model, supported_families, tiny_tokenizer,
)

HOOKED = has_hooked_transformer()
LINE = "HookedTransformer" if HOOKED else "TransformerBridge"
TOKENS = torch.tensor([[0, 5, 9, 17, 33, 40, 7, 2, 11, 60, 8, 9, 4, 71, 23, 5]])

# tolerances per family and line, with their reason: cage_lens.testing.logits_tolerance
TOLERANCE = {f: logits_tolerance(f) for f in FAMILIES}


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


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}


def test_llama3_rotary_scaling_is_reproduced():
    scaled = random_hf_model("llama", rope_scaling=LLAMA3_ROPE)
    plain = random_hf_model("llama")
    model = from_hf_model(scaled, tiny_tokenizer())
    with torch.no_grad():
        hf_logits, tl_logits, plain_logits = scaled(TOKENS).logits, model(TOKENS), plain(TOKENS).logits
    assert _rel(plain_logits, hf_logits) > 1e-2  # the scaling changes these 16 positions
    assert _rel(tl_logits, hf_logits) <= logits_tolerance("llama"), _rel(tl_logits, hf_logits)


def test_config_the_hooked_conversion_cannot_reproduce_is_refused():
    hf = random_hf_model("qwen2", rope_scaling={"rope_type": "linear", "factor": 2.0})
    if HOOKED:
        with pytest.raises(UnsupportedModelError, match=r"qwen2 model uses rotary scaling 'linear'.*TransformerLens >= 4"):
            from_hf_model(hf, tiny_tokenizer())
    else:
        with torch.no_grad():
            assert _rel(from_hf_model(hf, tiny_tokenizer())(TOKENS), hf(TOKENS).logits) <= logits_tolerance("qwen2")


def test_random_models_prepend_bos_on_every_line():
    for family in ("gpt_neox", "qwen2", "bloom"):
        assert random_model(family).to_str_tokens("the cat")[0] == "<bos>", family


def test_random_hf_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_hf_model("llama")
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------- local HF directories
def _save(family: str, directory, **kwargs):
    import shutil

    from cage_lens.testing import TINY_TOKENIZER_DIR

    hf = random_hf_model(family, **kwargs)
    hf.save_pretrained(str(directory))
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy(file, directory)
    return hf


@pytest.mark.parametrize("family", supported_families())
def test_load_hf_directory_equals_the_saved_model(family, tmp_path):
    from cage_lens.loading import load_hf_directory

    from transformers import AutoModelForCausalLM

    from cage_lens.loading import eager_kwargs

    saved = _save(family, tmp_path)
    model = load_hf_directory(tmp_path, dtype=torch.float64)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64, **eager_kwargs()).eval()
    with torch.no_grad():
        hf_logits = reloaded(TOKENS).logits
        tl_logits = model(TOKENS)
        saved_logits = saved(TOKENS).logits
    assert _rel(tl_logits, hf_logits) <= TOLERANCE[family], _rel(tl_logits, hf_logits)
    # the weights come back; non-persistent buffers (GPT-J's sine table) are recomputed on load in
    # float32, so the reloaded model agrees with the saved one to float32 rounding only
    assert _rel(hf_logits, saved_logits) <= FLOAT32_AGREEMENT, _rel(hf_logits, saved_logits)


def test_load_hf_directory_refuses_unsupported_family_on_this_line(tmp_path):
    from cage_lens.loading import load_hf_directory

    if HOOKED:
        _save("olmo2", tmp_path)
        with pytest.raises(UnsupportedModelError, match="no HookedTransformer conversion for olmo2"):
            load_hf_directory(tmp_path)
    else:
        assert "olmo2" in supported_families()


@pytest.mark.parametrize("change,message", [
    ({"intermediate_size": 48}, r"model\.layers\.0\.mlp\.\w+_proj\.weight is \(\d+, \d+\) in the weights but config\.json makes it"),
    ({"num_hidden_layers": 3}, r"lack 9 parameter\(s\) .*first: model\.layers\.2\."),
    # a 2-layer checkpoint read as 1 layer: the second layer's weights would be dropped silently
    ({"num_hidden_layers": 1}, r"hold 9 parameter\(s\) that config\.json does not use \(first: model\.layers\.1\..*ignore them"),
])
def test_load_hf_directory_refuses_config_weight_mismatch_in_one_line(tmp_path, change, message):
    import json

    from cage_lens import CageLensError
    from cage_lens.loading import load_hf_directory

    _save("llama", tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(CageLensError, match=message) as caught:
        load_hf_directory(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_gpt2_checkpoint_with_more_layers_than_its_config_is_refused(tmp_path):
    """A 3-layer GPT-2 checkpoint whose config.json says 2 layers loaded as a different 2-layer model
    (logits off by O(1)); the unused weights are now refused. (transformers 4 reports the 12 parameters of
    the third block; transformers 5 leaves c_attn.bias out of its report, matching it against GPT-2's list of
    keys that old checkpoints carry harmlessly.)"""
    import json

    from cage_lens import CageLensError
    from cage_lens.loading import load_hf_directory

    _save("gpt2", tmp_path, n_layers=3, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_layer=2)))
    with pytest.raises(CageLensError, match=r"hold 1[12] parameter\(s\) that config\.json does not use \(first: transformer\.h\.2\."):
        load_hf_directory(tmp_path)
