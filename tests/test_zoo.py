"""Tests of the ground-truth zoo (docs/zoo.md): generators, ground truth, shipped models.

Runs on TransformerLens 2.x (HookedTransformer) and 4.x (TransformerBridge) alike. A model that fails
to load fails its tests; nothing here skips.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from cage_lens import zoo
from cage_lens.loading import ARCHITECTURE_FAMILIES, load_tokenizer
from cage_lens.testing import EXACT_AGREEMENT, logits_tolerance
from cage_lens.zoo.tasks import TASKS

TEST_SEED = 77
#: every shipped model (task-size); a model missing from the package fails test_every_model_is_shipped
SHIPPED = {
    "arith-small", "arith-tiny", "facts-small", "facts-tiny", "ioi-small", "ioi-tiny", "ioi-neox", "ioi-gemma2",
    "pointer-chase-small", "pointer-chase-tiny",
}
N_ACC = 50
MARGIN = 0.08  # 50 samples: allow a few misses below the card's 500-sample figure

FINALS = [(m["name"], m["size"]) for m in zoo.list()]
ALL_DIRS = [Path(m["path"]) for m in zoo.list()] + [
    Path(m["path"]) / "checkpoints" / f"step-{s}" for m in zoo.list() for s in m["checkpoints"]
]


@lru_cache(maxsize=None)
def _tl(directory: str):
    from cage_lens.loading import load_hf_directory

    return load_hf_directory(directory)


def _load(name, size=None):
    return _tl(str(zoo.model_dir(name, size)))


SHIPPED_TASKS = sorted({m["name"] for m in zoo.list()})


def _str_tokens(name, text):
    """TL string tokens (BOS first) from the shipped model, or from the task's tokenizer."""
    if name in SHIPPED_TASKS:
        return [t.strip() for t in _load(name).to_str_tokens(text)]
    from cage_lens.zoo.build import build_tokenizer

    return ["<bos>"] + build_tokenizer(zoo.task(name)).encode(text).tokens


# ------------------------------------------------------------------------------------------ listing
def test_list_covers_every_task_with_two_sizes():
    listed = zoo.list()
    assert zoo.DEFAULT_MODEL == "ioi"
    assert set(zoo.tasks()) == set(TASKS)
    assert set(SHIPPED_TASKS) == set(TASKS)  # every task ships a final model and a second size
    for name in SHIPPED_TASKS:
        sizes = {m["size"] for m in listed if m["name"] == name}
        assert TASKS[name].default_size in sizes and len(sizes) >= 2, (name, sizes)
    archs = {m["architecture"] for m in listed}
    assert {"GPT2LMHeadModel", "LlamaForCausalLM", "GPTNeoXForCausalLM", "Gemma2ForCausalLM"} <= archs
    ioi = next(m for m in listed if m["name"] == "ioi" and m["default"])
    assert ioi["architecture"] == "GPT2LMHeadModel"
    for name in ("pointer-chase", "ioi"):
        assert any(len(m["checkpoints"]) >= 4 for m in listed if m["name"] == name), name


def test_every_model_is_shipped():
    assert {f"{m['name']}-{m['size']}" for m in zoo.list()} == SHIPPED


def test_shipped_size_limit():
    total = sum(f.stat().st_size for f in zoo.MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 25e6, total  # the whole zoo, checkpoints included, within 25 MB (docs/zoo.md)


@pytest.mark.parametrize("size,architecture", [("neox", "GPTNeoXForCausalLM"), ("gemma2", "Gemma2ForCausalLM")])
def test_architecture_models_load_by_size_name(size, architecture):
    model = zoo.load("ioi", size)
    meta = json.loads((zoo.model_dir("ioi", size) / "zoo.json").read_text())
    assert meta["architecture"] == architecture
    assert model.to_str_tokens("mary and john")[0] == "<bos>"  # trained with <bos> first, on every TL line
    config = json.loads((zoo.model_dir("ioi", size) / "config.json").read_text())
    if size == "neox":  # Pythia's defining features
        assert config["use_parallel_residual"] and config["rotary_pct"] == 0.25
    else:  # Gemma-2's soft-caps
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)
    assert next(m for m in zoo.list() if m["size"] == size)["architecture"] == architecture


