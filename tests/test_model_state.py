"""The user's model stays the user's: after every public call, ``copy.deepcopy(model)``, pickling and
``model.to(...)`` work as they did before the call, nothing cached on or beside the model holds autograd
history, and cage_lens results are unchanged afterwards (docs/transformerlens.md#the-users-model-stays-the-users)."""

from __future__ import annotations

import copy
import pickle
import tempfile

import pytest
import torch

import cage_lens
from cage_lens import methods, patching, study
from cage_lens.core.adapter import adapt
from cage_lens.testing import random_model
from conftest import PROMPT, hook_count

CORRUPTED = "the dog sat on the mat and the cat ran to the big red box"


def fresh(dtype=torch.float64):
    return random_model("gpt2", n_layers=1, dtype=dtype, seed=3)


def metric(logits):
    return logits[:, -1, 5].sum() - logits[:, -1, 6].sum()


def _lrp_block(model):
    with cage_lens.lrp(model, "attnlrp"):
        model.run_with_cache(model.to_tokens(PROMPT))


def _cache(model):
    with torch.no_grad():
        return model.run_with_cache(model.to_tokens(CORRUPTED))[1]


def _study(model):
    with tempfile.TemporaryDirectory() as out:
        study.run({"m": model}, [{"prompt": PROMPT, "answer": " cat"}], f"{out}/s", min_delta=-1e9, progress=False)


#: every public call that runs the model
CALLS = {
    "attribute": lambda m: cage_lens.attribute(m, PROMPT, target=" cat", neurons=2),
    "circuit_graph": lambda m: cage_lens.circuit_graph(m, PROMPT, target=" cat", levels="half"),
    "circuit_graph(autograd)": lambda m: cage_lens.circuit_graph(m, PROMPT, target=" cat", method="autograd"),
    "cage": lambda m: cage_lens.cage(m, PROMPT, max_new_tokens=2),
    "explain_failure": lambda m: cage_lens.explain_failure(m, PROMPT, wrong=" dog", correct=" cat"),
    "lrp": _lrp_block,
    "relevance_patch": lambda m: patching.relevance_patch(m, m.to_tokens(PROMPT), _cache(m), metric,
                                                          ("resid_pre", "attn_head_out_all_pos")),
    "agreement": lambda m: patching.agreement(m, corrupted_tokens=CORRUPTED, clean_tokens=PROMPT, metric=metric,
                                              grids=("resid_pre",)),
    "integrated_gradients": lambda m: methods.integrated_gradients(m, m.to_tokens(PROMPT), 10, steps=2),
    "occlusion": lambda m: methods.occlusion(m, m.to_tokens(PROMPT), 10),
    "study.run": _study,
}


#: calls inside which the user runs the model themselves (``with lrp(model): model(...)``)
USERS_OWN_FORWARD = {"lrp"}


def autograd_history(model) -> list[str]:
    """Tensors kept on the model's modules (outside parameters and buffers) that carry autograd history."""
    return [f"{path}.{name}" for path, module in model.named_modules() for name, value in vars(module).items()
            if isinstance(value, torch.Tensor) and (value.grad_fn is not None or (value.requires_grad and not value.is_leaf))]


def reference(model) -> torch.Tensor:
    return cage_lens.attribute(model, PROMPT, target=" cat", contrast=" dog").token_relevance


def pickle_outcome(model):
    """The unpickled model, or the type of the error pickling raises (TransformerLens 4's bridges hold
    local classes and cannot be pickled at all, cage_lens or not)."""
    try:
        return pickle.loads(pickle.dumps(model))
    except (AttributeError, pickle.PicklingError, TypeError) as err:
        return type(err)


@pytest.mark.parametrize("call", list(CALLS))
def test_after_every_public_call_the_model_copies_pickles_and_moves(call):
    expected = reference(fresh())            # what a model that never met cage_lens gives
    control = fresh()
    with torch.enable_grad():
        control(control.to_tokens(PROMPT))   # a plain forward, the user's own
    model = fresh()
    CALLS[call](model)
    assert hook_count(model) == 0
    if call in USERS_OWN_FORWARD:  # what the user's forward leaves is TransformerLens' doing, as in the control
        assert autograd_history(model) == autograd_history(control)
        for m in (model, control):
            for path in autograd_history(m):
                module, name = m.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
                setattr(module, name, getattr(module, name).detach())
    assert autograd_history(model) == []
    assert torch.equal(reference(model), expected)  # nothing left behind changes a later call
    twin = copy.deepcopy(model)
    assert torch.equal(reference(twin), expected)
    unpickled, control_outcome = pickle_outcome(model), pickle_outcome(control)
    if isinstance(control_outcome, type):
        assert unpickled is control_outcome  # refused by TransformerLens itself, as after a plain forward
    else:
        assert torch.equal(reference(unpickled), expected)
    model.to(torch.float32)
    assert adapt(model).certificate is None or adapt(model).certificate.dtype == "torch.float32"
    narrow = reference(model)
    assert adapt(model).certificate.dtype == "torch.float32"  # certified again, for the new dtype
    torch.testing.assert_close(narrow, reference(fresh(torch.float32)), rtol=1e-5, atol=1e-6)  # float32 rounding
    assert torch.equal(reference(model), narrow)


def test_cached_state_lives_beside_the_model_and_holds_no_autograd_history():
    model = fresh()
    cage_lens.attribute(model, PROMPT, target=" cat")
    caches = adapt(model).__dict__
    assert "model" not in caches and not any(v is model for v in caches.values())

    def tensors(value, depth=0):
        if isinstance(value, torch.Tensor):
            yield value
        elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                yield from tensors(v, depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for v in value.values():
                yield from tensors(v, depth + 1)
        elif depth < 4 and hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                yield from tensors(getattr(value, name), depth + 1)

    assert all(t.grad_fn is None for t in tensors(caches))
    assert not [k for k in vars(model) if "cage" in k.lower()]  # nothing of cage_lens is set on the model
