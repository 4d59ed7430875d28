"""Planning a run: peak memory and relative time of a cage_lens call, from the model's configuration alone
(docs/estimate.md).

``cage_lens.estimate(model_or_config, n_tokens, what=...)`` needs no weights: a TransformerLens
model, a Hugging Face config (``transformers.PretrainedConfig`` or its ``config.json`` as a dict) or a
plain dict of TransformerLens names (``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``d_mlp``,
``d_vocab`` …) describe the model, so a run of an 8B model can be planned on a laptop. The answer is
an :class:`Estimate`: bytes above the loaded weights at the peak, the weights' own bytes, the time in
forward passes of the same model over the same tokens, and whether it fits the memory available.

**Memory model** (bytes above the loaded weights; ``T`` tokens, ``b`` bytes per element, per layer):

- *default pass*: what autograd keeps for the backward of every layer, counted by shape class —
  ``k_P`` pattern-sized ``[head, T, T]`` tensors, ``k_M`` MLP-sized ``[T, d_mlp]``, ``k_R``
  residual-sized ``[T, d_model]``, ``k_A`` query-sized ``[T, heads·d_head]`` and ``k_K`` key-sized
  ``[T, kv_heads·d_head]`` ones (:data:`SAVED`, counted per TransformerLens line, MLP kind, rule set
  and precision with ``scripts/estimate_inventory.py``) — plus the captures and their gradients and the
  top layer's backward (its pattern gradients, :data:`TRANSIENT`);
- *long-context pass* (docs/long_context.md): each block's input and the captures per layer, one
  layer's saved tensors without its pattern, and the row chunks of the attention (their budget on the
  model's device, :func:`cage_lens.core.memory.attention_budget`; :data:`LONG_CONTEXT_CHUNKS`);
- *circuit_graph*: the pass with the graph's captures (queries, keys, values and head outputs too),
  the state the closed form reads, its row chunks, and the kept edges (about
  :data:`KEPT_EDGES_PER_TOKEN` per token and transition under ``top_p``);
- *cage*: the batched table: one forward over prompt and continuation and a backward vectorised over
  :data:`CAGE_ROWS` generated tokens at once (their gradients side by side); *study*: the greedy
  generation of ``new_tokens`` (a forward per token, no gradients) and one contrastive attribution of the
  prompt and its answer.

**Time** is in forward passes of the same model over the same tokens, from floating-point operations:
a forward is ``2·T·(parameters per block)·L + 4·T²·heads·d_head·L``; a backward two forwards; the
long-context pass one forward more and the attention's forward twice more; the closed form
``≈ 16·T²·heads·d_head`` per attention transition; measured terms for the CAGE table's rows and the
long-context chunks' gradient sums (:data:`CAGE_ROW_ATTENTION`, :data:`CHUNK_SUM_OPS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cage_lens.core.memory import (CPU_ATTENTION_BUDGET, EAGER_MULTIPLE, ROW_CHUNK_ENTRY_BYTES, attention_budget,
                                   available_memory, causal_key_extent, is_accelerator)
from cage_lens.errors import CageLensError, InputError, InsufficientMemoryError

__all__ = ["estimate", "Estimate", "ModelShape", "shape_of", "available_memory", "choose_long_context",
           "forward_in_row_chunks", "check_long_context", "plan_cage_table", "WHATS"]

#: what can be estimated
WHATS = ("attribute", "circuit_graph", "cage", "study")

_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: live tensors autograd keeps per layer at the start of the backward, in elements of the model's dtype:
#: (k_P pattern ``[head, T, T]``, k_M ``[T, d_mlp]``, k_R ``[T, d_model]``, k_A ``[T, heads·d_head]``,
#: k_K ``[T, kv_heads·d_head]``), by (TransformerLens line, MLP kind, rule set, 16-bit). Counted by
#: ``scripts/estimate_inventory.py`` (a 16-bit model's pattern is also kept in float32: k_P > 1 there;
#: HookedTransformer also keeps the NaN-scrubbed pattern and its NaN mask).
#: Plain MLPs are counted on GPT-2, whose ``heads·d_head = d_model``: their k_R covers q, k, v too.
SAVED: dict[tuple[str, str, str, bool], tuple[float, float, float, float, float]] = {
    ("bridge", "plain", "attnlrp", False): (1.0, 3.0, 7.0, 0.0, 0.0),
    ("bridge", "plain", "cplrp", False): (1.0, 3.0, 7.0, 0.0, 0.0),
    ("bridge", "plain", "gxi", False): (1.0, 5.0, 7.0, 0.0, 0.0),
    ("bridge", "gated", "attnlrp", False): (1.0, 3.0, 4.0, 3.0, 0.0),
    ("bridge", "gated", "cplrp", False): (1.0, 2.0, 4.0, 1.0, 0.0),
    ("bridge", "gated", "gxi", False): (1.0, 4.0, 6.0, 3.0, 0.0),
    ("bridge", "plain", "attnlrp", True): (1.0, 3.0, 9.0, 0.0, 0.0),
    ("bridge", "plain", "cplrp", True): (1.0, 3.0, 9.0, 0.0, 0.0),
    ("bridge", "plain", "gxi", True): (1.0, 5.0, 11.0, 0.0, 0.0),
    ("bridge", "gated", "attnlrp", True): (3.0, 3.0, 8.0, 3.0, 0.0),
    ("bridge", "gated", "cplrp", True): (1.0, 2.0, 8.0, 1.0, 0.0),
    ("bridge", "gated", "gxi", True): (3.0, 4.0, 8.0, 3.0, 0.0),
    ("hooked", "plain", "attnlrp", False): (2.25, 3.0, 19.0, 0.0, 0.0),
    ("hooked", "plain", "cplrp", False): (1.0, 3.0, 11.0, 0.0, 0.0),
    ("hooked", "plain", "gxi", False): (2.25, 5.0, 19.0, 0.0, 0.0),
    ("hooked", "gated", "attnlrp", False): (2.25, 3.0, 10.0, 5.0, 4.0),
    ("hooked", "gated", "cplrp", False): (1.0, 2.0, 6.0, 1.0, 2.0),
    ("hooked", "gated", "gxi", False): (2.25, 4.0, 10.0, 5.0, 4.0),
    ("hooked", "plain", "attnlrp", True): (3.5, 3.0, 27.0, 0.0, 0.0),
    ("hooked", "plain", "cplrp", True): (1.0, 3.0, 17.0, 0.0, 0.0),
    ("hooked", "plain", "gxi", True): (3.5, 5.0, 27.0, 0.0, 0.0),
    ("hooked", "gated", "attnlrp", True): (3.5, 3.0, 16.0, 6.0, 4.0),
    ("hooked", "gated", "cplrp", True): (1.0, 2.0, 12.0, 1.0, 2.0),
    ("hooked", "gated", "gxi", True): (3.5, 4.0, 16.0, 6.0, 4.0),
}
#: bytes per ``[T, T]`` entry of the causal mask a TransformerBridge builds once per forward and every
#: layer shares (``[batch, 1, T, T]``, float32); HookedTransformer slices a boolean buffer instead
CAUSAL_MASK = {"bridge": 4, "hooked": 0}
#: the top layer's backward on top of the saved tensors: (pattern-sized in float32, MLP-sized); while
#: it runs, the tensors saved by the layers above are already freed
TRANSIENT = (1.0, 1.0)
#: per layer in the default pass, kept beside autograd's tensors (residual-sized): the captures are
#: tensors autograd keeps anyway, and their gradients arrive as the saved tensors go
CAPTURES = 0.0
#: per layer in the long-context pass: each block's input, the captures and their gradients
#: (residual-sized; the head outputs count query-sized)
LONG_CONTEXT_KEPT = (4.0, 2.0)
#: per layer, what a graph's pass keeps for its edges (residual-, query- and key-sized): residual
#: states and the attention's contribution with their gradients, q and z with z's gradient, k and v
GRAPH_STATE = (4.0, 3.0, 2.0)
#: the closed form's row chunks: at most about :data:`cage_lens.circuit.closed_form.EDGE_BUDGET` (the
#: budget counts six ``[head, rows, key]`` intermediates; about 8.4 are alive in the largest chunk)
EDGE_CHUNKS = 1.1 * 256 * 2**20
EDGE_CHUNK_LIVE = 8.4
#: edges per token that ``top_p=0.85`` keeps per transition (the residual connection carries most of
#: the mass; measured ~2 on random GPT-2-sized weights at 1,024–4,096 tokens); a kept edge holds its value
#: and two int64 node indices
KEPT_EDGES_PER_TOKEN = 2.0
#: the memory a run may use, as a fraction of the memory available, when the estimate decides
FIT_FRACTION = 0.8
#: what the row chunks hold at the peak of a long-context pass: (budgets, CPU budgets), the larger —
#: one budget of ``[…, rows, key]`` tensors (measured 0.85–0.90 of a 3.8 GB budget on an H200 with
#: Qwen3-8B's and OLMo-3-7B's configurations at 8,192 tokens), at least the three 128 MB budgets the
#: CPU's fits were made with (the chunk's other transients weigh there)
LONG_CONTEXT_CHUNKS = (1.0, 3.0)
#: float32 ``[batch, head, T, T]`` tensors alive in one layer's eager attention backward, by line
EAGER_ATTENTION = {"bridge": 3.0, "hooked": 3.5}
#: float32 pattern-sized tensors an attention backward holds on an accelerator beyond the CPU's counts:
#: (the default pass's top layer, :data:`TRANSIENT`; an eager attention of the long-context pass,
#: :data:`EAGER_ATTENTION`). Measured on cuda (H200, TL 4.3 bridge, Qwen3-0.6B's shape with 2 and 4
#: layers at 4,096 and 8,192 tokens): 2.36-2.40 patterns in the top layer where the CPU holds 1.0, and
#: 3.88-3.92 in an eager attention where it holds 3.0; the allocator's trace shows four whole float32
#: patterns alive at that peak (docs/estimate.md#on-an-accelerator)
ACCELERATOR_PATTERNS = (1.4, 1.0)
#: rows the batched CAGE table differentiates at once at most (``cage_lens.generation.methods.DEFAULT_CHUNK``)
CAGE_ROWS = 8
#: pattern-sized ``[head, T, T]`` tensors per row of the CAGE table's backward vectorised over rows
#: (default pass), (in float32, in the model's dtype), by line and rule set: the pattern's and the
#: scores' gradients and softmax's product, each with the rows' dimension; CP-LRP's pattern is detached,
#: so no gradient flows into the scores and one pattern-sized product remains (HookedTransformer keeps
#: its pattern in float32). Measured on GPT-2- and Qwen3-shaped models, float32 and bfloat16
#: (docs/estimate.md#the-cage-table).
CAGE_ROW_PATTERNS = {("bridge", "attnlrp"): (3.0, 0.0), ("bridge", "cplrp"): (0.0, 1.0), ("bridge", "gxi"): (3.0, 0.0),
                     ("hooked", "attnlrp"): (3.0, 0.0), ("hooked", "cplrp"): (1.0, 0.0), ("hooked", "gxi"): (3.0, 0.0)}
#: per row of that backward in the long-context pass: float32 (MLP-sized, query-sized) gradients per token,
#: by line and rule set — AttnLRP's (and G×I's, the same backward) peak is the attention's, whose q-, k-
#: and v-gradients carry the rows; CP-LRP's detached pattern leaves them small and its MLP's remain.
#: Fitted on 2-36-layer Qwen3 (0.6B, 1.7B, 8B) and Llama configurations in bfloat16 at 512-4,096 tokens,
#: every one within 11 % (docs/estimate.md#the-cage-table); the attention's row chunks, divided among the
#: rows, hold about three quarters (CAGE_ATTENTION_CHUNKS) of a budget
CAGE_ROW_LONG_CONTEXT = {("bridge", "attnlrp"): (0.1, 3.8), ("bridge", "cplrp"): (0.6, 0.5), ("bridge", "gxi"): (0.1, 3.8),
                         ("hooked", "attnlrp"): (0.0, 5.4), ("hooked", "cplrp"): (0.4, 0.5), ("hooked", "gxi"): (0.0, 5.4)}
CAGE_ATTENTION_CHUNKS = 0.75
#: per layer in the CAGE table's long-context pass (residual-, query-sized): the block's input, which the
#: recomputation keeps — the table captures only the embeddings (the measured growth per layer is one
#: residual-sized tensor in the model's dtype on both lines)
CAGE_LONG_CONTEXT_KEPT = (1.0, 0.0)
#: a row's backward in the CAGE table, in units of two forwards: ``1 + k × (the attention's share of a
#: forward)``, k by pass (default, long-context). The default pass's backward vectorised over the rows
#: carries every row's ``[head, T, T]`` gradients through the attention (memory-bound, and softmax's
#: backward has no batching rule: a loop over the rows); the long-context pass's chunks stay small and,
#: under the causal mask, read about half the keys (k = -1, the fit's bound: the attention's backward
#: costs about what the pass's recomputations already count), and pay for their sums instead
#: (:data:`CHUNK_SUM_OPS`). Fitted together with :data:`CHUNK_SUM_OPS` on the CPU times of the table (8 rows
#: at once) against one ``attribute`` call, both passes, 2-layer models of Qwen3-0.6B's and Qwen3-8B's shapes
#: at 1,024 and 2,048 tokens (benchmarks/calibrate_cage_time.py; the least squares on its grid;
#: docs/estimate.md#time-model)
CAGE_ROW_ATTENTION = {False: 2.5, True: -1.0}
#: operations (in the time model's units, a forward's floating-point operations) per element of the key and
#: value gradients that every row chunk of a long-context attention computes and adds to the sum (cast to
#: float32): ``2 · rows · heads · d_head · extent`` per chunk ``[start, stop)`` and layer, the extent ``stop``
#: rounded up under the causal mask (:func:`~cage_lens.core.memory.causal_key_extent`), so the chunks' sums
#: grow as about ``T³ · heads² / 2`` (docs/estimate.md#time-model)
CHUNK_SUM_OPS = 180.0


# ---------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from a configuration."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    gated: bool = False
    dtype: str = "float32"
    line: str = "bridge"
    tied: bool = False
    name: str = ""

    @property
    def bytes(self) -> int:
        return _BYTES[self.dtype]

    @property
    def block_params(self) -> int:
        attention = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attention + (3 if self.gated else 2) * self.d_model * self.d_mlp

    @property
    def weights_bytes(self) -> int:
        embeddings = (1 if self.tied else 2) * self.d_vocab * self.d_model
        return (self.n_layers * self.block_params + embeddings) * self.bytes

    def describe(self) -> str:
        name = f"{self.name}: " if self.name else ""
        return (f"{name}{self.n_layers} layers, d_model {self.d_model}, {self.n_heads}/{self.n_kv_heads} heads × "
                f"{self.d_head}, d_mlp {self.d_mlp}{' gated' if self.gated else ''}, vocab {self.d_vocab}, {self.dtype}")


def _getter(config):
    if isinstance(config, dict):
        return lambda *names: next((config[n] for n in names if config.get(n) is not None), None)
    return lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


_GATED_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "swiglu", "geglu")
_GATED_TYPES = ("llama", "mistral", "mixtral", "qwen", "gemma", "olmo", "phi3")


def shape_of(model_or_config, dtype: str | None = None, line: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from a TL model (its ``cfg``), an HF config object or dict, or a dict of
    TL names; ``dtype`` and ``line`` ("bridge" / "hooked") override what the model says."""
    model = model_or_config if hasattr(model_or_config, "cfg") and not isinstance(model_or_config, dict) else None
    config = model.cfg if model is not None else model_or_config
    if config is None or (not isinstance(config, dict) and not hasattr(config, "__dict__")):
        raise InputError(f"estimate() needs a TransformerLens model, a Hugging Face config or a dict, got {type(config).__name__}")
    get = _getter(config)
    text = get("text_config")  # multimodal configs keep the language model's fields here
    if text is not None and get("num_hidden_layers", "n_layers") is None:
        get = _getter(text)
    n_layers = get("n_layers", "num_hidden_layers", "n_layer", "num_layers")
    d_model = get("d_model", "hidden_size", "n_embd")
    n_heads = get("n_heads", "num_attention_heads", "n_head")
    missing = [n for n, v in (("layers", n_layers), ("d_model/hidden_size", d_model), ("heads", n_heads)) if v is None]
    if missing:
        raise InputError(f"estimate(): the configuration does not say its {', '.join(missing)}")
    n_kv = get("n_key_value_heads", "num_key_value_heads", "n_kv_heads") or n_heads
    d_head = get("d_head", "head_dim") or d_model // n_heads
    model_type = str(get("model_type", "original_architecture") or "").lower()
    act = str(get("act_fn", "hidden_act", "hidden_activation", "activation_function") or "").lower()
    gated_flag = get("gated_mlp")
    gated = bool(gated_flag) if gated_flag is not None else (
        act in _GATED_ACTIVATIONS or any(t in model_type for t in _GATED_TYPES))
    d_mlp = get("d_mlp", "intermediate_size", "n_inner", "ffn_dim") or 4 * d_model
    d_vocab = get("d_vocab", "vocab_size") or 0
    found_dtype = str(dtype or get("dtype", "torch_dtype") or "float32").replace("torch.", "")
    if found_dtype not in _BYTES:
        raise InputError(f"estimate(): unknown dtype {found_dtype!r}; use one of {', '.join(_BYTES)}")
    if line is None:
        line = _line_of(model)
    if line not in ("bridge", "hooked"):
        raise InputError(f"estimate(): line must be 'bridge' or 'hooked', got {line!r}")
    tied = bool(get("tie_word_embeddings", "tie_embeddings") or False)
    name = str(get("model_name", "_name_or_path", "name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    return ModelShape(int(n_layers), int(d_model), int(n_heads), int(n_kv), int(d_head), int(d_mlp), int(d_vocab),
                      gated, found_dtype, line, tied, name)


def _line_of(model) -> str:
    """The TransformerLens line of a model, or for a configuration the installed one (read from the
    package metadata: planning a run imports neither torch nor TransformerLens)."""
    if model is not None:
        return "hooked" if hasattr(model, "W_E") and not hasattr(model, "original_model") else "bridge"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "bridge" if int(version("transformer-lens").split(".")[0]) >= 4 else "hooked"
    except (PackageNotFoundError, ValueError):
        return "bridge"


# ---------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Predicted peak memory (bytes above the loaded weights) and time (forward passes) of one call."""

    what: str
    n_tokens: int
    shape: ModelShape
    rules: str
    long_context: bool
    peak_bytes: float
    time_forwards: float
    available_bytes: float | None
    forward_flops: float
    parts: dict[str, float] = field(default_factory=dict)
    #: prompts attributed at once; for ``cage``: generated tokens differentiated at once
    rows: int = 1

    @property
    def weights_bytes(self) -> int:
        return self.shape.weights_bytes

    @property
    def attention_share(self) -> float:
        """The attention's share (scores and mixing, ``4·T²·heads·d_head`` per layer) of a forward's
        floating-point operations: what grows quadratically with the prompt."""
        return _attention_share(self.shape, self.n_tokens)

    @property
    def fits(self) -> bool:
        """Whether the peak stays within :data:`FIT_FRACTION` of the memory available (unknown: yes)."""
        return self.available_bytes is None or self.peak_bytes <= FIT_FRACTION * self.available_bytes

    def __str__(self) -> str:
        where = "long-context pass" if self.long_context else "default pass"
        fits = ("" if self.available_bytes is None else
                f"; {_gb(self.available_bytes)} available: {'fits' if self.fits else 'does NOT fit'}")
        return (f"{self.what} on {self.n_tokens:,} tokens ({self.shape.describe()}, {self.rules}, {where}): "
                f"peak ≈ {_gb(self.peak_bytes)} above the {_gb(self.weights_bytes)} of weights, "
                f"time ≈ {self.time_forwards:.1f} forward passes{fits}")

    def to_dict(self) -> dict:
        return {"what": self.what, "n_tokens": self.n_tokens, "rules": self.rules, "long_context": self.long_context,
                "rows": self.rows,
                "peak_bytes": self.peak_bytes, "weights_bytes": self.weights_bytes, "time_forwards": self.time_forwards,
                "forward_flops": self.forward_flops, "attention_share": self.attention_share,
                "available_bytes": self.available_bytes, "fits": self.fits,
                "parts": dict(self.parts), "shape": self.shape.describe()}


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**28 else f"{n / 2**20:.1f} MB"


def _rule_name(rules) -> str:
    name = getattr(rules, "name", rules)
    if name in ("attnlrp", "cplrp", "gxi"):
        return name
    # a custom RuleSet: the nearest built-in by what autograd keeps (detached q/k keeps no score graph)
    q, k = getattr(rules, "q", 1.0), getattr(rules, "k", 1.0)
    return "cplrp" if (q == 0 and k == 0) else "attnlrp"


def _forward_flops(s: ModelShape, T: int, batch: int) -> float:
    return batch * (2.0 * T * s.block_params * s.n_layers + 4.0 * T * T * s.n_heads * s.d_head * s.n_layers)


def _attention_share(s: ModelShape, T: int) -> float:
    return (4.0 * T * T * s.n_heads * s.d_head * s.n_layers) / _forward_flops(s, T, 1)


def _default_pass(s: ModelShape, T: int, rules: str, batch: int, captures: float,
                  accelerator: bool = False) -> dict[str, float]:
    k_p, k_m, k_r, k_a, k_k = SAVED[(s.line, "gated" if s.gated else "plain", rules, s.bytes == 2)]
    b, L = s.bytes, s.n_layers
    pattern = batch * s.n_heads * T * T
    saved = L * b * (k_p * pattern + batch * T * (k_m * s.d_mlp + k_r * s.d_model + k_a * s.n_heads * s.d_head
                                                   + k_k * s.n_kv_heads * s.d_head))
    t_p, t_m = TRANSIENT
    t_p += ACCELERATOR_PATTERNS[0] if accelerator else 0.0
    return {"saved": saved, "captures": L * b * batch * T * captures * s.d_model,
            "top layer": 4 * t_p * pattern + b * t_m * batch * T * s.d_mlp, "mask": CAUSAL_MASK[s.line] * batch * T * T}


def _cage_pass(s: ModelShape, T: int, rules: str, lc: bool, rows: int, budget: int) -> dict[str, float]:
    """The CAGE table's pass: one forward, a backward vectorised over ``rows`` generated tokens. In the
    default pass every row's gradients of the top layer's attention are alive at once; the long-context
    pass shrinks its row chunks by the number of rows (cage_lens.generation.methods)."""
    in_float32, in_dtype = CAGE_ROW_PATTERNS[(s.line, rules)]
    row_bytes = 4 * in_float32 + s.bytes * in_dtype            # per pattern entry and row
    if not lc:
        parts = _default_pass(s, T, rules, 1, CAPTURES)
        parts["top layer"] = rows * (row_bytes * s.n_heads * T * T + s.bytes * TRANSIENT[1] * T * s.d_mlp)
        return parts
    # an eager attention holds what the default pass's top layer holds per row
    parts = _long_context_pass(s, T, rules, 1, CAGE_LONG_CONTEXT_KEPT, budget, rows, CAGE_ATTENTION_CHUNKS * budget,
                               row_bytes / 4)
    mlp_sized, query_sized = CAGE_ROW_LONG_CONTEXT[(s.line, rules)]
    parts["rows' gradients"] = rows * 4 * T * (mlp_sized * s.d_mlp + query_sized * s.n_heads * s.d_head)
    return parts


def _long_context_pass(s: ModelShape, T: int, rules: str, batch: int, kept: tuple[float, float], budget: int,
                       grad_rows: int = 1, chunks: float | None = None,
                       eager_patterns: float | None = None, accelerator: bool = False) -> dict[str, float]:
    """The long-context pass with row chunks of ``budget`` bytes (:data:`LONG_CONTEXT_CHUNKS` unless ``chunks``)."""
    chunks = max(LONG_CONTEXT_CHUNKS[0] * budget, LONG_CONTEXT_CHUNKS[1] * CPU_ATTENTION_BUDGET) if chunks is None else chunks
    k_p, k_m, k_r, k_a, k_k = SAVED[(s.line, "gated" if s.gated else "plain", rules, s.bytes == 2)]
    b, L = s.bytes, s.n_layers
    # one layer's saved tensors while its block is recomputed, its pattern aside
    one_layer = b * batch * T * (k_m * s.d_mlp + k_r * s.d_model + k_a * s.n_heads * s.d_head + k_k * s.n_kv_heads * s.d_head)
    # one layer's attention computed whole when small: its pattern, the pattern's and the scores' gradients
    # (HookedTransformer: and the NaN-scrubbed pattern)
    # (a backward vectorised over ``grad_rows`` rows divides the chunks' budget by them)
    eager = (EAGER_ATTENTION[s.line] + (ACCELERATOR_PATTERNS[1] if accelerator else 0.0) if eager_patterns is None
             else eager_patterns)
    eager_attention = grad_rows * eager * 4 * batch * s.n_heads * T * T
    chunked = _attention_chunked(s, T, grad_rows * batch, budget)
    return {"per layer": L * b * batch * T * (kept[0] * s.d_model + kept[1] * s.n_heads * s.d_head),
            "one layer": one_layer + b * TRANSIENT[1] * batch * T * s.d_mlp,
            "attention": chunks if chunked else eager_attention, "mask": CAUSAL_MASK[s.line] * batch * T * T}


def estimate(model_or_config, n_tokens: int, what: str = "attribute", *, rules="attnlrp",
             long_context: bool | None = None, batch: int = 1, new_tokens: int = 32, rows: int | None = None,
             dtype: str | None = None, line: str | None = None, available_bytes: float | None = None,
             device: str | None = None) -> Estimate:
    """Predicted peak memory and time of ``what`` (``"attribute"``, ``"circuit_graph"``, ``"cage"`` or
    ``"study"``) on ``n_tokens`` tokens (docs/estimate.md).

    Args:
        model_or_config: a TL model, a Hugging Face config (object or ``config.json`` dict) or a dict
            of TL names; no weights are needed.
        rules: the rule set (name or :class:`cage_lens.RuleSet`).
        long_context: the pass to estimate; ``None`` takes the one cage_lens would choose (the default
            pass when it fits the memory available, else the long-context pass).
        batch: prompts attributed at once (``attribute``); ``new_tokens``: generated tokens (``cage``,
            ``study``); ``rows``: the most generated tokens the CAGE table differentiates at once
            (default :data:`CAGE_ROWS`); the estimate takes the fastest count up to it that fits, as
            ``cage`` does (:attr:`Estimate.rows`).
        dtype, line: override the model's dtype (``"bfloat16"`` …) and TransformerLens line
            (``"bridge"`` for TL 4's TransformerBridge, ``"hooked"`` for HookedTransformer).
        available_bytes: the memory to plan for (default: :func:`available_memory` of ``device`` or the
            model's device).
    """
    if what not in WHATS:
        raise InputError(f"estimate(): unknown what={what!r}; choose one of {', '.join(WHATS)}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise InputError(f"estimate(): n_tokens must be a positive int, got {n_tokens!r}")
    least_new = 1 if what == "cage" else 0   # the CAGE table needs a generated token to explain
    for name, value, least in (("batch", batch, 1), ("new_tokens", new_tokens, least_new),
                               ("rows", 1 if rows is None else rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"estimate(): {name} must be an int ≥ {least}, got {value!r}")
    s = shape_of(model_or_config, dtype, line)
    rule = _rule_name(rules)
    if available_bytes is None:
        available_bytes = available_memory(device or _device_of(model_or_config))
    T = n_tokens + (new_tokens if what in ("cage", "study") else 0)
    flops = _forward_flops(s, T, 1)
    place = device or _device_of(model_or_config)
    budget, accelerator = attention_budget(place, available_bytes), is_accelerator(place)

    def build(lc: bool, rows: int) -> Estimate:   # rows: the batch, or the CAGE table's rows at once
        if what == "circuit_graph":
            first, second = _graph_phases(s, T, rule, lc, budget, accelerator)
            parts = {**{f"pass: {k}": v for k, v in first.items()}, **{f"edges: {k}": v for k, v in second.items()}}
            peak = max(sum(first.values()), sum(second.values()))
        elif what == "cage":
            parts = _cage_pass(s, T, rule, lc, rows, budget)
            peak = sum(parts.values())
        else:
            parts = (_long_context_pass(s, T, rule, batch, LONG_CONTEXT_KEPT, budget, accelerator=accelerator) if lc
                     else _default_pass(s, T, rule, batch, CAPTURES, accelerator))
            peak = sum(parts.values())
        time = _time(s, T, what, lc, rows, new_tokens, budget)
        return Estimate(what, n_tokens, s, rule, lc, float(peak), time, available_bytes, flops, parts, rows)

    modes = [False, True] if long_context is None else [bool(long_context)]
    if what != "cage":
        options = [build(lc, batch) for lc in modes]
    else:
        most = min(CAGE_ROWS if rows is None else rows, new_tokens)
        counts = sorted({max(1, most >> i) for i in range(most.bit_length())}, reverse=True)   # most, most/2, …, 1
        options = [build(lc, r) for lc in modes for r in counts]
    fitting = [e for e in options if e.fits]
    if not fitting:
        return options[-1]
    if what != "cage":   # the default pass when it fits, else the long-context one
        return fitting[0]
    # the CAGE table: the default pass with all its rows when it fits; else the fastest plan that fits
    # (in each pass the most rows that fit: fewer rows are never faster)
    if fitting[0] is options[0]:
        return fitting[0]
    return min(fitting, key=lambda e: (e.time_forwards, e.peak_bytes))


def _graph_phases(s: ModelShape, T: int, rules: str, lc: bool, budget: int,
                  accelerator: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """The graph's two memory phases: its forward and backward pass (with its own captures), then
    the edges (the state it kept, one transition's parts, row chunks, the top-p sort, the kept edges)."""
    b, L = s.bytes, s.n_layers
    r, a, k = GRAPH_STATE
    state = L * b * T * (r * s.d_model + a * s.n_heads * s.d_head + k * s.n_kv_heads * s.d_head)
    if lc:
        pass_parts = _long_context_pass(s, T, rules, 1, (0.0, 0.0), budget, accelerator=accelerator)
        pass_parts["per layer"] = state
    else:
        pass_parts = _default_pass(s, T, rules, 1, CAPTURES, accelerator)
    computed = T * (T + 1) / 2                                   # non-zero edges of one attention transition
    edges = {"graph state": state,
             "one transition's parts": b * T * (s.n_heads * s.d_head + 2 * s.n_kv_heads * s.d_head),
             "edge chunks": min(EDGE_CHUNKS, EDGE_CHUNK_LIVE * s.n_heads * T * T * b),
             "top-p sort": computed * (b + 8 + b + 8 + 8),
             "kept edges": KEPT_EDGES_PER_TOKEN * T * (8 + 8 + b) * 2 * L}
    return pass_parts, edges


def _time(s: ModelShape, T: int, what: str, lc: bool, rows: int, new_tokens: int, budget: int) -> float:
    attention = _attention_share(s, T)
    one = 3.0 + ((1.0 + 2.0 * attention) if lc else 0.0)     # forward + backward (+ recomputation)

    def sums(stacked: int) -> float:   # the row chunks' sums of one pass, in forwards
        return CHUNK_SUM_OPS * _chunk_sums(s, T, stacked, budget) / _forward_flops(s, T, 1) if lc else 0.0

    if what == "attribute":
        return one * rows + sums(rows)
    if what == "circuit_graph":
        closed_form = 16.0 * T * T * s.n_heads * s.d_head * s.n_layers / _forward_flops(s, T, 1)
        return one + sums(1) + closed_form
    if what == "cage":   # per chunk of rows: one forward and a backward (two forwards) per row; the generation
        row = 2.0 * (1.0 + CAGE_ROW_ATTENTION[lc] * attention)
        return math.ceil(new_tokens / rows) * (one - 2.0 + row * rows + sums(rows)) + 1.0
    return one + sums(1) + new_tokens   # study: the greedy generation (a forward per token, as the study runs it), the attribution


def _attention_chunked(s: ModelShape, T: int, stacked: int, budget: int) -> bool:
    """core.recompute's rule: an attention of ``stacked`` prompts or CAGE rows is row-chunked when its
    eager backward (:data:`~cage_lens.core.memory.ROW_CHUNK_ENTRY_BYTES` per ``[head, T, T]`` entry) exceeds
    :data:`~cage_lens.core.memory.EAGER_MULTIPLE` budgets."""
    return stacked * s.n_heads * T * T * ROW_CHUNK_ENTRY_BYTES > EAGER_MULTIPLE * budget


def _chunk_sums(s: ModelShape, T: int, stacked: int, budget: int) -> float:
    """Elements of the key and value gradients the row chunks of one long-context pass sum, with
    ``stacked`` prompts or CAGE rows sharing the budget (core.recompute's chunks); 0 where the attention
    stays eager. Under the causal mask a chunk's gradients reach only the keys up to its last row."""
    if not _attention_chunked(s, T, stacked, budget):
        return 0.0
    query_rows_per_chunk = max(1, (budget // stacked) // (s.n_heads * T * ROW_CHUNK_ENTRY_BYTES))
    stops = range(query_rows_per_chunk, T + query_rows_per_chunk, query_rows_per_chunk)
    keys = sum(causal_key_extent(min(T, stop), T) for stop in stops)
    return keys * 2.0 * stacked * s.n_heads * s.d_head * s.n_layers


def _device_of(model_or_config) -> str:
    try:
        return str(next(model_or_config.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def check_long_context(long_context) -> None:
    """The ``long_context=`` option of a call: ``None`` (chosen from the estimate), ``True`` or ``False``."""
    if long_context not in (None, True, False):
        raise InputError(f"long_context must be None, True or False, got {long_context!r}")


def choose_long_context(model, n_tokens: int, what: str = "attribute", *, rules="attnlrp", batch: int = 1) -> bool:
    """Whether a call of ``what`` on ``n_tokens`` tokens should run in the long-context mode: when the
    default pass is predicted not to fit the memory available. A run that would not fit either way is
    refused before it starts, with the estimate, the memory available and the way out."""
    return _fitting(estimate(model, n_tokens, what, rules=rules, batch=batch)).long_context


def forward_in_row_chunks(model, n_tokens: int, batch: int = 1) -> bool:
    """Whether a forward without gradients on ``batch`` sequences of ``n_tokens`` should compute its
    attention in row chunks: when an attribution of that length would run in the long-context mode
    (a plain forward forms each layer's whole pattern, which the long-context plan does not count; row
    chunks cost a GPU about a third more time), or would not fit at all (docs/long_context.md#forwards-without-gradients)."""
    try:
        return choose_long_context(model, n_tokens, "attribute", batch=batch)
    except CageLensError:   # no plan fits (the attribution will say so) or no readable configuration
        return True


def plan_cage_table(model, n_prompt: int, new_tokens: int, *, rules="attnlrp", most_rows: int = CAGE_ROWS,
                    long_context: bool | None = None) -> Estimate:
    """How the CAGE table runs: the pass (``long_context``) and the generated tokens differentiated at
    once (``rows``, at most ``most_rows``): the default pass with ``most_rows`` when it fits the memory
    available, else the fastest plan that fits. ``long_context``
    given: that pass, run even when it does not fit; ``None``: a table that fits neither way is refused
    before it starts."""
    est = estimate(model, n_prompt, "cage", rules=rules, new_tokens=new_tokens, rows=most_rows,
                   long_context=long_context)
    return est if long_context is not None else _fitting(est)


def _fitting(est: Estimate) -> Estimate:
    if est.fits:
        return est
    raise InsufficientMemoryError(
        f"{est.what} on {est.n_tokens:,} tokens is estimated to need {_gb(est.peak_bytes)} above the loaded model even in "
        f"the long-context mode, but {_gb(est.available_bytes)} are available (cage_lens.estimate; the estimate "
        f"may be off by about 25%): use fewer tokens, set CAGE_LENS_MAX_MEMORY if more memory is free, or pass "
        f"long_context=True to run anyway"
    )
