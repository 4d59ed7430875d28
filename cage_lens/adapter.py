"""One view of any TransformerLens model: architecture facts and the hook names that exist *and fire*.

Accepts ``HookedTransformer`` (TL 2.x/3.x) and HF-backed or native ``TransformerBridge`` (TL 3.x/4.x)
by duck typing (``cfg``, ``hook_dict``, ``hooks``, ``to_tokens``), never by ``isinstance``. The
pitfalls handled here are listed in SPEC §3.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import torch

from cage_lens.errors import UnsupportedModelError

__all__ = ["Architecture", "ModelAdapter", "adapt"]

_REQUIRED_MODEL_API = ("cfg", "hook_dict", "hooks", "to_tokens", "to_str_tokens")
_SUPPORTED_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}
_SUPPORTED_POSITIONS = {"standard", "rotary"}


@dataclass(frozen=True)
class Architecture:
    """What the LRP rules need to know about a model (read from ``model.cfg``)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    normalization: str | None
    positional: str
    gated_mlp: bool
    attn_only: bool
    act_fn: str | None
    is_bridge: bool

    @property
    def grouped_query(self) -> bool:
        return self.n_kv_heads != self.n_heads

    def describe(self) -> str:
        parts = [
            f"{self.n_layers} layers", f"{self.n_heads} heads",
            f"{self.n_kv_heads} kv heads" if self.grouped_query else None,
            f"d_model {self.d_model}", self.normalization or "no norm",
            f"{self.positional} positions",
            "attention-only" if self.attn_only else ("gated MLP" if self.gated_mlp else "MLP"),
            "TransformerBridge" if self.is_bridge else "HookedTransformer",
        ]
        return ", ".join(p for p in parts if p)


