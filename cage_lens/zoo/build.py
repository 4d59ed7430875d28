"""Tokenizers, model configurations and HF-directory writing for the zoo (used by scripts/train_zoo.py).

A zoo model directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``zoo.json``; it loads with transformers 4.57 and 5.x alike (the
config is rewritten with the keys both versions understand, the tokenizer files are hand-written).
"""

from __future__ import annotations

import json
from pathlib import Path

from cage_lens.zoo.tasks import SPECIAL_TOKENS, Task

__all__ = ["SIZES", "build_tokenizer", "make_config", "make_model", "save_model_dir", "N_CTX"]

N_CTX = 64

#: per (task, size): architecture and dimensions.  "small" is the final/default size.
SIZES: dict[tuple[str, str], dict] = {
    ("pointer-chase", "small"): dict(arch="llama", d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=256),
    ("pointer-chase", "tiny"): dict(arch="llama", d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=192),
    ("facts", "small"): dict(arch="llama", d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=256),
    ("facts", "tiny"): dict(arch="llama", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=192),
    ("arith", "small"): dict(arch="llama", d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=256),
    ("arith", "tiny"): dict(arch="llama", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=192),
    ("ioi", "small"): dict(arch="gpt2", d_model=96, n_layers=3, n_heads=4, d_mlp=384),
    ("ioi", "tiny"): dict(arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=192),
    # course staples: Pythia's architecture (GPT-NeoX) and Gemma-2's
    ("ioi", "neox"): dict(arch="gpt_neox", d_model=96, n_layers=2, n_heads=4, d_mlp=384),
    ("ioi", "gemma2"): dict(arch="gemma2", d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=256),
}


def build_tokenizer(task: Task):
    """Word-level tokenizer: whitespace/punctuation split, lower-case vocabulary, four specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(task.full_vocab())}
    assert len(vocab) == len(task.full_vocab()), "duplicate vocabulary entries"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tokenizer_config(n_ctx: int = N_CTX) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": n_ctx,
        "clean_up_tokenization_spaces": False,
    }


def make_config(task: Task, size: str, vocab_size: int, n_ctx: int = N_CTX):
    spec = SIZES[(task.name, size)]
    tok_ids = {w: i for i, w in enumerate(task.full_vocab())}
    common = dict(bos_token_id=tok_ids["<bos>"], eos_token_id=tok_ids["<eos>"], pad_token_id=tok_ids["<pad>"])
    if spec["arch"] == "gpt2":
        from transformers import GPT2Config

        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=n_ctx, n_embd=spec["d_model"], n_layer=spec["n_layers"],
            n_head=spec["n_heads"], n_inner=spec["d_mlp"], activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **common,
        )
    elif spec["arch"] == "gpt_neox":
        from transformers import GPTNeoXConfig

        # as Pythia: parallel attention + MLP, a quarter of each head rotated, untied unembedding
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
            num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"], max_position_embeddings=n_ctx,
            rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
            layer_norm_eps=1e-5, attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False, **common,
        )
    elif spec["arch"] == "gemma2":
        from transformers import Gemma2Config

        # as Gemma-2: sandwich norms, GQA, soft-caps 50 (attention) and 30 (logits), tied embeddings;
        # its sliding window (4096) is longer than the context, so every layer sees the whole prompt
        d_head = spec["d_model"] // spec["n_heads"]
        cfg = Gemma2Config(
            vocab_size=vocab_size, hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
            num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
            num_key_value_heads=spec["n_kv_heads"], head_dim=d_head, query_pre_attn_scalar=d_head,
            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=n_ctx, rms_norm_eps=1e-6,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
            attention_dropout=0.0, tie_word_embeddings=True, **common,
        )
    else:
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
            num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
            num_key_value_heads=spec["n_kv_heads"], max_position_embeddings=n_ctx, rms_norm_eps=1e-5,
            rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, **common,
        )
    cfg._attn_implementation = "eager"
    return cfg


def make_model(task: Task, size: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(task, size, len(task.full_vocab()))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model


def _portable_config(model) -> dict:
    """config.json readable by transformers 4.57 and 5.x (both rope keys, both dtype keys)."""
    d = model.config.to_dict()
    for k in ["transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
              "_attn_implementation_autoset", "layer_types"]:
        d.pop(k, None)
    d["torch_dtype"] = "float32"
    d["use_cache"] = True
    if d.get("model_type") in ("llama", "gemma2", "gpt_neox"):  # rotary settings in both versions' keys
        d["rope_theta"] = 10000.0
        d["rope_scaling"] = None
        d.pop("rope_parameters", None)
    if d.get("model_type") == "gpt_neox":
        d["rotary_pct"] = 0.25
        d["rotary_emb_base"] = 10000
    return d


def save_model_dir(model, directory: str | Path, tokenizer, meta: dict, n_ctx: int = N_CTX) -> None:
    """Write a zoo model directory (weights float32, hand-written tokenizer files, zoo.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    for extra in ["generation_config.json"]:
        (directory / extra).unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(_portable_config(model), indent=2, sort_keys=True) + "\n")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(n_ctx), indent=2) + "\n")
    (directory / "zoo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
