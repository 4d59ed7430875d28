#!/usr/bin/env python
"""Evaluate the cage_lens zoo: held-out accuracy and ablation evidence; writes the model card.

    PYTHONPATH=. python scripts/evaluate_zoo.py              # all shipped models, prints + writes
    PYTHONPATH=. python scripts/evaluate_zoo.py --no-write   # print only

For every shipped model (final and checkpoints):

* **accuracy**: greedy exact match of the whole completion on ``N_ACC`` fresh samples (seed 2024,
  never used in training).  Computed in one teacher-forced batch: a greedy completion equals the
  reference exactly iff the argmax at every completion step, given the reference prefix, is the
  reference token, so this is identical to running greedy generation.
* **ablation evidence** (final models, ``N_ABL`` samples the model gets right): replace the token at
  one ground-truth source position (a random element of the union of ``total_sources``) by a random
  unused same-class token, and separately one random non-source ablatable position; report how often
  the greedy completion changes (flip rate).  For sentence-level tasks (pointer-chase, facts, arith)
  also a random ground-truth sentence vs a random non-ground-truth, non-query sentence (see
  ``cage_lens.zoo.ablation``).  Flip detection is again teacher-forced (identical to greedy).
* for ``ioi``: mean logit difference logit(IO) - logit(S) on the clean prompts.

Results are written into each model's ``zoo.json`` (``accuracy``, ``ablation``); then
``cage_lens/zoo/MODEL_CARD.md`` is regenerated from every shipped model's ``zoo.json`` (so ``--only``
re-evaluates some models and still rewrites the whole card). Hand-written notes belong in
``cage_lens/zoo/MODEL_NOTES.md``, which this script never touches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cage_lens.zoo import DEFAULT_MODEL, MODELS_DIR  # noqa: E402
from cage_lens.zoo.ablation import (  # noqa: E402
    ablatable_positions, replace_positions, replace_sentence,
)
from cage_lens.zoo.tasks import Sample, task  # noqa: E402

EVAL_SEED = 2024
N_ACC = 500
N_ABL = 300
N_LOGIT_DIFF = 200


def _load_hf(d: Path):
    from transformers import AutoModelForCausalLM

    from cage_lens.loading import _quiet_transformers, eager_kwargs

    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(d), **eager_kwargs()).eval()


def _vocab(d: Path) -> dict[str, int]:
    return json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]


@torch.no_grad()
def completion_ok(model, vocab, prompts: list[str], completions: list[list[str]], chunk=128):
    """Per prompt: does greedy decoding reproduce ``completions`` exactly (teacher-forced check)?"""
    out = []
    for i in range(0, len(prompts), chunk):
        seqs, spans = [], []
        for p, c in zip(prompts[i:i + chunk], completions[i:i + chunk]):
            pid = [vocab["<bos>"]] + [vocab[w] for w in p.split()]
            cid = [vocab[w] for w in c]
            seqs.append(pid + cid)
            spans.append((len(pid), cid))
        n = max(map(len, seqs))
        ids = torch.tensor([s + [vocab["<pad>"]] * (n - len(s)) for s in seqs])
        pred = model(input_ids=ids).logits.argmax(-1)
        for j, (lp, cid) in enumerate(spans):
            got = pred[j, lp - 1: lp - 1 + len(cid)].tolist()
            out.append(got == cid)
    return out


@torch.no_grad()
def ioi_logit_diff(model, vocab, samples: list[Sample]) -> float:
    diffs = []
    for s in samples:
        ids = torch.tensor([[vocab["<bos>"]] + [vocab[w] for w in s.prompt.split()]])
        lg = model(input_ids=ids).logits[0, -1]
        diffs.append((lg[vocab[s.correct]] - lg[vocab[s.wrong]]).item())
    return sum(diffs) / len(diffs)


def accuracy(d: Path, name: str, n: int = N_ACC) -> float:
    model, vocab = _load_hf(d), _vocab(d)
    samples = task(name).sample(n, seed=EVAL_SEED)
    ok = completion_ok(model, vocab, [s.prompt for s in samples], [s.completion_tokens for s in samples])
    return sum(ok) / len(ok)


def ablation(d: Path, name: str, n: int = N_ABL) -> dict:
    t = task(name)
    model, vocab = _load_hf(d), _vocab(d)
    samples = t.sample(3 * n, seed=EVAL_SEED + 1)
    ok = completion_ok(model, vocab, [s.prompt for s in samples], [s.completion_tokens for s in samples])
    samples = [s for s, o in zip(samples, ok) if o][:n]
    rng = random.Random(f"ablation:{name}")
    tok_src, tok_non, sen_src, sen_non = [], [], [], []
    for s in samples:
        abl = ablatable_positions(t, s)
        src = [p for p in abl if p in s.sources()]
        non = [p for p in abl if p not in s.sources()]
        if src and non:
            tok_src.append((s, replace_positions(t, s, [rng.choice(src)], rng)))
            tok_non.append((s, replace_positions(t, s, [rng.choice(non)], rng)))
        if s.sentence_spans is not None:
            gt = list(s.ground_truth_sentences)
            other = [k for k in range(len(s.sentence_spans)) if k not in gt and k not in (s.query_sentences or [])]
            a = replace_sentence(t, s, rng.choice(gt), rng)
            b = replace_sentence(t, s, rng.choice(other), rng) if other else None
            if a is not None and b is not None:
                sen_src.append((s, a))
                sen_non.append((s, b))

    def flip_rate(pairs):
        if not pairs:
            return None
        ok = completion_ok(model, vocab, [p for _, p in pairs], [s.completion_tokens for s, _ in pairs])
        return 1 - sum(ok) / len(ok)

    res = {
        "method": "replace by a random unused same-class token",
        "n_samples": len(samples),
        "token_source_flip": flip_rate(tok_src),
        "token_nonsource_flip": flip_rate(tok_non),
        "n_token": len(tok_src),
    }
    if sen_src:
        res.update(sentence_source_flip=flip_rate(sen_src), sentence_nonsource_flip=flip_rate(sen_non),
                   n_sentence=len(sen_src))
    if name == "ioi":
        res["mean_logit_diff"] = ioi_logit_diff(model, vocab, t.sample(N_LOGIT_DIFF, seed=EVAL_SEED))
        res["n_logit_diff"] = N_LOGIT_DIFF
        # IO-only and S2-only ablations, the two classic IOI interventions
        io_pairs, s2_pairs = [], []
        for s in samples:
            io_pairs.append((s, replace_positions(t, s, s.meta["io_positions"], rng)))
            s2_pairs.append((s, replace_positions(t, s, s.meta["s_positions"][-1:], rng)))
        res["io_flip"] = flip_rate(io_pairs)
        res["s2_flip"] = flip_rate(s2_pairs)
    return res


def _dir_size(d: Path, include_checkpoints=True) -> int:
    files = d.rglob("*") if include_checkpoints else d.glob("*")
    return sum(f.stat().st_size for f in files if f.is_file())


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _architecture(m: dict, config: dict) -> str:
    """One-line description of a zoo model's architecture, from its spec and config.json."""
    spec = m["spec"]
    if spec["arch"] == "gpt2":
        return "GPT2LMHeadModel (LayerNorm, biases, learned absolute positions, GELU, tied embeddings)"
    if spec["arch"] == "gpt_neox":
        return (f"GPTNeoXForCausalLM, Pythia's architecture (parallel attention + MLP, LayerNorm, biases, rotary on "
                f"{config['rotary_pct']:g} of each head, GELU, untied unembedding)")
    if spec["arch"] == "gemma2":
        return (f"Gemma2ForCausalLM, Gemma-2's architecture (RMSNorm before *and* after each sublayer, embeddings "
                f"× √d_model, GQA {spec['n_heads']} heads / {spec['n_kv_heads']} kv heads, gated GELU MLP, soft-caps "
                f"{config['attn_logit_softcapping']:g} on attention scores and {config['final_logit_softcapping']:g} "
                f"on logits, sliding window {config['sliding_window']} on every other layer (longer than the "
                "context), tied embeddings, no biases)")
    return (f"LlamaForCausalLM (RMSNorm, rotary, gated SiLU MLP, GQA {spec['n_heads']} heads / "
            f"{spec.get('n_kv_heads')} kv heads, no biases)")


