"""Text views: the escape every shown token goes through, the colour scale, and the ANSI terminal
heatmap of the CLI (docs/index.md#views).

Colour convention everywhere: red = positive relevance (supports the target, or the wrong token in a
contrastive explanation), blue = negative (supports the contrast / correct token).
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

__all__ = ["printable", "relevance_color", "terminal_heatmap"]


#: control (Cc), format (Cf: bidi overrides such as RLO, zero-width marks), surrogate (Cs) and
#: line/paragraph separator (Zl, Zp) characters never reach a terminal or a page as they are
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str) -> str:
    """``text`` with every control, format or separator character replaced by a visible escape
    (``\\x1b``, ``\\u202e``, ``\\n`` …), so token text can neither drive the terminal (ANSI escape
    sequences), reorder what is displayed (bidi overrides) nor break a line. Used for every token shown
    by the heatmaps, HTML views and result reprs."""
    out = []
    for ch in str(text):
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def relevance_color(value: float) -> str:
    """CSS colour for a relevance already scaled to [-1, 1]."""
    v = max(-1.0, min(1.0, float(value)))
    strength = int(round(255 * (1 - abs(v))))
    return f"rgb(255,{strength},{strength})" if v >= 0 else f"rgb({strength},{strength},255)"


def terminal_heatmap(tokens: Sequence[str], scaled: Sequence[float], color: bool = True) -> str:
    """Tokens with ANSI 24-bit background colours, plus a ``[+0.42]`` tag when colour is off."""
    out = []
    for tok, v in zip(tokens, scaled):
        shown = printable(tok)
        if color:
            rgb = relevance_color(v)[4:-1]
            r, g, b = (int(x) for x in rgb.split(","))
            out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{shown}\x1b[0m")
        else:
            out.append(f"{shown}[{v:+.2f}]")
    return "".join(out) if color else " ".join(out)
