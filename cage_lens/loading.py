"""Build TransformerLens models from Hugging Face models and local directories, on any TL line, offline.

TransformerLens 2.x/3.x users get a ``HookedTransformer``; TransformerLens 4.x removed it, so there
users get an HF-backed ``TransformerBridge``. Nothing here contacts a hub: a ``HookedTransformer``
is configured from the in-memory HF config by a per-family mapping written out below (TL's own
``convert_hf_model_config`` looks configs up by model name, and for Gemma it takes the dimensions
from a table of released checkpoints), its weights are converted with TL's own conversion
functions and loaded without any weight processing, so TL logits equal HF logits. A bridge is
booted with ``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)``.

Which family loads on which line, and how to load real checkpoints: docs/loading.md.
"""

from __future__ import annotations

import contextlib
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from cage_lens.errors import CageLensError, InputError, UnsupportedModelError

__all__ = [
    "has_hooked_transformer", "eager_kwargs", "load_tokenizer", "load_hf_directory", "from_hf_model", "family_of",
    "ARCHITECTURE_FAMILIES", "HOOKED_FAMILIES", "BRIDGE_FAMILIES", "unsupported_family_message",
]

#: Hugging Face model class → cage_lens family name
ARCHITECTURE_FAMILIES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPTJForCausalLM": "gptj",
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    "Phi3ForCausalLM": "phi3",
    "BloomForCausalLM": "bloom",
}
#: families TransformerBridge (TL 4.x) loads — all of them
BRIDGE_FAMILIES: tuple[str, ...] = tuple(ARCHITECTURE_FAMILIES.values())
#: families with a HookedTransformer weight conversion in TL 2.18 (no OLMo-2/3, no Qwen3-MoE there)
HOOKED_FAMILIES: tuple[str, ...] = (
    "gpt2", "gpt_neox", "gptj", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3",
    "phi3", "bloom",
)


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


def _tl_version() -> str:
    try:
        return metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def unsupported_family_message(family: str) -> str:
    """Why the installed TL line cannot load ``family``, and the way out."""
    return (
        f"TransformerLens {_tl_version()} has no HookedTransformer conversion for {family}; "
        "use TransformerLens >= 4 (TransformerBridge), which loads it"
    )


def family_of(hf_model) -> str | None:
    """The cage_lens family of a Hugging Face causal LM (``None`` for an architecture outside the table)."""
    return ARCHITECTURE_FAMILIES.get(type(hf_model).__name__)


def eager_kwargs() -> dict[str, str]:
    """``from_pretrained`` / ``from_config`` arguments for the reference (eager) implementations:
    attention that exposes its pattern and, on transformers 5, mixture-of-experts layers that loop
    over experts (the grouped-matmul kernel refuses float64)."""
    import transformers

    kwargs = {"attn_implementation": "eager"}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["experts_implementation"] = "eager"
    return kwargs


