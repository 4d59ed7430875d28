"""Exact activation patching that recomputes only what a patch can change (docs/patching.md#exact-suffix-patching).

Patching a cell whose first changed query row is ``q`` at layer ``l`` leaves every row before ``q``
and every layer before ``l`` as it was (attention is causal; a block reads only the blocks below it).
:class:`SuffixPatcher` therefore runs rows ``q .. T−1`` only, with the keys and values of rows
``< q`` taken from the patched run's own cache, and splices the new logits of the rows the metric
reads into the patched run's logits: the value of TransformerLens' ``get_act_patch_*`` cell minus the
unpatched metric, to rounding. Cells that share a first row run as one batch.

Two ways to run a suffix, one per TransformerLens line, both through TL's hook points:

- ``HookedTransformer`` (TL 2.x): its blocks from the lowest cell layer up, each given a frozen
  ``HookedTransformerKeyValueCacheEntry`` of the prefix; a cell joins the batch at its own layer.
- ``TransformerBridge`` (TL 4.x): the bridge's forward with the HF model's key/value cache of the
  prefix (``past_key_values``); every layer runs for every cell.

:meth:`SuffixPatcher.rows` runs each cell's first row alone, many cells per batch (the other rows of
the cache masked, positions following the mask): the exact trajectory of the patched row, which the
routing-aware estimate builds on.

A self-check (unpatched rows re-run from the cache, plain and masked, must reproduce the patched run's
logits) runs before any cell, so a model whose cache path is wired differently is refused instead of
giving wrong numbers.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.hooks import PointHook, installed, session
from cage_lens.errors import UnsupportedModelError
from cage_lens.patching.cost import key_reads, layer_flops, unembed_flops
from cage_lens.patching.grids import Grid
from cage_lens.patching.runs import PatchRun, new_kv_cache

__all__ = ["Cell", "SuffixPatcher", "cells_of"]

#: elements of the largest per-call tensor (rows × positions × width) before a batch is split
MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class Cell:
    """One cell of a grid: its layer, its index in TL's grid order after the layer axis, and the first
    query row its patch changes. ``value``: what :meth:`SuffixPatcher.rows` writes there instead of the
    source run's activation (the activation's layout, batch first, the cell's row only): a probe."""

    grid: Grid
    layer: int
    index: tuple[int, ...]
    first: int
    value: torch.Tensor | None = None

    def relative(self, start: int) -> tuple[int, ...]:
        """The index with its query row counted from ``start`` (the first row of the suffix run)."""
        axis = self.grid.row_axis
        if axis is None:
            return self.index
        return self.index[:axis] + (self.index[axis] - start,) + self.index[axis + 1:]


def cells_of(run: PatchRun, grid: Grid) -> list[Cell]:
    """The changed cells of ``grid`` (the others are exactly 0)."""
    changed, first = run.changes(grid)
    return [Cell(grid, int(i[0]), tuple(int(x) for x in i[1:]), int(first[tuple(i)])) for i in changed.nonzero()]


