"""One view of any TransformerLens model: architecture facts, where each structure sits, and the hook
names that exist (layer 4 of :mod:`cage_lens.core`; which of them fire is probed by
:func:`cage_lens.core.hooks.fired_hooks`).

Accepts ``HookedTransformer`` (TL 2.x/3.x) and HF-backed or native ``TransformerBridge`` (TL 3.x/4.x)
by duck typing (``cfg``, ``hook_dict``, ``hooks``, ``to_tokens``), never by ``isinstance`` on one
model class. Structures are found by walking the module tree (see docs/architectures.md): every
normalisation module (pre-, post-, sandwich, q/k norms), each block's attention and MLP (plain,
gated, mixture of experts), parallel attention + MLP, logit soft-caps and ALiBi. What the LRP rules
do at each of them is :mod:`cage_lens.core.realise`; whether the result is complete is checked by
:mod:`cage_lens.core.certificate`. TransformerLens pitfalls handled here are listed in
docs/architectures.md#transformerlens-facts.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from cage_lens.core.precision import check_precision, is_low_precision, upcast_copy
from cage_lens.errors import UnsupportedModelError

__all__ = [
    "Architecture", "ModelAdapter", "NormSite", "MLPSite", "LayerSites", "adapt", "model_state", "walk_modules",
    "ELEMENTWISE_ACTIVATIONS", "visible_keys",
]

_REQUIRED_MODEL_API = ("cfg", "hook_dict", "hooks", "to_tokens", "to_str_tokens")
_SUPPORTED_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}
_SUPPORTED_POSITIONS = {"standard", "rotary", "alibi"}

#: activation names (TL ``cfg.act_fn``) that are element-wise, so the identity rule applies
ELEMENTWISE_ACTIVATIONS = frozenset({
    "silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu",
    "gelu_python", "gelu_accurate", "relu2", "relu_squared", "tanh", "sigmoid",
})
#: element-wise activation module classes met in Hugging Face models (besides transformers.activations)
_ACTIVATION_CLASS_NAMES = frozenset({
    "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "BloomGelu", "GELUActivation", "NewGELUActivation",
    "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "QuickGELUActivation", "SiLUActivation",
    "AccurateGELUActivation", "ReLUSquaredActivation", "ClippedGELUActivation", "LinearActivation",
})


@dataclass(frozen=True)
class Architecture:
    """What the LRP rules need to know about a model (read from ``model.cfg`` and its modules)."""

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
    parallel: bool = False
    moe: bool = False
    qk_norm: bool = False
    post_norm: bool = False
    attn_softcap: float | None = None
    logit_softcap: float | None = None

    @property
    def grouped_query(self) -> bool:
        return self.n_kv_heads != self.n_heads

    def describe(self) -> str:
        parts = [
            f"{self.n_layers} layers", f"{self.n_heads} heads",
            f"{self.n_kv_heads} kv heads" if self.grouped_query else None,
            f"d_model {self.d_model}", self.normalization or "no norm",
            "q/k norms" if self.qk_norm else None, "post-norms" if self.post_norm else None,
            f"{self.positional} positions",
            "attention-only" if self.attn_only else (
                "mixture of experts" if self.moe else ("gated MLP" if self.gated_mlp else "MLP")),
            "parallel attention + MLP" if self.parallel else None,
            "soft-capped logits" if self.attn_softcap or self.logit_softcap else None,
            "TransformerBridge" if self.is_bridge else "HookedTransformer",
        ]
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class NormSite:
    """One normalisation module. ``centred``: LayerNorm (mean subtracted) rather than RMSNorm.
    ``scale_hook`` (HookedTransformer) is the hook point whose value is the norm's scale; bridges
    use ``in_hook``/``out_hook`` (the norm's input and output)."""

    path: str
    module: torch.nn.Module
    centred: bool
    scale_hook: object | None = None
    in_hook: object | None = None
    out_hook: object | None = None

    @property
    def eps(self) -> float:
        for owner in (getattr(self.module, "original_component", None), self.module):
            for name in ("eps", "variance_epsilon"):
                value = getattr(owner, name, None)
                if isinstance(value, (int, float)):
                    return float(value)
        cfg = getattr(self.module, "cfg", None) or getattr(self.module, "config", None)
        return float(getattr(cfg, "eps", 1e-5))

    @property
    def bias(self) -> torch.Tensor | None:
        inner = getattr(self.module, "original_component", None) or self.module
        b = getattr(inner, "bias", None)
        if b is None:
            b = getattr(inner, "b", None)
        return b if isinstance(b, torch.Tensor) else None


@dataclass(frozen=True)
class MLPSite:
    """The MLP of one block. ``kind``: ``"plain"`` (act(pre) → post), ``"gated"`` (act(pre) ·
    pre_linear → post) or ``"moe"``. Hook names are legacy TL names; ``act`` is the model's own
    activation callable. A mixture of experts lists its ``experts`` (TL-native experts: one
    ``MLPSite`` each) or, for a fused Hugging Face experts module, ``fused_experts`` and
    ``fused_act`` (module objects), and its ``router`` weights hook."""

    kind: str
    pre: str | None = None
    post: str | None = None
    pre_linear: str | None = None
    act: Callable | None = None
    experts: tuple["MLPSite", ...] = ()
    fused_experts: torch.nn.Module | None = None
    fused_act: torch.nn.Module | None = None
    router: str | None = None
    module: torch.nn.Module | None = None


@dataclass(frozen=True)
class LayerSites:
    """Where the structures of block ``index`` sit (legacy hook names)."""

    index: int
    resid_pre: str
    resid_post: str
    attn_out: str                      # the attention sublayer's contribution to the residual
    mlp_out: str | None                # the MLP's contribution (None: attention-only)
    parallel: bool
    q: str
    k: str
    v: str
    z: str
    rot_q: str | None
    rot_k: str | None
    attn_scores: str | None
    attn_module: torch.nn.Module
    attn_softcap: float | None
    mlp: MLPSite | None
    mlp_module: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)