def load_tokenizer(directory: str | Path):
    """The tokenizer of a local directory holding ``tokenizer.json`` and a minimal hand-written
    ``tokenizer_config.json`` (a directory that transformers 5 wrote with ``save_pretrained`` is not
    readable by transformers 4.57). Loading by path sets ``name_or_path``, which TransformerLens
    needs to reload the tokenizer (it does, to add the BOS token)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        raise InputError(
            f"{directory} has no tokenizer.json; put the model's tokenizer.json (and its "
            "tokenizer_config.json) next to the weights"
        )
    return AutoTokenizer.from_pretrained(str(directory))


# ------------------------------------------------------------------------ HookedTransformer configs
def _get(c: Any, name: str, default: Any = None) -> Any:
    value = getattr(c, name, None)
    return default if value is None else value


def _rope_theta(c: Any, default: float = 10000.0) -> float:
    """Rotary base: ``rope_theta`` (transformers 4.x) or ``rope_parameters["rope_theta"]`` (5.x)."""
    theta = getattr(c, "rope_theta", None)
    if theta is None:
        params = getattr(c, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    return float(default if theta is None else theta)


def _refuse(family: str, problem: str) -> None:
    raise UnsupportedModelError(
        f"this {family} model {problem}, which TransformerLens {_tl_version()}'s HookedTransformer conversion "
        "does not reproduce; use TransformerLens >= 4 (TransformerBridge)"
    )


def _rope_scaling_kind(c: Any) -> str:
    scaling = getattr(c, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _require_plain_rope(c: Any, family: str) -> None:
    if _rope_scaling_kind(c) != "default":
        _refuse(family, f"uses rotary scaling {_rope_scaling_kind(c)!r}")


def _llama3_rope(c: Any) -> dict[str, Any]:
    """Llama 3.1+ "NTK-by-parts" rotary scaling, which HookedTransformer implements."""
    scaling = c.rope_scaling
    return dict(
        use_NTK_by_parts_rope=True, NTK_by_parts_factor=float(scaling["factor"]),
        NTK_by_parts_low_freq_factor=float(scaling["low_freq_factor"]),
        NTK_by_parts_high_freq_factor=float(scaling["high_freq_factor"]),
        NTK_original_ctx_len=int(scaling["original_max_position_embeddings"]),
    )


def _local_attention(c: Any) -> dict[str, Any]:
    """Sliding-window layers: TL's attn_types / window_size, from ``layer_types`` or ``sliding_window``."""
    window = getattr(c, "sliding_window", None)
    layer_types = getattr(c, "layer_types", None)
    if layer_types is None:
        use_sliding = getattr(c, "use_sliding_window", True)
        layer_types = ["sliding_attention" if window and use_sliding else "full_attention"] * c.num_hidden_layers
    attn_types = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    if "local" not in attn_types or window is None:
        return {}
    return dict(use_local_attn=True, window_size=window, attn_types=attn_types)


def _rms_decoder(c: Any) -> dict[str, Any]:
    """Fields shared by the pre-norm RMSNorm / rotary / gated-MLP decoders (Llama and descendants)."""
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = _get(c, "num_key_value_heads", c.num_attention_heads)
    return dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=_get(c, "hidden_act") or c.hidden_activation, n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=_rope_theta(c), final_rms=True, gated_mlp=True,
    )


def _gpt2(c):
    return dict(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        act_fn=c.activation_function, use_attn_scale=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, normalization_type="LN",
    )


def _gpt_neox(c):
    d_head = c.hidden_size // c.num_attention_heads
    partial = getattr(c, "rotary_pct", None) or (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, parallel_attn_mlp=c.use_parallel_residual, normalization_type="LN",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=int(d_head * partial),
        rotary_base=_rope_theta(c, getattr(c, "rotary_emb_base", 10000.0)), default_prepend_bos=True,
    )


def _gptj(c):
    return dict(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        act_fn=c.activation_function, parallel_attn_mlp=True, normalization_type="LN",
        positional_embedding_type="rotary", rotary_dim=c.rotary_dim, rotary_adjacent_pairs=True,
    )


def _opt(c):
    if c.word_embed_proj_dim != c.hidden_size:
        _refuse("opt", "projects embeddings (word_embed_proj_dim != hidden_size)")
    if not c.do_layer_norm_before:
        _refuse("opt", "normalises after each sublayer (do_layer_norm_before=False)")
    return dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.ffn_dim, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=1e-5,
        d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN",
    )


def _llama(c):
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        _refuse("llama", "has attention or MLP biases")
    if _rope_scaling_kind(c) == "llama3":
        return dict(_rms_decoder(c), **_llama3_rope(c))
    _require_plain_rope(c, "llama")
    return _rms_decoder(c)


def _mistral(c):
    _require_plain_rope(c, "mistral")
    return dict(_rms_decoder(c), n_key_value_heads=c.num_key_value_heads, **_local_attention(c))


def _mixtral(c):
    return dict(_mistral(c), num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok)


def _qwen2(c):
    _require_plain_rope(c, "qwen2")
    return dict(_rms_decoder(c), n_key_value_heads=c.num_key_value_heads, default_prepend_bos=False)


def _qwen3(c):
    if getattr(c, "attention_bias", False):
        _refuse("qwen3", "has attention biases")
    _require_plain_rope(c, "qwen3")
    return dict(_rms_decoder(c), use_qk_norm=True, default_prepend_bos=False)


