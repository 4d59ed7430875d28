"""The view of a :class:`~cage_lens.FailureExplanation` (docs/failure.md): Δℓ and whether it counts as
a failure, the input heatmap with its colour bar, the tokens pushing each way, the layer × token trace
and the pruned attribution graph. :func:`failure_fragment` is the notebook output, :func:`failure_page`
the page of ``to_html``."""

from __future__ import annotations

import html

from cage_lens.views.graphs import graph_fragment, node_label
from cage_lens.views.html import colour_bar_html, html_page, layer_token_table_html, token_spans_html
from cage_lens.views.terminal import printable

__all__ = ["failure_fragment", "failure_page"]


def _tokens_line(items) -> str:
    return ", ".join(f"{html.escape(repr(printable(t)))}@{i} {v:+.2f}" for i, t, v in items) or "—"


def failure_fragment(explanation) -> str:
    """Δℓ, heatmap, top tokens, layer trace and graph of one failure, as an HTML fragment."""
    e = explanation
    wrong, correct = html.escape(repr(printable(e.wrong))), html.escape(repr(printable(e.correct)))
    verdict = ("a clear failure (Δℓ > 1)" if e.delta > 1 else
               "not a clear failure: Δℓ ≤ 1, the threshold below which failure studies drop a case" if e.delta > 0 else
               "not a failure: the model prefers the correct token")
    kept = [i for i in range(len(e.prompt_tokens)) if i not in e.excluded]
    scale = float(e.relevance[kept].abs().max()) if kept else float(e.relevance.abs().max())
    paths = "".join(f"<li>{flow:+.3g}: {html.escape(' → '.join(node_label(n) for n in path))}</li>"
                    for flow, path in e.graph.top_paths(3))
    return (
        "<div style='font-family:sans-serif'>"
        f"<p><b>Δℓ = logit({wrong}) − logit({correct}) = {e.delta:+.4g}</b>: {verdict}. Red supports the wrong "
        "token, blue the correct one.</p>"
        + colour_bar_html(f"±1 = max |R| over non-special tokens ({scale:.3g}); excluded positions: {e.excluded}",
                          negative="supports the correct token", positive="supports the wrong token")
        + f"<div>{token_spans_html(e.prompt_tokens, e.heatmap.tolist(), e.relevance.tolist())}</div>"
        f"<p>towards wrong: {_tokens_line(e.top_tokens(5, 1))}<br>towards correct: {_tokens_line(e.top_tokens(5, -1))}</p>"
        "<h4>Relevance per layer and token</h4>"
        + layer_token_table_html(e.prompt_tokens, e.trace_points, e.trace, what="layer")
        + f"<h4>Attribution graph</h4><p>Strongest paths: </p><ol>{paths}</ol>{graph_fragment(e.graph)}</div>"
    )


def failure_page(explanation) -> str:
    """A complete, self-contained page of :func:`failure_fragment`."""
    return html_page("cage_lens failure explanation", failure_fragment(explanation))