def test_bad_names_raise_value_error_listing_options():
    with pytest.raises(ValueError, match="pointer-chase"):
        zoo.load("no-such-task")
    with pytest.raises(ValueError, match="small"):
        zoo.load("ioi", size="huge")
    with pytest.raises(ValueError, match="step"):
        zoo.model_dir("ioi", checkpoint=10**9)
    with pytest.raises(ValueError, match="unknown zoo task"):
        zoo.task("nope")


def test_checkpoint_by_step_and_index():
    m = next(m for m in zoo.list() if m["name"] == "pointer-chase" and m["checkpoints"])
    steps = m["checkpoints"]
    assert zoo.model_dir("pointer-chase", m["size"], checkpoint=steps[1]) == zoo.model_dir(
        "pointer-chase", m["size"], checkpoint=1)
    assert zoo.model_dir("pointer-chase", m["size"], checkpoint=-1).name == f"step-{steps[-1]}"


# ------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", list(TASKS))
def test_generator_deterministic_per_seed(name):
    a = zoo.task(name).sample(5, seed=3)
    b = zoo.task(name).sample(5, seed=3)
    c = zoo.task(name).sample(5, seed=4)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]


@pytest.mark.parametrize("name", list(TASKS))
def test_tokenization_is_word_level_and_in_vocab(name):
    from cage_lens.zoo.build import build_tokenizer

    raw = build_tokenizer(zoo.task(name))
    tok = load_tokenizer(zoo.model_dir(name)) if name in SHIPPED_TASKS else None
    for s in zoo.task(name).sample(20, seed=TEST_SEED):
        enc = raw.encode(s.prompt + s.completion)
        assert enc.tokens == s.prompt.split() + s.completion_tokens
        assert raw.token_to_id("<unk>") not in enc.ids
        if tok is not None:
            ids = tok(s.prompt + s.completion, add_special_tokens=False)["input_ids"]
            assert ids == enc.ids
        assert s.completion.startswith(" ")
        assert len(s.direct_sources) == len(s.total_sources) == len(s.completion_tokens)
        for d_, t_ in zip(s.direct_sources, s.total_sources):
            assert d_ <= t_
            assert all(1 <= p < s.n_prompt for p in t_)
        if s.sentence_spans is not None:  # spans tile 0..n_prompt
            assert s.sentence_spans[0][0] == 0 and s.sentence_spans[-1][1] == s.n_prompt
            assert all(a[1] == b[0] for a, b in zip(s.sentence_spans, s.sentence_spans[1:]))


@pytest.mark.parametrize("name", list(TASKS))
def test_ground_truth_points_at_the_right_tokens(name):
    for s in zoo.task(name).sample(10, seed=TEST_SEED):
        toks = _str_tokens(name, s.prompt)
        assert toks[0] == "<bos>" and toks[1:] == s.prompt.split()
        assert s.prompt_tokens == toks
        if name == "pointer-chase":
            chain = [toks[-2]] + s.completion_tokens  # start key, then the generated chain
            assert chain == s.meta["chain"]
            for t, d in enumerate(s.direct_sources):
                prev = chain[t]
                key = [p for p in d if toks[p] == prev and p + 1 < len(toks) and toks[p + 1] == ">"]
                assert len(key) == 1, (t, d)
                assert toks[key[0] + 2] == s.completion_tokens[t]  # value of the fact = output
                assert key[0] + 2 in d
                if t == 0:
                    assert len(toks) - 2 in d  # the start key
                else:
                    assert len(d) == 2
            for k, t in zip(s.ground_truth_sentences, range(len(s.completion_tokens))):
                a, b = s.sentence_spans[k]
                assert toks[max(a, 1)] == chain[t]
        elif name == "facts":
            for t, (w, d) in enumerate(zip(s.completion_tokens, s.direct_sources)):
                if w == ".":
                    assert not d
                else:
                    assert w in {toks[p] for p in d}
            for k in s.ground_truth_sentences:
                a, b = s.sentence_spans[k]
                fact = toks[max(a, 1):b]
                joined = " ".join(s.completion_tokens)
                assert " ".join(fact) in joined
        elif name == "arith":
            q = s.meta["query"]
            v = s.meta["aliases"][q]
            assert toks[-2] == q and s.completion_tokens == [q, v, s.meta["values"][v]]
            assert [toks[p] for p in s.direct_sources[0]] == [q]
            assert sorted(toks[p] for p in s.direct_sources[1]) == sorted([q, v])
            assert sorted(toks[p] for p in s.direct_sources[2]) == sorted([v, s.meta["values"][v]])
            assert s.total_sources[2] == s.direct_sources[0] | s.direct_sources[1] | s.direct_sources[2]
            heads = set()
            for k in s.ground_truth_sentences:
                a, b = s.sentence_spans[k]
                assert toks[max(a, 1) + 1] == "="
                heads.add(toks[max(a, 1)])
            assert heads == {q, v}
        elif name == "ioi":
            assert s.completion_tokens == [s.correct]
            (d,) = s.direct_sources
            assert sorted(toks[p] for p in d) == sorted([s.correct, s.wrong, s.wrong])
            assert [toks[p] for p in s.meta["io_positions"]] == [s.correct]
            assert toks.count(s.wrong) == 2 and toks.count(s.correct) == 1


