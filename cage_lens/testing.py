"""Random-initialised tiny models of every supported architecture family, built offline.

``random_hf_model(family)`` builds a tiny Hugging Face causal LM from the family's *real*
``transformers`` config and model classes (eager attention, eval mode, every dropout 0);
``random_model(family)`` wraps it in the TransformerLens model of the installed TL line
(``HookedTransformer`` on TL 2.x/3.x, ``TransformerBridge`` on TL 4.x) or raises
:class:`~cage_lens.errors.UnsupportedModelError` when that line has no conversion for the family.
``random_model("attn_only")`` is a TL-native attention-only model (no HF architecture is
attention-only). A word-level tokenizer ships with the package. See docs/loading.md.

Weights come from cage_lens's own seeded generator, drawn in float64 and then cast, so the same
seed gives the same weights in every dtype:

- matrices (embeddings, projections, experts, routers) ~ N(0, ``init_scale``²) — larger than HF's
  0.02 so that norms, gates, soft-caps and the softmax really bend;
- normalisation scales ~ 1 + N(0, 0.1²) (Gemma stores the scale as an offset from 1, drawn as
  N(0, 0.1²));
- biases ~ N(0, 0.1²), or exactly zero with ``biases=False`` — *every* bias, layer-norm biases
  included, which is the setting in which CP-LRP conserves relevance exactly.

The tiny configurations switch on what makes each family different:

=========== ===============================================================================
family      active features
=========== ===============================================================================
gpt2        LayerNorm, learned positions, GELU, tied embeddings
gpt_neox    parallel attention + MLP (``use_parallel_residual``), partial rotary (½ of d_head)
gptj        parallel attention + MLP, one LayerNorm per block, partial rotary (½ of d_head,
            interleaved pairs), biased unembedding
opt         learned positions with offset 2, ReLU
llama       RMSNorm, rotary, gated SiLU MLP, grouped-query attention
mistral     as llama; sliding window 4096 ≫ context 64, so it never masks anything here
mixtral     mixture of experts: 4 experts, 2 selected per token
qwen2       as llama plus q/k/v biases
qwen3       per-head q/k RMSNorm
qwen3_moe   per-head q/k RMSNorm, 4 experts, 2 selected (Qwen3-MoE has no shared expert)
gemma2      sandwich norms (pre and post around each sublayer), √d embedding scale, attention
            soft-cap 2 and final-logit soft-cap 3 (both bend at this init scale), alternating
            sliding/full layers (window 4096 ≫ context: no effect here)
gemma3      sandwich norms, per-head q/k norm, local/global layers with their two rotary bases
olmo2       post-norm (norm on each sublayer output before the residual add), q/k norm over all
            heads
olmo3       as olmo2 with sliding/full layer types (window 4096 ≫ context: no effect here)
phi3        fused qkv and gate/up projections (full rotary, as Phi-3 itself)
bloom       ALiBi, LayerNorm after the embedding
=========== ===============================================================================

Families whose real checkpoints have no biases (llama, mistral, mixtral, qwen3, qwen3_moe, gemma2,
gemma3, olmo2, olmo3, phi3) are built without bias parameters whatever ``biases`` says.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from cage_lens.errors import UnsupportedModelError
from cage_lens.loading import (
    BRIDGE_FAMILIES, HOOKED_FAMILIES, eager_kwargs, from_hf_model, has_hooked_transformer, load_tokenizer,
    unsupported_family_message,
)

__all__ = [
    "TINY_TOKENIZER_DIR", "tiny_tokenizer", "random_hf_model", "random_model", "MODEL_KINDS", "FAMILIES",
    "FAMILY_SUPPORT", "supported_families",
]

#: every architecture family ``random_hf_model`` builds
FAMILIES = (
    "gpt2", "gpt_neox", "gptj", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe",
    "gemma2", "gemma3", "olmo2", "olmo3", "phi3", "bloom",
)
#: family → TL lines with a conversion: "HookedTransformer" (TL 2.x/3.x), "TransformerBridge" (TL 4.x)
FAMILY_SUPPORT: dict[str, tuple[str, ...]] = {
    f: tuple(line for line, fams in (("HookedTransformer", HOOKED_FAMILIES), ("TransformerBridge", BRIDGE_FAMILIES))
             if f in fams)
    for f in FAMILIES
}
#: the kinds the LRP test-suite runs over (HF-backed GPT-2 and Llama, TL-native attention-only)
MODEL_KINDS = ("gpt2", "llama", "attn_only")
TINY_TOKENIZER_DIR = Path(str(resources.files("cage_lens") / "assets" / "tiny_tokenizer"))

_NORM_STD = 0.1
_BIAS_STD = 0.1
_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=3)  # the tiny tokenizer's specials
_NO_EFFECT_WINDOW = 4096  # sliding windows far longer than any context used here


def tiny_tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def supported_families() -> tuple[str, ...]:
    """The families the installed TL line can load."""
    return HOOKED_FAMILIES if has_hooked_transformer() else BRIDGE_FAMILIES


def _family_config(family: str, *, n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab, n_ctx, biases):
    """The family's ``transformers`` config at tiny size (dropouts 0)."""
    import transformers

    d_head = d_model // n_heads
    dense = d_mlp or 4 * d_model  # non-gated MLPs
    gated = d_mlp or 2 * d_model  # gated MLPs and experts
    rms = dict(
        vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, intermediate_size=gated, max_position_embeddings=n_ctx,
        tie_word_embeddings=False, attention_dropout=0.0, **_TOKEN_IDS,
    )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=dense,
            activation_function="gelu_new", attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, **_TOKEN_IDS,
        )
    if family == "gpt_neox":
        # Pythia rotates ¼ of each head; ½ here, so that d_head 8 keeps two frequencies
        return transformers.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=dense, hidden_act="gelu", max_position_embeddings=n_ctx, rotary_pct=0.5,
            use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False,
            attention_bias=True, **_TOKEN_IDS,
        )
    if family == "gptj":
        return transformers.GPTJConfig(
            vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            rotary_dim=d_head // 2, n_inner=dense, activation_function="gelu_new", resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, **_TOKEN_IDS,
        )
    if family == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, ffn_dim=dense,
            num_attention_heads=n_heads, max_position_embeddings=n_ctx, word_embed_proj_dim=d_model,
            do_layer_norm_before=True, activation_function="relu", dropout=0.0, attention_dropout=0.0,
            layerdrop=0.0, enable_bias=True, **_TOKEN_IDS,
        )
    if family == "llama":
        return transformers.LlamaConfig(**rms, attention_bias=False, mlp_bias=False)
    if family == "mistral":
        return transformers.MistralConfig(**rms, sliding_window=_NO_EFFECT_WINDOW)
    if family == "mixtral":
        return transformers.MixtralConfig(**rms, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    if family == "qwen2":
        return transformers.Qwen2Config(**rms, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**rms, head_dim=d_head, attention_bias=False, use_sliding_window=False)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **dict(rms, intermediate_size=gated), head_dim=d_head, attention_bias=False, use_sliding_window=False,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=gated, decoder_sparse_step=1,
            norm_topk_prob=True,
        )
    if family == "gemma2":
        return transformers.Gemma2Config(
            **dict(rms, tie_word_embeddings=True), head_dim=d_head, query_pre_attn_scalar=d_head,
            hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            sliding_window=_NO_EFFECT_WINDOW, layer_types=alternating,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **dict(rms, tie_word_embeddings=True), head_dim=d_head, query_pre_attn_scalar=d_head,
            hidden_activation="gelu_pytorch_tanh", sliding_window=_NO_EFFECT_WINDOW, layer_types=alternating,
        )
    if family == "olmo2":
        return transformers.Olmo2Config(**rms)
    if family == "olmo3":
        return transformers.Olmo3Config(**rms, sliding_window=_NO_EFFECT_WINDOW, layer_types=alternating)
    if family == "phi3":
        return transformers.Phi3Config(
            **rms, original_max_position_embeddings=n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, sliding_window=None,
        )
    if family == "bloom":
        if d_mlp is not None and d_mlp != 4 * d_model:
            raise ValueError(f"Bloom's MLP width is fixed at 4 * d_model = {4 * d_model}; got d_mlp={d_mlp}")
        return transformers.BloomConfig(
            vocab_size=vocab, hidden_size=d_model, n_layer=n_layers, n_head=n_heads, hidden_dropout=0.0,
            attention_dropout=0.0, **_TOKEN_IDS,
        )
    raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _draw_weights(model: torch.nn.Module, *, seed: int, init_scale: float, biases: bool) -> None:
    """Overwrite every parameter with draws from a float64 generator seeded with ``seed`` (see the
    module docstring for the distributions); the order of draws is the module order."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:  # tied embeddings
                    continue
                seen.add(id(p))
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                if name in ("bias", "b") or name.startswith("b_") or name.endswith("_bias"):
                    value = noise * _BIAS_STD if biases else torch.zeros_like(noise)
                elif _is_norm(module):
                    # Gemma's RMSNorm multiplies by (1 + weight)
                    centre = 0.0 if type(module).__name__.startswith("Gemma") else 1.0
                    value = centre + noise * _NORM_STD
                elif p.ndim >= 2:
                    value = noise * init_scale
                else:
                    raise RuntimeError(f"no initialisation rule for parameter {module_name}.{name} {tuple(p.shape)}")
                p.copy_(value)


def random_hf_model(
    family: str = "gpt2", *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
    d_mlp: int | None = None, d_vocab: int | None = None, n_ctx: int = 64, biases: bool = True,
    dtype: torch.dtype = torch.float64, seed: int = 0, init_scale: float = 0.2, **overrides,
):
    """A random tiny Hugging Face causal LM of ``family`` (one of :data:`FAMILIES`), in eval mode.

    ``n_kv_heads`` applies to families with grouped-query attention; ``d_mlp`` defaults to
    4·d_model for plain MLPs and 2·d_model for gated MLPs and experts; ``overrides`` are passed to
    the ``transformers`` config (e.g. ``rotary_pct=0.25``). The global torch RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    config = _family_config(
        family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_mlp=d_mlp,
        vocab=d_vocab or len(tiny_tokenizer()), n_ctx=n_ctx, biases=biases,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, **eager_kwargs())
    model = model.to(dtype).eval()
    _draw_weights(model, seed=seed, init_scale=init_scale, biases=biases)
    return model


