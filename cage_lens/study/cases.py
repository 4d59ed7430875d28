"""One chunk of records on one model: generate, find the deviation, pick the contrast, explain.

The pipeline of Tan et al. 2026 (docs/study.md#pipeline), batched over the chunk:

1. **Generate** greedily (right-padded batch, one forward per step for the rows still running) and ask
   after every token whether the continuation can still be correct. The first token after which it
   cannot is the *deviation point*; the model's top-1 there is the *wrong* token.
2. **Contrast**: the highest-ranked token of the model's top-k whose continuation is correct; else the
   same in the sibling model's top-k (same tokenizer, same input); else the case is ``no_contrast``.
3. **Filter**: ``Δℓ = logit(wrong) − logit(contrast)`` at the deviation point; ``Δℓ ≤ min_delta`` →
   ``low_delta``.
4. **Explain** the kept cases with one batched :func:`cage_lens.attribute` call (input = prompt +
   generated prefix, target = wrong, contrast = correct): heatmap normalised as
   :func:`cage_lens.explain_failure` does, segment sums, layer trace; optionally a pruned
   :func:`cage_lens.circuit_graph` per case.

Every record yields exactly one row; a problem with one record (malformed, too long, checker raised,
attribution failed) becomes that row's ``reason`` and the chunk goes on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

import cage_lens
from cage_lens.core.engine import logits_at
from cage_lens.core.hooks import session
from cage_lens.errors import CageLensError, InputError
from cage_lens.inputs import encode, special_token_id, unknown_words_problem
from cage_lens.planning import forward_in_row_chunks
from cage_lens.study.checking import CORRECT, OPEN, WRONG, CheckerError, continuation_text, verdict
from cage_lens.study.records import Entry, Malformed, Record
from cage_lens.study.segments import segment_members, token_char_spans
from cage_lens.study.settings import StudySettings

__all__ = ["ModelContext", "ChunkResult", "process_chunk", "vocab_digest"]

EXPLAINED, CORRECT_STATUS, UNDECIDED = "explained", "correct", "undecided"
LOW_DELTA, NO_CONTRAST, SKIPPED, NOT_A_CASE = "low_delta", "no_contrast", "skipped", "not_a_case"
STATUSES = (EXPLAINED, CORRECT_STATUS, UNDECIDED, LOW_DELTA, NO_CONTRAST, SKIPPED, NOT_A_CASE)


def vocab_digest(tokenizer) -> str:
    """Identifies a tokenizer's vocabulary: models compared on the same token ids must share it."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


