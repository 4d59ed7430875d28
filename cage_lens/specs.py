"""Model specs: the strings the command line and failure studies accept for a model.

A spec is a zoo model ``name[:size][@checkpoint]`` (``ioi``, ``pointer-chase:tiny``, ``ioi@200``), a
local Hugging Face directory, or the name of a model already in the local Hugging Face cache (a repo
id or a TransformerLens alias). Anything else is refused at once with one line, never by waiting on
the network: cage_lens does not download models.
"""

from __future__ import annotations

from pathlib import Path

from cage_lens.errors import CageLensError, InputError, first_line

__all__ = ["parse_zoo_spec", "cached_hub_name", "spec_directory", "model_from_spec"]


def parse_zoo_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``name[:size][@checkpoint]`` → (name, size, checkpoint)."""
    rest, _, checkpoint = spec.partition("@")
    name, _, size = rest.partition(":")
    if "@" in spec and not checkpoint.lstrip("-").isdigit():
        raise InputError(
            f"{spec!r}: the checkpoint after '@' must be a training step number (e.g. {name}@200), got {checkpoint!r}"
        )
    return name, size or None, int(checkpoint) if checkpoint else None


def cached_hub_name(spec: str) -> str | None:
    """The Hugging Face repo id under which ``spec`` (a repo id or a TransformerLens alias) is in the
    local Hugging Face cache, or ``None``. Looks at the cache only: no network."""
    from huggingface_hub import constants, try_to_load_from_cache

    def cached(repo: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo, "config.json"), str)
        except ValueError:  # not a valid repo id
            return False

    if cached(spec):
        return spec
    if not any(Path(constants.HF_HUB_CACHE).glob("models--*")):
        return None  # nothing cached at all: no need to import TransformerLens to resolve an alias
    for module in ("transformer_lens.supported_models", "transformer_lens.loading_from_pretrained"):
        try:
            official = getattr(__import__(module, fromlist=["get_official_model_name"]), "get_official_model_name")(spec)
        except (ImportError, AttributeError, ValueError):
            continue
        return official if cached(official) else None
    return None


def spec_directory(spec: str) -> Path | None:
    """The local directory a spec names (a zoo model or a Hugging Face directory), or ``None`` for a
    hub name."""
    from cage_lens import zoo

    zoo_names = ", ".join(zoo.tasks())
    if spec.partition("@")[0].partition(":")[0] in zoo.tasks():
        name, size, checkpoint = parse_zoo_spec(spec)
        try:
            return zoo.model_dir(name, size, checkpoint)
        except ValueError as err:
            raise InputError(str(err)) from None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.startswith((".", "/", "~")):
        raise InputError(f"{spec!r} is not a directory (and not a zoo model: {zoo_names})")
    return None


def model_from_spec(spec: str | None):
    """A TL model (eval mode, CPU) from a spec; ``None`` is the zoo's default model."""
    from cage_lens import zoo

    spec = spec or zoo.DEFAULT_MODEL
    try:
        directory = spec_directory(spec)
        if directory is not None:
            from cage_lens.loading import load_hf_directory

            return load_hf_directory(directory)
        repo = cached_hub_name(spec)
        if repo is None:
            raise InputError(
                f"{spec!r} is not a zoo model ({', '.join(zoo.tasks())}), a local model directory, or a model in "
                "the local Hugging Face cache; cage-lens does not download models (fetch it first, e.g. "
                f"`huggingface-cli download {spec}`, or pass a directory)"
            )
        from cage_lens.loading import has_hooked_transformer

        if has_hooked_transformer():
            from transformer_lens import HookedTransformer

            return HookedTransformer.from_pretrained(spec, device="cpu").eval()
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(repo, device="cpu").eval()
    except CageLensError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # a broken or mismatched model on disk
        raise InputError(f"could not load model {spec!r}: {first_line(err)}") from None
