"""``cage-lens`` command line.

    cage-lens explain "when mary and john went to the store , john gave a drink to" --out report.html
    cage-lens explain "PROMPT" --target " mary" --contrast " john" --rules cplrp
    cage-lens failure "PROMPT" --correct " mary" --out graph.html   # contrastive failure analysis
    cage-lens cage "PROMPT" --model pointer-chase --completion " i n b"
    cage-lens zoo                       # list the shipped models
    cage-lens explain "PROMPT" --model ./qwen3-8b --dry-run   # peak memory and time, before anything runs

``--model`` takes a zoo model (``ioi``, ``pointer-chase:tiny``, ``ioi@200`` for a checkpoint), a local
Hugging Face directory, or the name of a model already in the local Hugging Face cache (cage-lens
never downloads).

Exit status: 0 on success, 2 with one line on stderr for a user error (bad argument, prompt, token,
model or output path), 130 when interrupted (Ctrl-C). Only ``argparse``, ``os``, ``sys`` and
``pathlib`` are imported at start-up: torch and TransformerLens load inside the commands, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

RULES = ("attnlrp", "cplrp", "gxi")
MODES = ("logit", "logprob", "demean", "topk_avg")


# ---------------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``cage-lens explain: error: …``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _user_error(message: str):
    from cage_lens.errors import InputError

    return InputError(message)


def _output_path(path: str | None) -> Path | None:
    """``--out``, checked before any computation: a file name in an existing, writable directory."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise _user_error(f"--out {path!r} is a directory; give a file name such as {str(out / 'report.html')!r}")
    if not out.parent.is_dir():
        raise _user_error(f"--out {path!r}: the directory {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise _user_error(f"--out {path!r} is not writable")
    return out


# ---------------------------------------------------------------------------- shared steps
def _prompt_tokens(model, text: str, allow_unknown: bool, role: str = "the prompt", prepend_bos: bool | None = None):
    """``[1, pos]`` tokens of ``text``; with ``--allow-unknown`` words outside the vocabulary become the
    unknown token, and the command says which."""
    from cage_lens.inputs import tokenize, unknown_words

    tokens = tokenize(model, text, prepend_bos, role=role, allow_unknown=allow_unknown)
    words = unknown_words(model, text) if allow_unknown else []
    if words:
        unk = model.tokenizer.unk_token
        print(f"note: {role} has {len(words)} word(s) outside the vocabulary, explained as {unk!r}: "
              + ", ".join(repr(w) for w in dict.fromkeys(words)), file=sys.stderr)
    return tokens[None]


def _prepare(args):
    """What every explaining command starts with: ``--out`` checked first (before any computation),
    then the model (:func:`cage_lens.specs.model_from_spec`), then the prompt's tokens."""
    out = _output_path(args.out)
    from cage_lens import specs

    model = specs.model_from_spec(args.model)
    return out, model, _prompt_tokens(model, args.prompt, args.allow_unknown)


def _write(out: Path | None, page: str) -> None:
    if out is not None:
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out}")


def _model_config(spec: str | None) -> tuple[dict, object]:
    """The ``config.json`` of a model spec and its tokenizer, without loading any weights."""
    import json

    from cage_lens import specs, zoo
    from cage_lens.loading import load_tokenizer

    spec = spec or zoo.DEFAULT_MODEL
    directory = specs.spec_directory(spec)
    if directory is None:
        repo = specs.cached_hub_name(spec)
        if repo is None:
            raise _user_error(f"{spec!r} is not a zoo model, a local model directory, or a model in the local Hugging "
                              "Face cache; cage-lens does not download models")
        from huggingface_hub import try_to_load_from_cache
        from transformers import AutoTokenizer

        config_path = Path(try_to_load_from_cache(repo, "config.json"))
        tokenizer = AutoTokenizer.from_pretrained(repo)
    else:
        config_path, tokenizer = directory / "config.json", load_tokenizer(directory)
    if not config_path.is_file():
        raise _user_error(f"{spec!r} has no config.json to estimate from")
    return json.loads(config_path.read_text(encoding="utf-8")), tokenizer