@dataclass
class ModelContext:
    """A loaded model (and sibling) with what the pipeline needs from its tokenizer."""

    name: str
    model: Any
    sibling: Any = None
    anchor_vocab: str | None = None

    def __post_init__(self):
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise InputError(f"model {self.name!r} has no tokenizer; a study decodes continuations for the checker "
                             "and aligns segments with it")
        # one adapter per loaded model for the whole chunk: the generation loop runs a forward per step
        self.adapter = cage_lens.adapt(self.model)
        self.adapter.check_eval_mode()
        self.tokenizer = tokenizer
        self.vocab = vocab_digest(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self.pad = special_token_id(self.model, "pad_token_id", "eos_token_id", "bos_token_id")
        self.n_ctx = int(self.model.cfg.n_ctx)
        self.d_vocab = int(self.model.cfg.d_vocab)
        if self.sibling is not None:
            sib_tok = getattr(self.sibling, "tokenizer", None)
            if sib_tok is None or vocab_digest(sib_tok) != self.vocab:
                raise InputError(f"the sibling model does not share model {self.name!r}'s tokenizer vocabulary; "
                                 "its top-k could not be compared token by token")
        if self.anchor_vocab is not None and self.anchor_vocab != self.vocab:
            raise InputError(f"model {self.name!r} does not share the tokenizer vocabulary of the cases_from model; "
                             "it cannot explain that model's token ids")

    def info(self) -> dict:
        return {"name": self.name, "vocab": self.vocab, "n_ctx": self.n_ctx, "d_vocab": self.d_vocab,
                "architecture": self.adapter.arch.describe()}


@dataclass
class ChunkResult:
    """The rows of one chunk (one per record, in record order) and the graphs of its explained cases."""

    rows: list[dict]
    graphs: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- per-case state
@dataclass
class _Case:
    entry: Entry
    status: str | None = None
    reason: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    deviation_step: int | None = None
    wrong: int | None = None
    logits: torch.Tensor | None = None  # the model's logits at the deviation point
    ranking: list[int] = field(default_factory=list)
    contrast: int | None = None
    contrast_rank: int | None = None
    contrast_source: str | None = None
    delta: float | None = None
    row: dict = field(default_factory=dict)

    def stop(self, status: str, reason: str | None = None) -> None:
        self.status, self.reason = status, reason

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def position(self) -> int:
        return len(self.prompt_ids) + len(self.generated) - 1


def _ranking(logits: torch.Tensor, k: int) -> list[int]:
    """Top-k ids by logit, ties broken by the lower id (so the first entry is ``argmax``)."""
    return torch.argsort(-logits, stable=True)[:k].tolist()


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens, [len(r) - 1 for r in rows]


def _last_logits(adapter, rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Next-token logits after each row (one right-padded forward; causal, so padding is never seen;
    attention in row chunks where the attribution would run in the long-context mode)."""
    tokens, positions = _padded(rows, pad)
    chunked = forward_in_row_chunks(adapter.model, tokens.shape[1], len(rows))
    with session(adapter, grad=False):   # the model's repairs (ModelAdapter.repairs) act in every cage_lens forward
        return logits_at(adapter, tokens, positions, row_chunked=chunked).detach().cpu()


# ---------------------------------------------------------------------------- 0. prepare
def _prepare(ctx: ModelContext, entry: Entry, settings: StudySettings, checker) -> _Case:
    case = _Case(entry)
    if isinstance(entry, Malformed):
        case.stop(SKIPPED, entry.reason)
        return case
    if checker is None and entry.answer is None:
        case.stop(SKIPPED, "the record has no answer and the study has no checker")
        return case
    try:  # inputs.encode never truncates: an over-long prompt is seen and skipped below
        case.prompt_ids = encode(ctx.model, entry.prompt, settings.prepend_bos).tolist()
    except Exception as err:  # noqa: BLE001 - a tokenizer failure skips this record only
        case.stop(SKIPPED, f"the prompt could not be tokenized: {type(err).__name__}: {err}")
        return case
    if len(case.prompt_ids) >= ctx.n_ctx:
        case.stop(SKIPPED, f"the prompt has {len(case.prompt_ids)} tokens but the model's context (n_ctx) is "
                  f"{ctx.n_ctx}: no room to generate")
        return case
    texts = [("the prompt", entry.prompt)] + ([("the answer", entry.answer)] if checker is None else [])
    for role, text in texts:  # a word outside a word-level vocabulary would silently become <unk>
        problem = unknown_words_problem(ctx.model, text, role)
        if problem:
            case.stop(SKIPPED, problem)
            return case
    if checker is None:
        case.answer_ids = _answer_ids(ctx, entry, case.prompt_ids, settings.prepend_bos)
        if not case.answer_ids:
            case.stop(SKIPPED, f"the answer {entry.answer!r} has no tokens")
    return case


def _answer_ids(ctx: ModelContext, record: Record, prompt_ids: list[int], prepend_bos: bool | None) -> list[int]:
    """The reference answer's tokens as they follow the prompt: from tokenizing prompt + answer when
    that keeps the prompt's tokens, else the answer tokenized alone (docs/study.md#deviation)."""
    whole = encode(ctx.model, record.prompt + record.answer, prepend_bos).tolist()
    if len(whole) > len(prompt_ids) and whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids):]
    return encode(ctx.model, record.answer, prepend_bos=False).tolist()


# ---------------------------------------------------------------------------- 1. generate
def _judge(ctx: ModelContext, case: _Case, token: int, checker, settings: StudySettings) -> str:
    """Verdict on the continuation ``generated + [token]``."""
    step = len(case.generated)
    if case.answer_ids is not None:
        if token != case.answer_ids[step]:
            return WRONG
        return CORRECT if step == len(case.answer_ids) - 1 else OPEN
    if settings.stop_at_eos and ctx.eos is not None and token == ctx.eos:
        text = continuation_text(ctx.tokenizer, case.prompt_ids, case.generated)
        return CORRECT if verdict(checker, case.entry, text) == CORRECT else WRONG
    text = continuation_text(ctx.tokenizer, case.prompt_ids, case.generated + [token])
    return verdict(checker, case.entry, text)


