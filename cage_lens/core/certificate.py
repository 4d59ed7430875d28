"""Completeness certificate: a model gets relevance only when the rules provably cover it
(layer 7 of :mod:`cage_lens.core`; docs/rules.md#completeness-certificate).

Under CP-LRP every non-linear factor is frozen (norm scales, q and k, gates, router weights,
element-wise ratios), so the network seen by the backward pass is affine in its inputs and its
biases. For any weights, then,

    Σ_tokens R(embeddings) + Σ_biases b · ∂f/∂b = f        (and the same from every residual point:
    Σ_tokens R(point) + Σ_{biases after the point} b · ∂f/∂b = f).

:func:`certify` checks this once per model state on a few tokens (cached on the adapter, checked again
after any change of the module tree, the hooks, the dtype or the device) and localises the first
component where it breaks: a non-linearity without a rule (a new activation, a soft-cap, an
unhooked norm) leaks relevance there. The q/k path is invisible to the identity (CP-LRP detaches
it), so the certificate also walks the module tree: every normalisation module — q/k norms included —
must carry the identity rule, and every TransformerLens bridge component must be one the rules know.

Bias entry points: a bias parameter ``b`` of module ``m`` enters where it is added, ``b·∂f/∂b`` is
``Σ b ⊙ g`` with ``g`` the gradient at that tensor (module outputs for Hugging Face layers and norms;
``hook_q/k/v``, ``hook_pre``, ``hook_post`` for HookedTransformer's own components).
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass, field

import torch

from cage_lens.core import engine
from cage_lens.core.adapter import ModelAdapter, is_norm_module
from cage_lens.core.hooks import ModuleHook, ModulePreHook, PointHook, installed, session
from cage_lens.core.rulesets import CPLRP
from cage_lens.errors import UnsupportedModelError

__all__ = ["Certificate", "certify", "certify_or_warn", "KNOWN_BRIDGE_COMPONENTS"]

#: TransformerLens bridge components whose computation the rules cover (checked per family in
#: tests/test_architectures.py); anything else in a bridge is refused by name
KNOWN_BRIDGE_COMPONENTS = frozenset({
    "EmbeddingBridge", "PosEmbedBridge", "RotaryEmbeddingBridge", "UnembeddingBridge", "LinearBridge",
    "NormalizationBridge", "RMSNormalizationBridge", "BlockBridge", "ParallelBlockBridge", "_OptBlockBridge",
    "BloomBlockBridge", "AttentionBridge", "JointQKVAttentionBridge", "PositionEmbeddingsAttentionBridge",
    "JointQKVPositionEmbeddingsAttentionBridge", "BloomAttentionBridge", "MLPBridge", "GatedMLPBridge",
    "JointGateUpMLPBridge", "BloomMLPBridge", "MoEBridge", "MoERouterBridge",
})

# HookedTransformer components: where each bias parameter is added ("output": the module's output)
_TL_BIAS_ENTRY = {
    ("Attention", "b_Q"): "hook_q", ("Attention", "b_K"): "hook_k", ("Attention", "b_V"): "hook_v",
    ("Attention", "b_O"): "output",
    ("GroupedQueryAttention", "b_Q"): "hook_q", ("GroupedQueryAttention", "_b_K"): "hook_k",
    ("GroupedQueryAttention", "_b_V"): "hook_v", ("GroupedQueryAttention", "b_O"): "output",
    ("MLP", "b_in"): "hook_pre", ("MLP", "b_out"): "output",
    ("GatedMLP", "b_in"): "hook_post", ("GatedMLP", "b_out"): "output",
    ("LayerNorm", "b"): "output", ("Unembed", "b_U"): "output",
}

_PROBE_TOKENS = 6


@dataclass
class Certificate:
    """Outcome of the completeness check of one model (see the module docstring).

    ``errors`` maps each residual point (and ``"embeddings"``) to the relative error of the identity
    there; ``max_error`` is the largest. ``seconds`` is the one-time cost."""

    passed: bool
    reason: str
    max_error: float
    tolerance: float
    dtype: str
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)

    def error(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.reason}. cage_lens refuses to return relevance it cannot vouch for; pass strict=False to "
            "compute it anyway (recorded as a warning in the result), see docs/architectures.md"
        )


def _tolerance(dtype: torch.dtype) -> float:
    # The identity is exact in exact arithmetic; what remains is summation rounding over a few tokens
    # and layers (measured ≤ 1e-14 relative in float64 on every supported family, ~1e-6 in float32).
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)


def certify(adapter: ModelAdapter) -> Certificate:
    """The completeness certificate of ``adapter.model`` in its current state: cached on the adapter,
    which forgets it whenever the model's module tree, hooks, dtype or device change
    (:func:`cage_lens.core.adapter.model_state`), so any change is certified again, once."""
    adapter.follow()
    if adapter.certificate is None:
        with session(adapter), engine.suspended(adapter):
            adapter.certificate = _certify(adapter)
            adapter.settle()  # a bridge wires some of its own hooks in its first forward (the probe's)
    return adapter.certificate


def certify_or_warn(adapter: ModelAdapter, strict: bool = True) -> list[str]:
    """Run (once per model state) the completeness certificate; refuse an uncertified model unless
    ``strict=False``, which returns the warning to record in the result."""
    cert = certify(adapter)
    if cert.passed:
        return []
    if strict:
        raise cert.error()
    message = f"uncertified model (strict=False): {cert.reason}"
    warnings.warn(message, stacklevel=3)
    return [message]


def _certify(adapter: ModelAdapter) -> Certificate:
    start = time.perf_counter()
    dtype = adapter.dtype
    tol = _tolerance(dtype)
    structural = _structural_problems(adapter)
    if structural:
        return Certificate(False, structural[0], float("nan"), tol, str(dtype), time.perf_counter() - start)
    errors, leak = _identity_errors(adapter)
    max_error = max(errors.values())
    passed = max_error <= tol
    reason = "certified" if passed else leak(tol)
    return Certificate(passed, reason, max_error, tol, str(dtype), time.perf_counter() - start, errors)


# ---------------------------------------------------------------------------- structure
def _structural_problems(adapter: ModelAdapter) -> list[str]:
    """Norm-like modules without the identity rule, bridge components the rules do not know."""
    covered = [site.path for site in adapter.norm_sites]
    problems = []
    for path, module in adapter.model.named_modules():
        name = type(module).__name__
        inside_norm = any(path == c or path.startswith(c + ".") for c in covered)
        if "norm" in name.lower() and not inside_norm and not is_norm_module(module):
            problems.append(f"{path} ({name}) looks like a normalisation but carries no identity rule")
        if _is_bridge_component(module) and name not in KNOWN_BRIDGE_COMPONENTS and not _wraps_identity(module):
            problems.append(f"{path} is a {name}, a TransformerLens component cage_lens has no LRP rule for")
    return problems


def _is_bridge_component(module: torch.nn.Module) -> bool:
    return any(c.__name__ == "GeneralizedComponent" for c in type(module).__mro__)


def _wraps_identity(module: torch.nn.Module) -> bool:
    """A bridge placeholder around ``nn.Identity`` (a model without that norm): nothing to rule."""
    return isinstance(getattr(module, "original_component", None), torch.nn.Identity)


# ---------------------------------------------------------------------------- the identity
class _Recorder:
    """Captures with a global firing order: residual points and bias entry points."""

    def __init__(self):
        self.counter = itertools.count()
        self.points: dict[str, tuple[int, torch.Tensor]] = {}
        self.biases: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []  # order, label, bias, output
        self.entries: dict[str, list[int]] = {}

    def point(self, name: str, root: bool = False):
        def hook(tensor, hook):
            if root:
                tensor = tensor.detach().requires_grad_(True)
            self.points[name] = (next(self.counter), tensor)
            return tensor
        return hook

    def bias_at_point(self, label: str, bias: torch.Tensor):
        def hook(tensor, hook):
            self.biases.append((next(self.counter), label, bias, tensor))
        return hook

    def module_entry(self, key: str):
        """Pre-hook noting when a module starts: its bias is upstream of every hook point inside it."""
        def hook(module, args, kwargs):
            self.entries.setdefault(key, []).append(next(self.counter))
        return hook

    def bias_at_output(self, label: str, bias: torch.Tensor, key: str):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            self.biases.append((self.entries[key].pop(), label, bias, out))
        return hook


def _bias_hooks(adapter: ModelAdapter, rec: _Recorder) -> list:
    """Hooks recording the tensor each bias parameter is added to (see the module docstring)."""
    model, hooks = adapter.model, []
    wrapper_of = {}
    for path, module in model.named_modules():
        inner = getattr(module, "original_component", None)
        if isinstance(inner, torch.nn.Module):
            wrapper_of.setdefault(id(inner), (path, module))
    for path, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if not (pname == "bias" or pname == "b" or pname.startswith(("b_", "_b_"))):
                continue
            label = f"{path}.{pname}"
            cls = type(module).__name__
            entry = _TL_BIAS_ENTRY.get((cls, pname))
            if entry not in (None, "output"):
                hooks.append(PointHook(getattr(module, entry), rec.bias_at_point(label, param)))
                continue
            if entry is None and pname != "bias":
                raise UnsupportedModelError(f"bias {label} of {cls}: cage_lens does not know where it is added")
            owner = module
            while id(owner) in wrapper_of:  # hook the outermost bridge wrapper: its output carries the bias
                owner = wrapper_of[id(owner)][1]
            hooks += [ModulePreHook(owner, rec.module_entry(label)), ModuleHook(owner, rec.bias_at_output(label, param, label))]
    return hooks


def _probe_tokens(adapter: ModelAdapter) -> torch.Tensor:
    n = min(_PROBE_TOKENS, adapter.arch.n_ctx)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, adapter.arch.d_vocab, (1, n), generator=generator).to(adapter.device)


def _identity_errors(adapter: ModelAdapter):
    """Relative error of the identity at the inputs and at every residual point, and a function
    naming where it first breaks."""
    rec = _Recorder()
    roots = engine.input_roots(adapter)
    points = engine.residual_captures(adapter)
    tokens = _probe_tokens(adapter)
    targets = torch.randint(0, adapter.arch.d_vocab, (tokens.shape[1],), generator=torch.Generator().manual_seed(1))
    capture = [PointHook(n, rec.point(n, root=n in roots)) for n in roots]
    capture += [PointHook(n, rec.point(n)) for n in points]
    with installed(adapter, _bias_hooks(adapter, rec)), engine.rules_active(adapter, CPLRP), \
            installed(adapter, capture):
        logits = adapter.model(tokens)
        value = logits[0, torch.arange(tokens.shape[1]), targets.to(logits.device)].sum()
        engine.check_finite(value, "the model's output on a probe input")
        tensors = {name: t for name, (_, t) in rec.points.items()}
        tensors.update({f"bias{i}": out for i, (_, _, _, out) in enumerate(rec.biases)})
        grads = engine.gradients(value, tensors)
    f = float(value.detach())
    contributions = [
        (order, label, float((bias.detach() * grads[f"bias{i}"].detach()).sum()))
        for i, (order, label, bias, _) in enumerate(rec.biases)
    ]
    scale = max(abs(f), sum(abs(c) for _, _, c in contributions), 1e-30)

    def downstream(after: int) -> float:
        return sum(c for order, _, c in contributions if order > after)

    errors: dict[str, float] = {}
    balance: dict[str, float] = {}   # Σ R(point) + Σ biases after it: f at every point when nothing leaks
    inputs = sum(float((rec.points[n][1].detach() * grads[n]).sum()) for n in roots)
    balance["embeddings"] = inputs + downstream(-1)
    for name in adapter.resid_hooks():
        h, g = engine.residual_state(adapter, tensors, grads, name)
        anchor = adapter.layer(int(name.split(".")[1])).attn_out if name.endswith("hook_resid_mid") else name
        balance[name] = float((h * g).sum()) + downstream(rec.points[anchor][0])
    balance["the logits"] = f
    for name, b in balance.items():
        if name != "the logits":
            errors[name] = abs(b - f) / scale

    def leak(tol: float) -> str:
        names = list(balance)
        segments = [(a, b, abs(balance[a] - balance[b]) / scale) for a, b in zip(names[:-1], names[1:])]
        leaking = [seg for seg in segments if seg[2] > tol]
        a, b, size = leaking[0]
        more = f" (and {len(leaking) - 1} later segment{'s' if len(leaking) > 2 else ''})" if len(leaking) > 1 else ""
        return (f"relevance is not conserved between {a} and {b}{more} under CP-LRP ({size:.2g} of the target leaks "
                f"there, tolerance {tol:g} for {adapter.dtype}): a non-linearity there has no LRP rule "
                f"({adapter.arch.describe()})")

    return errors, leak