def _narrow(grid: Grid, source: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The rows ``start .. end − 1`` of an activation (a pattern keeps its keys ``0 .. end − 1``)."""
    if grid.hook.endswith("hook_pattern"):
        return source[:, :, start:end, :end]
    return source[:, start:end]


def _pattern_at_positions(rows: torch.Tensor, firsts: torch.Tensor, length: int) -> torch.Tensor:
    """``[cells, batch, head, P + 1]`` attention of a masked one-row run (keys: the P cached ones, then the
    row itself) -> ``[cells, batch, head, length]`` with each probability at its key's position."""
    prefix = rows.shape[-1] - 1
    out = torch.zeros(*rows.shape[:-1], length, dtype=rows.dtype, device=rows.device)
    keys = torch.arange(prefix, device=rows.device)
    before = (keys[None, :] < firsts[:, None]).to(rows.dtype)[:, None, None, :]  # [cells, 1, 1, P]
    out[..., :prefix] = rows[..., :prefix] * before
    out.scatter_(-1, firsts.view(-1, 1, 1, 1).expand(*rows.shape[:-1], 1).to(rows.device), rows[..., -1:])
    return out


def _patcher(entries):
    """A hook writing each ``(rows, grid, source, index)`` patch into the tensor passing through."""
    def hook(tensor, hook):
        tensor = tensor.clone()
        for rows, grid, source, index in entries:
            grid.patch(tensor, rows, source, index)
        return tensor
    return hook


class _Group:
    """Cells that run as one batch from query row ``start`` to ``end``."""

    def __init__(self, start: int, end: int, cells: Sequence[Cell]):
        self.start, self.end = start, end
        self.cells = sorted(cells, key=lambda c: c.layer)  # a TL 2 batch grows layer by layer

    @property
    def lowest(self) -> int:
        return self.cells[0].layer if self.cells else 0


class SuffixPatcher:
    """Exact patching of any set of cells of one :class:`PatchRun` (see the module docstring).

    ``effects(cells)`` returns metric(patched) − metric(unpatched) per cell. ``rows(cells, captures)``
    runs each cell's first row alone (the exact new trajectory of that row) and returns its logits and
    the activations at ``captures`` (hook names per layer) of its last position — what the
    routing-aware estimate builds on. Work is booked on ``run.ledger`` under ``stage``."""

    def __init__(self, run: PatchRun, stage: str = "exact patching"):
        self.run = run
        self.adapter: ModelAdapter = run.adapter
        self.model = run.model
        self.arch = run.adapter.arch
        self.stage = stage
        self.bridge = self.arch.is_bridge
        # a sliding window is a mask by position in the batch, so a one-row batch of :meth:`rows` must put
        # every row at its own position: rows of one first position per batch
        self.windowed = any(self.adapter.attention_window(layer) for layer in range(self.arch.n_layers))
        if self.bridge:
            self._check_bridge_cache()
        else:
            self._check_hooked()
        self._logits_to_keep = self.bridge and "logits_to_keep" in inspect.signature(
            self.model.original_model.forward).parameters
        self._self_check()

    # ------------------------------------------------------------------ public
    def effects(self, cells: Sequence[Cell]) -> torch.Tensor:
        """metric(patched) − metric(unpatched) of each cell (float64, in the given order), TL's value."""
        out = torch.zeros(len(cells), dtype=torch.float64)
        where = {id(c): i for i, c in enumerate(cells)}
        by_start: dict[int, list[Cell]] = {}
        for cell in cells:
            by_start.setdefault(cell.first, []).append(cell)
        for start, group_cells in sorted(by_start.items()):
            for chunk in self._chunks(group_cells, start, self.run.length):
                group = _Group(start, self.run.length, chunk)
                read = [r for r in self.run.read if r >= start]
                logits, _ = self._run(group, read, captures=())
                for c, cell in enumerate(group.cells):
                    out[where[id(cell)]] = self.run.metric_with(read, logits[c]) if read else 0.0
        return out

    def rows(self, cells: Sequence[Cell], captures: Sequence[str], stage: str = "row trajectories"):
        """Each cell's first row run alone — its exact new trajectory, since no earlier row moves — many
        cells per batch: each batch row attends to the patched run's keys before its own row (the others
        are masked, and positions follow the mask). Under a sliding window, which masks by position in the
        batch, a batch holds cells of one first row only (each row then sits at its own position).

        Returns ``(logits, captured)``: ``{cell index: logits [batch, vocab]}`` for the cells whose row the
        metric reads, and per capture name a tensor over all cells, in their order — ``[cells, batch, head,
        d_head]`` for q/k/v-like points, ``[cells, batch, head, pos]`` for a pattern (the row's attention over
        keys ``0 .. row``, zeros after) — valid for the cells whose layer is at most the capture's layer.
        Pattern grids are not supported here."""
        B, T = self.run.batch, self.run.length
        width = max(self.arch.d_mlp or 0, self.arch.d_model * T, self.arch.n_heads * T)  # the prefix keys dominate
        per = max(1, MAX_ELEMENTS // max(1, B * width))
        together = self._row_batches([c.first for c in cells])
        logits: dict[int, torch.Tensor] = {}
        captured: dict[str, torch.Tensor] = {}
        for batch in (g[c0:c0 + per] for g in together for c0 in range(0, len(g), per)):
            order = sorted(batch, key=lambda i: cells[i].layer)  # a TL 2 batch grows by layer
            chunk = [cells[i] for i in order]
            chunk_logits, store = self._run_rows(chunk, captures, stage)
            for j, i in enumerate(order):
                if chunk_logits.get(j) is not None:
                    logits[i] = chunk_logits[j]
            firsts = torch.tensor([c.first for c in chunk])
            for name, t in store.items():
                m = t.shape[0] // B  # a TL 2 batch holds a cell's rows from its layer on: the first m cells
                t = t.view(m, B, *t.shape[1:])
                t = _pattern_at_positions(t[..., -1, :], firsts[:m], T) if name.endswith("hook_pattern") else t[:, :, -1]
                if name not in captured:
                    captured[name] = torch.zeros(len(cells), *t.shape[1:], dtype=t.dtype, device=t.device)
                captured[name][torch.tensor(order[:m], dtype=torch.long)] = t
        return logits, captured

    def cost(self, cells: Sequence[Cell]) -> float:
        """FLOPs that :meth:`effects` spends on ``cells`` (grouped as it groups them)."""
        total = 0.0
        by_start: dict[int, list[Cell]] = {}
        for cell in cells:
            by_start.setdefault(cell.first, []).append(cell)
        for start, group_cells in by_start.items():
            read = [r for r in self.run.read if r >= start]
            total += self._flops(_Group(start, self.run.length, group_cells), len(read))
        return total

    # ------------------------------------------------------------------ checks
    def _check_hooked(self) -> None:
        cfg = self.model.cfg
        if getattr(cfg, "positional_embedding_type", "standard") == "shortformer":
            raise UnsupportedModelError(
                "exact suffix patching does not support shortformer position embeddings; use method='one_backward'"
            )

    def _check_bridge_cache(self) -> None:
        layers = getattr(self.run.kv, "layers", None)
        full = self.run.length
        if getattr(getattr(self.model, "original_model", None), "config", None) is None:
            raise UnsupportedModelError(
                "this TransformerBridge runs a TransformerLens-native model, which has no key/value cache; exact "
                "suffix patching needs one (an HF-backed bridge or a HookedTransformer); use method='one_backward'"
            )
        filled = layers and all(getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == full
                                for layer in layers)
        if full > 1 and not filled:
            raise UnsupportedModelError(
                "this TransformerBridge did not fill the HF key/value cache for every position (a "
                "TransformerLens/transformers pair whose attention ignores past_key_values), which exact suffix "
                "patching needs; use method='one_backward' or TransformerLens 2.x"
            )

    def _self_check(self) -> None:
        start = self.run.length - 1  # the longest prefix read from the cache
        group = _Group(start, start + 1, [])
        logits, _ = self._run(group, [start], captures=(), stage="self-check")
        expected = self.run.logits[:, start]
        error = float((logits[0, :, 0] - expected).abs().max())
        scale = float(expected.abs().max()) + 1.0
        tolerance = (1e-9 if expected.dtype == torch.float64 else 2e-4) * scale  # a different summation order
        if error <= tolerance and start > 1:  # the masked one-row batch of :meth:`rows`, two rows at once
            probe = [start, start // 2]
            for batch in ([probe[i] for i in group] for group in self._row_batches(probe)):
                rows, _ = self._run_rows([], (), "self-check", firsts=batch, read=batch)
                for j, row in enumerate(batch):
                    error = max(error, float((rows[j] - self.run.logits[:, row]).abs().max()))
        if not error <= tolerance:
            raise UnsupportedModelError(
                f"re-running position {start} from the key/value cache gives logits {error:.3g} away from the full "
                "forward pass, so this model's cache path cannot be trusted for exact patching; use "
                "method='one_backward'"
            )

    def _row_batches(self, firsts: Sequence[int]) -> list[list[int]]:
        """Indices of ``firsts`` that may share masked one-row batches, ordered by first row (a short prefix
        for early rows): all of them, or under a sliding window, which masks by position in the batch, those
        of one first row."""
        order = sorted(range(len(firsts)), key=firsts.__getitem__)
        if not self.windowed:
            return [order]
        return [[i for i in order if firsts[i] == first] for first in sorted(set(firsts))]

    # ------------------------------------------------------------------ running a group
    def _chunks(self, cells: Sequence[Cell], start: int, end: int) -> list[list[Cell]]:
        arch, B = self.arch, self.run.batch
        width = max(arch.d_model, arch.d_mlp or 0, arch.n_heads * end, arch.d_vocab if self.run.read else 0)
        per = max(1, MAX_ELEMENTS // max(1, B * (end - start) * width))
        ordered = sorted(cells, key=lambda c: c.layer)
        return [ordered[i:i + per] for i in range(0, len(ordered), per)]

    def _patch_hooks(self, group: _Group) -> list[PointHook]:
        B = self.run.batch
        by_point: dict[str, list] = {}
        for c, cell in enumerate(group.cells):
            name = cell.grid.hook_name(cell.layer)
            source = _narrow(cell.grid, self.run.source_of(name), group.start, group.end)
            by_point.setdefault(name, []).append((slice(c * B, (c + 1) * B), cell.grid, source, cell.relative(group.start)))

        return [PointHook(name, _patcher(entries)) for name, entries in by_point.items()]

    def _capture_hooks(self, captures: Sequence[str], store: dict) -> list[PointHook]:
        def keep(name):
            def hook(tensor, hook):
                store[name] = tensor.detach()
            return hook
        return [PointHook(n, keep(n)) for n in captures]

    def _run(self, group: _Group, read: Sequence[int], captures: Sequence[str], stage: str | None = None):
        """(logits ``[cells, batch, len(read), vocab]``, captured tensors) for one group."""
        n = max(1, len(group.cells))
        store: dict[str, torch.Tensor] = {}
        hooks = self._patch_hooks(group) + self._capture_hooks(captures, store)
        with session(self.adapter, grad=False), installed(self.adapter, hooks):
            if self.bridge:
                final = self._bridge_forward(group, n, read)
            else:
                final = self._hooked_forward(group, read)
        self.run.ledger.add(stage or self.stage, self._flops(group, len(read), cells=n))
        B = self.run.batch
        return final.view(n, B, *final.shape[1:]), store

    def _run_rows(self, cells: Sequence[Cell], captures: Sequence[str], stage: str, firsts: Sequence[int] = (),
                  read: Sequence[int] | None = None):
        """One batch row per cell, the cell's first row only (see :meth:`rows`): ``{row index: logits [batch,
        vocab]}`` for the rows in ``read`` (default: the rows the metric reads) and the captured tensors.
        Without cells, unpatched rows ``firsts``."""
        run, B = self.run, self.run.batch
        read = set(run.read if read is None else read)
        firsts = [c.first for c in cells] or list(firsts)
        layers = [c.layer for c in cells] or [0] * len(firsts)
        prefix = max(firsts)
        mask = None
        if prefix > 0:
            keys = torch.arange(prefix + 1)
            mask = torch.stack([(keys < f) | (keys == prefix) for f in firsts]).long()  # [cells, prefix + 1]
            mask = mask.repeat_interleave(B, dim=0).to(run.tokens.device)
        store: dict[str, torch.Tensor] = {}
        hooks = self._row_patch_hooks(cells) + self._capture_hooks(captures, store)
        with session(self.adapter, grad=False), installed(self.adapter, hooks):
            if self.bridge:
                tokens = torch.cat([run.tokens[:, f:f + 1] for f in firsts])
                kwargs: dict = {}
                if prefix > 0:
                    cache = self._prefix_cache(prefix, len(firsts))
                    kwargs.update(run.kv_kwargs(cache))
                    kwargs["attention_mask"] = mask
                if self._logits_to_keep:
                    kwargs["logits_to_keep"] = 1
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
                    every = self.model(tokens, **kwargs)[:, -1].view(len(firsts), B, -1)
                logits = {j: every[j] for j, f in enumerate(firsts) if f in read}
            else:
                logits = self._hooked_rows(layers, firsts, prefix, mask, read)
        n = len(firsts)
        arch = self.arch
        layer_rows = n * arch.n_layers if self.bridge else sum(arch.n_layers - layer for layer in layers)
        logit_rows = n if self.bridge else len(logits)
        run.ledger.add(stage, B * (layer_rows * layer_flops(arch, 1, prefix + 1) + unembed_flops(arch, logit_rows)))
        return logits, store

    def _row_patch_hooks(self, cells: Sequence[Cell]) -> list[PointHook]:
        B = self.run.batch
        by_point: dict[str, list] = {}
        for c, cell in enumerate(cells):
            name = cell.grid.hook_name(cell.layer)
            source = cell.value if cell.value is not None else _narrow(
                cell.grid, self.run.source_of(name), cell.first, cell.first + 1)
            by_point.setdefault(name, []).append((slice(c * B, (c + 1) * B), cell.grid, source, cell.relative(cell.first)))
        return [PointHook(name, _patcher(entries)) for name, entries in by_point.items()]

    def _hooked_rows(self, layers: Sequence[int], firsts: Sequence[int], prefix: int, mask, read) -> dict:
        """TL 2.x: row ``i`` joins the batch at block ``layers[i]`` (ascending) with the input of row
        ``firsts[i]``; the logits of the rows whose position is in ``read``."""
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCacheEntry

        model, run, B = self.model, self.run, self.run.batch
        x = None
        for layer in range(layers[0], self.arch.n_layers):
            joining = [i for i, at in enumerate(layers) if at == layer]
            if joining:
                acts = run.activations[f"blocks.{layer}.hook_resid_pre"]
                rows = torch.cat([acts[:, firsts[i]:firsts[i] + 1] for i in joining])
                x = rows if x is None else torch.cat([x, rows])
            entry, layer_mask = None, None
            if prefix > 0:
                entry = self._prefix_entry(layer, prefix, x.shape[0] // B)
                layer_mask = mask[: x.shape[0]]
            x = model.blocks[layer](x, past_kv_cache_entry=entry, attention_mask=layer_mask)
        wanted = [j for j, f in enumerate(firsts) if f in read]
        if not wanted:
            return {}
        rows = torch.cat([x[j * B:(j + 1) * B, -1] for j in wanted])
        out = self._unembed(rows).view(len(wanted), B, -1)
        return dict(zip(wanted, out))

    def _prefix_entry(self, layer: int, prefix: int, reps: int):
        """A frozen TL 2 key/value cache entry: the patched run's keys and values (pre-rotary) of rows
        ``0 .. prefix − 1``, once per cell (a view, not a copy, for a single prompt)."""
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCacheEntry

        run, B = self.run, self.run.batch
        keys = run.activations[f"blocks.{layer}.attn.hook_k"][:, :prefix]
        values = run.activations[f"blocks.{layer}.attn.hook_v"][:, :prefix]
        if B == 1:
            return HookedTransformerKeyValueCacheEntry(keys.expand(reps, *keys.shape[1:]),
                                                       values.expand(reps, *values.shape[1:]), frozen=True)
        return HookedTransformerKeyValueCacheEntry(keys.repeat(reps, 1, 1, 1), values.repeat(reps, 1, 1, 1), frozen=True)

    def _unembed(self, final: torch.Tensor) -> torch.Tensor:
        model = self.model
        if getattr(model.cfg, "normalization_type", None) is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)
        cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def _flops(self, group: _Group, n_read: int, cells: int | None = None) -> float:
        arch, B = self.arch, self.run.batch
        n = cells if cells is not None else max(1, len(group.cells))
        rows, keys = group.end - group.start, key_reads(group.start, group.end)
        if self.bridge:
            layer_rows = n * arch.n_layers
            logits_rows = n * (max(1, n_read) if self._logits_to_keep else rows)
        else:
            layer_rows = sum(arch.n_layers - c.layer for c in group.cells) if group.cells else arch.n_layers
            logits_rows = n * n_read
        return B * (layer_rows * layer_flops(arch, rows, keys) + unembed_flops(arch, logits_rows))

    def _hooked_forward(self, group: _Group, read: Sequence[int]) -> torch.Tensor:
        """TL 2.x: blocks from the group's lowest layer; a cell's rows join the batch at its layer."""
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCacheEntry

        model, run = self.model, self.run
        s, e = group.start, group.end
        x = None
        for layer in range(group.lowest, self.arch.n_layers):
            joining = sum(1 for c in group.cells if c.layer == layer) or (1 if x is None else 0)
            if joining:
                rows = run.activations[f"blocks.{layer}.hook_resid_pre"][:, s:e].repeat(joining, 1, 1)
                x = rows if x is None else torch.cat([x, rows])
            entry = self._prefix_entry(layer, s, x.shape[0] // run.batch) if s > 0 else None
            x = model.blocks[layer](x, past_kv_cache_entry=entry)
        rel = [r - s for r in read]
        if not rel:
            return x[:, :0, :0]
        return self._unembed(x[:, rel])

    def _prefix_cache(self, start: int, n: int):
        cache = new_kv_cache(self.model)
        for i, layer in enumerate(self.run.kv.layers):
            keys = layer.keys[:, :, :start].repeat(n, 1, 1, 1)
            values = layer.values[:, :, :start].repeat(n, 1, 1, 1)
            cache.update(keys, values, i)
        return cache

    def _bridge_forward(self, group: _Group, n: int, read: Sequence[int]) -> torch.Tensor:
        """TL 4.x: the bridge's forward of rows ``start .. end − 1`` with the prefix's key/value cache."""
        s, e = group.start, group.end
        tokens = self.run.tokens[:, s:e].repeat(n, 1)
        kwargs: dict = {}
        cache = None
        if s > 0:
            cache = self._prefix_cache(s, n)
            kwargs.update(self.run.kv_kwargs(cache))
        rel = [r - s for r in read]
        if self._logits_to_keep:
            tail = list(range(e - s - len(rel), e - s))
            kwargs["logits_to_keep"] = len(rel) if rel == tail and rel else torch.tensor(rel or [e - s - 1])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            logits = self.model(tokens, **kwargs)
        if cache is not None and cache.get_seq_length() != e:
            raise UnsupportedModelError(
                "the TransformerBridge's attention did not use the key/value cache passed to it (transformers "
                "renamed its cache argument), so exact suffix patching cannot run; use method='one_backward'"
            )
        if not rel:
            return logits[:, :0, :0]
        return logits if self._logits_to_keep else logits[:, rel]

