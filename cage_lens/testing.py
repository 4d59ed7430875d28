"""Random-initialised tiny TransformerLens models, built offline, for tests, benchmarks and teaching.

``random_model("gpt2" | "llama" | "attn_only", ...)`` returns a ``HookedTransformer`` on TL 2.x/3.x
and a ``TransformerBridge`` on TL 4.x. GPT-2 and Llama models are HF-backed (built from a
``transformers`` config, so the same weights can be handed to LXT); the attention-only model is
TL-native (no HF architecture is attention-only). A word-level tokenizer ships with the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from cage_lens.loading import from_hf_model, has_hooked_transformer, load_tokenizer

__all__ = ["TINY_TOKENIZER_DIR", "tiny_tokenizer", "random_hf_model", "random_model", "MODEL_KINDS"]

MODEL_KINDS = ("gpt2", "llama", "attn_only")
TINY_TOKENIZER_DIR = Path(str(resources.files("cage_lens") / "assets" / "tiny_tokenizer"))


def tiny_tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def _randomize_biases(model: torch.nn.Module, scale: float, biases: bool, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.split(".")[-1].startswith("b_"):
                if biases:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
                else:
                    p.zero_()


def random_hf_model(
    kind: str = "gpt2", *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
    d_mlp: int | None = None, d_vocab: int | None = None, n_ctx: int = 64, biases: bool = True,
    dtype: torch.dtype = torch.float64, seed: int = 0, init_scale: float = 0.2,
):
    """A random Hugging Face causal LM (``GPT2LMHeadModel`` or ``LlamaForCausalLM``) in eval mode.

    ``init_scale`` is the std of the weights (larger than HF's 0.02 so that non-linearities and the
    softmax actually bend). Llama models never have biases (TL's Llama conversion ignores them)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = d_vocab or len(tiny_tokenizer())
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=n_ctx, n_ctx=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            n_inner=d_mlp, initializer_range=init_scale, bos_token_id=0, eos_token_id=1,
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, max_position_embeddings=n_ctx, hidden_size=d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, intermediate_size=d_mlp or 2 * d_model,
            initializer_range=init_scale, bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        biases = False
    else:
        raise ValueError(f"no Hugging Face architecture for kind {kind!r}; choose gpt2 or llama")
    model.config._attn_implementation = "eager"
    model = model.to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize_biases(model, 0.1, biases, generator)
    if biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    return model


def _random_attn_only(n_layers, d_model, n_heads, d_vocab, n_ctx, biases, dtype, seed, init_scale):
    tokenizer = tiny_tokenizer()
    vocab = d_vocab or len(tokenizer)
    fields = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads, d_vocab=vocab,
        n_ctx=n_ctx, attn_only=True, normalization_type="LN", positional_embedding_type="standard",
        act_fn="gelu", seed=seed, dtype=dtype,
    )
    torch.manual_seed(seed)
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**fields, d_mlp=None, initializer_range=init_scale), tokenizer=tokenizer)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(dict(fields, d_mlp=4 * d_model), tokenizer=tokenizer, device="cpu", dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, init_scale)
    model = model.to(dtype) if hasattr(model, "to") else model
    _randomize_biases(model, 0.1, biases, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def random_model(
    kind: str = "gpt2", *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv_heads: int = 2,
    d_mlp: int | None = None, d_vocab: int | None = None, n_ctx: int = 64, biases: bool = True,
    dtype: torch.dtype = torch.float64, seed: int = 0, init_scale: float = 0.2,
):
    """A random tiny TL model of ``kind`` in {"gpt2", "llama", "attn_only"} on this TL version.

    ``biases=False`` zeroes every bias (the setting in which CP-LRP conserves relevance exactly)."""
    if kind == "attn_only":
        return _random_attn_only(n_layers, d_model, n_heads, d_vocab, n_ctx, biases, dtype, seed, init_scale)
    hf = random_hf_model(
        kind, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_mlp=d_mlp,
        d_vocab=d_vocab, n_ctx=n_ctx, biases=biases, dtype=dtype, seed=seed, init_scale=init_scale,
    )
    return from_hf_model(hf, tiny_tokenizer(), name=str(TINY_TOKENIZER_DIR))
