"""Synthetic tasks of the ground-truth zoo: seeded data generators that also emit the ground truth.

Every prompt is a sequence of space-separated words, each word either alphanumeric or a single
punctuation mark, so the zoo's word-level tokenizer (whitespace + punctuation split) turns it into
exactly ``prompt.split()``.  TransformerLens prepends ``<bos>``, so the word ``i`` of the prompt sits
at position ``i + 1`` of ``model.to_tokens(prompt)[0]``; every position in a :class:`Sample` uses that
indexing (BOS at 0).  Completions start with a space, so ``prompt + completion`` tokenizes as the
prompt tokens followed by the completion tokens.

Ground-truth conventions (docs/zoo.md):

* ``direct_sources[t]``: prompt positions that completion token ``t`` reads directly (the fact or
  definition it copies from, and the prompt token that selects it).  Structural tokens whose value is
  fixed by the format (``.``, ``+``, ``=``) have an empty set: nothing in the prompt decides them.
* ``total_sources[t]``: positions token ``t`` depends on through any chain of earlier generated tokens
  (the union of the direct sources of tokens ``0..t`` that feed it).
* ``sentence_spans``: token ``[start, end)`` spans tiling positions ``0..len(prompt)``; BOS belongs to
  the first span.  ``ground_truth_sentences``: indices of the content sentences the completion is
  taken from; ``query_sentences``: the instruction/query sentence(s), also a true source but of a
  different kind (kept apart so coverage metrics can include or exclude it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from cage_lens.errors import InputError

__all__ = ["Sample", "Task", "TASKS", "task", "SPECIAL_TOKENS", "Corruption", "CORRUPTIONS", "CORRUPTION_KINDS"]

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@dataclass
class Sample:
    prompt: str
    completion: str
    completion_tokens: list[str]
    direct_sources: list[set[int]]
    total_sources: list[set[int]]
    sentence_spans: list[tuple[int, int]] | None = None
    ground_truth_sentences: list[int] | None = None
    query_sentences: list[int] | None = None
    correct: str | None = None
    wrong: str | None = None
    #: task-specific extras (chain, facts used, name positions, ...)
    meta: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> list[str]:
        """Prompt tokens including the BOS token at position 0 (TL indexing)."""
        return ["<bos>"] + self.prompt.split()

    @property
    def n_prompt(self) -> int:
        return len(self.prompt.split()) + 1

    def sources(self) -> set[int]:
        """Union of all total sources (every prompt position the completion depends on)."""
        out: set[int] = set()
        for s in self.total_sources:
            out |= s
        return out


@dataclass
class Task:
    name: str
    description: str
    vocab: list[str]
    default_size: str
    _gen: Callable[[random.Random], Sample]
    #: word classes for in-distribution token replacement (ablations)
    word_classes: dict[str, list[str]] = field(default_factory=dict)
    sentence_level: bool = False

    def sample(self, n: int, seed: int = 0) -> list[Sample]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n is the number of samples: a non-negative int, got {n!r}")
        rng = random.Random(f"{self.name}:{seed}")
        return [self._gen(rng) for _ in range(n)]

    def word_class(self, word: str) -> list[str] | None:
        for words in self.word_classes.values():
            if word in words:
                return words
        return None

    def full_vocab(self) -> list[str]:
        return SPECIAL_TOKENS + self.vocab

    def corrupt(self, sample: Sample, **options) -> "Corruption":
        """A clean/corrupted pair for activation patching: one answer-determining token changed
        (see :data:`CORRUPTIONS`); deterministic for a given sample."""
        return CORRUPTIONS[self.name](sample, **options)

    def corruptions(self) -> dict[str, tuple[dict, str]]:
        """This task's named corruptions: ``{name: (options of corrupt, "value" | "routing")}``
        (:data:`CORRUPTION_KINDS`)."""
        return dict(CORRUPTION_KINDS[self.name])


def _spans_from_sentences(sentence_lengths: list[int]) -> list[tuple[int, int]]:
    """Spans over TL positions for consecutive sentences; BOS joins the first one."""
    spans = []
    start = 0
    pos = 1
    for i, n in enumerate(sentence_lengths):
        end = pos + n
        spans.append((0 if i == 0 else start, end))
        start = end
        pos = end
    return spans


def _finish(words: list[str], completion_words: list[str], direct: list[set[int]],
            deps: list[list[int]] | None = None, **kw) -> Sample:
    """Build a Sample; ``deps[t]`` lists the earlier completion tokens that token ``t`` reads."""
    for w in words + completion_words:
        assert w and (w.isalnum() or (len(w) == 1 and not w.isalnum())), w
    if deps is None:
        deps = [[t - 1] if t > 0 else [] for t in range(len(completion_words))]
    total: list[set[int]] = []
    for t, d in enumerate(direct):
        s = set(d)
        for u in deps[t]:
            s |= total[u]
        total.append(s)
    return Sample(
        prompt=" ".join(words),
        completion="".join(" " + w for w in completion_words),
        completion_tokens=list(completion_words),
        direct_sources=[set(d) for d in direct],
        total_sources=total,
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# pointer-chase
# --------------------------------------------------------------------------------------------------
PC_SYMBOLS = list("abcdefghijklmnop")  # 16 one-letter symbols
PC_FACTS = 6
PC_STEPS = 3


def _gen_pointer_chase(rng: random.Random) -> Sample:
    """``a > b ; c > d ; ... ; start a :`` → `` b c d`` (each step: value of the previous token).

    Keys are distinct; the chain's facts are shuffled among distractor facts whose keys are not on
    the chain.  Step 0 reads the start key and the fact for it; step t>0 reads the fact keyed by the
    previously generated token (a generated token, so no prompt position for it).
    """
    syms = rng.sample(PC_SYMBOLS, PC_FACTS + PC_STEPS - 1 + 1)
    chain = syms[: PC_STEPS + 1]
    other_keys = syms[PC_STEPS + 1:]
    facts = [(chain[i], chain[i + 1]) for i in range(PC_STEPS)]
    chain_set = set(chain)
    for k in other_keys[: PC_FACTS - PC_STEPS]:
        facts.append((k, rng.choice([s for s in PC_SYMBOLS if s != k])))
    order = list(range(len(facts)))
    rng.shuffle(order)
    words: list[str] = []
    fact_pos: dict[str, tuple[int, int]] = {}
    lengths = []
    for j, i in enumerate(order):
        k, v = facts[i]
        pos = len(words) + 1
        fact_pos[k] = (pos, pos + 2)
        words += [k, ">", v, ";"]
        lengths.append(4)
    start_pos = len(words) + 2
    words += ["start", chain[0], ":"]
    lengths.append(3)
    spans = _spans_from_sentences(lengths)
    direct = []
    gt_sent = []
    for t in range(PC_STEPS):
        kpos, vpos = fact_pos[chain[t]]
        d = {kpos, vpos}
        if t == 0:
            d.add(start_pos)
        direct.append(d)
        gt_sent.append(next(i for i, (a, b) in enumerate(spans) if a <= kpos < b))
    assert not (set(other_keys) & chain_set)
    return _finish(
        words, chain[1:], direct, sentence_spans=spans, ground_truth_sentences=gt_sent,
        query_sentences=[len(spans) - 1],
        meta={"chain": chain, "start_position": start_pos,
              "fact_positions": {k: v for k, v in fact_pos.items()}},
    )


# --------------------------------------------------------------------------------------------------
# facts
# --------------------------------------------------------------------------------------------------
NAMES = ["mary", "john", "anna", "tom", "lisa", "paul", "kate", "mark", "emma", "jack", "sara",
         "dave", "lucy", "alex", "nina", "bob", "rose", "sam", "jane", "eric"]
FACT_VERBS = ["likes", "has", "sees", "wants", "sells", "paints"]
FACT_OBJECTS = ["tea", "dog", "car", "book", "cake", "boat", "lamp", "hat", "bike", "fish",
                "coat", "ring"]
FACTS_M = 4
FACTS_K = 2


def _gen_facts(rng: random.Random) -> Sample:
    """Four facts ``name verb object .`` (names, verbs, objects distinct) then ``list n1 n2 :`` →
    `` n1 verb1 obj1 . n2 verb2 obj2 .``."""
    names = rng.sample(NAMES, FACTS_M)
    # names, verbs and objects are all distinct within a prompt, so every word of a fact identifies it
    facts = list(zip(names, rng.sample(FACT_VERBS, FACTS_M), rng.sample(FACT_OBJECTS, FACTS_M)))
    chosen = rng.sample(range(FACTS_M), FACTS_K)
    words: list[str] = []
    lengths = []
    fact_start = []
    for n, v, o in facts:
        fact_start.append(len(words) + 1)
        words += [n, v, o, "."]
        lengths.append(4)
    q_pos = []
    words.append("list")
    for c in chosen:
        q_pos.append(len(words) + 1)
        words.append(facts[c][0])
    words.append(":")
    lengths.append(2 + FACTS_K)
    spans = _spans_from_sentences(lengths)
    comp: list[str] = []
    direct: list[set[int]] = []
    deps: list[list[int]] = []
    for j, c in enumerate(chosen):
        n, v, o = facts[c]
        s = fact_start[c]
        base = len(comp)
        comp += [n, v, o, "."]
        # the name is copied from the instruction; the verb is looked up in the fact keyed by the name,
        # the object in the same fact (keyed by the name and/or the verb: the fact's three words)
        direct += [{q_pos[j]}, {s, s + 1}, {s, s + 1, s + 2}, set()]
        deps += [[], [base], [base, base + 1], [base + 2]]
    return _finish(
        words, comp, direct, deps, sentence_spans=spans, ground_truth_sentences=list(chosen),
        query_sentences=[FACTS_M],
        meta={"facts": facts, "chosen": chosen, "fact_starts": fact_start, "query_positions": q_pos},
    )


# --------------------------------------------------------------------------------------------------
# arith
# --------------------------------------------------------------------------------------------------
ARITH_VARS = list("abcdefgh")
DIGITS = [str(i) for i in range(10)]
FILLER_SUBJ = ["the", "sky", "cat", "dog", "sun", "sea", "road", "tree", "door", "bird"]
FILLER = [
    ["the", "sky", "is", "blue", "."],
    ["the", "cat", "is", "asleep", "."],
    ["it", "is", "late", "."],
    ["the", "dog", "runs", "."],
    ["birds", "can", "fly", "."],
    ["the", "sea", "is", "calm", "."],
    ["the", "road", "is", "long", "."],
    ["it", "rains", "today", "."],
    ["the", "tree", "is", "tall", "."],
    ["the", "door", "is", "open", "."],
]
ARITH_DEFS = 3
ARITH_ALIASES = 2
ARITH_FILLERS = 2


def _gen_arith(rng: random.Random) -> Sample:
    """Two-step lookup among distractor sentences (CAGE's Math-task analogue), worked step by step.

    Three value definitions ``a = 3 .``, two alias definitions ``c = a .`` and two unrelated
    sentences, shuffled, then ``compute c :`` → `` c a 3``: the query is restated (reads the query),
    its alias is resolved (reads the alias definition of the *generated* ``c``), then the value of
    the generated ``a`` is looked up (reads that variable's definition).
    """
    vars_ = rng.sample(ARITH_VARS, ARITH_DEFS + ARITH_ALIASES)
    value_vars, alias_vars = vars_[:ARITH_DEFS], vars_[ARITH_DEFS:]
    vals = {v: rng.choice(DIGITS) for v in value_vars}
    targets = {a: rng.choice(value_vars) for a in alias_vars}
    fillers = rng.sample(FILLER, ARITH_FILLERS)
    items = ([("def", v) for v in value_vars] + [("alias", a) for a in alias_vars]
             + [("fill", i) for i in range(ARITH_FILLERS)])
    rng.shuffle(items)
    words: list[str] = []
    lengths = []
    def_pos: dict[str, int] = {}
    def_sent: dict[str, int] = {}
    for si, (kind, x) in enumerate(items):
        if kind == "fill":
            words += fillers[x]
            lengths.append(len(fillers[x]))
            continue
        def_pos[x] = len(words) + 1
        def_sent[x] = si
        words += [x, "=", vals[x] if kind == "def" else targets[x], "."]
        lengths.append(4)
    q = rng.choice(alias_vars)
    v = targets[q]
    words.append("compute")
    qpos = len(words) + 1
    words += [q, ":"]
    lengths.append(3)
    spans = _spans_from_sentences(lengths)
    comp = [q, v, vals[v]]
    direct = [{qpos}, {def_pos[q], def_pos[q] + 2}, {def_pos[v], def_pos[v] + 2}]
    return _finish(
        words, comp, direct, sentence_spans=spans,
        ground_truth_sentences=sorted({def_sent[q], def_sent[v]}), query_sentences=[len(items)],
        meta={"values": vals, "aliases": targets, "query": q,
              "definition_positions": dict(def_pos)},
    )


# --------------------------------------------------------------------------------------------------
# ioi
# --------------------------------------------------------------------------------------------------
IOI_NAMES = ["mary", "john", "anna", "tom", "lisa", "paul", "kate", "mark", "emma", "jack", "sara",
             "dave", "lucy", "alex", "nina", "bob", "rose", "sam", "jane", "eric", "amy", "ben",
             "claire", "dan", "ella", "fred", "grace", "henry", "iris", "luke"]
IOI_PLACES = ["store", "park", "school", "office", "beach", "house", "garden", "station",
              "market", "library"]
IOI_OBJECTS = ["drink", "book", "ball", "gift", "letter", "bag", "key", "ring", "pen", "cake"]
# {A} and {B} are the first two names (order varies), {S} repeats the subject, answer = the other.
IOI_TEMPLATES = [
    "when {A} and {B} went to the {P} , {S} gave a {O} to",
    "when {A} and {B} got a {O} at the {P} , {S} decided to give it to",
    "after {A} and {B} went to the {P} , {S} gave a {O} to",
    "while {A} and {B} were at the {P} , {S} handed a {O} to",
    "then , {A} and {B} went to the {P} . {S} gave a {O} to",
    "then , {A} and {B} had a long argument , and afterwards {S} said to",
    "{A} and {B} were working at the {P} . {S} decided to give a {O} to",
    "{A} and {B} were thinking about going to the {P} . {S} wanted to give a {O} to",
    "the {P} was quiet when {A} and {B} arrived . {S} showed the {O} to",
    "friends {A} and {B} found a {O} at the {P} . {S} gave it to",
    "when {A} and {B} came back from the {P} , {S} threw the {O} to",
    "after the lunch , {A} and {B} went to the {P} . {S} passed the {O} to",
]


def _gen_ioi(rng: random.Random) -> Sample:
    """Classic IOI: ``when mary and john went to the store , john gave a drink to`` → `` mary``."""
    io, s = rng.sample(IOI_NAMES, 2)
    tmpl = rng.choice(IOI_TEMPLATES)
    abba = rng.random() < 0.5  # IO first (ABBA) or S first (BABA)
    a, b = (io, s) if abba else (s, io)
    text = tmpl.format(A="\0A", B="\0B", S="\0S", P=rng.choice(IOI_PLACES), O=rng.choice(IOI_OBJECTS))
    words = []
    io_pos, s_pos = [], []
    for w in text.split():
        p = len(words) + 1
        if w == "\0A":
            (io_pos if a == io else s_pos).append(p)
            words.append(a)
        elif w == "\0B":
            (io_pos if b == io else s_pos).append(p)
            words.append(b)
        elif w == "\0S":
            s_pos.append(p)
            words.append(s)
        else:
            words.append(w)
    direct = [set(io_pos) | set(s_pos)]
    return _finish(
        words, [io], direct, correct=io, wrong=s,
        meta={"io_positions": io_pos, "s_positions": s_pos, "template": IOI_TEMPLATES.index(tmpl),
              "order": "ABBA" if abba else "BABA"},
    )


def _ioi_vocab() -> list[str]:
    words = set(IOI_NAMES) | set(IOI_PLACES) | set(IOI_OBJECTS)
    for t in IOI_TEMPLATES:
        for w in t.split():
            if not w.startswith("{"):
                words.add(w)
    return sorted(words)


def _uniq(*lists) -> list[str]:
    out: list[str] = []
    for lst in lists:
        for w in lst:
            if w not in out:
                out.append(w)
    return out


TASKS: dict[str, Task] = {
    "pointer-chase": Task(
        name="pointer-chase",
        description="multi-hop pointer chasing: each generated token is the value of the previous one",
        vocab=_uniq(PC_SYMBOLS, [">", ";", "start", ":"]),
        default_size="small",
        _gen=_gen_pointer_chase,
        word_classes={"symbol": PC_SYMBOLS},
    ),
    "facts": Task(
        name="facts",
        description="fact listing: 4 facts in the prompt, 'list n1 n2 :', the two facts generated",
        vocab=_uniq(NAMES, FACT_VERBS, FACT_OBJECTS, [".", "list", ":"]),
        default_size="small",
        _gen=_gen_facts,
        word_classes={"name": NAMES, "verb": FACT_VERBS, "object": FACT_OBJECTS},
        sentence_level=True,
    ),
    "arith": Task(
        name="arith",
        description="two-step variable lookup worked step by step (query, alias, value) among distractor sentences",
        vocab=_uniq(ARITH_VARS, DIGITS, ["=", ".", ":", "compute"], *FILLER),
        default_size="small",
        _gen=_gen_arith,
        word_classes={"variable": ARITH_VARS, "digit": DIGITS},
        sentence_level=True,
    ),
    "ioi": Task(
        name="ioi",
        description="indirect-object identification; contrastive target logit(IO) - logit(S)",
        vocab=_ioi_vocab(),
        default_size="small",
        _gen=_gen_ioi,
        word_classes={"name": IOI_NAMES, "place": IOI_PLACES, "object": IOI_OBJECTS},
    ),
}


# --------------------------------------------------------------------------------------------------
# corruptions for activation patching
# --------------------------------------------------------------------------------------------------
@dataclass
class Corruption:
    """A clean/corrupted prompt pair that differ in one token, the one that decides the answer.

    ``clean`` is the sample's prompt, teacher-forced with the completion tokens before the explained
    one where the first answer is a plain copy; its next token is ``answer``. ``corrupted`` replaces
    the word at TL position ``position`` (BOS = 0) by ``replacement``, keeping the token count, so its
    next token becomes ``corrupted_answer`` (None where the corrupted prompt no longer determines one).
    The patching metric is ``logit(answer) − logit(contrast)`` at the last position."""

    clean: str
    corrupted: str
    position: int
    original: str
    replacement: str
    answer: str
    corrupted_answer: str | None  # None: the corrupted prompt determines no answer (IOI's ABC)
    contrast: str


def _replace_word(text: str, position: int, word: str) -> str:
    words = text.split()
    words[position - 1] = word  # TL position (BOS at 0) -> word index
    return " ".join(words)


def _pair(clean: str, position: int, replacement: str, answer: str, corrupted_answer: str | None,
          contrast: str | None = None) -> Corruption:
    return Corruption(
        clean=clean, corrupted=_replace_word(clean, position, replacement), position=position,
        original=clean.split()[position - 1], replacement=replacement, answer=answer,
        corrupted_answer=corrupted_answer, contrast=corrupted_answer if contrast is None else contrast,
    )


def _rng(sample: Sample) -> random.Random:
    return random.Random(f"corrupt:{sample.prompt}")


def _corrupt_ioi(sample: Sample, swap: str = "io") -> Corruption:
    """``swap="io"``: the indirect object becomes a name not in the prompt (answer: that name; the name's
    content changes); ``swap="s2"``: the repeated subject becomes the IO name, as in TransformerLens'
    and ARENA's IOI demos (answer flips to S; which name repeats changes, so where attention looks);
    ``swap="abc"``: the repeated subject becomes a name not in the prompt, so no name repeats (the ABC
    corruption of Wang et al.; no answer is determined). Metric contrast: S."""
    io, s = sample.correct, sample.wrong
    unused = [n for n in IOI_NAMES if n not in sample.prompt.split()]
    if swap == "io":
        name = _rng(sample).choice(unused)
        return _pair(sample.prompt, sample.meta["io_positions"][0], name, io, name, contrast=s)
    if swap == "s2":
        return _pair(sample.prompt, sample.meta["s_positions"][-1], io, io, s, contrast=s)
    if swap == "abc":
        return _pair(sample.prompt, sample.meta["s_positions"][-1], _rng(sample).choice(unused), io, None, contrast=s)
    raise ValueError(f"unknown IOI corruption {swap!r}; choose 'io', 's2' or 'abc'")


def _corrupt_pointer_chase(sample: Sample) -> Corruption:
    """The start key becomes another key of the prompt with a different value (answer: that value)."""
    words = ["<bos>"] + sample.prompt.split()
    start, first = sample.meta["chain"][0], sample.completion_tokens[0]
    others = sorted(k for k, (_, vpos) in sample.meta["fact_positions"].items() if k != start and words[vpos] != first)
    key = _rng(sample).choice(others)
    value = words[sample.meta["fact_positions"][key][1]]
    return _pair(sample.prompt, sample.meta["start_position"], key, first, value)


def _corrupt_facts(sample: Sample) -> Corruption:
    """Explains the first verb (prompt + the copied name): the verb of that name's fact becomes an
    unused verb (answer: that verb)."""
    name, verb = sample.completion_tokens[:2]
    fact = sample.meta["chosen"][0]
    used = {v for _, v, _ in sample.meta["facts"]}
    replacement = _rng(sample).choice([v for v in FACT_VERBS if v not in used])
    return _pair(f"{sample.prompt} {name}", sample.meta["fact_starts"][fact] + 1, replacement, verb, replacement)


def _corrupt_arith(sample: Sample) -> Corruption:
    """Explains the alias hop (prompt + the restated query): the alias definition of the query points
    to another value variable (answer: that variable)."""
    query, target = sample.completion_tokens[:2]
    others = sorted(v for v in sample.meta["values"] if v != target)
    replacement = _rng(sample).choice(others)
    position = sample.meta["definition_positions"][query] + 2
    return _pair(f"{sample.prompt} {query}", position, replacement, target, replacement)


#: task name -> ``corrupt(sample, **options) -> Corruption``
CORRUPTIONS: dict[str, Callable[..., Corruption]] = {
    "ioi": _corrupt_ioi,
    "pointer-chase": _corrupt_pointer_chase,
    "facts": _corrupt_facts,
    "arith": _corrupt_arith,
}

#: task name -> {corruption name: (the options of ``corrupt``, how it acts)}. "value": the changed token's
#: content travels to the answer; "routing": it decides where attention looks (docs/patching.md#routing)
CORRUPTION_KINDS: dict[str, dict[str, tuple[dict, str]]] = {
    "ioi": {"io": ({"swap": "io"}, "value"), "s2": ({"swap": "s2"}, "routing"), "abc": ({"swap": "abc"}, "routing")},
    "pointer-chase": {"start-key": ({}, "routing")},
    "facts": {"verb": ({}, "value")},
    "arith": {"alias": ({}, "value")},
}


def task(name: str) -> Task:
    """The zoo task called ``name`` (``pointer-chase``, ``facts``, ``arith``, ``ioi``)."""
    if name not in TASKS:
        raise ValueError(f"unknown zoo task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
