"""Build TransformerLens models from local Hugging Face directories, on any supported TL version.

TransformerLens 2.x/3.x users get a ``HookedTransformer``; TransformerLens 4.x removed it, so there
users get an HF-backed ``TransformerBridge`` (SPEC §3). Everything here runs offline: the weights and
the tokenizer come from a local directory holding ``config.json``, ``model.safetensors`` and
``tokenizer.json``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["has_hooked_transformer", "load_tokenizer", "load_hf_directory", "from_hf_model"]


@contextlib.contextmanager
def _quiet_progress_bars():
    """No "Loading weights" bar for a local model of a few hundred kB; the user's setting is restored."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def has_hooked_transformer() -> bool:
    """True on TransformerLens 2.x/3.x, where ``HookedTransformer`` exists."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def load_tokenizer(directory: str | Path):
    """The tokenizer of a local directory holding ``tokenizer.json`` and a minimal hand-written
    ``tokenizer_config.json`` (a directory that transformers 5 wrote with ``save_pretrained`` is not
    readable by transformers 4.57). Loading by path sets ``name_or_path``, which TransformerLens
    needs to reload the tokenizer (it does, to add the BOS token)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json")
    return AutoTokenizer.from_pretrained(str(directory))


def _hooked_config_dict(hf_config: Any, arch: str) -> dict[str, Any]:
    """HookedTransformerConfig fields for the two architectures the zoo uses (SPEC §3).

    TL's own ``convert_hf_model_config`` guesses the architecture from the *path* (a directory whose
    name contains "llama" is misread) and needs ``n_ctx`` on GPT-2 configs, so the mapping for these
    two architectures is spelled out here; other architectures go through TL's converter.
    """
    if arch == "GPT2LMHeadModel":
        return dict(
            d_model=hf_config.n_embd,
            d_head=hf_config.n_embd // hf_config.n_head,
            n_heads=hf_config.n_head,
            d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
            n_layers=hf_config.n_layer,
            n_ctx=hf_config.n_positions,
            eps=hf_config.layer_norm_epsilon,
            d_vocab=hf_config.vocab_size,
            act_fn=hf_config.activation_function,
            use_attn_scale=True,
            scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
            normalization_type="LN",
            original_architecture=arch,
        )
    if arch == "LlamaForCausalLM":
        n_kv = hf_config.num_key_value_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rope_theta = getattr(hf_config, "rope_theta", None)
        if rope_theta is None:
            rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return dict(
            d_model=hf_config.hidden_size,
            d_head=d_head,
            n_heads=hf_config.num_attention_heads,
            d_mlp=hf_config.intermediate_size,
            n_layers=hf_config.num_hidden_layers,
            n_ctx=hf_config.max_position_embeddings,
            eps=hf_config.rms_norm_eps,
            d_vocab=hf_config.vocab_size,
            act_fn=hf_config.hidden_act,
            n_key_value_heads=n_kv if n_kv != hf_config.num_attention_heads else None,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_adjacent_pairs=False,
            rotary_dim=d_head,
            rotary_base=rope_theta,
            final_rms=True,
            gated_mlp=True,
            original_architecture=arch,
        )
    raise ValueError(f"no offline HookedTransformer mapping for architecture {arch!r}")


def _hooked_from_hf(hf_model, tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading

    cfg = HookedTransformerConfig(
        **_hooked_config_dict(hf_model.config, type(hf_model).__name__), device="cpu", dtype=hf_model.dtype
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    arch = cfg.original_architecture
    convert = {
        "GPT2LMHeadModel": tl_loading.convert_gpt2_weights,
        "LlamaForCausalLM": tl_loading.convert_llama_weights,
    }[arch]
    state_dict = convert(hf_model, cfg)
    # No weight processing: TL logits must equal the HF logits (SPEC §3, pitfall 7).
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def from_hf_model(hf_model, tokenizer, name: str | None = None):
    """Wrap an in-memory Hugging Face causal LM in the TransformerLens model of this TL version.

    ``tokenizer`` must have been loaded from a local directory (TL reloads it by ``name_or_path``).
    """
    hf_model = hf_model.eval()
    if has_hooked_transformer():
        return _hooked_from_hf(hf_model, tokenizer)
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        name or tokenizer.name_or_path, hf_model=hf_model, tokenizer=tokenizer, device="cpu",
        dtype=hf_model.dtype,
    )
    return bridge.eval()


def load_hf_directory(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF-format directory (config + safetensors + tokenizer.json) as a TL model, offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(directory))
    with _quiet_progress_bars():
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(directory), config=config, dtype=dtype, attn_implementation="eager"
        )
    tokenizer = load_tokenizer(directory)
    return from_hf_model(hf_model, tokenizer, name=str(directory))
