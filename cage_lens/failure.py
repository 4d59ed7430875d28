"""``explain_failure``: why did the model prefer the wrong token over the correct one? (docs/failure.md)

The explained quantity is ``Δℓ = logit(wrong) − logit(correct)`` at the last position of the prompt
(the prompt being the input plus the completion up to, not including, the wrong token). Positive
relevance supports the wrong token, negative relevance the correct one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from jaxtyping import Float

from cage_lens.attribution import Attribution, attribute
from cage_lens.circuit.builder import circuit_graph
from cage_lens.circuit.graph import CircuitGraph
from cage_lens.core.adapter import adapt
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.errors import InputError
from cage_lens.inputs import as_int, single_prompt
from cage_lens.persist import Saveable, provenance
from cage_lens.targets import resolve_token
from cage_lens.views.graphs import node_label
from cage_lens.views.terminal import printable, terminal_heatmap

__all__ = ["explain_failure", "FailureExplanation"]


@dataclass
class FailureExplanation(Saveable):
    """Δℓ, the normalised input heatmap, the layer × token relevance trace and the pruned graph."""

    prompt_tokens: list[str]
    wrong: str
    correct: str
    delta: float
    heatmap: Float[torch.Tensor, "pos"]
    excluded: list[int]
    trace_points: list[str]
    trace: Float[torch.Tensor, "row pos"]  # rows: trace_points
    attribution: Attribution
    graph: CircuitGraph
    meta: dict = field(default_factory=dict)

    @property
    def relevance(self) -> Float[torch.Tensor, "pos"]:
        """Raw input relevance (token + position embeddings) in units of Δℓ."""
        return self.attribution.input_relevance[0, : len(self.prompt_tokens)]

    def top_tokens(self, k: int = 5, sign: int = 1) -> list[tuple[int, str, float]]:
        """The ``k`` tokens (specials excluded) pushing hardest towards the wrong token (``sign=1``) or
        the correct one (``sign=-1``), with their normalised relevance."""
        order = (sign * self.heatmap).argsort(descending=True).tolist()
        out = [(i, self.prompt_tokens[i], float(self.heatmap[i])) for i in order if i not in self.excluded]
        return [t for t in out if sign * t[2] > 0][:k]

    def __repr__(self) -> str:
        def fmt(items):
            return ", ".join(f"{t!r}@{i} {v:+.2f}" for i, t, v in items) or "—"

        note = "" if self.delta > 1 else "  (Δℓ ≤ 1: the paper drops such cases as not a clear failure)"
        lines = [
            f"FailureExplanation: wrong {self.wrong!r} vs correct {self.correct!r}, Δℓ = {self.delta:+.4g}{note}",
            f"  towards wrong  : {fmt(self.top_tokens(5, 1))}",
            f"  towards correct: {fmt(self.top_tokens(5, -1))}",
            "  heatmap (÷ max |R| over non-special tokens): "
            + terminal_heatmap(self.prompt_tokens, self.heatmap.tolist(), color=False),
            f"  {self.graph.summary()}",
        ]
        for flow, path in self.graph.top_paths(3):
            lines.append(f"  path {flow:+.3g}: " + " → ".join(node_label(n) for n in path))
        return "\n".join(printable(line) for line in lines)  # tokens and level names may come from a loaded file

    def _repr_html_(self) -> str:
        from cage_lens.views.failure import failure_fragment

        return failure_fragment(self)

    def to_html(self, path=None) -> str:
        """Self-contained page: Δℓ, heatmap, layer trace and the interactive graph. Written to ``path``
        when given; the HTML string is returned either way."""
        from cage_lens.views.failure import failure_page

        page = failure_page(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def _excluded_positions(model, token_ids: Sequence[int], extra: Sequence[int]) -> list[int]:
    """Special-token positions plus the user's ``extra`` ones (negatives count from the end)."""
    n = len(token_ids)
    tokenizer = getattr(model, "tokenizer", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    positions = {i for i, t in enumerate(token_ids) if t in special}
    for p in extra:
        q = as_int(p)
        if q is None or not -n <= q < n:
            raise InputError(
                f"exclude holds {p!r}, which is not a position of the {n}-token prompt (valid: -{n} to {n - 1})"
            )
        positions.add(q % n)
    return sorted(positions)


def _top1(model, tokens: torch.Tensor) -> int:
    """The model's greedy next token after ``tokens [1, pos]``."""
    with torch.no_grad():
        return int(model(tokens.to(adapt(model).device))[0, -1].argmax())


def explain_failure(
    model,
    prompt: str | torch.Tensor,
    *,
    wrong=None,
    correct,
    rules: "str | RuleSet" = "attnlrp",
    levels: str = "half",
    exclude: Sequence[int] = (),
    prepend_bos: bool | None = None,
    **graph_options,
) -> FailureExplanation:
    """Explain ``Δℓ = logit(wrong) − logit(correct)`` at the last position of ``prompt``.

    Args:
        model: a TransformerLens model.
        prompt: ONE input (string or token ids) plus the completion up to (not including) the wrong
            token; explain a list of failures one call at a time.
        wrong: the wrong token the model emitted (one token; default: its top-1 prediction).
        correct: a correct alternative (one token).
        exclude: extra positions left out of the heatmap's normalisation (chat-template tokens);
            BOS and other special tokens are always excluded.
        graph_options: passed to :func:`cage_lens.circuit_graph` (``node_threshold``, ``top_p``, …).
    """
    if correct is None:
        raise InputError("explain_failure needs correct= (a correct alternative token)")
    rules = resolve_rules(rules)
    tokens = single_prompt(model, prompt, prepend_bos, "explain_failure")
    correct_id = resolve_token(model, correct, "correct")
    wrong_id = _top1(model, tokens) if wrong is None else resolve_token(model, wrong, "wrong")
    if wrong_id == correct_id:
        if wrong is None:
            raise InputError("the model's top-1 prediction is the correct token: there is no failure to explain")
        raise InputError(f"wrong and correct are the same token ({wrong!r}); nothing to contrast")
    excluded = _excluded_positions(model, tokens[0].tolist(), exclude)
    attribution = attribute(model, tokens, target=wrong_id, contrast=correct_id, rules=rules)
    n = attribution.lengths[0]
    relevance = attribution.input_relevance[0, :n]
    points, trace = attribution.layer_trace(0)
    graph = circuit_graph(model, tokens, target=wrong_id, contrast=correct_id, rules=rules, levels=levels, **graph_options)
    return FailureExplanation(
        prompt_tokens=attribution.str_tokens[0][:n],
        wrong=model.to_string(torch.tensor([wrong_id])),
        correct=model.to_string(torch.tensor([correct_id])),
        delta=float(attribution.target_value[0]),
        heatmap=attribution.normalized(0, excluded, include_positions=True),
        excluded=excluded,
        trace_points=["embeddings"] + points,
        trace=torch.cat([relevance[None], trace[:, :n]]),
        attribution=attribution,
        graph=graph,
        meta=provenance(model, function="explain_failure", rules=rules, levels=levels, wrong=wrong, correct=correct, exclude=exclude, prepend_bos=prepend_bos, graph_options=graph_options),
    )
