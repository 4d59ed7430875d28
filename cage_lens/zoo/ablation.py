"""In-distribution ablations used as mechanism evidence for the zoo's ground truth.

Ablation = **token replacement**: the token at a prompt position is replaced by a random *other*
token of the same word class (symbol → symbol, name → name, digit → digit, variable → variable,
verb → verb, object → object, place → place) that does not occur in the prompt, so the ablated prompt
stays inside the training distribution.  Positions whose word belongs to no class (punctuation,
template words) are not ablated, except that in ``arith`` a distractor sentence can be swapped for an
unused distractor sentence of the same length.  An ablation *flips* the output when the model's
greedy completion of the ablated prompt differs from its greedy completion of the original prompt.
"""

from __future__ import annotations

import random

from cage_lens.zoo.tasks import FILLER, Sample, Task

__all__ = ["ablatable_positions", "replace_positions", "replace_sentence", "sentence_positions"]


def ablatable_positions(task: Task, sample: Sample) -> list[int]:
    """Prompt positions (TL indexing, BOS at 0) holding a word with a replacement class."""
    toks = sample.prompt_tokens
    return [i for i in range(1, len(toks)) if task.word_class(toks[i]) is not None]


def replace_positions(task: Task, sample: Sample, positions, rng: random.Random) -> str:
    """The prompt with each of ``positions`` replaced by an unused same-class word."""
    toks = sample.prompt_tokens
    words = list(toks)
    used = set(toks)
    for p in positions:
        cls = task.word_class(toks[p])
        if cls is None:
            continue
        options = [w for w in cls if w not in used]
        if not options:
            options = [w for w in cls if w != toks[p]]
        w = rng.choice(options)
        words[p] = w
        used.add(w)
    return " ".join(words[1:])


def sentence_positions(sample: Sample, k: int) -> list[int]:
    a, b = sample.sentence_spans[k]
    return [p for p in range(max(a, 1), b)]


def replace_sentence(task: Task, sample: Sample, k: int, rng: random.Random) -> str | None:
    """The prompt with sentence ``k`` ablated (its class words replaced; an ``arith`` distractor
    sentence swapped for an unused one of the same length).  ``None`` when nothing can be ablated."""
    pos = sentence_positions(sample, k)
    toks = sample.prompt_tokens
    words = [toks[p] for p in pos]
    if task.name == "arith" and words in FILLER:
        present = sample.prompt
        options = [f for f in FILLER if len(f) == len(words) and f != words and " ".join(f) not in present]
        if not options:
            return None
        new = list(toks)
        new[pos[0]:pos[-1] + 1] = rng.choice(options)
        return " ".join(new[1:])
    abl = [p for p in pos if task.word_class(toks[p]) is not None]
    if not abl:
        return None
    return replace_positions(task, sample, abl, rng)
