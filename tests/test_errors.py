"""Every bad input gets a one-line cage_lens error naming the problem and the way out — never a
traceback from deep inside torch, never a silently truncated, substituted or all-zero result — and
no hook is left behind after the error."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import cage_lens
from cage_lens.generation.graph import GenerationGraph, cage
from cage_lens.circuit.builder import circuit_graph
from cage_lens.errors import CageLensError, InputError, NumericalError, UnsupportedModelError
from cage_lens.failure import explain_failure
from cage_lens.testing import random_model
from conftest import PROMPT, cached_model, hook_count

LONG = " ".join(["the cat sat on the mat ."] * 10)  # 70 words + BOS = 71 tokens > n_ctx 64
UNKNOWN = "the cat sat on the zorblax and the qux"  # 'zorblax', 'qux' are not in the tiny vocabulary


@pytest.fixture
def gpt2():
    return cached_model("gpt2")


@contextlib.contextmanager
def refused(model, phrase: str, error=InputError):
    """The block raises ``error`` whose one-line message contains ``phrase``; no hooks remain."""
    with pytest.raises(error) as info:
        yield
    message = str(info.value)
    assert phrase in message, message
    assert "\n" not in message, message
    assert hook_count(model) == 0


def top1(model, prompt: str = PROMPT) -> int:
    with torch.no_grad():
        return int(model(model.to_tokens(prompt))[0, -1].argmax())


# ---------------------------------------------------------------------------- models and options
def test_not_a_transformerlens_model():
    with pytest.raises(UnsupportedModelError, match="not a TransformerLens model.*lacks"):
        cage_lens.attribute(torch.nn.Linear(2, 2), PROMPT)


def test_unknown_rule_set(gpt2):
    with refused(gpt2, "unknown rule set 'lrp-eps'", CageLensError):
        cage_lens.attribute(gpt2, PROMPT, rules="lrp-eps")
    with refused(gpt2, "unknown rule set", CageLensError):
        with cage_lens.lrp(gpt2, "nope"):
            pass


def test_unsupported_architecture_names_what_is_missing(gpt2):
    class Fake:
        cfg = gpt2.cfg
        hook_dict = {"hook_embed": None}

        def hooks(self):  # pragma: no cover - never reached
            pass

        def to_tokens(self):  # pragma: no cover
            pass

        def to_str_tokens(self):  # pragma: no cover
            pass

    with pytest.raises(UnsupportedModelError, match="lacks hook points.*blocks.0.hook_resid_pre"):
        cage_lens.attribute(Fake(), PROMPT)


def test_bad_modes_and_options(gpt2):
    with refused(gpt2, "unknown target mode 'prob'"):
        cage_lens.attribute(gpt2, PROMPT, mode="prob")
    with refused(gpt2, "cannot be combined with contrast"):
        cage_lens.attribute(gpt2, PROMPT, target=5, contrast=6, mode="demean")
    with refused(gpt2, "neurons must be None, 'all' or a positive int"):
        cage_lens.attribute(gpt2, PROMPT, neurons=0)
    with refused(cached_model("attn_only"), "attention-only"):
        cage_lens.attribute(cached_model("attn_only"), PROMPT, neurons=3)
    with refused(gpt2, "must return a [batch] tensor"):
        cage_lens.attribute(gpt2, PROMPT, target=lambda logits: logits)


def test_train_mode_with_dropout_is_refused(gpt2):
    gpt2.extra_dropout = torch.nn.Dropout(0.1)
    try:
        gpt2.train()
        with pytest.raises(UnsupportedModelError, match="train mode with active dropout.*model.eval"):
            cage_lens.attribute(gpt2, PROMPT)
    finally:
        del gpt2.extra_dropout
        gpt2.eval()
    assert hook_count(gpt2) == 0


def test_nan_target_is_reported(gpt2):
    with refused(gpt2, "not finite", NumericalError):
        cage_lens.attribute(gpt2, PROMPT, target=lambda logits: logits[:, 0] * float("nan"))


def test_nan_weights_give_a_numerical_error():
    from cage_lens.testing import random_model

    model = random_model("gpt2", n_layers=1, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.fill_(float("nan"))
    with refused(model, "not finite", NumericalError):
        cage_lens.attribute(model, PROMPT, target=5)


# ---------------------------------------------------------------------------- prompts and token ids
def test_empty_prompts(gpt2):
    with refused(gpt2, "the prompt is empty"):
        cage_lens.attribute(gpt2, "")
    with refused(gpt2, "inputs[1] is empty"):
        cage_lens.attribute(gpt2, ["the cat", "   "])
    with refused(gpt2, "empty list"):
        cage_lens.attribute(gpt2, [])
    with refused(gpt2, "the token tensor is empty"):
        cage_lens.attribute(gpt2, torch.zeros((1, 0), dtype=torch.long))


def refused_by_every_entry_point(model, prompt: str, phrase: str) -> None:
    """attribute (alone and in a list), circuit_graph, explain_failure and cage all refuse ``prompt``."""
    with refused(model, "the prompt " + phrase):
        cage_lens.attribute(model, prompt)
    with refused(model, "inputs[1] " + phrase):
        cage_lens.attribute(model, [PROMPT, prompt])
    for entry_point in (circuit_graph, lambda m, p: explain_failure(m, p, correct=" cat"),
                        lambda m, p: cage(m, p, max_new_tokens=2)):
        with refused(model, phrase):
            entry_point(model, prompt)


def test_strings_longer_than_the_context_are_refused_not_truncated(gpt2):
    assert gpt2.to_tokens(LONG).shape[1] == 64  # TransformerLens itself truncates silently
    refused_by_every_entry_point(gpt2, LONG, "is 71 tokens long but the model's context (n_ctx) is 64")
    with refused(gpt2, "the completion is 70 tokens long"):
        cage(gpt2, "the cat", completion=" " + LONG)
    with refused(gpt2, "has 65 tokens but the model's context (n_ctx) is 64"):
        cage_lens.attribute(gpt2, torch.ones((1, 65), dtype=torch.long))


def test_unknown_words_are_refused_with_the_words_named(gpt2):
    refused_by_every_entry_point(gpt2, UNKNOWN, "has 2 word(s) the model's vocabulary does not contain: 'zorblax', 'qux'")
    with refused(gpt2, "the completion has 1 word(s) the model's vocabulary does not contain: 'zorblax'"):
        cage(gpt2, PROMPT, completion=" the zorblax")
    # the way out: token ids are taken as they are, <unk> included
    tokens = gpt2.to_tokens(UNKNOWN)
    assert gpt2.tokenizer.unk_token_id in tokens[0].tolist()
    assert cage_lens.attribute(gpt2, tokens).str_tokens[0][6] == "<unk>"
    # a literal '<unk>' written in the text is the user's own choice, not a substitution
    assert cage_lens.attribute(gpt2, "the <unk> sat on the").tokens[0, 2] == gpt2.tokenizer.unk_token_id


@pytest.mark.parametrize("role, kwargs", [
    ("target", dict(target=" zorblax")),
    ("contrast", dict(target=" cat", contrast=" zorblax")),
])
def test_unknown_target_and_contrast_words(gpt2, role, kwargs):
    with refused(gpt2, f"{role} ' zorblax' is not in the model's vocabulary (it would become '<unk>')"):
        cage_lens.attribute(gpt2, PROMPT, **kwargs)
    with refused(gpt2, f"{role} ' zorblax' is not in the model's vocabulary"):
        circuit_graph(gpt2, PROMPT, **kwargs)


def test_unknown_correct_and_wrong_words(gpt2):
    with refused(gpt2, "correct ' zorblax' is not in the model's vocabulary"):
        explain_failure(gpt2, PROMPT, correct=" zorblax")
    with refused(gpt2, "wrong ' qux' is not in the model's vocabulary"):
        explain_failure(gpt2, PROMPT, wrong=" qux", correct=" cat")


def test_target_that_is_not_one_token(gpt2):
    with refused(gpt2, "not a single token: it splits into 2 tokens"):
        cage_lens.attribute(gpt2, PROMPT, target=" cat sat")
    with refused(gpt2, "contrast ' big dog' is not a single token"):
        cage_lens.attribute(gpt2, PROMPT, target=" cat", contrast=" big dog")
    with refused(gpt2, "outside the vocabulary"):
        cage_lens.attribute(gpt2, PROMPT, target=10**6)
    with refused(gpt2, "empty string"):
        cage_lens.attribute(gpt2, PROMPT, target="")
    with refused(gpt2, "target must be a token string or id, got float"):
        cage_lens.attribute(gpt2, PROMPT, target=5.0)


def test_contrast_equal_to_target_is_refused(gpt2):
    same = "target and contrast are the same token 'cat': target − contrast is zero by construction"
    with refused(gpt2, same):
        cage_lens.attribute(gpt2, PROMPT, target=" cat", contrast=" cat")
    with refused(gpt2, same):
        cage_lens.attribute(gpt2, PROMPT, target=gpt2.to_single_token(" cat"), contrast=" cat")
    with refused(gpt2, same):
        circuit_graph(gpt2, PROMPT, target=" cat", contrast=" cat")
    with refused(gpt2, "the same token 'cat' in row 1"):
        cage_lens.attribute(gpt2, [PROMPT, PROMPT], target=[" dog", " cat"], contrast=" cat")
    # without a target the model's own top-1 is explained: it must not be the contrast either
    predicted = top1(gpt2)
    with refused(gpt2, "the model's top-1 prediction is the contrast token"):
        cage_lens.attribute(gpt2, PROMPT, contrast=predicted)
    with refused(gpt2, "the model's top-1 prediction is the contrast token"):
        circuit_graph(gpt2, PROMPT, contrast=predicted)
    with refused(gpt2, "there is no failure to explain"):
        explain_failure(gpt2, PROMPT, correct=predicted)


def test_batch_shapes_that_do_not_match(gpt2):
    with refused(gpt2, "target has 3 entries but the batch has 2 rows"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], target=[5, 6, 7])
    with refused(gpt2, "position has 1 entries but the batch has 2 rows"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], position=[1])
    with refused(gpt2, "position 10 is outside the prompt of 3 tokens (valid: -3 to 2)"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], position=10)
    with refused(gpt2, "must be [pos] or [batch, pos]"):
        cage_lens.attribute(gpt2, torch.ones((1, 2, 3), dtype=torch.long))
    with refused(gpt2, "integer ids"):
        cage_lens.attribute(gpt2, torch.ones((1, 3)))
    with refused(gpt2, "token ids must lie in [0, 96)"):
        cage_lens.attribute(gpt2, torch.tensor([[1, 500]]))
    with refused(gpt2, "position must be an int, got float"):
        cage_lens.attribute(gpt2, PROMPT, position=1.0)


def test_numpy_integers_work_like_ints(gpt2):
    reference = cage_lens.attribute(gpt2, PROMPT, target=7, contrast=9, position=-2)
    tokens = gpt2.to_tokens(PROMPT).cpu()
    for kwargs in (
        dict(inputs=PROMPT, target=np.int64(7), contrast=np.int32(9), position=np.int64(-2)),
        dict(inputs=tokens.numpy(), target=torch.tensor(7), contrast=9, position=[np.int16(-2)]),
        dict(inputs=PROMPT, target=np.array([7]), contrast=9, position=-2),
    ):
        a = cage_lens.attribute(gpt2, kwargs.pop("inputs"), **kwargs)
        assert torch.equal(a.token_relevance, reference.token_relevance)
        assert a.target_ids == [7] and a.positions == reference.positions
    g = GenerationGraph.from_table(torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 2.0, 1.0, 0.0]]), 2)
    assert torch.equal(g.context_attribution(np.int64(1)), g.context_attribution(1))
    assert g.top_paths(np.int64(0), np.int64(-1)) == g.top_paths(0, -1)
    e = explain_failure(gpt2, PROMPT, wrong=np.int64(7), correct=np.int64(9), exclude=[np.int64(2)])
    assert e.excluded == [0, 2]


# ---------------------------------------------------------------------------- cage()
def test_cage_checks_token_ids_like_attribute(gpt2):
    prompt = gpt2.to_tokens(PROMPT).cpu()
    with refused(gpt2, "must hold integer ids, got dtype torch.float32"):
        cage(gpt2, prompt.float(), max_new_tokens=2)
    with refused(gpt2, "cage explains one prompt at a time; got a batch of 2"):
        cage(gpt2, torch.cat([prompt, prompt]), max_new_tokens=2)
    with refused(gpt2, "token ids must lie in [0, 96); got range [0, 500]"):
        cage(gpt2, torch.tensor([[0, 5, 500]]), max_new_tokens=2)
    with refused(gpt2, "the completion must hold integer ids"):
        cage(gpt2, prompt, completion=torch.tensor([5.0, 6.0]))
    with refused(gpt2, "token ids must lie in [0, 96); got range [-1, 5]"):
        cage(gpt2, prompt, completion=[5, -1])
    with refused(gpt2, "the completion must be one row of token ids"):
        cage(gpt2, prompt, completion=torch.tensor([[5, 6], [7, 8]]))
    with refused(gpt2, "max_new_tokens=60 does not fit; at most 48 new tokens do"):
        cage(gpt2, prompt, max_new_tokens=60)
    with refused(gpt2, "the completion is empty"):
        cage(gpt2, PROMPT, completion="")
    with refused(gpt2, "the completion is empty"):
        cage(gpt2, PROMPT, completion="  ")
    with refused(gpt2, "max_new_tokens must be a positive int"):
        cage(gpt2, PROMPT, max_new_tokens=0)
    # ids and numpy counts go the same way as the string
    by_ids = cage(gpt2, prompt[0].numpy(), completion=np.array([5, 6]))
    by_text = cage(gpt2, PROMPT, completion=gpt2.to_tokens(PROMPT, prepend_bos=False)[0, :0].tolist() + [5, 6])
    assert torch.equal(by_ids.table, by_text.table)
    assert cage(gpt2, PROMPT, max_new_tokens=np.int64(2)).n_generated == 2


# ---------------------------------------------------------------------------- explain_failure
def test_explain_failure_takes_one_prompt_and_valid_positions(gpt2):
    with refused(gpt2, "explain_failure explains one prompt at a time; got a batch of 2. Call it once per prompt."):
        explain_failure(gpt2, [PROMPT, "the dog sat"], correct=" cat")
    with refused(gpt2, "explain_failure explains one prompt at a time"):
        explain_failure(gpt2, torch.cat([gpt2.to_tokens(PROMPT)] * 2), correct=" cat")
    n = gpt2.to_tokens(PROMPT).shape[1]
    with refused(gpt2, f"exclude holds -100, which is not a position of the {n}-token prompt (valid: -{n} to {n - 1})"):
        explain_failure(gpt2, PROMPT, correct=" cat", exclude=[-100])
    with refused(gpt2, "exclude holds 'x'"):
        explain_failure(gpt2, PROMPT, correct=" cat", exclude=["x"])
    assert explain_failure(gpt2, PROMPT, wrong=" dog", correct=" cat", exclude=[-1]).excluded == [0, n - 1]


def test_zoo_sample_count_must_be_non_negative():
    from cage_lens import zoo

    with pytest.raises(InputError, match="non-negative int, got -3"):
        zoo.task("ioi").sample(-3)
    with pytest.raises(InputError, match="got 2.5"):
        zoo.task("ioi").sample(2.5)
    assert zoo.task("ioi").sample(0) == []


# ---------------------------------------------------------------------------- display safety
CONTROL = ["\x1b[31m", "\u202e", "\x00", "a\nb"]
RAW = ("\x1b", "\u202e", "\x00", "a\nb")


def _clean(text: str) -> None:
    for raw in RAW:
        assert raw not in text.replace("\x1b[48;2;", "").replace("\x1b[30m", "").replace("\x1b[97m", "").replace("\x1b[0m", ""), repr(text)


def test_printable_escapes_control_and_format_characters():
    from cage_lens.views.terminal import printable

    assert printable("a\x1bb\u202ec\x00d\ne\tf") == "a\\x1bb\\u202ec\\x00d\\ne\\tf"
    assert printable("\U000e0001 \u2028 é 😀 x") == "\\U000e0001 \\u2028 é 😀 x"  # language tag, line separator


def test_token_text_never_reaches_displays_raw(gpt2):
    from cage_lens.views.html import layer_token_table_html
    from cage_lens.views.terminal import terminal_heatmap

    a = cage_lens.attribute(gpt2, PROMPT, target=" cat")
    a.str_tokens[0][1:5] = CONTROL
    names, trace = a.layer_trace(0)
    for text in (a.show(), terminal_heatmap(a.str_tokens[0], a.normalized(0).tolist(), color=False), repr(a),
                 a._repr_html_(), layer_token_table_html(a.str_tokens[0], names, trace)):
        _clean(text)
    e = explain_failure(gpt2, PROMPT, wrong=" dog", correct=" cat")
    e.prompt_tokens[1:5] = CONTROL
    e.graph.str_tokens[1:5] = CONTROL
    for text in (repr(e), e.to_html(), e.graph.to_html(), repr(e.graph), e.graph.metrics_table()):
        _clean(text)
    g = GenerationGraph.from_table(torch.ones(4, 6), 2, labels=["p", CONTROL[0], *CONTROL])
    for text in (repr(g), g._repr_html_()):
        _clean(text)


def test_numpy_integers_and_out_of_row_positions():
    """numpy integers work wherever Python ints do; an excluded position outside the row is refused, not
    ignored or turned into an IndexError."""
    model = random_model("gpt2")
    attr = cage_lens.attribute(model, "the cat sat on the mat", target=5, neurons=np.int64(3))
    plain = cage_lens.attribute(model, "the cat sat on the mat", target=5, neurons=3)
    torch.testing.assert_close(attr.neuron_relevance.values, plain.neuron_relevance.values)
    torch.testing.assert_close(attr.normalized(exclude=[-1]), attr.normalized(exclude=[attr.lengths[0] - 1]))
    with pytest.raises(InputError, match="position -100 is not a position of these 7 tokens"):
        attr.normalized(exclude=[-100])
    with pytest.raises(InputError, match="neurons must be"):
        cage_lens.attribute(model, "the cat sat on the mat", target=5, neurons=True)
    graph = cage_lens.circuit_graph(model, "the cat sat on the mat", 5)
    assert graph.top_paths(np.int64(2)) == graph.top_paths(2)
