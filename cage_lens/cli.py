"""``cage-lens`` command line.

    cage-lens explain "when mary and john went to the store , john gave a drink to" --out report.html
    cage-lens explain "PROMPT" --target " mary" --contrast " john" --rules cplrp
    cage-lens failure "PROMPT" --correct " mary" --out graph.html   # contrastive failure analysis
    cage-lens cage "PROMPT" --model pointer-chase --completion " i n b"
    cage-lens zoo                       # list the shipped models

``--model`` takes a zoo model (``ioi``, ``pointer-chase:tiny``, ``ioi@2000`` for a checkpoint), a local
Hugging Face directory, or a TransformerLens model name (needs the weights locally or network).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "load_model"]


def load_model(spec: str | None):
    """A TL model from a zoo spec ``name[:size][@checkpoint]``, a local HF directory, or a TL model name."""
    from cage_lens import zoo
    from cage_lens.loading import has_hooked_transformer, load_hf_directory

    spec = spec or zoo.DEFAULT_MODEL
    name, _, checkpoint = spec.partition("@")
    name, _, size = name.partition(":")
    if name in zoo.tasks():
        return zoo.load(name, size or None, int(checkpoint) if checkpoint else None)
    if Path(spec).is_dir():
        return load_hf_directory(spec)
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{spec!r} is not a directory (and not a zoo model: {', '.join(zoo.tasks())})")
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(spec, device="cpu").eval()
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(spec, device="cpu").eval()


def _warn_unknown_tokens(model, str_tokens: list[str]) -> None:
    unk = getattr(getattr(model, "tokenizer", None), "unk_token", None)
    unknown = [t for t in str_tokens if unk is not None and t.strip() == unk]
    if unknown:
        print(f"warning: {len(unknown)} word(s) are not in this model's vocabulary and became {unk!r}", file=sys.stderr)


def cmd_explain(args) -> int:
    import cage_lens
    from cage_lens import zoo
    from cage_lens.inputs import greedy_continuation, special_token_id
    from cage_lens.viz import explain_report_html, terminal_heatmap

    model = load_model(args.model)
    tokens = model.to_tokens(args.prompt)
    str_tokens = list(model.to_str_tokens(tokens[0]))
    _warn_unknown_tokens(model, str_tokens)
    generated_ids = greedy_continuation(model, tokens, args.max_new_tokens, stop_at_eos=True)[0, tokens.shape[1]:]
    continuation = [t for t in generated_ids.tolist() if t != special_token_id(model, "eos_token_id", "bos_token_id")]
    attr = cage_lens.attribute(
        model, tokens, target=args.target, contrast=args.contrast, rules=args.rules, mode=args.mode
    )
    color = not args.no_color and (os.environ.get("NO_COLOR") is None) and sys.stdout.isatty()
    generated = model.to_string(continuation) if continuation else ""
    print(f"model:        {args.model or 'zoo:' + zoo.DEFAULT_MODEL} ({cage_lens.adapt(model).arch.describe()})")
    print(f"prompt:       {args.prompt}")
    print(f"continuation: {generated!r}")
    print(f"explained:    {attr.target_description} = {float(attr.target_value[0]):.4f}   rules: {attr.rules}")
    print()
    print(terminal_heatmap(attr.str_tokens[0], attr.normalized(0).tolist(), color=color))
    print()
    print("most relevant tokens (relevance, + supports the explained token):")
    for pos, tok, rel in attr.top_tokens(args.top):
        print(f"  {pos:>4}  {tok!r:<16} {rel:+.4f}")
    share = float(attr.conservation.input_share()[0])
    print(f"\nshare of the target reaching the input tokens: {share:.3f} (the rest is absorbed by biases / softmax)")
    if args.out:
        Path(args.out).write_text(explain_report_html(attr, args.prompt, generated, args.model or "zoo default"))
        print(f"wrote {args.out}")
    return 0


def cmd_failure(args) -> int:
    import cage_lens

    model = load_model(args.model)
    explanation = cage_lens.explain_failure(
        model, args.prompt, wrong=args.wrong, correct=args.correct, rules=args.rules, levels=args.levels
    )
    print(explanation)
    if args.out:
        explanation.to_html(args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_cage(args) -> int:
    import cage_lens
    from cage_lens.viz import html_page

    model = load_model(args.model)
    graph = cage_lens.cage(
        model, args.prompt, completion=args.completion, max_new_tokens=None if args.completion else args.max_new_tokens,
        method=args.method, granularity=args.granularity, normalize=args.normalize,
    )
    print(graph)
    if graph.empty_rows:
        print(f"note: generated rows {graph.empty_rows} had no positive attribution and were set to zero")
    if args.out:
        Path(args.out).write_text(html_page("cage_lens CAGE graph", graph._repr_html_()))
        print(f"wrote {args.out}")
    return 0


def cmd_zoo(args) -> int:
    from cage_lens import zoo

    rows = zoo.list()
    print(f"{'model':<22} {'arch':<18} {'params':>8} {'accuracy':>9}  checkpoints")
    for r in rows:
        name = f"{r['name']}:{r['size']}" + (" *" if r["default"] else "")
        acc = f"{r['accuracy']:.3f}" if isinstance(r.get("accuracy"), (int, float)) else "-"
        print(f"{name:<22} {str(r['architecture']):<18} {str(r['parameters']):>8} {acc:>9}  {r['checkpoints'] or '-'}")
    print("(* = default size; the default model is", zoo.DEFAULT_MODEL + ")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cage-lens", description="Relevance explanations for TransformerLens models.")
    sub = parser.add_subparsers(dest="command", required=True)

    explain = sub.add_parser("explain", help="explain the next-token prediction for a prompt")
    explain.add_argument("prompt")
    explain.add_argument("--model", default=None, help="zoo model (default: ioi), local HF directory or TL model name")
    explain.add_argument("--target", default=None, help="token to explain (default: the model's prediction)")
    explain.add_argument("--contrast", default=None, help="explain target minus this token")
    explain.add_argument("--rules", default="attnlrp", choices=["attnlrp", "cplrp", "gxi"])
    explain.add_argument("--mode", default="logit", choices=["logit", "logprob", "demean", "topk_avg"])
    explain.add_argument("--max-new-tokens", type=int, default=4, help="length of the greedy continuation shown")
    explain.add_argument("--top", type=int, default=5, help="how many top tokens to list")
    explain.add_argument("--out", default=None, help="write a self-contained HTML report here")
    explain.add_argument("--no-color", action="store_true")
    explain.set_defaults(func=cmd_explain)

    failure = sub.add_parser("failure", help="explain logit(wrong) - logit(correct): heatmap, trace, pruned graph")
    failure.add_argument("prompt", help="the input plus the completion up to (not including) the wrong token")
    failure.add_argument("--correct", required=True, help="a correct alternative token")
    failure.add_argument("--wrong", default=None, help="the wrong token (default: the model's prediction)")
    failure.add_argument("--model", default=None)
    failure.add_argument("--rules", default="attnlrp", choices=["attnlrp", "cplrp", "gxi"])
    failure.add_argument("--levels", default="half", choices=["block", "half", "heads", "neurons"])
    failure.add_argument("--out", default=None, help="write the HTML graph view here")
    failure.set_defaults(func=cmd_failure)

    cage_cmd = sub.add_parser("cage", help="CAGE generation graph of a continuation")
    cage_cmd.add_argument("prompt")
    cage_cmd.add_argument("--completion", default=None, help="teacher-force this continuation")
    cage_cmd.add_argument("--max-new-tokens", type=int, default=4, help="greedy tokens when no --completion")
    cage_cmd.add_argument("--model", default=None)
    cage_cmd.add_argument("--method", default="attnlrp")
    cage_cmd.add_argument("--granularity", default="token", choices=["token", "sentence"])
    cage_cmd.add_argument("--normalize", default="paper", choices=["paper", "signed", "none"])
    cage_cmd.add_argument("--out", default=None, help="write an HTML view of the graph here")
    cage_cmd.set_defaults(func=cmd_cage)

    zoo_cmd = sub.add_parser("zoo", help="list the shipped ground-truth models")
    zoo_cmd.set_defaults(func=cmd_zoo)

    from cage_lens.study.cli import add_study_commands  # `study` and `report`; imports nothing heavy
    add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    from cage_lens.errors import CageLensError

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a TL dependency
        pass
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CageLensError, ValueError, OSError) as err:
        print(f"cage-lens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