# ------------------------------------------------------------------------------------ shipped models
@pytest.mark.parametrize("directory", ALL_DIRS, ids=lambda p: f"{p.parent.parent.name}/{p.name}"
                         if p.parent.name == "checkpoints" else p.name)
def test_model_loads_offline_and_matches_hf(directory):
    from transformers import AutoModelForCausalLM

    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "zoo.json"):
        assert (directory / f).exists(), f
    from cage_lens.loading import eager_kwargs, load_hf_directory

    meta = json.loads((directory / "zoo.json").read_text())
    # compared in float64, where the agreement per family and TL line is known (logits_tolerance
    # states the reasons: exact, or float32 rounding where HF computes softmax/norms in float32).
    # Trained weights sharpen the softmax and amplify that float32 rounding: measured ≤ 4.1e-6
    # relative over the zoo and its checkpoints on TL 2.18, hence 1e-5; exact pairs stay exact.
    model = load_hf_directory(directory, dtype=torch.float64)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64, **eager_kwargs()).eval()
    assert type(hf).__name__ == meta["architecture"]
    tolerance = logits_tolerance(ARCHITECTURE_FAMILIES[meta["architecture"]])
    tolerance = tolerance if tolerance == EXACT_AGREEMENT else 1e-5
    s = zoo.task(meta["task"]).sample(2, seed=TEST_SEED)
    for sample in s:
        tokens = model.to_tokens(sample.prompt + sample.completion)
        assert tokens[0, 0].item() == model.tokenizer.bos_token_id
        with torch.no_grad():
            tl_logits = model(tokens)
            hf_logits = hf(tokens).logits
        error = ((tl_logits - hf_logits).abs().max() / hf_logits.abs().max()).item()
        assert error <= tolerance, error


@pytest.mark.parametrize("name,size", FINALS)
def test_final_model_accuracy_matches_card(name, size):
    d = zoo.model_dir(name, size)
    meta = json.loads((d / "zoo.json").read_text())
    card = meta["accuracy"]
    assert card >= 0.95
    model = _tl(str(d))
    samples = zoo.task(name).sample(N_ACC, seed=TEST_SEED)
    # teacher-forced check == greedy exact match (argmax right at every completion step);
    # samples of equal token length go through the model in one batch
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for s in samples:
        tokens = model.to_tokens(s.prompt + s.completion)[0]
        groups.setdefault((len(tokens), len(s.completion_tokens)), []).append(tokens)
    correct = 0
    with torch.no_grad():
        for (_, n), toks in groups.items():
            batch = torch.stack(toks)
            pred = model(batch)[:, -n - 1:-1].argmax(-1)
            correct += int((pred == batch[:, -n:]).all(dim=1).sum())
    assert correct / N_ACC >= card - MARGIN, (correct, card)


@pytest.mark.parametrize("name", SHIPPED_TASKS)
def test_greedy_generation_loop(name):
    model = _load(name)
    s = zoo.task(name).sample(3, seed=TEST_SEED + 1)
    hits = sum(zoo.greedy_complete(model, x.prompt, len(x.completion_tokens)) == x.completion_tokens for x in s)
    assert hits >= 2


def test_default_model_ioi_prompt():
    model = zoo.load()
    tokens = model.to_tokens("when mary and john went to the store , john gave a drink to")
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    assert logits[model.to_single_token("mary")] > logits[model.to_single_token("john")]
    assert model.tokenizer.convert_ids_to_tokens(int(logits.argmax())) == "mary"
