"""The two runs of a patching experiment: the run that is patched (TransformerLens' ``corrupted_tokens``
when denoising) and the cache of the run patched from (``clean_cache``), checked at the gate
(docs/patching.md#direction-and-sign).

:class:`PatchRun` is the patched run once, forward only: its activations at the hook points a call
needs, its logits and metric, which rows of the logits the metric reads, and, for a cell, the first
query row its patch changes (no row before it can move: attention is causal).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from jaxtyping import Int

from cage_lens.core.adapter import ModelAdapter
from cage_lens.core.hooks import PointHook, installed, session
from cage_lens.errors import InputError, NumericalError
from cage_lens.inputs import rectangular_tokens
from cage_lens.patching.cost import Ledger, forward_flops
from cage_lens.patching.grids import Grid, Metric

__all__ = ["PatchRun", "start_run", "new_kv_cache", "check_same_length", "fetch_source", "source_activation",
           "metric_value", "rows_read", "as_tokens"]


def as_tokens(model, tokens, role: str = "corrupted_tokens") -> Int[torch.Tensor, "batch pos"]:
    """Tokens through the input gate (cage_lens.inputs): ids checked, prompts never truncated or ``<unk>``-substituted."""
    return rectangular_tokens(model, tokens, role=role)


def check_same_length(model, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted tokens as tensors, refusing different lengths (patching compares position
    ``i`` of one run with position ``i`` of the other: there is no alignment rule that keeps that true)."""
    clean_t, corrupted_t = as_tokens(model, clean, "clean"), as_tokens(model, corrupted, "corrupted")
    if clean_t.shape != corrupted_t.shape:
        detail = ""
        if clean_t.shape[0] == 1 == corrupted_t.shape[0] and hasattr(model, "to_str_tokens"):
            detail = (f": clean {list(model.to_str_tokens(clean_t[0]))} vs corrupted "
                      f"{list(model.to_str_tokens(corrupted_t[0]))}")
        raise InputError(
            f"clean and corrupted inputs have different shapes {tuple(clean_t.shape)} vs {tuple(corrupted_t.shape)}"
            f"{detail}. Patching needs the same number of tokens in both runs: change one token for "
            "another single token (check leading spaces)."
        )
    return clean_t, corrupted_t


def fetch_source(cache, name: str) -> torch.Tensor:
    """``cache[name]``, refused with the way to build a usable cache when it is missing or batch-less."""
    if getattr(cache, "has_batch_dim", True) is False:
        raise InputError(
            "the clean cache was made with remove_batch_dim=True, so its activations have no batch axis; "
            "build it with model.run_with_cache(clean_tokens) (remove_batch_dim=False, the default)"
        )
    try:
        value = cache[name]
    except (KeyError, IndexError, TypeError):
        value = None
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"the clean cache has no {name!r}; build it with model.run_with_cache(clean_tokens) "
            "(without a names_filter that drops it)"
        )
    return value


def source_activation(cache, name: str, like: torch.Tensor) -> torch.Tensor:
    """``cache[name]`` on ``like``'s device and dtype, refused unless it is shaped like ``like``."""
    value = fetch_source(cache, name)
    if value.shape != like.shape:
        if value.shape == like.shape[1:]:
            raise InputError(
                f"{name}: the clean cache holds {tuple(value.shape)}, without the batch axis of {tuple(like.shape)}; "
                "it was made with remove_batch_dim=True — build it with model.run_with_cache(clean_tokens)"
            )
        raise InputError(
            f"{name}: the clean cache holds shape {tuple(value.shape)} but the corrupted run has "
            f"{tuple(like.shape)}; clean and corrupted inputs need the same batch size and token length"
        )
    return value.to(device=like.device, dtype=like.dtype)


