"""Regenerate the LXT reference fixtures of ``tests/test_lxt_agreement.py``.

For every family LXT 2.1 has a patch map for (GPT-2, Llama, Qwen2, Qwen3, Gemma-3) this writes a
tiny random Hugging Face model (``config.json`` + float32 ``model.safetensors``: random init differs
across transformers versions, so the weights themselves are the fixture) and LXT's AttnLRP and
CP-LRP token relevance for one prompt (``reference.json``, computed in float64 on those weights).
The tests then compare cage_lens against these numbers on both TransformerLens lines.

Run in an environment with LXT 2.1 and transformers < 5 (the TL 2.18 one):

    python scripts/make_lxt_fixtures.py            # writes tests/fixtures/lxt/
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cage_lens.testing import random_hf_model  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "lxt"
REFERENCE = ROOT / "tests" / "lxt_reference.py"
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gemma3")
TOKENS = [0, 17, 5, 23, 41, 8, 30, 12, 55, 3, 61, 19]   # BOS then word ids of the tiny tokenizer
TARGET = 5
RULES = ("attnlrp", "cplrp")


def lxt_relevance(model_dir: Path, rules: str) -> list[float]:
    out = subprocess.run(
        [sys.executable, str(REFERENCE), str(model_dir), rules, str(TARGET), *map(str, TOKENS)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import lxt  # noqa: F401  (fail early without LXT)
    import transformers

    OUT.mkdir(parents=True, exist_ok=True)
    reference = {"tokens": TOKENS, "target": TARGET, "transformers": transformers.__version__, "families": {}}
    for family in FAMILIES:
        hf = random_hf_model(family, n_layers=2, biases=True, seed=11, dtype=torch.float32)
        hf.config.architectures = [type(hf).__name__]
        directory = OUT / family
        hf.save_pretrained(directory, safe_serialization=True)
        reference["families"][family] = {rules: lxt_relevance(directory, rules) for rules in RULES}
        print(family, "done", flush=True)
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
