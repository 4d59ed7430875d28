"""Shared fixtures: random tiny models of every supported architecture, built once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from cage_lens.testing import MODEL_KINDS, random_model

# the test models are tiny: one thread avoids thread-pool overhead (many times faster on a shared machine)
torch.set_num_threads(1)

PROMPT = "the cat sat on the mat and the dog ran to the big red box"


@functools.lru_cache(maxsize=None)
def cached_model(kind: str, biases: bool = True, dtype: torch.dtype = torch.float64, n_layers: int = 2):
    return random_model(kind, biases=biases, dtype=dtype, n_layers=n_layers)


@pytest.fixture(params=MODEL_KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def model(kind):
    return cached_model(kind)


@pytest.fixture
def bias_free_model(kind):
    return cached_model(kind, biases=False)


def hook_count(model) -> int:
    """Forward and backward hooks currently registered on any hook point of ``model``."""
    return sum(len(hp._forward_hooks) + len(getattr(hp, "_backward_hooks", {})) for hp in model.hook_dict.values())


# allclose tolerances for two float64 computations of the same quantity (two batch layouts, a
# contrast against a difference of targets, closed form against autograd), per model kind:
#: float64 end to end: only the summation order differs
EXACT = dict(rtol=1e-9, atol=1e-12)
#: Hugging Face modules that compute in float32 inside a float64 model — eager attention's
#: softmax(..., dtype=float32) and the RMSNorm upcast — so two computations agree to float32 rounding
FLOAT32_INSIDE = dict(rtol=1e-5, atol=1e-7)
#: bridges whose attention and norms stay in float64: GPT-2 (its own eager attention), GPT-NeoX (the
#: bridge's joint-QKV attention), TL-native models; HookedTransformer computes everything in float64
_FLOAT64_BRIDGES = {"GPT2LMHeadModel", "GPTNeoXForCausalLM", "NativeModel"}


def float32_inside(model) -> bool:
    from cage_lens.core.adapter import adapt

    if not adapt(model).arch.is_bridge:
        return False
    return type(getattr(model, "original_model", None)).__name__ not in _FLOAT64_BRIDGES


def tol(model) -> dict:
    """The tolerance for ``model``'s kind (see ``EXACT`` and ``FLOAT32_INSIDE`` above)."""
    return FLOAT32_INSIDE if float32_inside(model) else EXACT
