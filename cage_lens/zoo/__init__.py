"""Ground-truth model zoo: synthetic tasks with known mechanisms and small trained models (docs/zoo.md).

>>> from cage_lens import zoo
>>> model = zoo.load("ioi")                      # TL model (HookedTransformer or TransformerBridge)
>>> pythia_like = zoo.load("ioi", "neox")        # the same task in GPT-NeoX (Pythia) architecture
>>> sample = zoo.task("ioi").sample(1, seed=0)[0]
>>> sample.prompt, sample.completion, sample.direct_sources

Models are HF-format directories under ``cage_lens/zoo/models/<task>-<size>/`` (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, zoo.json), intermediate checkpoints under
``.../checkpoints/step-N/``.  Everything loads offline.  See ``MODEL_CARD.md`` for accuracies and the
ablation evidence behind each ground truth.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

from cage_lens.errors import InputError
from cage_lens.zoo.tasks import TASKS, Sample, Task, task

__all__ = ["DEFAULT_MODEL", "MODELS_DIR", "Sample", "Task", "task", "tasks", "load", "list",
           "model_dir", "greedy_complete", "dataset"]

DEFAULT_MODEL = "ioi"
MODELS_DIR = Path(__file__).resolve().parent / "models"


def dataset(name: str, n: int, seed: int = 0):
    """A zoo task as a failure-study dataset (records with segments, plus a checker); see
    :func:`cage_lens.zoo.datasets.dataset`."""
    from cage_lens.zoo.datasets import dataset as build

    return build(name, n, seed)


def tasks() -> builtins.list[str]:
    """Names of the zoo tasks."""
    return builtins.list(TASKS)


def _checkpoints(directory: Path) -> builtins.list[int]:
    ck = directory / "checkpoints"
    if not ck.is_dir():
        return []
    steps = []
    for d in ck.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / "config.json").exists():
            steps.append(int(d.name[len("step-"):]))
    return sorted(steps)


def _sizes(name: str) -> builtins.list[str]:
    if not MODELS_DIR.is_dir():
        return []
    prefix = name + "-"
    return sorted(
        d.name[len(prefix):] for d in MODELS_DIR.iterdir()
        if d.is_dir() and d.name.startswith(prefix) and (d / "config.json").exists()
        and d.name[len(prefix):] and "-" not in d.name[len(prefix):]
    )


def list() -> builtins.list[dict]:  # noqa: A001 - zoo.list() is the public name (docs/zoo.md)
    """Available models: dicts with name, size, default, architecture, parameters, accuracy, checkpoints."""
    out = []
    for name in TASKS:
        for size in _sizes(name):
            d = MODELS_DIR / f"{name}-{size}"
            meta = json.loads((d / "zoo.json").read_text()) if (d / "zoo.json").exists() else {}
            out.append({
                "name": name,
                "size": size,
                "default": size == TASKS[name].default_size,
                "architecture": meta.get("architecture"),
                "parameters": meta.get("parameters"),
                "accuracy": meta.get("accuracy"),
                "checkpoints": _checkpoints(d),
                "path": str(d),
            })
    return out


def model_dir(name: str | None = None, size: str | None = None, checkpoint: int | None = None) -> Path:
    """Directory of a zoo model (see :func:`load` for the arguments)."""
    name = DEFAULT_MODEL if name is None else name
    if name not in TASKS:
        raise InputError(f"unknown zoo model {name!r}; available: {', '.join(TASKS)}")
    sizes = _sizes(name)
    size = TASKS[name].default_size if size is None else size
    if size not in sizes:
        raise InputError(f"zoo model {name!r} has no size {size!r}; available sizes: {', '.join(sizes) or 'none'}")
    d = MODELS_DIR / f"{name}-{size}"
    if checkpoint is None:
        return d
    steps = _checkpoints(d)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int):
        raise InputError(f"checkpoint must be a step number or an index, not {checkpoint!r}")
    if checkpoint in steps:
        step = checkpoint
    elif -len(steps) <= checkpoint < len(steps):
        step = steps[checkpoint]
    else:
        raise InputError(
            f"zoo model {name}-{size} has no checkpoint {checkpoint!r}; steps: {steps or 'none'} "
            f"(or an index 0..{len(steps) - 1})" if steps else
            f"zoo model {name}-{size} has no checkpoint {checkpoint!r}; it ships no intermediate checkpoints"
        )
    return d / "checkpoints" / f"step-{step}"


def load(name: str | None = None, size: str | None = None, checkpoint: int | None = None):
    """A zoo model as a TransformerLens model (CPU, eval mode, offline).

    ``name``: task name (default ``DEFAULT_MODEL``); ``size``: e.g. ``"small"``/``"tiny"``, or an
    architecture model such as ``"neox"``/``"gemma2"`` for ``ioi`` (default: the task's default size); ``checkpoint``: a training step number or an index into the sorted
    checkpoint steps (``None``: the final model).  Raises ``ValueError`` listing the options.
    """
    from cage_lens.loading import load_hf_directory

    return load_hf_directory(model_dir(name, size, checkpoint))


def greedy_complete(model, prompt: str, n_tokens: int) -> builtins.list[str]:
    """Greedy continuation of ``prompt`` (BOS prepended), as ``n_tokens`` token strings.

    A plain loop over ``model(tokens)`` so it behaves the same on HookedTransformer and
    TransformerBridge.
    """
    from cage_lens.inputs import check_number, greedy_continuation, tokenize

    tokens = tokenize(model, prompt)[None]
    n_tokens = check_number(n_tokens, "n_tokens", low=0, integer=True)
    out = greedy_continuation(model, tokens, n_tokens)[0, tokens.shape[1]:].tolist()
    return [model.tokenizer.convert_ids_to_tokens(i) for i in out]
