"""circuit-tracer 0.5.0's own viewer opens our exported graphs: its local server
(``circuit_tracer.frontend.serve``, run by the circuit-tracer python of ``CAGE_LENS_CIRCUIT_TRACER_PYTHON``)
serves a folder written by ``CircuitGraph.to_circuit_tracer``, headless Chromium loads its page, and every
node of our file is drawn, with our links attached, and no script error.

The viewer's page (in the PyPI wheel: ``circuit_tracer/frontend/assets``) loads five libraries from the
web: d3 and a d3-jetpack build from transformer-circuits.pub (plus a live-reload client that is not
needed), dagre and pako from unpkg. Nothing is reachable here, so the test answers those requests from
local files built from the npm packages (``.ci/circuit-tracer-frontend``; ``.ci/run`` builds them into
``CAGE_LENS_CIRCUIT_TRACER_FRONTEND``) and fails on any other request that leaves the machine. Where the
circuit-tracer python, the libraries or Chromium are missing it skips and says why; CI sets
``CAGE_LENS_REQUIRE_CIRCUIT_TRACER=1`` and ``CAGE_LENS_REQUIRE_BROWSER=1``, which turn skips into failures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cage_lens.circuit.builder import circuit_graph
from test_browser import ARGS, CHROMIUM, browser  # noqa: F401 - the module's browser fixture
from test_circuit_tracer_export import circuit_tracer_python

PROMPT = "when mary and john went to the store , john gave a drink to"
#: what the viewer's index.html fetches from the web -> the local file that stands in (None: an empty script)
LIBRARIES = {
    "/static_js/lib/hotserver-client-ws.js": None,  # live reload while developing the viewer
    "/static_js/lib/d3.js": "d3-jetpack-bundle.js",
    "/static_js/lib/jetpack_2024-07-20.js": None,  # in the bundle above
    "/static_js/lib/npy_v0.js": None,  # .npy feature examples: not used for graphs
    "/dagre@0.8.5/dist/dagre.min.js": "dagre.min.js",
    "/pako@2.1.0/dist/pako.min.js": "pako.min.js",
}


def _libraries() -> Path:
    folder = os.environ.get("CAGE_LENS_CIRCUIT_TRACER_FRONTEND")
    missing = [name for name in LIBRARIES.values() if name and not (folder and (Path(folder) / name).is_file())]
    if missing:
        reason = (f"circuit-tracer's viewer libraries ({', '.join(missing)}) are not in CAGE_LENS_CIRCUIT_TRACER_FRONTEND="
                  f"{folder!r}; .ci/run builds them from .ci/circuit-tracer-frontend with npm")
        if os.environ.get("CAGE_LENS_REQUIRE_CIRCUIT_TRACER") == "1":
            pytest.fail(reason + "; CAGE_LENS_REQUIRE_CIRCUIT_TRACER=1 requires them")
        pytest.skip(reason)
    return Path(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(python: str, directory: Path, port: int) -> subprocess.Popen:
    code = ("import sys, time\nfrom circuit_tracer.frontend import serve\n"
            f"serve({str(directory)!r}, port={port})\nwhile True: time.sleep(1)")
    server = subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None:
            pytest.fail(f"circuit-tracer's server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.1)
    server.kill()
    pytest.fail("circuit-tracer's server did not listen within 20 s")


def route_offline(page, port: int, libraries: Path) -> list[str]:
    """Answer the viewer's requests: its own server passes, the web libraries come from ``libraries``,
    anything else is refused and listed (the returned list fills as the page loads)."""
    outside = []

    def answer(route):
        url = route.request.url
        if url.startswith(f"http://127.0.0.1:{port}/"):
            return route.continue_()
        for suffix, name in LIBRARIES.items():
            if url.endswith(suffix):
                body = "" if name is None else (libraries / name).read_text(encoding="utf-8")
                return route.fulfill(status=200, content_type="application/javascript", body=body)
        outside.append(url)
        return route.abort()

    page.route("**/*", answer)
    return outside


@pytest.mark.parametrize("levels", ["half", "heads"])
def test_circuit_tracer_viewer_draws_our_graph(browser, tmp_path, levels):  # noqa: F811 - fixture
    from conftest import cached_model

    python = circuit_tracer_python()
    libraries = _libraries()
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", contrast=" john", levels=levels)
    graph.to_circuit_tracer(tmp_path / "graphs", slug="ours")
    doc = json.loads((tmp_path / "graphs" / "ours.json").read_text())
    port = _free_port()
    server = _serve(python, tmp_path / "graphs", port)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        outside = route_offline(page, port, libraries)
        page.goto(f"http://127.0.0.1:{port}/index.html?slug=ours")
        page.wait_for_function(f"document.querySelectorAll('.node').length >= {len(doc['nodes'])}", timeout=30_000)
        drawn = page.evaluate("[...document.querySelectorAll('.node')].map(e => e.__data__.node_id)")
        assert sorted(drawn) == sorted(n["node_id"] for n in doc["nodes"])
        # the viewer attached our links to our nodes (its own bookkeeping on the drawn nodes)
        links = page.evaluate("[...document.querySelectorAll('.node')].reduce((n, e) => n + e.__data__.sourceLinks.length, 0)")
        assert links == len(doc["links"])
        assert errors == [] and outside == []
    finally:
        context.close()
        server.kill()
        server.wait(timeout=10)
