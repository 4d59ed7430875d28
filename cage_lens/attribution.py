"""``attribute``: token, residual-node, head and neuron relevance from one forward and one backward pass.

The rule hooks of :mod:`cage_lens.core.realise` change local gradients; capture hooks record the activations
``h`` at the hook points of interest, and a single ``torch.autograd.grad`` call returns ``∂target/∂h``
for all of them at once (:mod:`cage_lens.core.engine`). Relevance is ``Σ_d h ⊙ ∂target/∂h``
(docs/rules.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import networkx as nx
import torch
from jaxtyping import Float, Int

from cage_lens.core import engine
from cage_lens.core.adapter import adapt
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.engine import Capture, run_attribution
from cage_lens.core.hooks import has_position_embedding
from cage_lens.core.precision import check_precision
from cage_lens.core.rulesets import BUILT_IN_RULES, RuleSet, resolve_rules
from cage_lens.errors import InputError
from cage_lens.planning import check_long_context, choose_long_context
from cage_lens.inputs import Inputs, as_int, resolve_positions, to_token_batch
from cage_lens.persist import Saveable, provenance
from cage_lens.targets import Target
from cage_lens.views.terminal import printable

__all__ = ["attribute", "Attribution", "ConservationReport", "NeuronRelevance"]


# ---------------------------------------------------------------------------- result objects
@dataclass
class NeuronRelevance:
    """MLP neuron relevance ``[batch, layer, pos, k]`` with the neuron index of each entry
    (``k = d_mlp`` and ``indices = arange`` when all neurons were kept)."""

    values: Float[torch.Tensor, "batch layer pos k"]
    indices: Int[torch.Tensor, "batch layer pos k"]
    top_k: int | None

    def dense(self, d_mlp: int) -> Float[torch.Tensor, "batch layer pos d_mlp"]:
        out = torch.zeros(*self.values.shape[:3], d_mlp, dtype=self.values.dtype)
        return out.scatter_(-1, self.indices, self.values)


@dataclass
class ConservationReport:
    """Relevance summed over tokens at each residual point, input → output, against the target.

    ``sums[b, i]`` is Σ_pos R at ``points[i]``; the last point is the target itself. ``absorbed[b, i]``
    = ``sums[b, i+1] − sums[b, i]``: relevance the component between the two points does not pass on
    (biases, AttnLRP's softmax, the final norm's bias). Exactly zero everywhere for CP-LRP on a
    bias-free model (docs/rules.md#conservation).
    """

    points: list[str]
    sums: Float[torch.Tensor, "batch point"]
    target: Float[torch.Tensor, "batch"]

    @property
    def absorbed(self) -> Float[torch.Tensor, "batch transition"]:
        return self.sums[:, 1:] - self.sums[:, :-1]

    @property
    def transitions(self) -> list[str]:
        return [f"{a} → {b}" for a, b in zip(self.points[:-1], self.points[1:])]

    def input_share(self) -> Float[torch.Tensor, "batch"]:
        """Fraction of the target that reaches the input tokens."""
        return self.sums[:, 0] / self.target

    def max_error(self) -> float:
        """Largest |Σ_pos R − target| over all points and rows, relative to |target|."""
        return float(((self.sums - self.target[:, None]).abs() / self.target.abs().clamp_min(1e-30)[:, None]).max())

    def table(self, row: int = 0) -> str:
        lines = [f"{'point':<34} {'Σ relevance':>14} {'absorbed':>12}"]
        for i, p in enumerate(self.points):
            absorbed = "" if i == 0 else f"{float(self.absorbed[row, i - 1]):12.5g}"
            lines.append(f"{printable(p):<34} {float(self.sums[row, i]):14.6g} {absorbed}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"points": self.points, "sums": self.sums.tolist(), "target": self.target.tolist()}


@dataclass
class Attribution(Saveable):
    """Relevance of every input token and every hooked node for one explained quantity per row.

    Shapes: ``token_relevance`` and each ``node_relevance[name]`` are ``[batch, pos]``;
    ``head_relevance`` is ``[batch, layer, head, pos]``. Padding positions (right-padded batches)
    hold zeros. Positive relevance supports the target (with a contrast: supports the target *over*
    the contrast).
    """

    tokens: Int[torch.Tensor, "batch pos"]
    lengths: list[int]
    str_tokens: list[list[str]]
    positions: list[int]
    rules: str
    target: Target
    target_value: Float[torch.Tensor, "batch"]
    token_relevance: Float[torch.Tensor, "batch pos"]
    position_relevance: Float[torch.Tensor, "batch pos"] | None
    node_relevance: dict[str, Float[torch.Tensor, "batch pos"]]
    head_relevance: Float[torch.Tensor, "batch layer head pos"]
    neuron_relevance: NeuronRelevance | None
    conservation: ConservationReport
    target_description: str = ""
    #: the rule set's values (``rules`` is its name); filled from the built-in of that name when not given
    rule_set: RuleSet | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rule_set = self.rule_set or BUILT_IN_RULES.get(self.rules)

    # -------------------------------------------------------------- views
    @property
    def input_relevance(self) -> Float[torch.Tensor, "batch pos"]:
        """Token plus position-embedding relevance: everything that enters block 0."""
        if self.position_relevance is None:
            return self.token_relevance
        return self.token_relevance + self.position_relevance

    @property
    def target_ids(self) -> list[int | None]:
        return self.target.target_ids

    @property
    def contrast_ids(self) -> list[int | None]:
        return self.target.contrast_ids

    def layer_trace(self, row: int = 0) -> tuple[list[str], Float[torch.Tensor, "point pos"]]:
        """Residual relevance per (point, token), input → output, for heatmaps of layer × token."""
        names = list(self.node_relevance)
        return names, torch.stack([self.node_relevance[n][row] for n in names])

    def normalized(
        self, row: int = 0, exclude: Sequence[int] = (0,), include_positions: bool = False
    ) -> Float[torch.Tensor, "pos"]:
        """Token relevance of one row (plus position-embedding relevance with ``include_positions``)
        divided by max |R| over the non-excluded tokens. By default the BOS position is excluded: it
        acts as an attention sink (docs/rules.md#attention-sinks)."""
        source = self.input_relevance if include_positions else self.token_relevance
        r = source[row, : self.lengths[row]]
        keep = torch.ones_like(r, dtype=torch.bool)
        keep[_positions_in(exclude, len(r), f"exclude (row {row})")] = False
        scale = r[keep].abs().max() if keep.any() else r.abs().max()
        return r / scale.clamp_min(1e-30)

    def stack(self, point: str = "resid_pre") -> Float[torch.Tensor, "batch layer pos"]:
        """Residual relevance at ``point`` (``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``) of every
        layer, stacked like TransformerLens' ``[layer, pos]`` patching grids (batch first)."""
        names = [n for n in self.node_relevance if n.endswith(f".hook_{point}")]
        if not names:
            points = sorted({n.rsplit(".hook_", 1)[-1] for n in self.node_relevance})
            raise InputError(f"no residual point {point!r}; this attribution has {', '.join(points)}")
        return torch.stack([self.node_relevance[n] for n in names], dim=1)

    def head_grid(self, by_pos: bool = True) -> Float[torch.Tensor, "batch layer ..."]:
        """Head relevance in TransformerLens' patching axis order: ``[batch, layer, pos, head]`` (as
        ``get_act_patch_attn_head_out_by_pos``) or, with ``by_pos=False``, summed over positions to
        ``[batch, layer, head]`` (as ``get_act_patch_attn_head_out_all_pos``)."""
        if by_pos:
            return self.head_relevance.transpose(2, 3)
        return self.head_relevance.sum(-1)

    @property
    def head_labels(self) -> list[str]:
        """``"L{layer}H{head}"`` in layer-major order, as TL's ``stack_head_results`` labels its rows."""
        n_layers, n_heads = self.head_relevance.shape[1:3]
        return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]

    def stack_head_relevance(
        self, return_labels: bool = False
    ) -> Float[torch.Tensor, "node batch pos"] | tuple[Float[torch.Tensor, "node batch pos"], list[str]]:
        """One row per head (layer-major, labels in :attr:`head_labels`), like TL's ``stack_head_results``."""
        b, n_layers, n_heads, p = self.head_relevance.shape
        stacked = self.head_relevance.permute(1, 2, 0, 3).reshape(n_layers * n_heads, b, p)
        return (stacked, self.head_labels) if return_labels else stacked

    def top_tokens(self, k: int = 5, row: int = 0) -> list[tuple[int, str, float]]:
        r = self.token_relevance[row, : self.lengths[row]]
        order = r.abs().argsort(descending=True)[:k].tolist()
        return [(i, self.str_tokens[row][i], float(r[i])) for i in order]

    # -------------------------------------------------------------- export
    def to_dict(self) -> dict:
        return {
            "rules": self.rules,
            "rule_set": None if self.rule_set is None else self.rule_set.to_dict(),
            "target": self.target_description,
            "target_ids": self.target.target_ids,
            "contrast_ids": self.target.contrast_ids,
            "positions": self.positions,
            "target_value": self.target_value.tolist(),
            "str_tokens": self.str_tokens,
            "tokens": [t[:n] for t, n in zip(self.tokens.tolist(), self.lengths)],
            "token_relevance": [r[:n] for r, n in zip(self.token_relevance.tolist(), self.lengths)],
            "position_relevance": None if self.position_relevance is None else [
                r[:n] for r, n in zip(self.position_relevance.tolist(), self.lengths)
            ],
            "node_relevance": {
                k: [r[:n] for r, n in zip(v.tolist(), self.lengths)] for k, v in self.node_relevance.items()
            },
            "head_relevance": self.head_relevance.tolist(),
            "neuron_relevance": None if self.neuron_relevance is None else {
                "top_k": self.neuron_relevance.top_k,
                "values": [r[:, :n].tolist() for r, n in zip(self.neuron_relevance.values, self.lengths)],
                "indices": [r[:, :n].tolist() for r, n in zip(self.neuron_relevance.indices, self.lengths)],
            },
            "conservation": self.conservation.to_dict(),
            "meta": self.meta,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_html(self, path=None) -> str:
        """Self-contained HTML page: token heatmaps, layer × token relevance, head relevance and the
        conservation table. Written to ``path`` when given; the HTML string is returned either way."""
        from cage_lens.views.viewer import attribution_page

        return attribution_page(self, path)

    def plot(self, row: int = 0, **kwargs):
        """Matplotlib figure: token heatmap and layer × token relevance (needs ``cage-lens[plot]``)."""
        from cage_lens.views.plots import plot_attribution

        return plot_attribution(self, row, **kwargs)

    def to_networkx(self, row: int = 0) -> nx.DiGraph:
        """Nodes ``(point, pos)`` with their relevance; edges join the same position at consecutive
        residual points (the residual stream). Cross-token edges are :func:`cage_lens.circuit_graph`'s job."""
        g = nx.DiGraph(target=self.target_description, rules=self.rules)
        names = ["tokens"] + list(self.node_relevance)
        n = self.lengths[row]
        for pos in range(n):
            g.add_node(("tokens", pos), relevance=float(self.input_relevance[row, pos]), token=self.str_tokens[row][pos])
            for name in self.node_relevance:
                g.add_node((name, pos), relevance=float(self.node_relevance[name][row, pos]), token=self.str_tokens[row][pos])
            for a, b in zip(names[:-1], names[1:]):
                g.add_edge((a, pos), (b, pos), kind="residual")
        return g

    # -------------------------------------------------------------- display
    def __repr__(self) -> str:
        b, p = self.token_relevance.shape
        lines = [
            f"Attribution(rules={self.rules!r}, target={self.target_description}, batch={b}, pos={p})",
            f"  target value: {[round(v, 4) for v in self.target_value.tolist()]}",
            f"  input share of target: {[round(v, 4) for v in self.conservation.input_share().tolist()]}",
        ]
        for row in range(min(b, 3)):
            top = ", ".join(f"{t!r}@{i}: {r:+.3g}" for i, t, r in self.top_tokens(5, row))
            lines.append(f"  row {row} top tokens: {top}")
        return "\n".join(printable(line) for line in lines)  # names and tokens may come from a loaded file

    def _repr_html_(self) -> str:
        from cage_lens.views.html import attribution_html

        return attribution_html(self)

    def show(self, row: int = 0) -> str:
        """Terminal rendering: tokens with signed, max-normalised relevance."""
        from cage_lens.views.terminal import terminal_heatmap

        return terminal_heatmap(self.str_tokens[row], self.normalized(row).tolist())


# ---------------------------------------------------------------------------- attribute
def attribute(
    model,
    inputs: Inputs,
    target=None,
    contrast=None,
    *,
    rules: "str | RuleSet" = "attnlrp",
    mode: str | Callable = "logit",
    position: int | Sequence[int] = -1,
    neurons: int | str | None = None,
    top_k: int = 10,
    prepend_bos: bool | None = None,
    strict: bool = True,
    precision: str = "model",
    long_context: bool | None = None,
) -> Attribution:
    """Explain ``target`` (minus ``contrast``) at ``position`` with LRP rules, in one backward pass.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        inputs: a prompt, a list of prompts (right-padded), or a ``[batch, pos]`` token tensor.
        target: token string (exactly one token), id, one per row, or a callable on the logits
            ``[batch, vocab] -> [batch]``. ``None`` explains the model's own top-1 prediction.
        contrast: a second token: explain ``target − contrast`` (failure analysis).
        rules: ``"attnlrp"``, ``"cplrp"``, ``"gxi"`` or a :class:`cage_lens.RuleSet`.
        mode: ``"logit"``, ``"logprob"``, ``"demean"``, ``"topk_avg"`` (``top_k`` logits) or a callable.
        position: explained position (negative counts from each row's last real token).
        neurons: ``None``, ``"all"`` or ``k`` (top-k MLP neurons per position by |R|).
        prepend_bos: override the model's default BOS handling when tokenising strings.
        strict: refuse a model the completeness certificate does not pass (docs/rules.md);
            ``False`` computes anyway and records the reason in ``meta["warnings"]``.
        precision: ``"model"`` (the model's dtype) or ``"float32"``: a bfloat16/float16 model is
            computed on an exact float32 copy of its weights (docs/rules.md#precision).
        long_context: recompute each block in the backward and compute attention in row chunks
            instead of keeping every layer's patterns (docs/long_context.md): the memory of one layer,
            the same numbers to rounding, about one more forward pass. ``None`` chooses it when
            :func:`cage_lens.estimate` says the default pass would not fit the memory available, and
            refuses a run that would not fit either way.
    """
    adapter = adapt(model)
    rule_set = resolve_rules(rules)
    adapter.check_eval_mode()
    batch = to_token_batch(model, inputs, prepend_bos)
    positions = resolve_positions(position, batch.lengths)
    spec = Target.build(model, batch.batch, target, contrast, mode, top_k)
    arch = adapter.arch
    if neurons is not None and arch.attn_only:
        raise InputError("neurons= was requested but the model is attention-only (no MLP neurons)")
    if neurons is not None and arch.moe:
        raise InputError("neurons= is not available for a mixture of experts (each token uses different experts)")
    if as_int(neurons) is not None:
        neurons = as_int(neurons)
    if neurons is not None and not (neurons == "all" or (type(neurons) is int and 0 < neurons)):
        raise InputError(f"neurons must be None, 'all' or a positive int, got {neurons!r}")
    check_precision(precision)
    check_long_context(long_context)
    warnings = certify_or_warn(adapter, strict)
    adapter = adapter.at_precision(precision)
    if long_context is None:
        long_context = choose_long_context(adapter.model, batch.tokens.shape[1], "attribute", rules=rule_set,
                                           batch=batch.tokens.shape[0])

    points = adapter.resid_hooks()
    z_names = [adapter.attn_hook(l, "hook_z") for l in range(arch.n_layers)]
    mlp_names = [adapter.mlp_hook(l, "hook_post") for l in range(arch.n_layers)] if neurons is not None else []
    captures = engine.residual_captures(adapter) + z_names + mlp_names
    value, capture, grads = run_attribution(adapter, batch, positions, spec, rule_set, captures,
                                            long_context=bool(long_context))

    def summed(name):
        return capture.relevance(grads, name).sum(-1).detach()

    token_rel = engine.check_finite(summed(adapter.embed_hook), "the token relevance")
    pos_rel = summed(adapter.pos_embed_hook) if has_position_embedding(adapter) else None
    if pos_rel is not None:
        engine.check_finite(pos_rel, "the position-embedding relevance")
    node_rel = {}
    for name in points:
        h, g = engine.residual_state(adapter, capture.tensors, grads, name)
        node_rel[name] = (h * g).sum(-1).detach()
    heads = torch.stack([summed(n).transpose(1, 2) for n in z_names], dim=1)  # [batch, layer, head, pos]
    neuron_rel = _neuron_relevance(capture, grads, mlp_names, neurons) if mlp_names else None

    input_sum = (token_rel + (pos_rel if pos_rel is not None else 0)).sum(-1)
    sums = torch.stack([input_sum] + [node_rel[n].sum(-1) for n in points] + [value], dim=1)
    conservation = ConservationReport(["embeddings"] + points + ["target"], sums, value)
    str_tokens = [model.to_str_tokens(row[:n]) for row, n in zip(batch.tokens, batch.lengths)]
    result = Attribution(
        tokens=batch.tokens,
        lengths=batch.lengths,
        str_tokens=[list(s) for s in str_tokens],
        positions=positions,
        rules=rule_set.name,
        target=spec,
        target_value=value,
        token_relevance=token_rel,
        position_relevance=pos_rel,
        node_relevance=node_rel,
        head_relevance=heads,
        neuron_relevance=neuron_rel,
        conservation=conservation,
        target_description=spec.describe(model),
        rule_set=rule_set,
        meta=provenance(model, function="attribute", rules=rule_set, target=spec.describe(model), target_ids=spec.target_ids, contrast_ids=spec.contrast_ids, mode=mode, position=position, neurons=neurons, top_k=top_k, prepend_bos=prepend_bos, strict=strict, precision=precision, long_context=bool(long_context)),
    )
    if warnings:
        result.meta.setdefault("warnings", []).extend(warnings)
    return result


def _positions_in(positions: Sequence[int], length: int, what: str) -> list[int]:
    """Positions as non-negative indices into ``length`` tokens (negative ones count from the end);
    one outside the row is refused rather than ignored."""
    out = []
    for p in positions:
        i = as_int(p)
        if i is None or not -length <= i < length:
            raise InputError(f"{what}: position {p!r} is not a position of these {length} tokens (0..{length - 1} or -{length}..-1)")
        out.append(i % length)
    return out


def _neuron_relevance(capture: Capture, grads, names: list[str], neurons) -> NeuronRelevance:
    """Per-layer neuron relevance; with ``neurons=k`` only the top-k per position by |R| are kept,
    one layer at a time, so memory stays at ``k`` per position."""
    if neurons == "all":
        values = torch.stack([capture.relevance(grads, n).detach() for n in names], dim=1)
        indices = torch.arange(values.shape[-1]).expand_as(values).contiguous()
        return NeuronRelevance(values, indices, None)
    values, indices = [], []
    for name in names:
        r = capture.relevance(grads, name).detach()  # [batch, pos, d_mlp]
        top = r.abs().topk(min(int(neurons), r.shape[-1]), dim=-1).indices
        values.append(r.gather(-1, top))
        indices.append(top)
    return NeuronRelevance(torch.stack(values, dim=1), torch.stack(indices, dim=1), indices[0].shape[-1])
