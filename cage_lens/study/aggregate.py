"""Aggregating a study: counts, Δℓ distributions, segment relevance with bootstrap CIs, where the top
relevance sits, and paired comparisons of two models (checkpoints, sizes) on the same cases.

Statistics (docs/study.md#aggregation): means with 95 % percentile-bootstrap intervals
(:func:`cage_lens.metrics.bootstrap_ci`); paired comparisons on the records both models explain, with
the mean difference ``b − a``, its bootstrap interval, a two-sided **paired sign-flip permutation
test** of the mean difference (exact for ≤ 16 pairs, else Monte Carlo with ``n_perm`` draws and
``p = (1 + #{|mean*| ≥ |mean|}) / (1 + n_perm)``), Holm-adjusted p-values across the rows of one
comparison, and win/loss/tie counts (:func:`cage_lens.metrics.paired_wins`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cage_lens.errors import InputError
from cage_lens.metrics import bootstrap_ci, paired_wins
from cage_lens.study.frame import SEG, load, segment_names

__all__ = ["summary", "compare", "StudySummary", "Comparison", "sign_flip_test", "holm"]

_STATUSES = ("explained", "correct", "undecided", "low_delta", "no_contrast", "skipped", "not_a_case")


def _frame(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (str, Path)):
        return load(data)
    raise InputError(f"pass a study directory or the DataFrame of cage_lens.study.load, got {type(data).__name__}")


def _models(df: pd.DataFrame) -> list[str]:
    manifest = df.attrs.get("manifest")
    names = [m["name"] for m in manifest["models"]] if manifest else list(dict.fromkeys(df["model"]))
    return [n for n in names if (df["model"] == n).any()]


def _ci(values, n_boot: int, seed: int) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (math.nan, math.nan, math.nan)
    return bootstrap_ci(v, n=n_boot, seed=seed)


# ---------------------------------------------------------------------------- tests
def sign_flip_test(diffs, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test of ``mean(diffs) = 0``."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d / n) >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_perm, n))
    return float((1 + np.sum(np.abs(signs @ d / n) >= observed - tol)) / (1 + n_perm))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ok) - rank) * p[i]))
        out[i] = running
    return out.tolist()


# ---------------------------------------------------------------------------- summary
def _cell(column: str, value) -> str:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if column.startswith("p") or column in ("usable", "top_wrong", "top_correct"):
            return f"{value:.3g}"
        return f"{value:+.3f}"
    return str(value)


def formatted(df: pd.DataFrame) -> tuple[list[str], list[list[str]], int]:
    """Header, rows and number of index columns of a table, every cell as :func:`_cell` writes it: ints as
    ints, p-values and shares with 3 significant digits, the rest signed, "–" for NaN."""
    names = list(df.index.names) if isinstance(df.index, pd.MultiIndex) else [df.index.name or ""]
    cols = [str(c) for c in df.columns]
    rows = []
    for idx, values in zip(df.index, df.itertuples(index=False)):
        keys = list(idx) if isinstance(idx, tuple) else [idx]
        rows.append([str(k) for k in keys] + [_cell(c, v) for c, v in zip(cols, values)])
    return names + cols, rows, len(names)


def _markdown(df: pd.DataFrame) -> str:
    """A markdown table of :func:`formatted` cells."""
    header, rows, _ = formatted(df)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def html_table(df: pd.DataFrame) -> str:
    """An HTML table of :func:`formatted` cells."""
    from cage_lens.views.html import table_html

    return table_html(*formatted(df))


@dataclass
class StudySummary:
    """Tables of one study. ``counts``: cases per status and model, ``failures`` (deviations found on
    the model's own generations) and ``usable`` = explained / failures. ``delta``: Δℓ of every case
    with a contrast (explained and dropped). ``segments``: mean normalised segment relevance over
    explained cases with 95 % bootstrap CI. ``top``: share of explained cases whose most
    wrong-supporting (``top_wrong``) and most correct-supporting (``top_correct``) token lies in each
    segment."""

    counts: pd.DataFrame
    delta: pd.DataFrame
    segments: pd.DataFrame
    top: pd.DataFrame

    def to_markdown(self, parts: Sequence[str] = ("counts", "delta", "segments", "top")) -> str:
        titles = {
            "counts": "**cases per model**",
            "delta": "**Δℓ = logit(wrong) − logit(contrast)** (cases with a contrast)",
            "segments": "**segment relevance** (Σ over the segment's tokens, ÷ max |R| over non-special tokens; "
                        "explained cases; mean with 95 % bootstrap CI)",
            "top": "**where the top relevance sits** (share of explained cases)",
        }
        return "\n\n".join(f"{titles[p]}\n\n{_markdown(getattr(self, p))}" for p in parts)

    def __repr__(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        titles = {"counts": "cases per model", "delta": "Δℓ = logit(wrong) − logit(contrast)",
                  "segments": "segment relevance (mean, 95 % bootstrap CI)", "top": "where the top relevance sits"}
        return "".join(f"<h4>{t}</h4>{html_table(getattr(self, p))}" for p, t in titles.items())


def summary(data, *, n_boot: int = 2000, seed: int = 0) -> StudySummary:
    """Counts, Δℓ distribution, segment relevance (with CIs) and top-relevance location per model."""
    df = _frame(data)
    models = _models(df)
    segs = segment_names(df)
    counts, delta, seg_rows, top_rows = [], [], [], []
    for m in models:
        d = df[df["model"] == m]
        row = {"records": len(d)} | {s: int((d["status"] == s).sum()) for s in _STATUSES}
        own = d["deviation_step"].notna() & (d["contrast_source"] != "anchor")
        row["failures"] = int(own.sum())
        row["usable"] = row["explained"] / row["failures"] if row["failures"] else math.nan
        counts.append(row)
        dl = d.loc[d["status"].isin(["explained", "low_delta"]), "delta"].to_numpy(float)
        mean, lo, hi = _ci(dl, n_boot, seed)
        q = np.quantile(dl, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(dl) else [math.nan] * 5
        delta.append({"n": len(dl), "mean": mean, "ci_low": lo, "ci_high": hi, "q05": q[0], "q25": q[1],
                      "median": q[2], "q75": q[3], "q95": q[4]})
        ex = d[d["status"] == "explained"]
        for s in segs:
            v = ex[SEG + s].dropna().to_numpy(float)
            mean, lo, hi = _ci(v, n_boot, seed)
            raw = ex["seg_raw." + s].dropna().to_numpy(float)
            seg_rows.append({"model": m, "segment": s, "n": len(v), "mean": mean, "ci_low": lo, "ci_high": hi,
                             "mean_raw": raw.mean() if len(raw) else math.nan})
            top_rows.append({"model": m, "segment": s,
                             "top_wrong": _share(ex["top_wrong_segments"], s),
                             "top_correct": _share(ex["top_correct_segments"], s)})
    counts_df = pd.DataFrame(counts, index=pd.Index(models, name="model"))
    delta_df = pd.DataFrame(delta, index=pd.Index(models, name="model"))
    seg_df = pd.DataFrame(seg_rows, columns=["model", "segment", "n", "mean", "ci_low", "ci_high", "mean_raw"])
    top_df = pd.DataFrame(top_rows, columns=["model", "segment", "top_wrong", "top_correct"])
    return StudySummary(counts_df, delta_df, seg_df.set_index(["model", "segment"]), top_df.set_index(["model", "segment"]))


def _share(column: pd.Series, segment: str) -> float:
    if len(column) == 0:
        return math.nan
    return float(np.mean([segment in list(v) if v is not None else False for v in column]))


# ---------------------------------------------------------------------------- compare
@dataclass
class Comparison:
    """Paired comparison of models ``a`` and ``b`` on the records both explain. Rows: ``delta`` and
    every segment; ``diff`` = mean of ``b − a`` with its bootstrap CI; ``p`` the sign-flip permutation
    test, ``p_holm`` Holm-adjusted across rows; ``b_higher`` / ``b_lower`` / ``ties`` per pair."""

    a: str
    b: str
    n_pairs: int
    table: pd.DataFrame

    def to_markdown(self) -> str:
        head = (f"**{self.b} vs {self.a}** on {self.n_pairs} paired cases (diff = {self.b} − {self.a}; "
                "paired sign-flip permutation test, Holm-adjusted)\n\n")
        return head + _markdown(self.table)

    def __repr__(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        from cage_lens.views.html import escaped

        return (f"<p><b>{escaped(self.b)} vs {escaped(self.a)}</b> on {self.n_pairs} paired cases (diff = b − a; paired "
                f"sign-flip permutation test, Holm-adjusted)</p>{html_table(self.table)}")


def compare(data, a: str, b: str, *, n_boot: int = 2000, n_perm: int = 10000, seed: int = 0) -> Comparison:
    """Compare models ``a`` and ``b`` of one study on the records both explain (paired)."""
    df = _frame(data)
    for m in (a, b):
        if not (df["model"] == m).any():
            raise InputError(f"model {m!r} is not in this study; models: {_models(df)}")
    ex = df[df["status"] == "explained"]
    left = ex[ex["model"] == a].set_index("record")
    right = ex[ex["model"] == b].set_index("record")
    common = left.index.intersection(right.index)
    if len(common) == 0:
        raise InputError(f"models {a!r} and {b!r} explain no common record; run the study with cases_from={a!r} "
                         "so that every model explains the same cases")
    rows = []
    for metric, column in [("delta", "delta")] + [(s, SEG + s) for s in segment_names(df)]:
        x = left.loc[common, column].to_numpy(float)
        y = right.loc[common, column].to_numpy(float)
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
        if len(x) == 0:
            continue
        diff, lo, hi = _ci(y - x, n_boot, seed)
        wins = paired_wins(y, x)
        rows.append({"metric": metric, "n": len(x), "mean_a": x.mean(), "mean_b": y.mean(), "diff": diff,
                     "ci_low": lo, "ci_high": hi, "p": sign_flip_test(y - x, n_perm, seed),
                     "b_higher": wins["wins"], "b_lower": wins["losses"], "ties": wins["ties"]})
    table = pd.DataFrame(rows).set_index("metric")
    table.insert(table.columns.get_loc("p") + 1, "p_holm", holm(table["p"].tolist()))
    return Comparison(a, b, len(common), table)