def _cfg_get(cfg, name, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def _positive(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def is_norm_module(module: torch.nn.Module) -> bool:
    """Normalisation modules by class: TL components, bridge wrappers, HF/torch norms."""
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm", "LayerNormPre",
                                                                   "RMSNormPre", "NormalizationBridge",
                                                                   "Norm", "NormPre"))


def _is_activation_module(module: torch.nn.Module) -> bool:
    if type(module).__name__ in _ACTIVATION_CLASS_NAMES:
        return True
    try:
        from transformers.activations import ACT2CLS
    except ImportError:  # pragma: no cover - transformers is always there for HF-backed bridges
        return False
    classes = tuple(c[0] if isinstance(c, tuple) else c for c in ACT2CLS.values())
    return isinstance(module, classes)


class ModelAdapter:
    """Architecture facts, structure sites and hook names of one TransformerLens model.

    Hook names are the legacy TL names (``blocks.{l}.hook_resid_pre`` …), which exist on both
    HookedTransformer and TransformerBridge. On a bridge ``hook.name`` is the canonical name, so
    callers must bind names in closures. Per-model state of the layers above (the lock serialising
    cage_lens calls, the rule sets active per thread, the hook points that fire, the cached
    certificate) lives here as plain data; the layers above fill and read it.

    The adapter follows the model (docs/rules.md#completeness-certificate): everything it caches is
    keyed on :func:`model_state` (the module tree, every hook on every module, a replaced ``forward``,
    the parameters' dtypes and devices), and :meth:`follow` rebuilds the caches — the certificate
    included — when that state changes. Nothing cached holds autograd history.

    Every :func:`adapt` call returns a new adapter object that holds the model and shares one cache
    dictionary (its ``__dict__``) with every other adapter of the same model; the module-level registry
    keeps only that dictionary, weakly keyed by the model, and the dictionary never refers to the
    model: an adapter keeps its model alive, the registry keeps no model alive.
    """

    __slots__ = ("__dict__", "_model")

    def __init__(self, model):
        missing = [a for a in _REQUIRED_MODEL_API if not hasattr(model, a)]
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a TransformerLens model: it lacks {', '.join(missing)}. "
                "Pass a HookedTransformer (TL 2.x/3.x) or a TransformerBridge (TL 3.x/4.x)."
            )
        self._model = model
        self.lock = threading.RLock()     # serialises cage_lens calls on this model (engine)
        self.active: dict[int, list] = {}  # thread id -> stack of active rule installations (engine)
        #: torch hook-handle ids of the hooks cage_lens calls have installed right now (core.hooks): they
        #: are not part of the model's state
        self.call_hooks: set[int] = set()
        self.state: tuple | None = None
        self._build()

    @classmethod
    def _sharing(cls, model, caches: dict) -> "ModelAdapter":
        """Another adapter of ``model`` over the same caches."""
        adapter = cls.__new__(cls)
        adapter._model = model
        adapter.__dict__ = caches
        return adapter

    @property
    def model(self):
        return self._model

    def _build(self) -> None:
        """(Re)read everything from the model and forget what was derived from its previous state."""
        model = self.model
        for cached in ("layers", "norm_sites", "_stash_point_ids"):
            self.__dict__.pop(cached, None)
        self.certificate = None            # cached completeness certificate (core.certificate)
        self.fired: frozenset[str] | None = None  # hook names that fire in a forward (core.hooks.fired_hooks)
        # one snapshot of the name → HookPoint table (a bridge rebuilds its alias table on every access)
        self.hook_points: dict = dict(model.hook_dict)
        self.arch = self._read_architecture(model)
        self._check_hooks_exist()
        self.state = self.current_state()

    def current_state(self) -> tuple:
        """:func:`model_state` of the model, leaving out the hooks of running cage_lens calls."""
        return model_state(self.model, self.call_hooks)

    def follow(self) -> "ModelAdapter":
        """Rebuild the caches if the model's state changed since they were filled (under the model's
        lock, so a running call finishes first); returns ``self``."""
        if self.current_state() != self.state:
            with self.lock:
                if self.current_state() != self.state:
                    self._build()
        return self

    def settle(self) -> None:
        """Record the current state as the one the caches describe (after a probe forward, in which a
        bridge may wire its own hooks the first time it runs)."""
        self.state = self.current_state()

    # ------------------------------------------------------------------ architecture
    def _read_architecture(self, model) -> Architecture:
        cfg = model.cfg
        for name in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx"):
            if getattr(cfg, name, None) is None:
                raise UnsupportedModelError(f"model.cfg has no {name!r}; cannot read the architecture")
        norm = getattr(cfg, "normalization_type", None)
        if norm not in _SUPPORTED_NORMS:
            raise UnsupportedModelError(
                f"normalization_type={norm!r} is not supported (supported: LN, LNPre, RMS, RMSPre, None)"
            )
        positional = _cfg_get(cfg, "positional_embedding_type", "standard")
        if positional not in _SUPPORTED_POSITIONS:
            raise UnsupportedModelError(
                f"positional_embedding_type={positional!r} has no LRP rule here "
                f"(supported: {', '.join(sorted(_SUPPORTED_POSITIONS))})"
            )
        attn_only = bool(_cfg_get(cfg, "attn_only", False))
        is_bridge = hasattr(model, "enable_compatibility_mode")
        act_fn = getattr(cfg, "act_fn", None)
        # a bridge's cfg.act_fn is informative only: its rules use the HF activation module itself
        if not attn_only and not is_bridge and act_fn not in ELEMENTWISE_ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {act_fn!r} is not element-wise, so the identity rule does not apply "
                f"(supported: {', '.join(sorted(ELEMENTWISE_ACTIVATIONS))})"
            )
        n_heads = int(cfg.n_heads)
        n_layers = int(cfg.n_layers)
        hook_dict = self.hook_points
        parallel = (not attn_only and n_layers > 0 and "blocks.0.hook_resid_mid" not in hook_dict)
        post_norm = "blocks.0.ln1_post.hook_scale" in hook_dict or "blocks.0.ln1_post.hook_in" in hook_dict
        qk_norm = any(n.startswith("blocks.0.attn.q_norm.") for n in hook_dict)
        n_experts = getattr(cfg, "num_experts", None)
        return Architecture(
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(_cfg_get(cfg, "n_key_value_heads", n_heads)),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_mlp=None if attn_only else int(_cfg_get(cfg, "d_mlp", 0)),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
            normalization=norm,
            positional=positional,
            gated_mlp=bool(_cfg_get(cfg, "gated_mlp", False)),
            attn_only=attn_only,
            act_fn=act_fn,
            is_bridge=is_bridge,
            parallel=parallel,
            moe=bool(n_experts),
            qk_norm=qk_norm,
            post_norm=post_norm,
            attn_softcap=_positive(getattr(cfg, "attn_scores_soft_cap", None)),
            logit_softcap=_positive(getattr(cfg, "output_logits_soft_cap", None)),
        )

    # ------------------------------------------------------------------ hook names
    def block(self, layer: int, name: str) -> str:
        return f"blocks.{layer}.{name}"

    @property
    def embed_hook(self) -> str:
        """The token embeddings as the embedding layer returns them. On a bridge ``hook_embed`` can
        alias a later point (Bloom: after its embedding LayerNorm), so the embedding bridge's own
        output is used there."""
        return "embed.hook_out" if "embed.hook_out" in self.hook_points else "hook_embed"

    @property
    def pos_embed_hook(self) -> str | None:
        return "hook_pos_embed" if self.arch.positional == "standard" else None

    @property
    def has_resid_mid(self) -> bool:
        """A residual state between attention and MLP exists (not attention-only, not parallel)."""
        return not self.arch.attn_only and not self.arch.parallel

    def resid_hooks(self) -> list[str]:
        """Residual-stream points from input to output: resid_pre, resid_mid, resid_post per layer.

        ``resid_mid`` is reported under its legacy name but never *read* at that hook point: on a
        bridge it can alias a point that feeds only the MLP (OPT, OLMo-2); the engine reads it as
        ``resid_pre + attn_out`` with the gradient of ``attn_out`` (see :meth:`layer`)."""
        names = []
        for layer in range(self.arch.n_layers):
            names.append(self.block(layer, "hook_resid_pre"))
            if self.has_resid_mid:
                names.append(self.block(layer, "hook_resid_mid"))
            names.append(self.block(layer, "hook_resid_post"))
        return names

    def attn_hook(self, layer: int, name: str) -> str:
        return self.block(layer, f"attn.{name}")

    def mlp_hook(self, layer: int, name: str) -> str:
        return self.block(layer, f"mlp.{name}")

    def _existing(self, name: str) -> str | None:
        return name if name in self.hook_points else None

    # ------------------------------------------------------------------ structure sites
    @cached_property
    def norm_sites(self) -> tuple[NormSite, ...]:
        """Every normalisation module, outermost only (a bridge wrapper, not the HF norm inside it)."""
        sites, covered = [], []
        for path, module in self.model.named_modules():
            if any(path.startswith(prefix + ".") for prefix in covered) or not is_norm_module(module):
                continue
            covered.append(path)
            sites.append(self._norm_site(path, module))
        return tuple(sites)

    def _norm_site(self, path: str, module: torch.nn.Module) -> NormSite:
        name = type(module).__name__
        if hasattr(module, "uses_rms_norm") and hasattr(module, "hook_in") and hasattr(module, "hook_out"):
            return NormSite(path, module, centred=not module.uses_rms_norm, in_hook=module.hook_in,
                            out_hook=module.hook_out)
        if hasattr(module, "hook_scale") and name in ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre"):
            return NormSite(path, module, centred=name.startswith("LayerNorm"), scale_hook=module.hook_scale)
        raise UnsupportedModelError(
            f"normalisation module {path} ({name}) has no hook point cage_lens can put the identity rule "
            "on; this architecture is not supported (docs/architectures.md)"
        )

    def layer(self, index: int) -> LayerSites:
        return self.layers[index]

    @cached_property
    def layers(self) -> tuple[LayerSites, ...]:
        return tuple(self._layer_sites(l) for l in range(self.arch.n_layers))

    def _layer_sites(self, l: int) -> LayerSites:
        arch, b = self.arch, self.block
        block = self.model.blocks[l]
        attn = block.attn
        rotary = arch.positional == "rotary"
        softcap = arch.attn_softcap
        if arch.is_bridge:
            softcap = _positive(getattr(attn.original_component, "attn_logit_softcapping", None)) or softcap
        mlp_site = None if arch.attn_only else self._mlp_site(l, block.mlp)
        return LayerSites(
            index=l,
            resid_pre=b(l, "hook_resid_pre"),
            resid_post=b(l, "hook_resid_post"),
            attn_out=b(l, "hook_attn_out"),
            mlp_out=None if arch.attn_only else b(l, "hook_mlp_out"),
            parallel=arch.parallel,
            q=self.attn_hook(l, "hook_q"), k=self.attn_hook(l, "hook_k"),
            v=self.attn_hook(l, "hook_v"), z=self.attn_hook(l, "hook_z"),
            rot_q=self._existing(self.attn_hook(l, "hook_rot_q")) if rotary else None,
            rot_k=self._existing(self.attn_hook(l, "hook_rot_k")) if rotary else None,
            attn_scores=self._existing(self.attn_hook(l, "hook_attn_scores")),
            attn_module=attn,
            attn_softcap=softcap,
            mlp=mlp_site,
            mlp_module=None if arch.attn_only else block.mlp,
        )

    def _mlp_site(self, l: int, mlp: torch.nn.Module) -> MLPSite:
        name = type(mlp).__name__
        if self.arch.is_bridge:
            return self._bridge_mlp_site(l, mlp, name)
        if name == "MLP":
            return MLPSite("plain", pre=self.mlp_hook(l, "hook_pre"), post=self.mlp_hook(l, "hook_post"),
                           act=mlp.act_fn, module=mlp)
        if name == "GatedMLP":
            return MLPSite("gated", pre=self.mlp_hook(l, "hook_pre"), pre_linear=self.mlp_hook(l, "hook_pre_linear"),
                           post=self.mlp_hook(l, "hook_post"), act=mlp.act_fn, module=mlp)
        if name == "MoE":
            experts = tuple(
                MLPSite("gated", pre=self.mlp_hook(l, f"experts.{e}.hook_gate"),
                        pre_linear=self.mlp_hook(l, f"experts.{e}.hook_pre"),
                        post=self.mlp_hook(l, f"experts.{e}.hook_post"), act=expert.act_fn, module=expert)
                for e, expert in enumerate(mlp.experts)
            )
            return MLPSite("moe", experts=experts, router=self.mlp_hook(l, "hook_expert_weights"), module=mlp)
        raise UnsupportedModelError(
            f"blocks.{l}.mlp is a {name}, which has no LRP rule here (supported: MLP, GatedMLP, MoE)"
        )

    def _bridge_mlp_site(self, l: int, mlp: torch.nn.Module, name: str) -> MLPSite:
        if name == "MoEBridge":
            return self._bridge_moe_site(l, mlp)
        hf = mlp.original_component
        acts = [m for m in hf.children() if _is_activation_module(m)]
        if len(acts) != 1:
            found = [type(m).__name__ for m in hf.children()]
            raise UnsupportedModelError(
                f"blocks.{l}.mlp ({name} around {type(hf).__name__}) has no single element-wise activation "
                f"module cage_lens knows (children: {found}); its non-linearity has no LRP rule here"
            )
        act = acts[0]
        if name in ("GatedMLPBridge", "JointGateUpMLPBridge"):
            return MLPSite("gated", pre=self.mlp_hook(l, "hook_pre"), pre_linear=self.mlp_hook(l, "hook_pre_linear"),
                           post=self.mlp_hook(l, "hook_post"), act=act, module=mlp)
        if name in ("MLPBridge", "BloomMLPBridge"):
            return MLPSite("plain", pre=self.mlp_hook(l, "hook_pre"), post=self.mlp_hook(l, "hook_post"),
                           act=act, module=mlp)
        raise UnsupportedModelError(f"blocks.{l}.mlp is a {name}, which has no LRP rule here")

    def _bridge_moe_site(self, l: int, mlp: torch.nn.Module) -> MLPSite:
        hf = mlp.original_component
        children = dict(hf.named_children())
        router = self._existing(self.mlp_hook(l, "gate.hook_expert_weights"))
        experts = children.get("experts")
        unknown = sorted(n for n in children if n not in ("gate", "experts"))
        if router is None or experts is None or unknown:
            raise UnsupportedModelError(
                f"blocks.{l}.mlp ({type(hf).__name__}) is a mixture of experts cage_lens cannot cover: "
                + ("no router weights hook" if router is None else
                   "no experts module" if experts is None else f"unknown parts {unknown} (e.g. shared experts)")
            )
        acts = [m for m in experts.children() if _is_activation_module(m)]
        has_own_params = any(p.ndim >= 3 for p in experts.parameters(recurse=False))
        if len(acts) != 1 or not has_own_params:
            raise UnsupportedModelError(
                f"blocks.{l}.mlp.experts ({type(experts).__name__}) is not a fused gated experts module with one "
                "activation; no LRP rule here"
            )
        return MLPSite("moe", fused_experts=experts, fused_act=acts[0], router=router, module=mlp)

    def input_norm(self, layer: int, branch: str) -> NormSite | None:
        """The norm whose output feeds the attention (``branch="attn"``) or the MLP of ``layer``
        (None: the sublayer reads the raw residual, e.g. OLMo-2's post-norm blocks)."""
        block = self.model.blocks[layer]
        module = getattr(block, "ln1" if branch == "attn" else "ln2", None)
        if module is None and branch == "mlp" and self.arch.parallel:
            module = getattr(block, "ln1", None)  # GPT-J: one norm feeds both branches
        for site in self.norm_sites:
            if site.module is module:
                return site
        return None

    def attention_window(self, layer: int) -> int | None:
        """How many positions up to and including its own each query of ``layer`` attends to (a sliding
        window), or None when it attends to every earlier position."""
        if not self.arch.is_bridge:
            cfg = self.model.cfg
            types = getattr(cfg, "attn_types", None) or ["local"] * self.arch.n_layers   # unnamed: every layer local
            local = getattr(cfg, "use_local_attn", False) and types[layer] == "local"
            return int(cfg.window_size) if local and cfg.window_size else None
        hf = getattr(self.model.blocks[layer].attn, "original_component", None)
        # Hugging Face: a per-layer ``sliding_window`` on the module, or (Mistral) the config's for every layer
        window = getattr(hf, "sliding_window") if hasattr(hf, "sliding_window") else \
            getattr(getattr(hf, "config", None), "sliding_window", None)
        return int(window) if isinstance(window, int) and window > 0 else None

    def score_scale(self, layer: int) -> float | None:
        """The factor multiplying ``q·k`` in the attention scores of ``layer`` (None: unknown)."""
        attn = self.model.blocks[layer].attn
        if not self.arch.is_bridge:
            return 1.0 / float(attn.attn_scale)
        hf = getattr(attn, "original_component", None)
        for name, invert in (("scaling", False), ("inv_norm_factor", False), ("scale_attn", True)):
            value = getattr(hf, name, None)
            if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
                value = float(value)
                return 1.0 / value if invert else value
        for owner in (attn, hf):  # TL-native attention (boot_native)
            value = getattr(owner, "attn_scale", None)
            if isinstance(value, (int, float)) and value > 0:
                return 1.0 / float(value)
        cfg = self.model.cfg
        if not getattr(cfg, "use_attn_scale", True):
            return 1.0
        scale = getattr(cfg, "attn_scale", None)
        return 1.0 / (float(scale) if isinstance(scale, (int, float)) and scale > 0 else self.arch.d_head ** 0.5)

    @cached_property
    def _stash_point_ids(self) -> frozenset[int]:
        hook_dict = self.hook_points
        points = []
        for site in self.layers:
            if site.attn_softcap:
                points += [hook_dict[n] for n in (site.rot_q or site.q, site.rot_k or site.k) if n]
            for mlp in (site.mlp, *(site.mlp.experts if site.mlp else ())):
                if mlp is not None:
                    points += [hook_dict[n] for n in (mlp.pre, mlp.pre_linear) if n]
        points += [norm.in_hook for norm in self.norm_sites if norm.in_hook is not None]
        return frozenset(id(p) for p in points)

    def is_stash_point(self, name: str) -> bool:
        """Whether a rule keeps the tensor of this hook point for a later hook (captures there go
        first, see :func:`cage_lens.core.hooks.installed`)."""
        point = self.hook_points.get(name)
        return point is not None and id(point) in self._stash_point_ids

    # ------------------------------------------------------------------ hooks that must exist and fire
    def required_hooks(self) -> list[str]:
        names = [self.embed_hook]
        for site in self.layers:
            names += [site.resid_pre, site.resid_post, site.attn_out, site.q, site.k, site.v, site.z]
            if site.mlp_out:
                names.append(site.mlp_out)
            if site.attn_softcap:  # the soft-cap rule reads the rotated queries and keys
                names += [n for n in (site.rot_q, site.rot_k, site.attn_scores) if n]
            names += self._mlp_hook_names(site.mlp)
        return names

    def _mlp_hook_names(self, mlp: MLPSite | None) -> list[str]:
        if mlp is None:
            return []
        names = [n for n in (mlp.pre, mlp.pre_linear, mlp.post, mlp.router) if n]
        for expert in mlp.experts:
            names += self._mlp_hook_names(expert)
        return names

    def _named_hooks(self) -> list[str]:
        """The hook names every supported model has (checked before its modules are read)."""
        names = [self.embed_hook]
        for l in range(self.arch.n_layers):
            names += [self.block(l, "hook_resid_pre"), self.block(l, "hook_resid_post"), self.block(l, "hook_attn_out")]
            names += [self.attn_hook(l, n) for n in ("hook_q", "hook_k", "hook_v", "hook_z")]
        return names

    def _check_hooks_exist(self) -> None:
        self._refuse_missing([n for n in self._named_hooks() if n not in self.hook_points])
        try:
            required = self.required_hooks()
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.arch.describe()}) does not have the blocks/attn/mlp layout "
                f"of a TransformerLens decoder: {exc}"
            ) from None
        self._refuse_missing([n for n in required if n not in self.hook_points])

    def _refuse_missing(self, missing: list[str]) -> None:
        if missing:
            shown = ", ".join(missing[:6]) + (" …" if len(missing) > 6 else "")
            raise UnsupportedModelError(
                f"{type(self.model).__name__} ({self.arch.describe()}) lacks hook points the LRP rules "
                f"need: {shown}"
            )

    def optional_hooks(self) -> list[str]:
        """Hooks the graph's closed form reads where they fire (rotated q/k, rotary tables, scores)."""
        names = []
        for l in range(self.arch.n_layers):
            names += [self.attn_hook(l, n) for n in ("hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin",
                                                     "hook_attn_scores", "hook_pattern")]
        return names

    def expert_hooks(self) -> set[str]:
        """Hooks inside mixture-of-experts experts: they fire only when a token is routed there."""
        return {n for site in self.layers if site.mlp for e in site.mlp.experts for n in self._mlp_hook_names(e)}

    # ------------------------------------------------------------------ precision
    def at_precision(self, precision: str) -> "ModelAdapter":
        """The adapter to compute on for ``precision`` (docs/rules.md#precision): this one, or for
        ``"float32"`` on a bfloat16/float16 model an adapter of an exact float32 copy of it (the same
        rounded weights; the user's hooks copied, the running cage_lens calls' own left out). The copy
        lives as long as the returned adapter; it is not certified again (its module tree is the
        model's, certified as such)."""
        if check_precision(precision) == "model" or not is_low_precision(self.dtype):
            return self
        return ModelAdapter(upcast_copy(self.model, without_hooks=self.call_hooks))

    # ------------------------------------------------------------------ repairs
    def repairs(self) -> list[tuple[str, Callable]]:
        """``(hook name, fn)`` pairs every cage_lens forward of this model runs with, where a
        TransformerLens bridge cannot run the model as Hugging Face does (docs/architectures.md#transformerlens-facts).

        TL 4.3's reconstructed rotary attention (``PositionEmbeddingsAttentionBridge``) applies Llama's
        ``apply_rotary_pos_emb``, which keeps the dtype of ``cos``/``sin``; OLMo-2/3's rotary embedding
        returns them in float32, so in a bfloat16/float16 model the rotated queries and keys become
        float32 and the pattern (cast to the queries' dtype) no longer multiplies the 16-bit values:
        no forward runs. OLMo's own ``apply_rotary_pos_emb`` casts the rotated queries and keys back to
        their dtype; the repair does the same at ``hook_rot_q``/``hook_rot_k`` (the bridge's logits then
        equal Hugging Face's bit for bit, tested). It acts only on a float32 tensor in a 16-bit model."""
        dtype = self.dtype
        if not self.arch.is_bridge or dtype not in (torch.bfloat16, torch.float16):
            return []

        def back_to_model_dtype(tensor, hook):
            return tensor.to(dtype) if tensor.dtype == torch.float32 else None

        names = [self.attn_hook(l, n) for l in range(self.arch.n_layers) for n in ("hook_rot_q", "hook_rot_k")]
        return [(name, back_to_model_dtype) for name in names if name in self.hook_points]

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


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def visible_keys(queries: torch.Tensor, n_keys: int, window: int | None, first: int = 0) -> torch.Tensor:
    """``[query, key]`` for the keys ``first … n_keys − 1``: whether each query position attends to the
    key — the earlier ones, and only the last ``window`` of them (its own included) under a sliding window."""
    keys = torch.arange(first, n_keys, device=queries.device)[None, :]
    visible = keys <= queries[:, None]
    return visible if window is None else visible & (keys > queries[:, None] - window)