def _dry_run(args, what: str, extra_tokens: int = 0) -> int:
    """``--dry-run``: the estimate of the command's computation (cage_lens.estimate, docs/estimate.md),
    from the model's configuration and the prompt's length; nothing is loaded or computed."""
    import cage_lens

    config, tokenizer = _model_config(args.model)
    n_tokens = len(tokenizer(args.prompt, add_special_tokens=False)["input_ids"]) + 1   # + BOS
    if not args.prompt.strip():
        raise _user_error("the prompt is empty")
    # cage-lens loads models in float32 on the CPU (cage_lens.loading)
    est = cage_lens.estimate(config, n_tokens, what, rules=getattr(args, "rules", "attnlrp"), dtype="float32",
                             new_tokens=extra_tokens, device="cpu")
    print(f"dry run: {est}")
    if not est.fits:
        print("dry run: the run would be refused (use fewer tokens, or set CAGE_LENS_MAX_MEMORY if more memory is free)")
    return 0


# ---------------------------------------------------------------------------- commands
def cmd_explain(args) -> int:
    if args.dry_run:
        return _dry_run(args, "attribute")
    out, model, tokens = _prepare(args)
    import cage_lens
    from cage_lens import zoo
    from cage_lens.inputs import greedy_continuation, special_token_id
    from cage_lens.views.html import explain_report_html
    from cage_lens.views.terminal import printable, terminal_heatmap

    attr = cage_lens.attribute(
        model, tokens, target=args.target, contrast=args.contrast, rules=args.rules, mode=args.mode
    )
    generated_ids = greedy_continuation(model, tokens, args.max_new_tokens, stop_at_eos=True)[0, tokens.shape[1]:]
    eos = special_token_id(model, "eos_token_id", "bos_token_id")
    continuation = [t for t in generated_ids.tolist() if t != eos]
    color = not args.no_color and (os.environ.get("NO_COLOR") is None) and sys.stdout.isatty()
    generated = model.to_string(continuation) if continuation else ""
    print(f"model:        {args.model or 'zoo:' + zoo.DEFAULT_MODEL} ({cage_lens.adapt(model).arch.describe()})")
    print(f"prompt:       {printable(args.prompt)}")
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
    _write(out, explain_report_html(attr, args.prompt, generated, args.model or "zoo default"))
    return 0


def cmd_failure(args) -> int:
    if args.dry_run:
        return _dry_run(args, "circuit_graph")
    out, model, tokens = _prepare(args)
    import cage_lens

    explanation = cage_lens.explain_failure(
        model, tokens, wrong=args.wrong, correct=args.correct, rules=args.rules, levels=args.levels
    )
    print(explanation)
    _write(out, explanation.to_html())
    return 0


def cmd_cage(args) -> int:
    if args.dry_run:
        new = len(args.completion.split()) if args.completion is not None else args.max_new_tokens
        return _dry_run(args, "cage", extra_tokens=new)
    out, model, tokens = _prepare(args)
    import cage_lens
    from cage_lens.views.html import html_page

    completion = args.completion
    if completion is not None and completion.strip() and args.allow_unknown:
        completion = _prompt_tokens(model, completion, True, role="the completion", prepend_bos=False)
    graph = cage_lens.cage(
        model, tokens, completion=completion, max_new_tokens=None if completion is not None else args.max_new_tokens,
        method=args.method, granularity=args.granularity, normalize=args.normalize,
    )
    print(graph)
    if graph.empty_rows:
        print(f"note: generated rows {graph.empty_rows} had no positive attribution and were set to zero")
    _write(out, html_page("cage_lens CAGE graph", graph._repr_html_()))
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


_PROMPT_HELP = ("the input text, in quotes; the zoo models have a word-level vocabulary: lower-case words and "
                "punctuation separated by spaces (see docs/prompts.md)")
_RULES_HELP = ("LRP rule set: attnlrp (AttnLRP, the default), cplrp (CP-LRP: attention weights held constant; "
               "conserves exactly on bias-free models), gxi (plain gradient × input); docs/rules.md")


def _explaining_command(sub, name: str, help: str, out_help: str, prompt_help: str = _PROMPT_HELP):
    """A subcommand that explains one prompt: ``prompt``, ``--model``, ``--out``, ``--allow-unknown``."""
    command = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    command.add_argument("prompt", help=prompt_help)
    command.add_argument("--model", default=None,
                         help="zoo model name[:size][@step] (default: ioi), a local HF directory, or a model in the local HF cache")
    command.add_argument("--out", default=None, help=out_help)
    command.add_argument("--allow-unknown", action="store_true",
                         help="explain words outside the vocabulary as the unknown token instead of refusing them")
    command.add_argument("--dry-run", action="store_true",
                         help="print the estimated peak memory and time (from the model's config.json and the "
                              "prompt's length; docs/estimate.md) and exit without loading the model")
    return command