def _generate(ctx: ModelContext, cases: list[_Case], checker, settings: StudySettings) -> None:
    limit = settings.max_new_tokens
    while True:
        active = [c for c in cases if c.status is None]
        for c in active:
            if len(c.input_ids) >= ctx.n_ctx:
                c.stop(UNDECIDED, f"the continuation reached the model's context ({ctx.n_ctx} tokens) without a verdict")
            elif c.answer_ids is None and len(c.generated) >= limit:
                c.stop(UNDECIDED, f"no verdict within max_new_tokens={limit}")
        active = [c for c in active if c.status is None]
        if not active:
            return
        logits = _last_logits(ctx.adapter, [c.input_ids for c in active], ctx.pad)
        for c, row in zip(active, logits):
            token = int(row.argmax())
            try:
                judged = _judge(ctx, c, token, checker, settings)
            except CheckerError as err:
                c.stop(SKIPPED, str(err))
                continue
            if judged == WRONG:
                c.deviation_step, c.wrong, c.logits = len(c.generated), token, row
                c.ranking = _ranking(row, settings.top_k)
                continue
            c.generated.append(token)
            if judged == CORRECT:
                c.stop(CORRECT_STATUS)
        for c in active:
            if c.wrong is not None and c.status is None:
                c.status = "deviated"


# ---------------------------------------------------------------------------- 2. contrast, 3. filter
def _first_correct(ctx: ModelContext, case: _Case, candidates: list[int], checker, settings) -> tuple[int, int] | None:
    for rank, token in enumerate(candidates):
        if token == case.wrong:
            continue
        if _judge(ctx, case, token, checker, settings) != WRONG:
            return token, rank
    return None


def _token_str(ctx: ModelContext, token: int | None) -> str | None:
    return None if token is None else ctx.tokenizer.decode([token])


def _try_contrast(ctx: ModelContext, c: _Case, candidates: list[int], source: str, checker, settings) -> None:
    """Take the best-ranked correct token of ``candidates`` as the contrast (a failing checker skips)."""
    try:
        found = _first_correct(ctx, c, candidates, checker, settings)
    except CheckerError as err:
        c.stop(SKIPPED, str(err))
        return
    if found is not None:
        (c.contrast, c.contrast_rank), c.contrast_source = found, source


def _choose_contrasts(ctx: ModelContext, cases: list[_Case], checker, settings: StudySettings) -> None:
    deviated = [c for c in cases if c.status == "deviated"]
    for c in deviated:
        _try_contrast(ctx, c, c.ranking, "model", checker, settings)
    need = [c for c in deviated if c.status == "deviated" and c.contrast is None]
    if need and ctx.sibling is not None:
        sibling_logits = _last_logits(cage_lens.adapt(ctx.sibling), [c.input_ids for c in need], ctx.pad)
        for c, row in zip(need, sibling_logits):
            _try_contrast(ctx, c, _ranking(row, settings.top_k), "sibling", checker, settings)
    k = settings.top_k
    for c in deviated:
        if c.status != "deviated":
            continue
        if c.contrast is None:
            where = f"the model's top-{k}" + (" nor the sibling's" if ctx.sibling is not None else "")
            if c.answer_ids is not None:
                ref = _token_str(ctx, c.answer_ids[c.deviation_step])
                c.stop(NO_CONTRAST, f"the reference token {ref!r} is not in {where}")
            else:
                c.stop(NO_CONTRAST, f"no token of {where} continues correctly")
            continue
        c.delta = float(c.logits[c.wrong].double() - c.logits[c.contrast].double())
        if c.delta <= settings.min_delta:
            c.stop(LOW_DELTA, f"Δℓ = {c.delta:.4g} ≤ min_delta = {settings.min_delta:g}")
        else:
            c.status = "to_explain"


