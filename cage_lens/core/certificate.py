"""Completeness certificate: a model gets relevance only when the rules provably cover it
(layer 8 of :mod:`cage_lens.core`; docs/rules.md#completeness-certificate).

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

In floating point the identity holds up to rounding. Each segment between two residual points (one
sublayer, or the final norm and unembedding) may leak ``ROUNDING_MULTIPLE · u_eff · Q`` with ``u_eff``
the dtype's effective unit roundoff and ``Q`` the L2 size of the relevance at its ends
(docs/rules.md#precision); float32 and float64 models may also leak their old relative tolerance.
A bfloat16/float16 model is probed on an exact float32 copy of its weights (a separate module tree,
so the user's model is never touched), where rounding stays 10²–10⁴ times below a missing rule; when the
copy does not fit in memory (or cannot be made) the probe runs in the model's own dtype against the
same bound, and the certificate says what that cannot exclude.

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
from cage_lens.core.hooks import ModuleHook, ModulePreHook, PointHook, fired_hooks, installed, session
from cage_lens.core.memory import free_bytes
from cage_lens.core.precision import (
    effective_roundoff, float32_copy_bytes, is_low_precision, upcast_copy,
)
from cage_lens.core.rulesets import CPLRP
from cage_lens.errors import UnsupportedModelError

__all__ = ["Certificate", "certify", "certify_or_warn", "KNOWN_BRIDGE_COMPONENTS", "ROUNDING_MULTIPLE", "rounding_bound"]

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
#: how many standard deviations of the rounding model a segment may leak (docs/rules.md#precision):
#: rounding-only segments of 16-bit probes measured at ≤ 0.55 of the bound, float32 probes of 16-bit
#: models at ≤ 0.06, a missing rule in a float32 probe at ≥ 15
ROUNDING_MULTIPLE = 4.0
#: the float32 copy of a 16-bit model is made only when it takes at most this share of the free memory
_COPY_SHARE = 0.5


@dataclass
class Certificate:
    """Outcome of the completeness check of one model (see the module docstring).

    ``segments`` maps each segment between consecutive residual points (``"a -> b"``) to its leak
    divided by the leak it may have (rounding bound, or for float32/float64 the relative tolerance if
    larger); the model passes when every ratio is ≤ 1 and ``worst`` is the largest. ``errors`` maps each
    residual point (and ``"embeddings"``) to the relative error of the identity there (|leak| over
    ``max(|f|, Σ|bias contributions|)``, accumulated from the logits), ``max_error`` is the largest
    and ``tolerance`` the relative tolerance of the probe's dtype (0 for a 16-bit probe: the bound
    alone). ``probe`` is the dtype the identity was checked in; ``limits`` what the check could not
    exclude ("" when nothing). ``seconds`` is the one-time cost."""

    passed: bool
    reason: str
    max_error: float
    tolerance: float
    dtype: str
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)
    segments: dict[str, float] = field(default_factory=dict)
    worst: float = float("nan")
    probe: str = ""
    limits: str = ""

    def error(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.reason}. cage_lens refuses to return relevance it cannot vouch for; pass strict=False to "
            "compute it anyway (recorded as a warning in the result), see docs/architectures.md"
        )


def _tolerance(dtype: torch.dtype) -> float:
    # The identity is exact in exact arithmetic; what remains is summation rounding over a few tokens
    # and layers (measured ≤ 1e-14 relative in float64 on every supported family, ~1e-6 in float32).
    # 16-bit dtypes have none: a tolerance relative to the target misfires when the probe's logits
    # cancel, and hides small leaks otherwise (docs/rules.md#precision); the rounding bound decides.
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 0.0)


def rounding_bound(dtype: torch.dtype, contraction: int, sum_of_squares: float) -> float:
    """The leak rounding may cause in one segment: ``ROUNDING_MULTIPLE · u_eff · sqrt(Σ(h⊙g)²)``
    (docs/rules.md#precision), ``sum_of_squares`` summed over both ends, the branch and the biases."""
    return ROUNDING_MULTIPLE * effective_roundoff(dtype, contraction) * sum_of_squares**0.5


def certify(adapter: ModelAdapter) -> Certificate:
    """The completeness certificate of ``adapter.model`` in its current state: cached on the adapter,
    which forgets it whenever the model's module tree, hooks, dtype or device change
    (:func:`cage_lens.core.adapter.model_state`), so any change is certified again, once."""
    adapter.follow()
    if adapter.certificate is None:
        with session(adapter), engine.suspended(adapter):
            fired_hooks(adapter)  # the model's own first forward (a bridge wires some hooks of its own there)
            adapter.certificate = _certify(adapter)
            adapter.settle()
    return adapter.certificate


def certify_or_warn(adapter: ModelAdapter, strict: bool = True) -> list[str]:
    """Run (once per model state) the completeness certificate; refuse an uncertified model unless
    ``strict=False``, which returns the warning to record in the result. A certificate with limits
    (a 16-bit model checked in its own dtype) returns them as a note to record."""
    cert = certify(adapter)
    if cert.passed:
        return [f"certificate: {cert.limits}"] if cert.limits else []
    if strict:
        raise cert.error()
    message = f"uncertified model (strict=False): {cert.reason}"
    warnings.warn(message, stacklevel=3)
    return [message]


def _certify(adapter: ModelAdapter) -> Certificate:
    start = time.perf_counter()
    dtype = adapter.dtype
    structural = _structural_problems(adapter)
    if structural:
        return Certificate(False, structural[0], float("nan"), _tolerance(dtype), str(dtype), time.perf_counter() - start)
    twin, why_native = _probe_copy(adapter) if is_low_precision(dtype) else (None, "")
    if twin is None:
        probe = _identity(adapter)
    else:
        twin_adapter = ModelAdapter(twin)
        with session(twin_adapter):
            probe = _identity(twin_adapter)
        del twin, twin_adapter
    limits = ""
    if why_native:
        limits = (f"checked in {dtype} only ({why_native}): a missing rule leaking less than "
                  f"{ROUNDING_MULTIPLE:g}·u·sqrt(Σ(h⊙g)²) per segment (u = {effective_roundoff(dtype, 1):.2g}) "
                  "cannot be excluded")
    passed = all(ratio <= 1.0 for ratio in probe.ratios.values())
    if passed:
        reason = "certified" + (f" ({limits})" if limits else "")
    else:
        reason = probe.leak_message(adapter) + (f"; {limits}" if limits else "")
    return Certificate(passed, reason, max(probe.errors.values()), _tolerance(probe.dtype), str(dtype),
                       time.perf_counter() - start, probe.errors, probe.ratios, probe.worst, str(probe.dtype), limits)


def _probe_copy(adapter: ModelAdapter) -> tuple[torch.nn.Module | None, str]:
    """An exact float32 copy of a 16-bit model for the probe, or (None, why not)."""
    need, free = float32_copy_bytes(adapter.model), free_bytes(adapter.device)
    if free is None or need > _COPY_SHARE * free:
        have = "unknown" if free is None else f"{free / 2**30:.1f} GiB"
        return None, f"a float32 copy of the weights needs {need / 2**30:.1f} GiB, free memory {have}"
    try:
        return upcast_copy(adapter.model, without_hooks=adapter.call_hooks), ""
    except Exception as exc:  # noqa: BLE001 - any failure to copy falls back to the native probe, said so
        return None, f"the model could not be copied to float32: {type(exc).__name__}: {str(exc)[:120]}"


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


@dataclass
class _Probe:
    """The identity on the probe input: per residual point its balance Σ R(point) + Σ biases after it
    (the target at every point when nothing leaks) and Σ(h⊙g)² (with the biases' squares after it);
    per segment its leak over what it may leak."""

    dtype: torch.dtype
    f: float
    scale: float                     # max(|f|, Σ|bias contributions|): the old relative scale
    balance: dict[str, float]
    squares: dict[str, float]
    branch: dict[str, float]         # Σ((h_b − h_a)⊙g_b)²: what the segment into the point added
    contraction: int
    ratios: dict[str, float] = field(default_factory=dict)
    leaks: dict[str, tuple[str, str, float, float]] = field(default_factory=dict)

    def __post_init__(self):
        names = list(self.balance)
        relative = _tolerance(self.dtype)
        for a, b in zip(names[:-1], names[1:]):
            leak = abs(self.balance[a] - self.balance[b])
            bound = rounding_bound(self.dtype, self.contraction, self.squares[a] + self.squares[b] + self.branch[b])
            allowed = max(relative * self.scale, bound)
            ratio = leak / allowed if allowed > 0 else (0.0 if leak == 0 else float("inf"))
            self.ratios[f"{a} -> {b}"] = ratio
            self.leaks[f"{a} -> {b}"] = (a, b, leak, bound)

    @property
    def errors(self) -> dict[str, float]:
        return {name: abs(b - self.f) / self.scale for name, b in self.balance.items() if name != "the logits"}

    @property
    def worst(self) -> float:
        return max(self.ratios.values())

    def leak_message(self, adapter: ModelAdapter) -> str:
        leaking = [key for key, ratio in self.ratios.items() if not ratio <= 1.0]
        a, b, leak, bound = self.leaks[leaking[0]]
        ratio = self.ratios[leaking[0]]
        more = f" (and {len(leaking) - 1} later segment{'s' if len(leaking) > 2 else ''})" if len(leaking) > 1 else ""
        probe = "" if self.dtype == adapter.dtype else f", probed on a {self.dtype} copy of the {adapter.dtype} weights"
        return (f"relevance is not conserved between {a} and {b}{more} under CP-LRP ({leak / self.scale:.2g} of the "
                f"target leaks there, {ratio:.3g}× what rounding and the tolerance allow in {self.dtype}{probe}): "
                f"a non-linearity there has no LRP rule ({adapter.arch.describe()})")


def _contraction(adapter: ModelAdapter) -> int:
    """The longest dot product of a layer (d_model, d_mlp or heads × d_head)."""
    arch = adapter.arch
    return max(arch.d_model, arch.d_mlp or 0, arch.n_heads * arch.d_head)


def _dot(h: torch.Tensor, g: torch.Tensor) -> float:
    """Σ h⊙g, formed in float64 (in a 16-bit probe the sum itself would round like a segment does)."""
    return float((h.detach().double() * g.detach().double()).sum())


def _squares(h: torch.Tensor, g: torch.Tensor) -> float:
    return float((h.detach().double() * g.detach().double()).pow(2).sum())


def _identity(adapter: ModelAdapter) -> _Probe:
    """CP-LRP's identity on the probe input, at the inputs and every residual point."""
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
        selected = logits[0, torch.arange(tokens.shape[1]), targets.to(logits.device)]
        value = selected.sum()
        engine.check_finite(value, "the model's output on a probe input")
        tensors = {name: t for name, (_, t) in rec.points.items()}
        tensors.update({f"bias{i}": out for i, (_, _, _, out) in enumerate(rec.biases)})
        grads = engine.gradients(value, tensors)
    f = float(value.detach())
    biases = []   # (order, contribution Σ b⊙g, Σ (b⊙g)²)
    for i, (order, _, bias, _) in enumerate(rec.biases):
        part = bias.detach().double() * grads[f"bias{i}"].detach().double()
        biases.append((order, float(part.sum()), float(part.pow(2).sum())))
    scale = max(abs(f), sum(abs(c) for _, c, _ in biases), 1e-30)

    def downstream(after: int) -> tuple[float, float]:
        return sum(c for o, c, _ in biases if o > after), sum(q for o, _, q in biases if o > after)

    balance, squares, branch = {}, {}, {}
    inputs = [(rec.points[n][1].detach(), grads[n]) for n in roots]
    after_inputs = downstream(-1)
    balance["embeddings"] = sum(_dot(h, g) for h, g in inputs) + after_inputs[0]
    squares["embeddings"] = sum(_squares(h, g) for h, g in inputs) + after_inputs[1]
    branch["embeddings"] = 0.0
    previous = sum(h.double() for h, _ in inputs)
    for name in adapter.resid_hooks():
        h, g = engine.residual_state(adapter, tensors, grads, name)
        anchor = adapter.layer(int(name.split(".")[1])).attn_out if name.endswith("hook_resid_mid") else name
        after = downstream(rec.points[anchor][0])
        balance[name] = _dot(h, g) + after[0]
        squares[name] = _squares(h, g) + after[1]
        branch[name] = _squares(h.double() - previous, g) if h.shape == previous.shape else 0.0
        previous = h.double()
    balance["the logits"] = f
    squares["the logits"] = float(selected.detach().double().pow(2).sum())
    branch["the logits"] = 0.0
    return _Probe(adapter.dtype, f, scale, balance, squares, branch, _contraction(adapter))
