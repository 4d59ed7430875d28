"""Export a :class:`~cage_lens.CircuitGraph` in circuit-tracer's graph JSON (the format its frontend
and Neuronpedia read), with collision-free node ids. The mapping is documented in
docs/results.md#circuit-tracer-export.

Files: ``{slug}.json`` (``metadata``, ``qParams``, ``nodes``, ``links``) and ``graph-metadata.json``
(``{"graphs": [metadata, ...]}``; an existing file is updated, other slugs kept).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from cage_lens.errors import InputError

__all__ = ["to_circuit_tracer", "circuit_tracer_dict", "FEATURE_TYPES"]

CIRCUIT_TRACER_SCHEMA = 1
FEATURE_TYPES = {"embeddings": "embedding", "resid_mid": "residual stream", "resid_post": "residual stream",
                 "heads": "attention head", "neurons": "mlp neuron"}
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _frontend_token(token: str) -> str:
    """circuit-tracer's display form: newline, tab and carriage return as visible glyphs."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _layer_names(graph) -> dict[str, str]:
    """Viewer row of each level: ``"E"`` for the embeddings, then ``"0"``, ``"1"`` … in level order."""
    return {name: "E" if i == 0 else str(i - 1) for i, name in enumerate(graph.levels)}


def _clerp(level: str, kind: str, unit: int, token: str) -> str:
    tok = _frontend_token(token).replace('"', "'")
    if kind == "heads":
        return f'{level} H{unit} "{tok}"'
    if kind == "neurons":
        return f'{level} N{unit} "{tok}"'
    return f'{level} "{tok}"'


def _influences(graph, unpruned: bool):
    """Node influence per level (the target node: 1, the weight of the logit node's only input) and
    circuit-tracer's cumulative score over all nodes of the graph."""
    from cage_lens.circuit.pruning import cumulative_influence, node_influence

    per_level = node_influence(graph, unpruned)
    last = graph.nodes[graph.levels[-1]]
    target = ((last.pos == graph.position) & (last.unit < 0)).nonzero().flatten()
    per_level[last.name] = per_level[last.name].clone()
    per_level[last.name][target] = 1.0
    flat = torch.cat(list(per_level.values()))
    cumulative = cumulative_influence(flat)
    out, start = {}, 0
    for name, values in per_level.items():
        out[name] = cumulative[start: start + values.shape[0]]
        start += values.shape[0]
    return out