def _random_attn_only(n_layers, d_model, n_heads, d_vocab, n_ctx, biases, dtype, seed, init_scale):
    tokenizer = tiny_tokenizer()
    vocab = d_vocab or len(tokenizer)
    fields = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads, d_vocab=vocab,
        n_ctx=n_ctx, attn_only=True, normalization_type="LN", positional_embedding_type="standard",
        act_fn="gelu", seed=seed, dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):
        if has_hooked_transformer():
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            model = HookedTransformer(HookedTransformerConfig(**fields, d_mlp=None), tokenizer=tokenizer)
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(dict(fields, d_mlp=4 * d_model), tokenizer=tokenizer, device="cpu",
                                                  dtype=dtype)
    torch.nn.Module.to(model, dtype)  # (TL's own .to prints a notice)
    _draw_weights(model, seed=seed, init_scale=init_scale, biases=biases)
    return model.eval()


def random_model(
    family: str = "gpt2", *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
    d_mlp: int | None = None, d_vocab: int | None = None, n_ctx: int = 64, biases: bool = True,
    dtype: torch.dtype = torch.float64, seed: int = 0, init_scale: float = 0.2, **overrides,
):
    """A random tiny TL model of ``family`` (one of :data:`FAMILIES` or ``"attn_only"``) on the
    installed TL line; :class:`UnsupportedModelError` when the line has no conversion for it.

    ``biases=False`` zeroes every bias (the setting in which CP-LRP conserves relevance exactly)."""
    if family == "attn_only":
        return _random_attn_only(n_layers, d_model, n_heads, d_vocab, n_ctx, biases, dtype, seed, init_scale)
    if family in FAMILIES and family not in supported_families():
        raise UnsupportedModelError(unsupported_family_message(family))
    hf = random_hf_model(
        family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_mlp=d_mlp,
        d_vocab=d_vocab, n_ctx=n_ctx, biases=biases, dtype=dtype, seed=seed, init_scale=init_scale, **overrides,
    )
    return from_hf_model(hf, tiny_tokenizer(), name=str(TINY_TOKENIZER_DIR))
