"""Reading a study store back: one pandas row per (record, model), graphs on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa

from cage_lens.study.store import Store, StoreError

__all__ = ["load", "load_graphs", "segment_names"]

SEG, SEG_RAW = "seg.", "seg_raw."


def segment_names(df: pd.DataFrame) -> list[str]:
    """Segment names of a loaded study (the ``seg.<name>`` columns), in column order."""
    return [c[len(SEG):] for c in df.columns if c.startswith(SEG)]


def load(path: str | Path) -> pd.DataFrame:
    """The store at ``path`` as a DataFrame with one row per record and model, ordered by model (in
    the study's order) then record. Segment relevance is spread into ``seg.<name>`` (normalised by
    max |R| over non-special tokens) and ``seg_raw.<name>`` (logit units) columns, NaN where a case has
    no such segment. ``df.attrs`` holds the ``manifest`` and ``missing`` (cases not yet computed)."""
    store = Store(path)
    manifest = store.manifest()
    # integer columns with missing values stay integers (pandas' nullable Int64), not floats
    ints = {pa.int64(): pd.Int64Dtype()}
    df = store.table().to_pandas(maps_as_pydicts="strict", types_mapper=ints.get)
    order = {m["name"]: i for i, m in enumerate(manifest["models"])}
    if df.duplicated(["model", "record"]).any():
        dup = df[df.duplicated(["model", "record"], keep=False)][["model", "record"]].drop_duplicates()
        raise StoreError(f"{path} holds duplicate cases {dup.values.tolist()[:5]}: the store is corrupt")
    df = df.assign(_order=df["model"].map(order)).sort_values(["_order", "record"], kind="stable")
    df = df.drop(columns="_order").reset_index(drop=True)
    names: list[str] = []
    for m in df["segment_relevance"]:
        for k in (m or {}):
            if k not in names:
                names.append(k)
    # the study's own segments appear only when some case has tokens in them
    reserved = [n for n in ("_generated", "_other")
                if any(m is not None and len(m.get(n, ())) for m in df["segments"])]
    names = sorted(n for n in names if not n.startswith("_")) + reserved
    spread = {}
    for n in names:
        spread[SEG + n] = [m.get(n, float("nan")) if m else float("nan") for m in df["segment_relevance"]]
    for n in names:
        spread[SEG_RAW + n] = [m.get(n, float("nan")) if m else float("nan") for m in df["segment_relevance_raw"]]
    df = pd.concat([df, pd.DataFrame(spread, index=df.index)], axis=1)
    df.attrs["manifest"] = manifest
    df.attrs["missing"] = len(manifest["models"]) * manifest["dataset"]["n_records"] - len(df)
    return df


def load_graphs(path: str | Path) -> Iterator[dict]:
    """The stored cross-layer graphs: dicts ``{model, record, metrics, graph}`` where ``graph`` is
    :meth:`cage_lens.CircuitGraph.to_dict`'s output (only studies run with ``graph=True``)."""
    yield from Store(path).iter_graphs()
