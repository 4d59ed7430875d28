"""Text views: the escape every shown token goes through, the colour scale, and the ANSI terminal
heatmap of the CLI (docs/index.md#views).

Colour convention everywhere: red = positive relevance (supports the target, or the wrong token in a
contrastive explanation), blue = negative (supports the contrast / correct token).
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

__all__ = ["printable", "relevance_color", "rgb", "contrast_ratio", "text_color", "terminal_heatmap"]


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


def rgb(css: str) -> tuple[int, int, int]:
    """``(r, g, b)`` of an ``rgb(r,g,b)`` or ``#rrggbb`` colour."""
    if css.startswith("#"):
        return tuple(int(css[i:i + 2], 16) for i in (1, 3, 5))
    r, g, b = (int(x) for x in css[css.index("(") + 1:css.index(")")].split(","))
    return r, g, b


def _luminance(colour: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(foreground: str, background: str) -> float:
    """WCAG 2 contrast ratio of two colours (1 to 21; text needs 4.5)."""
    a, b = sorted((_luminance(rgb(foreground)), _luminance(rgb(background))), reverse=True)
    return (a + 0.05) / (b + 0.05)


def text_color(background: str) -> str:
    """Black or white, whichever contrasts more with ``background``: at least 4.58:1 on any colour
    (the two ratios are equal at luminance 0.179, where each is 4.58), above WCAG's 4.5:1 for text."""
    return "#000" if contrast_ratio("#000000", background) >= contrast_ratio("#ffffff", background) else "#fff"


def terminal_heatmap(tokens: Sequence[str], scaled: Sequence[float], color: bool = True) -> str:
    """Tokens with ANSI 24-bit background colours (black or white text, whichever reads better), one
    uncoloured space between tokens so that word-level tokens do not run together; a ``[+0.42]`` tag
    per token when colour is off."""
    out = []
    for tok, v in zip(tokens, scaled):
        shown = printable(tok)
        if color:
            background = relevance_color(v)
            r, g, b = rgb(background)
            fg = "30" if text_color(background) == "#000" else "97"
            out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[{fg}m{shown}\x1b[0m")
        else:
            out.append(f"{shown}[{v:+.2f}]")
    return " ".join(out)