def circuit_tracer_dict(graph, slug: str = "cage-lens-graph", token_prob: float | None = None) -> dict:
    """The ``{slug}.json`` document as a dict (see :func:`to_circuit_tracer`)."""
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise InputError(f"slug {slug!r} must be 1-128 letters, digits, '.', '_' or '-' (it names the file)")
    if token_prob is not None and not (isinstance(token_prob, (int, float)) and 0.0 <= token_prob <= 1.0):
        raise InputError(f"token_prob must be a probability in [0, 1] or None, got {token_prob!r}")
    unpruned = all(_has_unpruned(graph, es) for es in graph.edge_sets)
    influence = _influences(graph, unpruned)
    layers = _layer_names(graph)
    token_ids = graph.tokens.tolist()
    ids: dict[tuple, str] = {}
    nodes = []
    alive = graph.alive
    for name, level in graph.nodes.items():
        shown = torch.ones_like(alive[name]) if level.kind == "embeddings" else alive[name]
        for n in shown.nonzero().flatten().tolist():
            pos, unit = int(level.pos[n]), int(level.unit[n])
            layer = layers[name]
            if level.kind == "embeddings":
                node_id, js_id, feature = f"E_{token_ids[pos]}_{pos}", f"E_{token_ids[pos]}-{pos}", pos
            else:
                feature = max(unit, 0)
                node_id, js_id = f"{layer}_{feature}_{pos}", f"{layer}_{feature}-{pos}"
            ids[level.key(n)] = node_id
            nodes.append({
                "node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos,
                "feature_type": FEATURE_TYPES.get(level.kind, level.kind), "token_prob": 0.0,
                "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": graph.n_pos - 1 - pos,
                "jsNodeId": js_id, "clerp": "" if level.kind == "embeddings" else _clerp(name, level.kind, unit, graph.str_tokens[pos]),
                "influence": float(influence[name][n]), "activation": float(level.relevance[n]),
            })
    links = []
    for es in graph.edges():
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist()):
            links.append({"source": ids[src.key(s)], "target": ids[tgt.key(t)], "weight": float(v)})
    links.append(_logit(graph, nodes, ids, layers, token_prob))
    metadata = {
        "slug": slug, "scan": f"cage-lens-{graph.rules}", "transcoder_list": [],
        "prompt_tokens": [_frontend_token(t) for t in graph.str_tokens], "prompt": "".join(graph.str_tokens),
        "node_threshold": (graph.settings.get("pruning") or {}).get("node_influence"),
        "schema_version": CIRCUIT_TRACER_SCHEMA,
        "cage_lens": {
            "target": graph.target_description, "target_value": graph.target_value, "rules": graph.rules,
            "level_mode": graph.level_mode, "rows": {layers[name]: name for name in graph.levels},
            "influence_from": "unpruned rows" if unpruned else "kept edges",
            "settings": graph.settings, "provenance": graph.meta,
        },
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _has_unpruned(graph, es) -> bool:
    from cage_lens.circuit.pruning import unpruned_matrix

    return unpruned_matrix(graph, es) is not None


def _logit(graph, nodes: list, ids: dict, layers: dict, token_prob: float | None) -> dict:
    """Append the logit node (what is explained) and return its only link: from the target node,
    weighted by the target node's relevance."""
    settings = (graph.meta or {}).get("settings", {})
    target_ids = settings.get("target_ids") or [None]
    vocab = target_ids[0] if isinstance(target_ids[0], int) else 0
    row = str(len(graph.levels) - 1)
    description = _frontend_token(graph.target_description).replace('"', "'")
    p = "n/a" if token_prob is None else f"{token_prob:.3f}"
    node_id = f"{row}_{vocab}_{graph.position}"
    nodes.append({
        "node_id": node_id, "feature": vocab, "layer": row, "ctx_idx": graph.position, "feature_type": "logit",
        "token_prob": 0.0 if token_prob is None else float(token_prob), "is_target_logit": True, "run_idx": 0,
        "reverse_ctx_idx": graph.n_pos - 1 - graph.position, "jsNodeId": f"L_{vocab}-{graph.position}",
        "clerp": f'Output "{description}" (p={p})', "influence": None, "activation": graph.target_value,
    })
    return {"source": ids[graph.target_node], "target": node_id, "weight": graph.target_value_at_target}


def to_circuit_tracer(graph, directory, slug: str = "cage-lens-graph", token_prob: float | None = None) -> Path:
    """Write ``{directory}/{slug}.json`` and add its metadata to ``{directory}/graph-metadata.json``
    (circuit-tracer's viewer serves that folder). ``token_prob``: the target token's probability, if
    you know it (circuit-tracer shows it on the logit node; otherwise ``p=n/a``). Returns the graph file.

    Nothing is written before every name is checked: the slug (never the index's own name), the
    folder, and an existing index (which must be circuit-tracer's); both files are written atomically."""
    if isinstance(slug, str) and slug.lower() == INDEX_NAME[: -len(".json")]:
        raise InputError(f"slug {slug!r} would overwrite the folder's index {INDEX_NAME}; choose another slug")
    document = circuit_tracer_dict(graph, slug, token_prob)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a folder; give a folder for the graph and its index")
    path, index = directory / f"{slug}.json", directory / INDEX_NAME
    if path.is_dir():
        raise InputError(f"{path} is a folder; choose another slug")
    graphs = _read_index(index)
    graphs = [g for g in graphs if g["slug"] != slug] + [document["metadata"]]
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(document))
    _write_atomically(index, json.dumps({"graphs": graphs}, indent=2))
    return path


INDEX_NAME = "graph-metadata.json"


def _read_index(index: Path) -> list[dict]:
    """The graphs listed in an existing index (none when there is no index); anything but
    circuit-tracer's ``{"graphs": [{"slug": ...}, ...]}`` is refused before a file is written."""
    if not index.exists():
        return []
    try:
        graphs = json.loads(index.read_text(encoding="utf-8"))["graphs"]
        if not isinstance(graphs, list) or not all(isinstance(g, dict) and isinstance(g.get("slug"), str) for g in graphs):
            raise TypeError("its 'graphs' is not a list of graph metadata with slugs")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index} exists but is not a circuit-tracer graph index ({exc}); move it away first") from None
    return graphs


def _write_atomically(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
