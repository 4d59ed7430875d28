#!/usr/bin/env python
"""Train the cage_lens ground-truth zoo (docs/zoo.md) on CPU, reproducibly.

    python scripts/train_zoo.py                 # every model
    python scripts/train_zoo.py --only ioi-small --threads 1

Each model is trained with teacher forcing on ``prompt + completion`` with the loss on the
completion tokens only.  Batches are drawn fresh from the task generator with seeds
``train:<step>`` (fixed), validation uses seed 999 (never used by training, nor by
``scripts/evaluate_zoo.py`` which uses 2024, nor by the tests which use 77).  Training stops at the
first validation at or after ``min_steps`` where greedy exact-match accuracy (equal to teacher-forced
all-argmax-correct) reaches ``target``, or at ``max_steps``.  Intermediate checkpoints (for models
with ``checkpoints=True``) are the validation snapshots closest to 10/25/50/75 % of the final step.

Needs transformers (4.57 or 5.x), torch, tokenizers, safetensors; run with the repo root on
``sys.path`` (e.g. ``PYTHONPATH=. python scripts/train_zoo.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cage_lens.zoo import MODELS_DIR  # noqa: E402
from cage_lens.zoo.build import SIZES, build_tokenizer, make_model, save_model_dir  # noqa: E402
from cage_lens.zoo.tasks import TASKS, task  # noqa: E402

VAL_SEED = 999

#: training hyper-parameters per model (name-size)
PLAN: dict[str, dict] = {
    "pointer-chase-small": dict(n_val=512, seed=1, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.995, checkpoints=True),
    "pointer-chase-tiny": dict(n_val=512, seed=2, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.99, checkpoints=False),
    "facts-small": dict(seed=13, lr=3e-3, batch=64, min_steps=1000, max_steps=20000, target=0.99, checkpoints=False),
    "facts-tiny": dict(seed=14, lr=3e-3, batch=64, min_steps=1000, max_steps=20000, target=0.99, checkpoints=False),
    "arith-small": dict(seed=5, lr=3e-3, batch=64, min_steps=1000, max_steps=20000, target=0.995, checkpoints=False),
    "arith-tiny": dict(seed=6, lr=3e-3, batch=64, min_steps=1000, max_steps=4000, target=0.99, checkpoints=False),
    "ioi-small": dict(n_val=512, seed=7, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.995, checkpoints=True),
    "ioi-tiny": dict(n_val=512, seed=8, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.99, checkpoints=False),
    "ioi-neox": dict(n_val=512, seed=21, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.99, checkpoints=False),
    "ioi-gemma2": dict(n_val=512, seed=22, lr=3e-3, batch=64, min_steps=1000, max_steps=8000, target=0.99, checkpoints=False),
}
EVAL_EVERY = 250
N_VAL = 256
#: optimiser settings shared by every model (the model card prints them from here)
WARMUP_STEPS = 200
LR_FLOOR = 0.1  # cosine decay from the peak learning rate to this fraction of it
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.98)
GRAD_CLIP = 1.0


def encode(samples, vocab: dict[str, int]):
    """Token ids (BOS + prompt + completion, right-padded) and labels (-100 outside completions)."""
    seqs, labs = [], []
    for s in samples:
        p = [vocab["<bos>"]] + [vocab[w] for w in s.prompt.split()]
        c = [vocab[w] for w in s.completion_tokens]
        ids = p + c
        seqs.append(ids)
        # label at position i is the token at i+1 (HF shifts internally; we shift ourselves)
        labs.append([-100] * (len(p) - 1) + c + [-100])
    n = max(len(x) for x in seqs)
    pad = vocab["<pad>"]
    ids = torch.tensor([x + [pad] * (n - len(x)) for x in seqs])
    labels = torch.tensor([y + [-100] * (n - len(y)) for y in labs])
    return ids, labels


def loss_and_acc(model, ids, labels):
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    mask = labels != -100
    correct = (logits.argmax(-1) == labels) | ~mask
    return loss, correct.all(dim=1).float().mean().item()


@torch.no_grad()
def exact_match(model, ids, labels, chunk=128) -> float:
    model.eval()
    accs = []
    for i in range(0, len(ids), chunk):
        _, a = loss_and_acc(model, ids[i:i + chunk], labels[i:i + chunk])
        accs.append(a * len(ids[i:i + chunk]))
    model.train()
    return sum(accs) / len(ids)


def train_one(key: str, out_root: Path, log) -> dict:
    name, size = key.rsplit("-", 1)
    plan = PLAN[key]
    t = task(name)
    tok = build_tokenizer(t)
    vocab = {w: i for i, w in enumerate(t.full_vocab())}
    model = make_model(t, size, plan["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    arch = type(model).__name__
    opt = torch.optim.AdamW(model.parameters(), lr=plan["lr"], weight_decay=WEIGHT_DECAY, betas=BETAS)
    warmup = WARMUP_STEPS
    max_steps = plan["max_steps"]

    def lr_at(step):
        if step < warmup:
            return plan["lr"] * (step + 1) / warmup
        frac = (step - warmup) / max(1, max_steps - warmup)
        return plan["lr"] * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * frac)))

    val_ids, val_labels = encode(t.sample(plan.get("n_val", N_VAL), seed=VAL_SEED), vocab)
    snapshots: list[tuple[int, dict, float]] = []
    history = []
    model.train()
    t0 = time.time()
    step = 0
    acc = 0.0
    while step < max_steps:
        ids, labels = encode(t.sample(plan["batch"], seed=f"train:{step}"), vocab)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, _ = loss_and_acc(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        if step % (100 if plan["checkpoints"] else EVAL_EVERY) == 0 or step == max_steps:
            acc = exact_match(model, val_ids, val_labels)
            history.append({"step": step, "loss": round(loss.item(), 5), "val_exact_match": acc})
            log(f"{key} step {step} loss {loss.item():.4f} val {acc:.4f} ({time.time() - t0:.0f}s)")
            if plan["checkpoints"]:
                snapshots.append((step, copy.deepcopy(model.state_dict()), acc))
            if step >= plan["min_steps"] and acc >= plan["target"]:
                break
    train_time = time.time() - t0
    final_step = step
    out = out_root / key
    if out.exists():
        shutil.rmtree(out)
    meta = {
        "task": name, "size": size, "architecture": arch, "parameters": n_params,
        "training_steps": final_step, "batch_size": plan["batch"], "learning_rate": plan["lr"],
        "seed": plan["seed"], "training_samples": final_step * plan["batch"],
        "training_time_s": round(train_time, 1), "validation_seed": VAL_SEED,
        "validation_exact_match": acc, "torch_threads": torch.get_num_threads(),
        "spec": SIZES[(name, size)], "history": history,
    }
    model.eval()
    save_model_dir(model, out, tok, meta)
    if plan["checkpoints"]:
        chosen = []
        for frac in (0.1, 0.25, 0.5, 0.75):
            target_step = frac * final_step
            best = min((s for s in snapshots if s[0] < final_step), key=lambda s: abs(s[0] - target_step))
            if best[0] not in [c[0] for c in chosen]:
                chosen.append(best)
        for s, state, a in chosen:
            ck = copy.deepcopy(model)
            ck.load_state_dict(state)
            cmeta = dict(meta, training_steps=s, training_samples=s * plan["batch"], validation_exact_match=a,
                         checkpoint_of=key, history=[h for h in history if h["step"] <= s])
            cmeta.pop("training_time_s")
            save_model_dir(ck, out / "checkpoints" / f"step-{s}", tok, cmeta)
    log(f"{key}: {n_params} params, {final_step} steps, {train_time:.0f}s, val exact match {acc:.4f}")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="model keys (e.g. ioi-small); default: all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(MODELS_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = args.only or list(PLAN)
    for k in keys:
        if k not in PLAN:
            raise SystemExit(f"unknown model {k!r}; choose from {', '.join(PLAN)}")
    out_root = Path(args.out)

    def log(msg):
        print(msg, flush=True)

    for k in keys:
        train_one(k, out_root, log)


if __name__ == "__main__":
    main()
