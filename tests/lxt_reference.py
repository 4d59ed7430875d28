"""Reference relevance from LXT (``lxt.efficient``, the AttnLRP authors' implementation), run in a
subprocess: LXT monkey-patches ``transformers`` classes process-wide, so it must never run inside a
test process.

Usage: ``python lxt_reference.py MODEL_DIR RULES TARGET_ID TOKEN_ID [TOKEN_ID ...]`` prints a JSON list
with the relevance of each input token embedding (Σ over d_model of embedding × grad, float64);
``python lxt_reference.py --probe`` exits 0 when LXT imports here.

LXT 2.1 has patch maps for GPT-2, Llama, Qwen2, Qwen3 and Gemma-3 (and BERT/ViT). It imports its
torchvision ViT patches unconditionally; torchvision has no CPU build on these machines, so that one
module is replaced by an empty stand-in before importing LXT.
"""

import json
import sys
import types

#: Hugging Face architecture → (LXT patch module, transformers modeling module)
LXT_MAPS = {
    "GPT2LMHeadModel": ("gpt2", "transformers.models.gpt2.modeling_gpt2"),
    "LlamaForCausalLM": ("llama", "transformers.models.llama.modeling_llama"),
    "Qwen2ForCausalLM": ("qwen2", "transformers.models.qwen2.modeling_qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "transformers.models.qwen3.modeling_qwen3"),
    "Gemma3ForCausalLM": ("gemma3", "transformers.models.gemma3.modeling_gemma3"),
}


def _stub_vision_patches():
    stub = types.ModuleType("lxt.efficient.models.vit_torch")
    stub.vision_transformer = types.ModuleType("vision_transformer_stub")
    stub.cp_LRP = {}
    stub.attnLRP = {}
    sys.modules["lxt.efficient.models.vit_torch"] = stub


def main(argv):
    import importlib

    _stub_vision_patches()
    if argv == ["--probe"]:  # can every LXT patch map used here be imported?
        for patches, _ in LXT_MAPS.values():
            importlib.import_module(f"lxt.efficient.models.{patches}")
        return
    model_dir, rules, target_id = argv[0], argv[1], int(argv[2])
    token_ids = [int(t) for t in argv[3:]]
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from lxt.efficient import monkey_patch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = AutoConfig.from_pretrained(model_dir).architectures[0]
    if arch not in LXT_MAPS:
        raise SystemExit(f"LXT has no patch map for {arch}")
    patches_name, module_name = LXT_MAPS[arch]
    patches = importlib.import_module(f"lxt.efficient.models.{patches_name}")
    monkey_patch(importlib.import_module(module_name), {"attnlrp": patches.attnLRP, "cplrp": patches.cp_LRP}[rules])
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64, attn_implementation="eager").eval()
    tokens = torch.tensor([token_ids])
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits[0, -1, target_id].backward()
    print(json.dumps((embeds * embeds.grad).sum(-1)[0].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