def build_parser() -> argparse.ArgumentParser:
    from cage_lens import __version__

    parser = _Parser(prog="cage-lens", description="Relevance explanations for TransformerLens models.")
    parser.add_argument("--version", action="version", version=f"cage-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    explain = _explaining_command(sub, "explain", "explain the next-token prediction for a prompt",
                                  "write a self-contained HTML report here")
    explain.add_argument("--target", default=None,
                         help="the token to explain, exactly one token, e.g. ' mary' (default: the model's prediction)")
    explain.add_argument("--contrast", default=None,
                         help="explain logit(target) − logit(CONTRAST) instead of the target's logit alone")
    explain.add_argument("--rules", default="attnlrp", choices=RULES, help=_RULES_HELP)
    explain.add_argument("--mode", default="logit", choices=MODES,
                         help="what is explained: logit (default), logprob, demean (target minus the mean logit) "
                              "or topk_avg (target minus the mean of the top-k logits)")
    explain.add_argument("--max-new-tokens", type=_integer(0), default=4, help="length of the greedy continuation shown")
    explain.add_argument("--top", type=_integer(1), default=5, help="how many top tokens to list")
    explain.add_argument("--no-color", action="store_true",
                         help="print the heatmap as text with a [+0.42] value per token instead of ANSI colours "
                              "(also when NO_COLOR is set or the output is not a terminal)")
    explain.set_defaults(func=cmd_explain)

    failure = _explaining_command(sub, "failure", "explain logit(wrong) - logit(correct): heatmap, trace, pruned graph",
                                  "write the HTML graph view here",
                                  prompt_help="the input plus the completion up to (not including) the wrong token")
    failure.add_argument("--correct", required=True, help="a correct alternative token, e.g. ' mary'")
    failure.add_argument("--wrong", default=None, help="the wrong token (default: the model's prediction)")
    failure.add_argument("--rules", default="attnlrp", choices=RULES, help=_RULES_HELP)
    failure.add_argument("--levels", default="half", choices=["block", "half", "heads", "neurons"],
                         help="graph nodes: block (one per layer and token), half (after attention and after the "
                              "MLP, the default), heads (attention heads) or neurons (MLP neurons); docs/graphs.md")
    failure.set_defaults(func=cmd_failure)

    cage_cmd = _explaining_command(sub, "cage", "CAGE generation graph of a continuation",
                                   "write an HTML view of the graph here")
    cage_cmd.add_argument("--completion", default=None,
                          help="teacher-force this continuation instead of generating one greedily")
    cage_cmd.add_argument("--max-new-tokens", type=_integer(1), default=4, help="greedy tokens when no --completion")
    cage_cmd.add_argument("--method", default="attnlrp",
                          help="base attribution method of each row: attnlrp (default), cplrp, input_x_gradient, "
                               "integrated_gradients, attention, attention_x_ig, occlusion, clp")
    cage_cmd.add_argument("--granularity", default="token", choices=["token", "sentence"],
                          help="graph nodes: single tokens (default) or sentences")
    cage_cmd.add_argument("--normalize", default="paper", choices=["paper", "signed", "none"],
                          help="row normalisation: paper (clamp at 0, rows sum to 1; the default), signed (rows "
                               "scaled by Σ|·|, signs kept) or none; docs/cage.md")
    cage_cmd.set_defaults(func=cmd_cage)

    zoo_cmd = sub.add_parser("zoo", help="list the shipped ground-truth models",
                             description="List the shipped ground-truth models: architecture, size, accuracy, checkpoints.")
    zoo_cmd.set_defaults(func=cmd_zoo)

    from cage_lens.study.cli import add_study_commands  # `study` and `report`; imports nothing heavy
    add_study_commands(sub)
    return parser


def _quiet_libraries() -> None:
    """No progress bars, no hub access (cage-lens never downloads), no library warnings on stderr.
    Set before transformers is imported (it reads the environment at import)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    from cage_lens.errors import CageLensError, first_line

    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        return args.func(args)
    except KeyboardInterrupt:
        print("cage-lens: interrupted", file=sys.stderr)
        return 130
    except (CageLensError, OSError) as err:
        print(f"cage-lens: error: {first_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