def model_state(model, ignored: set[int] = frozenset()) -> tuple:
    """What the completeness certificate and the structure sites depend on, as a comparable value:
    per module (in tree order) its path, identity and class, a ``forward`` replaced on the instance, and
    the ids of its forward / backward (pre-)hooks except ``ignored``; torch's global module hooks; and
    the dtypes and devices of the parameters. Parameter *values* are not part of it: the certificate
    holds for any weights (docs/rules.md#completeness-certificate). One walk over the module tree
    (~1 µs per module: it runs on every call)."""
    modules, params = [], set()
    for path, module in walk_modules(model):
        attributes = module.__dict__
        hook_dicts = [attributes.get(name) for name in _HOOK_DICTS]
        # tuple(d) copies in one step: another thread's call may be adding its own hooks meanwhile
        hooks = tuple(k for d in hook_dicts if d for k in tuple(d) if k not in ignored) if any(hook_dicts) else ()
        modules.append((path, id(module), type(module), id(attributes.get("forward")), hooks))
        params.update((p.dtype, p.device) for p in tuple(attributes.get("_parameters", {}).values()) if p is not None)
    from torch.nn.modules import module as torch_module

    global_hooks = tuple(tuple(getattr(torch_module, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    return tuple(modules), global_hooks, frozenset(params)


def walk_modules(model):
    """``(path, module)`` of every module once, in ``named_modules`` order (a plain loop, faster than
    ``named_modules``: the model's state is read on every call)."""
    seen, stack = set(), [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = [(f"{path}.{name}" if path else name, child)
                    for name, child in tuple(module.__dict__.get("_modules", {}).items()) if child is not None]
        stack.extend(reversed(children))


#: model -> the caches its adapters share (weak keys; the caches never refer to the model)
_ADAPTERS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def adapt(model) -> ModelAdapter:
    """An adapter of ``model`` over the model's shared caches (built on first use), following the
    model's current state (:meth:`ModelAdapter.follow`). An adapter passed in is followed and returned."""
    if isinstance(model, ModelAdapter):
        return model.follow()
    with _ADAPTERS_LOCK:
        try:
            caches = _ADAPTERS.get(model)
        except TypeError:  # not hashable or not weakly referable: an adapter of its own every call
            return ModelAdapter(model)
        if caches is None:
            adapter = ModelAdapter(model)
            _ADAPTERS[model] = adapter.__dict__
            return adapter
    return ModelAdapter._sharing(model, caches).follow()