def metric_value(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    """``metric(logits)``, refused unless it is a finite scalar tensor computed from the logits."""
    value = metric(logits)
    if not isinstance(value, torch.Tensor):
        raise InputError(
            f"patching_metric returned a {type(value).__name__}; it must return a scalar torch tensor computed "
            "from the logits (TransformerLens' contract metric(logits) -> scalar; do not call .item())"
        )
    if value.ndim != 0:
        raise InputError(
            f"patching_metric must return a scalar (TransformerLens' contract metric(logits) -> scalar), "
            f"got shape {tuple(value.shape)}; reduce it over the batch, e.g. .mean()"
        )
    if not value.requires_grad:
        raise InputError("patching_metric's value does not depend on the logits (no gradient); compute it from them")
    if not torch.isfinite(value):
        raise NumericalError(f"patching_metric is not finite on the corrupted run: {float(value)}")
    return value


def rows_read(metric: Metric, logits: torch.Tensor) -> list[int]:
    """Query rows whose logits the metric reads: a non-zero gradient there, confirmed by replacing every
    other row with noise, twice (a metric that reads a row without a gradient, e.g. through an argmax,
    changes its value then, and every row counts)."""
    leaf = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = metric_value(metric, leaf)
        (grad,) = torch.autograd.grad(value, leaf)
    read = grad.ne(0).flatten(2).any(2).any(0)
    same = True
    for seed in (0, 1):
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        probe = torch.where(read[None, :, None], logits.detach(), noise.to(logits) * logits.detach().std() * 10)
        with torch.no_grad():
            same = same and bool(metric(probe) == value.detach())
    rows = read.nonzero().flatten().tolist() if same else list(range(logits.shape[1]))
    return [int(r) for r in rows]


@dataclass
class PatchRun:
    """The patched run, forward only: ``activations`` at the hook points a call needs, its ``logits``,
    ``base`` = metric(logits), the rows the metric reads, and (on a TransformerBridge) the key/value
    cache its HF model filled, from which exact patching takes the unchanged prefix."""

    model: object
    adapter: ModelAdapter
    tokens: torch.Tensor
    source: Mapping
    metric: Metric
    activations: dict[str, torch.Tensor]
    logits: torch.Tensor
    base: float
    read: list[int]
    ledger: Ledger
    kv: object = None
    kv_keywords: tuple[str, ...] = ()
    _changes: dict = field(default_factory=dict)
    _buffer: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    def source_of(self, name: str) -> torch.Tensor:
        return source_activation(self.source, name, self.activations[name])

    def changes(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """``(changed, first_row)``, both ``[layer, ...cell]``: which cells a patch changes at all (the others
        are exactly 0) and the first query row each changes."""
        if grid.name not in self._changes:
            masks, firsts = [], []
            for layer in range(self.adapter.arch.n_layers):
                name = grid.hook_name(layer)
                changed, first = grid.changes(self.source_of(name) != self.activations[name])
                masks.append(changed)
                firsts.append(first)
            self._changes[grid.name] = (torch.stack(masks).cpu(), torch.stack(firsts).cpu())
        return self._changes[grid.name]

    def kv_kwargs(self, cache) -> dict:
        """The keyword arguments that hand the bridge's HF model ``cache`` (see :func:`start_run`)."""
        return {k: cache for k in self.kv_keywords}

    def metric_with(self, rows: Sequence[int], values: torch.Tensor) -> float:
        """metric − base with logits rows ``rows`` replaced by ``values`` ([batch, len(rows), vocab]). One
        buffer serves every call: the rows are written, the metric read, the rows restored."""
        if self._buffer is None:
            self._buffer = self.logits.clone()
        buffer, rows = self._buffer, list(rows)
        buffer[:, rows] = values.to(buffer.dtype)
        try:
            with torch.no_grad():
                return float(self.metric(buffer)) - self.base
        finally:
            buffer[:, rows] = self.logits[:, rows]


#: ways to hand a TransformerBridge's HF model a key/value cache, tried in order. TL 4's attention
#: components update a cache that reaches them as ``past_key_values`` or ``layer_past``; transformers
#: ≥ 5.2x renames ``past_key_values`` to ``cache`` on the way down, so ``layer_past`` is given too,
#: except to models whose HF code passes ``layer_past`` itself (GPT-NeoX)
KV_KEYWORDS = (("past_key_values", "layer_past"), ("past_key_values",))


def new_kv_cache(model):
    """An empty HF key/value cache for a TransformerBridge's HF model, every layer keeping every position:
    the config's cache would give a sliding-window layer one that drops the keys outside the window, which
    exact patching reads back (the window stays the attention mask's)."""
    from transformers import DynamicCache

    return DynamicCache()


def start_run(model, adapter: ModelAdapter, tokens: torch.Tensor, source: Mapping, metric: Metric,
              names: Sequence[str], kv: bool = False, extra_hooks: Sequence[PointHook] = (),
              grad: bool = False) -> tuple[PatchRun, torch.Tensor]:
    """One forward of ``tokens`` keeping the activations at ``names``; with ``kv`` on a TransformerBridge,
    also the HF key/value cache of every position (None when no way of passing one fills it).
    ``extra_hooks`` act in the same forward; with ``grad`` it keeps its graph. Returns the run and the
    metric's value (a tensor, with its graph when ``grad``)."""
    store: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(tensor, hook):
            store[name] = tensor.detach()
        return hook

    for name in dict.fromkeys(names):
        fetch_source(source, name)  # a cache without them is refused before the forward
    hf_config = getattr(getattr(model, "original_model", None), "config", None)  # None: a TL-native bridge
    attempts = KV_KEYWORDS if kv and adapter.arch.is_bridge and hf_config is not None else ((),)
    cache, used = None, ()
    hooks = list(extra_hooks) + [PointHook(n, keep(n)) for n in dict.fromkeys(names)]
    with session(adapter, grad=grad), installed(adapter, hooks):
        for keywords in attempts:
            cache = new_kv_cache(model) if keywords else None
            try:
                with warnings.catch_warnings():  # transformers ≥ 5.2x: "past_key_values is deprecated"
                    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
                    logits = model(tokens, **{k: cache for k in keywords})
            except TypeError:
                if keywords == attempts[-1]:
                    raise
                continue
            if cache is None or cache.get_seq_length() == tokens.shape[1]:
                used = keywords
                break
        else:
            cache = None
            logits = model(tokens)
    missing = [n for n in names if n not in store]
    if missing:
        raise InputError(f"the hook point {missing[0]} did not fire in a forward pass; it cannot be patched")
    ledger = Ledger(forward_flops(adapter.arch, int(tokens.shape[1]), int(tokens.shape[0])))
    ledger.add_fe("forward of the patched run", 1.0)
    read = rows_read(metric, logits)
    with torch.set_grad_enabled(grad):
        value = metric_value(metric, logits) if grad else metric(logits.detach())
    for name in names:
        source_activation(source, name, store[name])  # refuse a bad cache before any patch runs
    run = PatchRun(model, adapter, tokens, source, metric, store, logits.detach(), float(value.detach()), read, ledger,
                   cache if used else None, used)
    return run, value
