"""Every bad input gets a clear cage_lens error, never a traceback from deep inside torch."""

from __future__ import annotations

import pytest
import torch

import cage_lens
from cage_lens.errors import InputError, NumericalError, UnsupportedModelError
from conftest import PROMPT, cached_model, hook_count


@pytest.fixture
def gpt2():
    return cached_model("gpt2")


def test_not_a_transformerlens_model():
    with pytest.raises(UnsupportedModelError, match="not a TransformerLens model.*lacks"):
        cage_lens.attribute(torch.nn.Linear(2, 2), PROMPT)


def test_unknown_rule_set(gpt2):
    with pytest.raises(cage_lens.CageLensError, match="unknown rule set 'lrp-eps'"):
        cage_lens.attribute(gpt2, PROMPT, rules="lrp-eps")
    with pytest.raises(cage_lens.CageLensError, match="unknown rule set"):
        with cage_lens.lrp(gpt2, "nope"):
            pass
    assert hook_count(gpt2) == 0


def test_unsupported_architecture_names_what_is_missing(gpt2):
    class Cfg:
        pass

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


def test_target_that_is_not_one_token(gpt2):
    with pytest.raises(InputError, match="not a single token: it splits into 2 tokens"):
        cage_lens.attribute(gpt2, PROMPT, target=" cat sat")
    with pytest.raises(InputError, match="contrast .* is not a single token"):
        cage_lens.attribute(gpt2, PROMPT, target=" cat", contrast=" big dog")
    with pytest.raises(InputError, match="outside the vocabulary"):
        cage_lens.attribute(gpt2, PROMPT, target=10**6)
    with pytest.raises(InputError, match="empty string"):
        cage_lens.attribute(gpt2, PROMPT, target="")


def test_empty_prompts(gpt2):
    with pytest.raises(InputError, match="empty prompt"):
        cage_lens.attribute(gpt2, "")
    with pytest.raises(InputError, match="empty prompt"):
        cage_lens.attribute(gpt2, ["the cat", "   "])
    with pytest.raises(InputError, match="empty list"):
        cage_lens.attribute(gpt2, [])
    with pytest.raises(InputError, match="token tensor is empty"):
        cage_lens.attribute(gpt2, torch.zeros((1, 0), dtype=torch.long))


def test_prompt_longer_than_context(gpt2):
    with pytest.raises(InputError, match="has 65 tokens but the model's context \\(n_ctx\\) is 64"):
        cage_lens.attribute(gpt2, torch.ones((1, 65), dtype=torch.long))


def test_batch_shapes_that_do_not_match(gpt2):
    with pytest.raises(InputError, match="target has 3 entries but the batch has 2 rows"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], target=[5, 6, 7])
    with pytest.raises(InputError, match="position has 1 entries but the batch has 2 rows"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], position=[1])
    with pytest.raises(InputError, match="position 10 is outside the prompt of 3 tokens"):
        cage_lens.attribute(gpt2, [PROMPT, "the dog"], position=10)
    with pytest.raises(InputError, match=r"must be \[pos\] or \[batch, pos\]"):
        cage_lens.attribute(gpt2, torch.ones((1, 2, 3), dtype=torch.long))
    with pytest.raises(InputError, match="integer ids"):
        cage_lens.attribute(gpt2, torch.ones((1, 3)))
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 96\)"):
        cage_lens.attribute(gpt2, torch.tensor([[1, 500]]))


def test_bad_modes_and_options(gpt2):
    with pytest.raises(InputError, match="unknown target mode 'prob'"):
        cage_lens.attribute(gpt2, PROMPT, mode="prob")
    with pytest.raises(InputError, match="cannot be combined with contrast"):
        cage_lens.attribute(gpt2, PROMPT, target=5, contrast=6, mode="demean")
    with pytest.raises(InputError, match="neurons must be None, 'all' or a positive int"):
        cage_lens.attribute(gpt2, PROMPT, neurons=0)
    with pytest.raises(InputError, match="attention-only"):
        cage_lens.attribute(cached_model("attn_only"), PROMPT, neurons=3)
    with pytest.raises(InputError, match="must return a \\[batch\\] tensor"):
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
    with pytest.raises(NumericalError, match="not finite"):
        cage_lens.attribute(gpt2, PROMPT, target=lambda logits: logits[:, 0] * float("nan"))
    assert hook_count(gpt2) == 0


def test_nan_weights_give_a_numerical_error():
    from cage_lens.testing import random_model

    model = random_model("gpt2", n_layers=1, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.fill_(float("nan"))
    with pytest.raises(NumericalError, match="not finite"):
        cage_lens.attribute(model, PROMPT, target=5)
    assert hook_count(model) == 0