def _gemma(c, *, qk_norm: bool, rotary_base_local: float | None):
    fields = dict(
        _rms_decoder(c), act_fn=c.hidden_activation, n_key_value_heads=c.num_key_value_heads,
        use_attn_scale=True, attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        use_normalization_before_and_after=True, use_qk_norm=qk_norm,
        **_local_attention(c),
    )
    if getattr(c, "attn_logit_softcapping", None):
        fields["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
    if getattr(c, "final_logit_softcapping", None):
        fields["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    if rotary_base_local is not None:
        fields["rotary_base_local"] = rotary_base_local
    return fields


def _gemma2(c):
    return _gemma(c, qk_norm=False, rotary_base_local=None)


def _gemma3(c):
    if getattr(c, "rope_scaling", None):
        _refuse("gemma3", "uses rotary scaling")
    return _gemma(c, qk_norm=True, rotary_base_local=float(_get(c, "rope_local_base_freq", 10000.0)))


def _phi3(c):
    _require_plain_rope(c, "phi3")
    fields = _rms_decoder(c)
    partial = _get(c, "partial_rotary_factor", 1.0)
    return dict(fields, rotary_dim=int(fields["d_head"] * partial), parallel_attn_mlp=False)


def _bloom(c):
    if c.apply_residual_connection_post_layernorm:
        _refuse("bloom", "adds the residual after the layer norm (apply_residual_connection_post_layernorm)")
    return dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.n_head, n_heads=c.n_head, d_mlp=4 * c.hidden_size,
        n_layers=c.n_layer, n_ctx=2048, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn="gelu_fast",
        normalization_type="LN", post_embedding_ln=True, positional_embedding_type="alibi",
        default_prepend_bos=False,
    )


#: family → (HookedTransformerConfig fields from the HF config, name of TL's weight conversion)
_HOOKED: dict[str, tuple[Callable[[Any], dict[str, Any]], str]] = {
    "gpt2": (_gpt2, "convert_gpt2_weights"),
    "gpt_neox": (_gpt_neox, "convert_neox_weights"),
    "gptj": (_gptj, "convert_gptj_weights"),
    "opt": (_opt, "convert_opt_weights"),
    "llama": (_llama, "convert_llama_weights"),
    "mistral": (_mistral, "convert_mistral_weights"),
    "mixtral": (_mixtral, "convert_mixtral_weights"),
    "qwen2": (_qwen2, "convert_qwen2_weights"),
    "qwen3": (_qwen3, "convert_qwen3_weights"),
    "gemma2": (_gemma2, "convert_gemma_weights"),
    "gemma3": (_gemma3, "convert_gemma_weights"),
    "phi3": (_phi3, "convert_phi3_weights"),
    "bloom": (_bloom, "convert_bloom_weights"),
}
assert set(_HOOKED) == set(HOOKED_FAMILIES)


def _hooked_from_hf(hf_model, tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions

    architecture = type(hf_model).__name__
    family = ARCHITECTURE_FAMILIES.get(architecture)
    if family is None:
        raise UnsupportedModelError(
            f"cage_lens has no HookedTransformer mapping for {architecture}; it loads "
            f"{', '.join(ARCHITECTURE_FAMILIES)} (see docs/loading.md). On TransformerLens >= 4 the "
            "TransformerBridge may load it"
        )
    if family not in _HOOKED:
        raise UnsupportedModelError(unsupported_family_message(family))
    config_fields, conversion = _HOOKED[family]
    cfg = HookedTransformerConfig(
        **config_fields(hf_model.config), original_architecture=architecture, device="cpu", dtype=hf_model.dtype,
    )
    # TL builds some submodules (the MoE experts) in the default dtype: cast everything to cfg.dtype
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    torch.nn.Module.to(model, cfg.dtype)  # (HookedTransformer.to would print a notice)
    state_dict = getattr(weight_conversions, conversion)(hf_model, cfg)
    # no weight processing (LayerNorm folding, centring): TL logits must equal the HF logits
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def from_hf_model(hf_model, tokenizer, name: str | None = None):
    """Wrap an in-memory Hugging Face causal LM in the TransformerLens model of this TL line.

    ``tokenizer`` must have been loaded from a local directory (TL reloads it by ``name_or_path``).
    On TL 2.x/3.x the family must be one of :data:`HOOKED_FAMILIES`, else
    :class:`UnsupportedModelError` names the way out.
    """
    hf_model = hf_model.eval()
    if has_hooked_transformer():
        return _hooked_from_hf(hf_model, tokenizer)
    from transformer_lens.model_bridge import TransformerBridge

    # a model built with ``from_config`` has no ``architectures`` entry, which the bridge selects its
    # adapter by; the override goes to the bridge's copy of the config, not to the user's model
    architecture = type(hf_model).__name__
    try:
        bridge = TransformerBridge.boot_transformers(
            name or tokenizer.name_or_path, hf_model=hf_model, tokenizer=tokenizer, device="cpu",
            dtype=hf_model.dtype, hf_config_overrides={"architectures": [architecture]},
        )
    except ValueError as error:
        if "supported architecture" not in str(error):
            raise
        raise UnsupportedModelError(
            f"TransformerLens {_tl_version()} has no TransformerBridge adapter for {architecture}; "
            f"cage_lens is tested on {', '.join(ARCHITECTURE_FAMILIES)} (see docs/loading.md)"
        ) from None
    return bridge.eval()


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars and no multi-line load reports from transformers; the user's settings are restored."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _quiet_progress_bars(), contextlib.redirect_stdout(None):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in the directory's safetensors files (headers only, no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _shape_mismatch(directory: Path, config) -> str | None:
    """The first parameter whose stored shape differs from the shape ``config`` gives it, in words."""
    from transformers import AutoModelForCausalLM

    stored = _checkpoint_shapes(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for name, param in skeleton.state_dict().items():
        if name in stored and stored[name] != tuple(param.shape):
            return (f"{name} is {tuple(stored[name])} in the weights but config.json makes it "
                    f"{tuple(param.shape)}")
    return None


def load_hf_directory(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF-format directory (config.json + safetensors + tokenizer.json) as a TL model, offline.

    Refuses with one line (:class:`CageLensError`) weights whose shapes contradict ``config.json``,
    checkpoints that leave parameters out (transformers would fill them with random values) and
    checkpoints holding parameters ``config.json`` does not use (transformers would ignore them, e.g. a
    third layer of a model whose config says two), naming the first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise InputError(
            f"{directory} is not a Hugging Face model directory: it has no config.json. Point to the folder "
            "save_pretrained wrote (config.json, *.safetensors, tokenizer.json)"
        )
    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError) as error:
        raise CageLensError(f"{directory}/config.json cannot be read by this transformers version: {error}") from None
    try:
        with _quiet_transformers():
            hf_model, info = AutoModelForCausalLM.from_pretrained(
                str(directory), config=config, dtype=dtype, output_loading_info=True, **eager_kwargs()
            )
    except RuntimeError as error:
        if "mismatch" not in str(error):
            raise
        problem = _shape_mismatch(directory, config) or str(error).strip().splitlines()[-1]
        raise CageLensError(
            f"the weights in {directory} do not fit its config.json: {problem}. "
            "Fix config.json or point to the directory the weights were saved with"
        ) from None
    missing = sorted(str(k) for k in [*(info.get("missing_keys") or []), *(info.get("mismatched_keys") or [])])
    if missing:
        raise CageLensError(
            f"the weights in {directory} lack {len(missing)} parameter(s) that config.json asks for "
            f"(first: {missing[0]}); transformers would fill them with random values. "
            "Fix config.json or point to the complete checkpoint"
        )
    unused = sorted(str(k) for k in info.get("unexpected_keys") or [])
    if unused:
        raise CageLensError(
            f"the weights in {directory} hold {len(unused)} parameter(s) that config.json does not use "
            f"(first: {unused[0]}); transformers would ignore them and load a different model. "
            "Fix config.json or point to the directory the weights were saved with"
        )
    tokenizer = load_tokenizer(directory)
    model = from_hf_model(hf_model, tokenizer, name=str(directory))
    if (directory / "zoo.json").exists():
        # zoo models were trained with <bos> first; some TL adapters (GPT-NeoX on the bridge) default
        # to no BOS, so state it on every line
        model.cfg.default_prepend_bos = True
    return model
