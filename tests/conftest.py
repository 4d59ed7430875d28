"""Shared fixtures: random tiny models of every supported architecture, built once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from cage_lens.testing import MODEL_KINDS, random_model

torch.set_num_threads(2)

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


def tol(model) -> dict:
    """allclose tolerances for float64 comparisons. Hugging Face's Llama RMSNorm computes in float32
    even in a float64 model, so HF-backed Llama bridges agree only to float32 rounding."""
    from cage_lens.adapter import adapt

    arch = adapt(model).arch
    if arch.is_bridge and arch.normalization == "RMS":
        return dict(rtol=1e-5, atol=1e-7)
    return dict(rtol=1e-9, atol=1e-12)
