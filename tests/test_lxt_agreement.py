"""AttnLRP and CP-LRP token relevance equal the reference implementation LXT (``lxt.efficient``).

LXT monkey-patches transformers classes process-wide, so it runs in a subprocess
(``tests/lxt_reference.py``) on the same Hugging Face weights saved to a temporary directory.
LXT 2.1 does not import under transformers 5 (it imports names transformers 5 removed), so in the
TransformerLens 4.x environment this test skips; CI installs LXT in the TL 2.18 environment.

Measured agreement (float64): GPT-2 ~5e-10 relative (LXT adds 1e-10 to the identity-rule
denominator), Llama ~1e-6 relative (LXT's RMSNorm patch computes in float32).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cage_lens
from cage_lens.loading import from_hf_model
from cage_lens.testing import random_hf_model, tiny_tokenizer

REFERENCE = Path(__file__).with_name("lxt_reference.py")


def _lxt_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("lxt") is None:
        return False, "lxt is not installed"
    probe = subprocess.run([sys.executable, str(REFERENCE), "--probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, "lxt does not import here: " + probe.stderr.strip().splitlines()[-1][:200]
    return True, ""


LXT_OK, LXT_WHY = _lxt_importable()


@pytest.mark.skipif(not LXT_OK, reason=LXT_WHY)
@pytest.mark.parametrize("kind,rtol", [("gpt2", 1e-7), ("llama", 1e-5)])
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp"])
def test_token_relevance_matches_lxt(tmp_path, kind, rtol, rules):
    hf = random_hf_model(kind, n_layers=3, biases=True, seed=11)
    hf.config.architectures = [type(hf).__name__]
    hf.save_pretrained(tmp_path)
    model = from_hf_model(hf, tiny_tokenizer())
    tokens = model.to_tokens("the cat sat on the mat and the dog ran to the red box")
    target = 5
    ours = cage_lens.attribute(model, tokens, target=target, rules=rules).token_relevance[0]
    out = subprocess.run(
        [sys.executable, str(REFERENCE), str(tmp_path), rules, str(target), *map(str, tokens[0].tolist())],
        capture_output=True, text=True, check=True,
    )
    ref = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    # position embeddings are added inside the HF model, so LXT's input relevance is the token part
    assert torch.allclose(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    assert float(ref.abs().max()) > 1e-3  # not a trivially-zero comparison