# ---------------------------------------------------------------------------- anchored cases
def _from_anchor(ctx: ModelContext, cases: list[_Case], anchor_rows: dict[int, dict], settings: StudySettings) -> None:
    """Every case explains the anchor model's case for the same record (docs/study.md#paired)."""
    anchor = settings.cases_from
    for c in cases:
        if c.status is not None:
            continue
        a = anchor_rows.get(c.entry.index)
        if a is None or a["status"] != EXPLAINED:
            got = "missing" if a is None else a["status"]
            c.stop(NOT_A_CASE, f"the cases_from model {anchor!r} has no explained case for this record ({got})")
            continue
        ids = list(a["input_ids"])
        if len(ids) > ctx.n_ctx:
            c.stop(SKIPPED, f"the anchor case has {len(ids)} tokens but the model's context (n_ctx) is {ctx.n_ctx}")
            continue
        n_prompt = a["prompt_len"]
        c.prompt_ids, c.generated = ids[:n_prompt], ids[n_prompt:]
        c.deviation_step, c.wrong, c.contrast = a["deviation_step"], a["wrong_id"], a["contrast_id"]
        c.contrast_rank, c.contrast_source = a["contrast_rank"], "anchor"
    todo = [c for c in cases if c.status is None]
    if not todo:
        return
    logits = _last_logits(ctx.adapter, [c.input_ids for c in todo], ctx.pad)
    for c, row in zip(todo, logits):
        c.logits = row
        c.ranking = _ranking(row, settings.top_k)
        c.delta = float(row[c.wrong].double() - row[c.contrast].double())
        c.status = "to_explain"


# ---------------------------------------------------------------------------- 4. explain
def _attribute(ctx: ModelContext, cases: list[_Case], rules: str):
    tokens, _ = _padded([c.input_ids for c in cases], ctx.pad)
    return cage_lens.attribute(
        ctx.model, tokens, target=[c.wrong for c in cases], contrast=[c.contrast for c in cases],
        rules=rules, position=[c.position for c in cases],
    )


def _explain(ctx: ModelContext, cases: list[_Case], settings: StudySettings) -> None:
    todo = [c for c in cases if c.status == "to_explain"]
    if not todo:
        return
    try:
        batches = [(_attribute(ctx, todo, settings.rules), todo)]
    except (CageLensError, RuntimeError):  # isolate the failing case(s): one attribution per case
        batches = []
        for c in todo:
            try:
                batches.append((_attribute(ctx, [c], settings.rules), [c]))
            except (CageLensError, RuntimeError) as err:
                c.stop(SKIPPED, f"attribution failed: {type(err).__name__}: {err}")
    for attribution, group in batches:
        for row, c in enumerate(group):
            _fill_relevance(ctx, c, attribution, row)
            c.stop(EXPLAINED)


def _fill_relevance(ctx: ModelContext, c: _Case, attribution, row: int) -> None:
    n = c.position + 1
    ids = c.input_ids
    excluded = sorted(i for i, t in enumerate(ids) if t in ctx.special)
    relevance = attribution.input_relevance[row, :n].double()
    heatmap = attribution.normalized(row, excluded, include_positions=True)[:n].double()
    points, trace = attribution.layer_trace(row)
    c.row.update(
        target_value=float(attribution.target_value[row]),
        input_share=float(attribution.conservation.input_share()[row]),
        str_tokens=list(attribution.str_tokens[row][:n]),
        relevance=relevance.tolist(),
        heatmap=heatmap.tolist(),
        excluded=excluded,
        trace_points=["embeddings"] + list(points),
        trace=[relevance.tolist()] + trace[:, :n].double().tolist(),
    )
    _fill_segments(ctx, c, heatmap, relevance, excluded)


def _fill_segments(ctx: ModelContext, c: _Case, heatmap: torch.Tensor, relevance: torch.Tensor, excluded) -> None:
    segments = c.entry.segments
    spans, method = token_char_spans(ctx.tokenizer, c.entry.prompt, c.prompt_ids, ctx.special)
    n = len(heatmap)
    if spans is None:
        members = {"_generated": list(range(len(c.prompt_ids), n))}
        if segments:
            c.row["reason"] = f"segments not aligned ({method})"
    else:
        members = segment_members(segments, spans, n)
    c.row.update(
        segment_alignment=method,
        segments={k: v for k, v in members.items()},
        segment_relevance={k: float(heatmap[v].sum()) for k, v in members.items()},
        segment_relevance_raw={k: float(relevance[v].sum()) for k, v in members.items()},
    )
    skip = set(excluded)
    keep = [i for i in range(n) if i not in skip]
    if not keep:
        return
    h = heatmap[keep]
    for label, pick, sign in (("top_wrong", int(h.argmax()), 1), ("top_correct", int(h.argmin()), -1)):
        pos = keep[pick]
        if sign * float(heatmap[pos]) <= 0:
            continue
        c.row[f"{label}_position"] = pos
        c.row[f"{label}_token"] = c.row["str_tokens"][pos]
        c.row[f"{label}_segments"] = [k for k, v in members.items() if pos in v]