def _shipped() -> list[Path]:
    return sorted(d for d in MODELS_DIR.iterdir() if d.is_dir() and (d / "zoo.json").exists())


def _ground_truth_lines() -> list[str]:
    T = importlib.import_module("cage_lens.zoo.tasks")  # (cage_lens.zoo.tasks is also a function name)

    return [
        "## Ground truth per task",
        "",
        f"- `pointer-chase`: {T.PC_FACTS} facts `a > b ;` over {len(T.PC_SYMBOLS)} symbols, then `start a :` →",
        f"  a chain of {T.PC_STEPS} values. Step 0 reads the start key and the fact keyed by it; step t > 0 reads",
        "  the fact keyed by the previously *generated* token (`direct_sources` = key and value positions of that",
        "  fact); `total_sources` accumulate along the chain. Each fact is a sentence span; ground-truth",
        "  sentences = the chain's facts.",
        f"- `facts`: {T.FACTS_M} facts `name verb object .` (names, verbs, objects distinct within a prompt), then",
        f"  `list n1 n2 :` → the {T.FACTS_K} listed facts. Name tokens read the instruction; verb/object tokens",
        "  read their fact (name + verb, resp. name + verb + object); `.` has no prompt source. Ground-truth",
        "  sentences = the listed facts; the instruction is `query_sentences`.",
        f"- `arith`: {T.ARITH_DEFS} value definitions `x = 3 .`, {T.ARITH_ALIASES} alias definitions `c = a .` and",
        f"  {T.ARITH_FILLERS} unrelated sentences, shuffled, then `compute c :` → ` c a 3` (the lookup worked step",
        "  by step). The first token restates the query (reads the query position); the second reads the alias",
        "  definition of the *generated* `c`, the third the value definition of the *generated* `a`, so",
        "  `total_sources` accumulate along the chain. Ground-truth sentences = the alias and the value",
        "  definition used.",
        f"- `ioi`: {len(T.IOI_TEMPLATES)} English-like templates, ABBA and BABA orders, {len(T.IOI_NAMES)} names,",
        f"  {len(T.IOI_PLACES)} places, {len(T.IOI_OBJECTS)} objects. `direct_sources` = positions of the IO name",
        "  and both S names; `correct` = IO, `wrong` = S.",
        "",
        "Caveat: flip rates measure necessity under in-distribution replacement, not which attention",
        "path carries the information; they bound how far the ground truth can be wrong, they do not",
        "prove the circuit.",
        "",
    ]


