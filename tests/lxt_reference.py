"""Reference relevance from LXT (``lxt.efficient``), run in a subprocess by ``test_lxt_agreement.py``.

LXT monkey-patches ``transformers`` classes process-wide, so it must never run inside the test
process. Usage: ``python lxt_reference.py MODEL_DIR RULES TARGET_ID TOKEN_ID [TOKEN_ID ...]`` (or ``--probe``); prints
a JSON list with the relevance of each input token embedding (Σ over d_model of embedding × grad).

LXT 2.1 imports its torchvision ViT patches unconditionally; torchvision has no CPU build on these
machines, so that one module is replaced by an empty stand-in before importing LXT (only the
GPT-2 and Llama patch maps are used here).
"""

import json
import sys
import types


def _stub_vision_patches():
    stub = types.ModuleType("lxt.efficient.models.vit_torch")
    stub.vision_transformer = types.ModuleType("vision_transformer_stub")
    stub.cp_LRP = {}
    stub.attnLRP = {}
    sys.modules["lxt.efficient.models.vit_torch"] = stub


def main(argv):
    if argv == ["--probe"]:  # can LXT's GPT-2 and Llama patches be imported here?
        _stub_vision_patches()
        import lxt.efficient.models.gpt2  # noqa: F401
        import lxt.efficient.models.llama  # noqa: F401
        return
    model_dir, rules, target_id = argv[0], argv[1], int(argv[2])
    token_ids = [int(t) for t in argv[3:]]
    _stub_vision_patches()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from lxt.efficient import monkey_patch
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(model_dir).architectures[0]
    if arch == "GPT2LMHeadModel":
        import lxt.efficient.models.gpt2 as patches
        from transformers.models.gpt2 import modeling_gpt2 as module
        from transformers import GPT2LMHeadModel as cls
    elif arch == "LlamaForCausalLM":
        import lxt.efficient.models.llama as patches
        from transformers.models.llama import modeling_llama as module
        from transformers import LlamaForCausalLM as cls
    else:
        raise SystemExit(f"unsupported architecture {arch}")
    monkey_patch(module, {"attnlrp": patches.attnLRP, "cplrp": patches.cp_LRP}[rules])
    model = cls.from_pretrained(model_dir, torch_dtype=torch.float64, attn_implementation="eager").eval()
    tokens = torch.tensor([token_ids])
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits[0, -1, target_id].backward()
    print(json.dumps((embeds * embeds.grad).sum(-1)[0].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