def _cfg_get(cfg, name, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


class ModelAdapter:
    """Architecture facts and hook names of one TransformerLens model.

    Hook names are the legacy TL names (``blocks.{l}.hook_resid_pre`` …), which exist on both
    HookedTransformer and TransformerBridge. On a bridge ``hook.name`` is the canonical name, so
    callers must bind names in closures (SPEC §3, pitfall 1).
    """

    def __init__(self, model):
        missing = [a for a in _REQUIRED_MODEL_API if not hasattr(model, a)]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a TransformerLens model: it lacks {', '.join(missing)}. "
                "Pass a HookedTransformer (TL 2.x/3.x) or a TransformerBridge (TL 3.x/4.x)."
            )
        self.model = model
        self.arch = self._read_architecture(model)
        self._check_hooks_exist()

    # ------------------------------------------------------------------ architecture
    @staticmethod
    def _read_architecture(model) -> Architecture:
        cfg = model.cfg
        for field in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx"):
            if getattr(cfg, field, None) is None:
                raise UnsupportedModelError(f"model.cfg has no {field!r}; cannot read the architecture")
        norm = getattr(cfg, "normalization_type", None)
        if norm not in _SUPPORTED_NORMS:
            raise UnsupportedModelError(
                f"normalization_type={norm!r} is not supported (supported: LN, LNPre, RMS, RMSPre, None)"
            )
        positional = _cfg_get(cfg, "positional_embedding_type", "standard")
        if positional not in _SUPPORTED_POSITIONS:
            raise UnsupportedModelError(
                f"positional_embedding_type={positional!r} is not supported (supported: standard, rotary)"
            )
        attn_only = bool(_cfg_get(cfg, "attn_only", False))
        act_fn = getattr(cfg, "act_fn", None)
        from cage_lens.rules import ACTIVATIONS  # the rule table is the list of what is supported

        if not attn_only and act_fn not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {act_fn!r} has no LRP rule here (supported: {sorted(ACTIVATIONS)})"
            )
        n_heads = int(cfg.n_heads)
        return Architecture(
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            n_kv_heads=int(_cfg_get(cfg, "n_key_value_heads", n_heads)),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_mlp=None if attn_only else int(cfg.d_mlp),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
            normalization=norm,
            positional=positional,
            gated_mlp=bool(_cfg_get(cfg, "gated_mlp", False)),
            attn_only=attn_only,
            act_fn=act_fn,
            is_bridge=hasattr(model, "enable_compatibility_mode"),
        )

    # ------------------------------------------------------------------ hook names
    def block(self, layer: int, name: str) -> str:
        return f"blocks.{layer}.{name}"

    @property
    def embed_hook(self) -> str:
        return "hook_embed"

    @property
    def pos_embed_hook(self) -> str | None:
        return "hook_pos_embed" if self.arch.positional == "standard" else None

    def resid_hooks(self) -> list[str]:
        """Residual-stream hook names from input to output: resid_pre, resid_mid, resid_post per layer."""
        names = []
        for layer in range(self.arch.n_layers):
            names.append(self.block(layer, "hook_resid_pre"))
            if not self.arch.attn_only:
                names.append(self.block(layer, "hook_resid_mid"))
            names.append(self.block(layer, "hook_resid_post"))
        return names

    def norm_modules(self) -> list[str]:
        """Prefixes of every normalisation layer (``blocks.{l}.ln1``, ``blocks.{l}.ln2``, ``ln_final``)."""
        if self.arch.normalization is None:
            return []
        names = []
        for layer in range(self.arch.n_layers):
            names.append(self.block(layer, "ln1"))
            if not self.arch.attn_only:
                names.append(self.block(layer, "ln2"))
        names.append("ln_final")
        return names

    def norm_scale_hooks(self) -> list[str]:
        return [f"{prefix}.hook_scale" for prefix in self.norm_modules()]

    @property
    def edits_norm_output(self) -> bool:
        """RMSNorm on a bridge: editing ``hook_scale`` makes TL rebuild the norm output from the hooked
        values, which changes forward values by ~1e-7 relative. The identity rule is applied at the
        norm's ``hook_out`` instead (exact there, see :mod:`cage_lens.rules`)."""
        return self.arch.is_bridge and self.arch.normalization in ("RMS", "RMSPre")

    def norm_rule_hooks(self) -> list[str]:
        if self.edits_norm_output:
            return [f"{p}.{h}" for p in self.norm_modules() for h in ("hook_in", "hook_out")]
        return self.norm_scale_hooks()

    def attn_hook(self, layer: int, name: str) -> str:
        return self.block(layer, f"attn.{name}")

    def mlp_hook(self, layer: int, name: str) -> str:
        return self.block(layer, f"mlp.{name}")

    def required_hooks(self) -> list[str]:
        names = [self.embed_hook] + self.resid_hooks() + self.norm_rule_hooks()
        for layer in range(self.arch.n_layers):
            names += [self.attn_hook(layer, n) for n in ("hook_q", "hook_k", "hook_v", "hook_z")]
            if not self.arch.attn_only:
                names += [self.mlp_hook(layer, "hook_pre"), self.mlp_hook(layer, "hook_post")]
                if self.arch.gated_mlp:
                    names.append(self.mlp_hook(layer, "hook_pre_linear"))
        return names

    def _check_hooks_exist(self) -> None:
        missing = [n for n in self.required_hooks() if n not in self.model.hook_dict]
        if missing:
            shown = ", ".join(missing[:6]) + (" …" if len(missing) > 6 else "")
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.arch.describe()}) lacks hook points the LRP rules "
                f"need: {shown}"
            )

    @cached_property
    def fired_hooks(self) -> frozenset[str]:
        """Hook names that actually fire in a forward pass (``hook_pos_embed`` is listed but silent on
        rotary bridges, SPEC §3 pitfall 4). Found once with a two-token probe."""
        fired: set[str] = set()
        candidates = self.required_hooks() + ([self.pos_embed_hook] if self.pos_embed_hook else [])
        candidates = [n for n in candidates if n in self.model.hook_dict]

        def recorder(name):
            def hook(tensor, hook):
                fired.add(name)
            return hook

        probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        with torch.no_grad(), self.model.hooks(fwd_hooks=[(n, recorder(n)) for n in candidates]):
            self.model(probe)
        silent = [n for n in self.required_hooks() if n not in fired]
        if silent:
            raise UnsupportedModelError(
                f"these hook points exist but never fire in a forward pass: {', '.join(silent[:6])}"
            )
        return frozenset(fired)

    @property
    def has_position_embedding(self) -> bool:
        return self.pos_embed_hook is not None and self.pos_embed_hook in self.fired_hooks

    # ------------------------------------------------------------------ misc
    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.model.parameters()).dtype
        except (StopIteration, AttributeError):
            return torch.float32

    def check_eval_mode(self) -> None:
        """Dropout in train mode makes relevance random and non-reproducible: refuse it."""
        if not getattr(self.model, "training", False):
            return
        active = [
            name for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.Dropout) and module.p > 0 and module.training
        ]
        if active:
            raise UnsupportedModelError(
                f"the model is in train mode with active dropout ({active[0]} p={self.model.get_submodule(active[0]).p}); "
                "call model.eval() before computing relevance"
            )


_ADAPTERS: "weakref.WeakKeyDictionary[object, ModelAdapter]" = weakref.WeakKeyDictionary()


def adapt(model) -> ModelAdapter:
    """The (cached) adapter of ``model``. An adapter passed in is returned as is."""
    if isinstance(model, ModelAdapter):
        return model
    try:
        adapter = _ADAPTERS.get(model)
    except TypeError:
        adapter = None
    if adapter is None:
        adapter = ModelAdapter(model)
        try:
            _ADAPTERS[model] = adapter
        except TypeError:
            pass
    return adapter