def write_card(path: Path) -> None:
    """The model card, entirely from the shipped models' zoo.json / config.json (written by
    ``train_zoo.py`` and this script); hand-written notes live in MODEL_NOTES.md."""
    from train_zoo import BETAS, GRAD_CLIP, LR_FLOOR, WARMUP_STEPS, WEIGHT_DECAY

    from cage_lens.zoo.build import N_CTX, SIZES

    dirs = _shipped()
    total = sum(_dir_size(d) for d in dirs)
    lines = [
        "# cage_lens ground-truth zoo — model card",
        "",
        "Generated by `PYTHONPATH=. python scripts/evaluate_zoo.py`; every figure below is printed by that",
        "script from the models' `zoo.json` (training records written by `scripts/train_zoo.py`, evaluation",
        "results written by `evaluate_zoo.py`). Hand-written notes (training history, variants that did not",
        "train) are in `MODEL_NOTES.md`; tasks and loading are described in `docs/zoo.md`. Models are trained",
        "on the synthetic tasks of `cage_lens/zoo/tasks.py`, whose generators also emit the ground truth. Every",
        "model is an HF-format directory (config.json, model.safetensors in float32, tokenizer.json,",
        "tokenizer_config.json, zoo.json) that loads offline with transformers 4.57 / 5.x, TransformerLens",
        "2.x (`HookedTransformer`) and 4.x (`TransformerBridge`) through `cage_lens.zoo.load(name, size)`.",
        "",
        "Conventions for all tables:",
        "",
        f"- **Held-out accuracy**: greedy exact match of the whole completion on {N_ACC} fresh samples",
        f"  (generator seed {EVAL_SEED}; training used seeds `train:<step>`, validation 999, tests 77).",
        "  Prompts get `<bos>` prepended, as `model.to_tokens` does.",
        "- **Ablation** = replace the token at a prompt position by a random *unused token of the same word",
        "  class* (symbol, name, variable, digit, verb, object, place); in `arith` a distractor sentence is",
        "  swapped for an unused distractor sentence of the same length. A *flip* = the greedy completion",
        "  changes. *Source* positions = union of the sample's `total_sources`; *non-source* = other",
        "  ablatable prompt positions. Sentence rows: one random ground-truth sentence vs one random",
        "  non-ground-truth sentence (query sentence excluded), all its class words replaced.",
        f"  Measured on up to {N_ABL} samples (seed {EVAL_SEED + 1}) that the model completes correctly.",
        f"- **Optimiser** (all models): AdamW, linear warm-up {WARMUP_STEPS} steps, cosine decay to "
        f"{100 * LR_FLOOR:g} % of the peak, weight decay {WEIGHT_DECAY}, betas {BETAS}, gradient clip {GRAD_CLIP}.",
        f"- **Total shipped size** (all models and checkpoints): {total / 1e6:.2f} MB.",
        "",
    ]
    for d in dirs:
        key = d.name
        m = json.loads((d / "zoo.json").read_text())
        config = json.loads((d / "config.json").read_text())
        ab = m["ablation"]
        spec = m["spec"]
        default = m["size"] == task(m["task"]).default_size
        lines += [
            f"## {key}" + (f"  (`zoo.load(\"{m['task']}\")`, the default size"
                           + ("; the default model of `zoo.load()` and the CLI" if m["task"] == DEFAULT_MODEL else "")
                           + ")" if default else ""),
            "",
            f"Task `{m['task']}`: {task(m['task']).description}.",
            "",
            "| property | value |",
            "|---|---|",
            f"| architecture | {_architecture(m, config)} |",
            f"| dimensions | d_model {spec['d_model']}, {spec['n_layers']} layers, {spec['n_heads']} heads, d_mlp {spec['d_mlp']}, context {N_CTX}, vocab {config['vocab_size']} |",
            f"| parameters | {m['parameters']:,} |",
            f"| training data | {m['training_samples']:,} fresh generator samples ({m['training_steps']} steps × batch {m['batch_size']}), teacher forcing, loss on completion tokens |",
            f"| learning rate, seed | {m['learning_rate']}, {m['seed']} |",
            f"| training time | {m['training_time_s']:.0f} s wall clock, {m.get('torch_threads', 1)} CPU thread(s) |",
            f"| held-out greedy exact match | **{_pct(m['accuracy'])}** (n = {m['accuracy_eval']['n']}) |",
            f"| ablate a source token → flip | {_pct(ab['token_source_flip'])} (n = {ab['n_token']}) |",
            f"| ablate a non-source token → flip | {_pct(ab['token_nonsource_flip'])} (n = {ab['n_token']}) |",
        ]
        if "sentence_source_flip" in ab:
            lines += [
                f"| ablate a ground-truth sentence → flip | {_pct(ab['sentence_source_flip'])} (n = {ab['n_sentence']}) |",
                f"| ablate a non-ground-truth sentence → flip | {_pct(ab['sentence_nonsource_flip'])} (n = {ab['n_sentence']}) |",
            ]
        if "mean_logit_diff" in ab:
            lines += [
                f"| mean logit(IO) − logit(S) | {ab['mean_logit_diff']:.2f} ({ab.get('n_logit_diff', 200)} prompts) |",
                f"| replace the IO name → flip | {_pct(ab['io_flip'])} |",
                f"| replace the second S name → flip | {_pct(ab['s2_flip'])} |",
            ]
        own, with_checkpoints = _dir_size(d, False), _dir_size(d)
        lines += [
            f"| shipped size | {own / 1e6:.2f} MB"
            + (f" (+ {(with_checkpoints - own) / 1e6:.2f} MB checkpoints)" if with_checkpoints > own else "") + " |",
        ]
        checkpoints = sorted((d / "checkpoints").glob("step-*/zoo.json"), key=lambda p: int(p.parent.name[5:]))
        if checkpoints:
            cks = [json.loads(c.read_text()) for c in checkpoints]
            ck = ", ".join(f"step {c['training_steps']}: {_pct(c['accuracy'])}" for c in cks)
            lines += [f"| checkpoints (held-out exact match) | {ck}; final step {m['training_steps']}: {_pct(m['accuracy'])} |"]
        lines += [""]
    shipped = {d.name for d in dirs}
    missing = [f"{n}-{z}" for (n, z) in SIZES if f"{n}-{z}" not in shipped]
    if missing:
        lines += [
            "## Planned models not shipped",
            "",
            ", ".join(f"`{k}`" for k in missing) + " are configured in `cage_lens/zoo/build.py` but not shipped",
            "(see `MODEL_NOTES.md`); `zoo.load` raises `ValueError` for them.",
            "",
        ]
    lines += _ground_truth_lines()
    path.write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = args.only or sorted(
        d.name for d in MODELS_DIR.iterdir() if d.is_dir() and (d / "zoo.json").exists()
    )
    for key in keys:
        d = MODELS_DIR / key
        meta = json.loads((d / "zoo.json").read_text())
        name = meta["task"]
        t0 = time.time()
        acc = accuracy(d, name)
        ab = ablation(d, name)
        cks = []
        ck_root = d / "checkpoints"
        if ck_root.is_dir():
            for c in sorted(ck_root.iterdir(), key=lambda p: int(p.name.split("-")[1])):
                cm = json.loads((c / "zoo.json").read_text())
                ca = accuracy(c, name)
                cm["accuracy"] = ca
                cm["accuracy_eval"] = {"seed": EVAL_SEED, "n": N_ACC}
                if not args.no_write:
                    (c / "zoo.json").write_text(json.dumps(cm, indent=2, sort_keys=True) + "\n")
                cks.append({"step": cm["training_steps"], "accuracy": ca})
        meta["accuracy"] = acc
        meta["accuracy_eval"] = {"seed": EVAL_SEED, "n": N_ACC}
        meta["ablation"] = ab
        if not args.no_write:
            (d / "zoo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        print(f"{key}: acc {acc:.4f} | token flip src {_pct(ab['token_source_flip'])} vs non {_pct(ab['token_nonsource_flip'])}"
              + (f" | sentence flip src {_pct(ab['sentence_source_flip'])} vs non {_pct(ab['sentence_nonsource_flip'])}" if 'sentence_source_flip' in ab else "")
              + (f" | logit diff {ab['mean_logit_diff']:.2f} io {_pct(ab['io_flip'])} s2 {_pct(ab['s2_flip'])}" if 'mean_logit_diff' in ab else "")
              + (" | checkpoints " + ", ".join(f"{c['step']}:{c['accuracy']:.3f}" for c in cks) if cks else "")
              + f" ({time.time() - t0:.0f}s)", flush=True)
    if not args.no_write:
        write_card(ROOT / "cage_lens" / "zoo" / "MODEL_CARD.md")
        print("wrote cage_lens/zoo/MODEL_CARD.md (from every shipped model's zoo.json)")


if __name__ == "__main__":
    main()