def _graphs(ctx: ModelContext, cases: list[_Case], settings: StudySettings, model_name: str) -> list[dict]:
    out = []
    for c in cases:
        if c.status != EXPLAINED:
            continue
        try:
            graph = cage_lens.circuit_graph(
                ctx.model, torch.tensor(c.input_ids), target=c.wrong, contrast=c.contrast, rules=settings.rules,
                levels=settings.graph_levels, **settings.graph_options,
            )
        except (CageLensError, RuntimeError) as err:
            c.row["reason"] = f"graph failed: {type(err).__name__}: {err}"
            continue
        metrics = graph.metrics()
        c.row["graph_metrics"] = [{k: v for k, v in m.items() if k != "hubs"} for m in metrics]
        c.row["graph_nodes"] = int(sum(int(a.sum()) for a in graph.alive.values()))
        c.row["graph_edges"] = int(sum(len(es) for es in graph.edges()))
        out.append({"model": model_name, "record": c.entry.index, "metrics": metrics, "graph": graph.to_dict()})
    return out


# ---------------------------------------------------------------------------- rows
def _row(ctx: ModelContext, c: _Case, model_name: str) -> dict:
    e = c.entry
    explained_or_case = c.wrong is not None
    row = {
        "model": model_name,
        "record": e.index,
        "id": e.id,
        "status": c.status,
        "reason": c.reason,
        "prompt": e.prompt,
        "prompt_len": len(c.prompt_ids) if c.prompt_ids else None,
        "generated_ids": list(c.generated),
        "generated": continuation_text(ctx.tokenizer, c.prompt_ids, c.generated) if c.prompt_ids else None,
        "deviation_step": c.deviation_step,
        "position": c.position if explained_or_case else None,
        "wrong_id": c.wrong,
        "wrong": _token_str(ctx, c.wrong),
        "contrast_id": c.contrast,
        "contrast": _token_str(ctx, c.contrast),
        "contrast_rank": c.contrast_rank,
        "contrast_source": c.contrast_source,
        "prediction_id": int(c.logits.argmax()) if c.logits is not None else None,
        "topk_ids": c.ranking if c.logits is not None else None,
        "topk_logits": [float(c.logits[t]) for t in c.ranking] if c.logits is not None else None,
        "delta": c.delta,
        "input_ids": c.input_ids if explained_or_case else None,
    }
    row["prediction"] = _token_str(ctx, row["prediction_id"])
    extra = dict(c.row)
    if extra.get("reason") and row["reason"] is None:
        row["reason"] = extra.pop("reason")
    extra.pop("reason", None)
    row.update(extra)
    return row


def process_chunk(
    ctx: ModelContext, entries: list[Entry], settings: StudySettings, checker: Callable | None = None,
    anchor_rows: dict[int, dict] | None = None,
) -> ChunkResult:
    """Rows (one per entry, in order) and graphs for ``entries`` on ``ctx``'s model."""
    anchored = settings.cases_from is not None and ctx.name != settings.cases_from
    if anchored:
        cases = [_Case(e) if isinstance(e, Record) else _Case(e, SKIPPED, e.reason) for e in entries]
        _from_anchor(ctx, cases, anchor_rows or {}, settings)
    else:
        cases = [_prepare(ctx, e, settings, checker) for e in entries]
        _generate(ctx, cases, checker, settings)
        _choose_contrasts(ctx, cases, checker, settings)
    _explain(ctx, cases, settings)
    graphs = _graphs(ctx, cases, settings, ctx.name) if settings.graph else []
    return ChunkResult([_row(ctx, c, ctx.name) for c in cases], graphs)
