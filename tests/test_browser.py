"""The interactive views in a real browser (headless Chromium driven by Playwright): pages load without
errors or network requests, draw every node, show the tooltip on hover, highlight exactly the paths to
the target on click, and the slider hides exactly the edges under the threshold. Hostile tokens stay text.
At 1400 × 1000 every drawn node of a 34- and a 120-token graph lies inside the window (also after zooming
and fitting again), tooltips stay inside the window, text on coloured cells meets WCAG's 4.5:1 contrast
(from the rendered colours), every heatmap has a colour bar that states its scale, and the graph page says
how it was pruned and can show more.

Skips only where Chromium or Playwright's Python package is missing, and says which; with
``CAGE_LENS_REQUIRE_BROWSER=1`` (set by CI) a missing browser fails instead.
"""

from __future__ import annotations

import json
import os
import shutil

import networkx as nx
import pytest

from cage_lens.attribution import attribute
from cage_lens.generation.graph import cage
from cage_lens.circuit.builder import circuit_graph
from cage_lens.views.viewer import PAGE_BUDGET_BYTES, visible
from cage_lens.views.html import html_page
from cage_lens.testing import random_model
from conftest import cached_model

PROMPT = "the cat sat on the mat and john"
CHROMIUM = os.environ.get("CAGE_LENS_CHROMIUM", "/usr/bin/chromium")
WIDTH, HEIGHT = 1400, 1000
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _unavailable(reason: str):
    if os.environ.get("CAGE_LENS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; CAGE_LENS_REQUIRE_BROWSER=1 requires the browser tests to run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (pip install playwright)")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium, or set CAGE_LENS_CHROMIUM)")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as exc:  # noqa: BLE001 - any launch failure means: no usable browser here
            _unavailable(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


class Page:
    """A loaded page with everything it logged, requested or tried to pop up."""

    def __init__(self, browser, path, javascript: bool = True):
        self.context = browser.new_context(java_script_enabled=javascript, viewport={"width": WIDTH, "height": HEIGHT})
        self.page = self.context.new_page()
        self.errors, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def views(self) -> list[dict]:
        return self.page.evaluate("[...document.querySelectorAll('.cl-data')].map(s => JSON.parse(s.textContent))")

    def close(self):
        self.context.close()


def write(tmp_path, name: str, page: str):
    path = tmp_path / name
    path.write_text(page, encoding="utf-8")
    return path


def expected_path(data: dict, start: int, visible_edges=None) -> tuple[set, set]:
    """Nodes and edges on some path from ``start`` to a target, over the (visible) edges."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(data["nodes"])))
    for k, (s, t, _, tier) in enumerate(data["edges"]):
        if tier == 0 and (visible_edges is None or k in visible_edges):
            g.add_edge(s, t, k=k)
    g.remove_nodes_from([n for n, d in enumerate(data["nodes"]) if d["tier"] > 0])
    below = nx.descendants(g, start) | {start}
    above = set().union(*[nx.ancestors(g, t) | {t} for t in data["targets"]])
    nodes = below & above
    return nodes, {d["k"] for s, t, d in g.edges(data=True) if s in nodes and t in nodes}


def displayed(page, selector: str) -> int:
    """Elements drawn (CSS display is not none; a vertical line has an empty box, so no :visible)."""
    return page.evaluate(f"[...document.querySelectorAll(\"{selector}\")].filter(e => getComputedStyle(e).display !== 'none').length")


def tier_count(items) -> int:
    """Nodes (dicts) or edges (lists) of the graph as built: tier 0."""
    return sum(1 for x in items if (x["tier"] if isinstance(x, dict) else x[3]) == 0)


def highlighted(page, kind: str) -> set:
    return set(page.evaluate(f"[...document.querySelectorAll('.cl-on[data-{kind}]')].map(e => +e.getAttribute('data-{kind}'))"))


def check_interactions(view: Page, data: dict, start: int) -> None:
    page = view.page
    n_edges = sum(1 for e in data["edges"] if e[3] == 0)
    assert page.locator(".cage-lens-view.cl-live").count() == 1  # the script ran
    assert page.get_attribute(".cage-lens-view", "data-visible-edges") == str(n_edges)
    assert page.locator(".cl-slider").is_visible()
    # hover: the tooltip shows the node's label and value
    node = page.locator(f"svg.cl-graph [data-i='{start}']")
    node.hover()
    tip = page.locator(".cl-tip")
    assert tip.is_visible()
    value = data["nodes"][start]["value"]
    assert data["nodes"][start]["label"] in tip.inner_text()
    assert page.evaluate(f"Number({value}).toPrecision(4)") in tip.inner_text()
    # click: exactly the nodes and edges on paths from the node to the target
    node.click()
    nodes, edges = expected_path(data, start)
    assert len(nodes) >= 2 and set(data["targets"]) <= nodes
    assert highlighted(page, "i") == nodes and highlighted(page, "e") == edges
    # slider at half: exactly the edges with |value| ≥ half the largest stay, the highlight follows
    page.locator(".cl-slider").fill("500")
    cut = 0.5 * data["maxEdge"]
    shown = {k for k, e in enumerate(data["edges"]) if abs(e[2]) >= cut and e[3] == 0}
    assert 0 < len(shown) < n_edges
    assert page.get_attribute(".cage-lens-view", "data-visible-edges") == str(len(shown))
    drawn = page.evaluate("[...document.querySelectorAll('[data-e]')].filter(e => e.style.display !== 'none').length")
    assert drawn == len(shown)
    assert highlighted(page, "e") == expected_path(data, start, shown)[1]
    # a click on the background clears the highlight
    page.locator("svg.cl-graph").click(position={"x": 2, "y": 2})
    assert not highlighted(page, "i")


# ---------------------------------------------------------------------------- pages
@pytest.mark.parametrize("levels", ["half", "heads"])
def test_circuit_graph_page(browser, tmp_path, levels):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", levels=levels, top_p=0.9)
    view = Page(browser, write(tmp_path, "graph.html", graph.to_html()))
    try:
        (data,) = view.views()
        assert view.page.locator("svg.cl-graph [data-i]:visible").count() == len(graph.node_list()) == tier_count(data["nodes"])
        assert displayed(view.page, "svg.cl-graph [data-e]") == sum(len(es) for es in graph.edges()) == tier_count(data["edges"])
        # an input token whose node reaches the target through at least two edges
        g = graph.to_networkx()
        start_key = max((k for k in g if k[0] == "embeddings"), key=lambda k: len(nx.descendants(g, k)))
        labels = [n["label"] for n in data["nodes"]]
        from cage_lens.views.graphs import node_label

        check_interactions(view, data, labels.index(node_label(start_key)))
        assert view.errors == [] and view.dialogs == []
        assert all(url.startswith("file:") for url in view.requests), view.requests
    finally:
        view.close()


def test_generation_graph_page(browser, tmp_path):
    g = cage(cached_model("gpt2"), PROMPT, completion=" mary went . john sat .")
    path = write(tmp_path, "gen.html", g.to_html())
    view = Page(browser, path)
    try:
        (data,) = view.views()
        assert view.page.locator("svg.cl-graph [data-i]").count() == g.n_prompt + g.n_generated
        assert len(data["edges"]) == int((g.adjacency != 0).sum())
        start = max(range(g.n_prompt), key=lambda j: len(expected_path(data, j)[0]))
        check_interactions(view, data, start)
        strip = view.page.locator(".cl-strip span")
        assert strip.count() == g.n_prompt + g.n_generated
        assert view.errors == [] and view.dialogs == []
        assert all(url.startswith("file:") for url in view.requests), view.requests
    finally:
        view.close()


def test_attribution_page_and_two_notebook_outputs(browser, tmp_path):
    attr = attribute(cached_model("llama"), [PROMPT, "the dog ran"], target=" mat")
    view = Page(browser, write(tmp_path, "attr.html", attr.to_html()))
    try:
        assert view.page.locator(".cl-strip span").count() == sum(attr.lengths)
        assert view.errors == [] and view.dialogs == []
    finally:
        view.close()
    # two graph outputs in one notebook page: both come alive, the script is defined once
    model = cached_model("gpt2")
    one, two = (circuit_graph(model, PROMPT, " mary", levels=lv) for lv in ("block", "half"))
    page = html_page("notebook", one._repr_html_() + two._repr_html_())
    view = Page(browser, write(tmp_path, "notebook.html", page))
    try:
        assert view.page.locator(".cage-lens-view.cl-live").count() == 2
        assert view.page.locator("svg.cl-graph [data-i]:visible").count() == len(one.node_list()) + len(two.node_list())
        assert view.errors == []
    finally:
        view.close()


def test_static_fallback_without_scripts(browser, tmp_path):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", levels="half")
    view = Page(browser, write(tmp_path, "static.html", graph.to_html()), javascript=False)
    try:
        assert view.page.locator("svg.cl-graph circle[data-i]:visible").count() == len(graph.node_list())
        assert not view.page.locator(".cl-slider").is_visible()  # no dead controls
        titles = view.page.evaluate("[...document.querySelectorAll('svg.cl-graph circle[data-i]:not([data-tier]) > title')].length")
        assert titles == len(graph.node_list())  # native tooltips carry the values
    finally:
        view.close()


HOSTILE = ["<script>alert(1)</script>", "\"'><img src=x onerror=alert(2)>", "a\x00b\x1bc", "</script><b>x", "\u2028&amp;"]


def test_hostile_tokens_stay_text(browser, tmp_path):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", levels="block", top_p=None, node_threshold=None)
    graph.str_tokens = HOSTILE + graph.str_tokens[len(HOSTILE):]
    attr = attribute(cached_model("gpt2"), PROMPT, target=" mat")
    attr.str_tokens = [HOSTILE + attr.str_tokens[0][len(HOSTILE):]]
    for name, page in (("graph.html", graph.to_html()), ("attr.html", attr.to_html())):
        view = Page(browser, write(tmp_path, name, page))
        try:
            assert view.dialogs == [] and view.errors == []
            assert view.page.locator("img").count() == 0 and view.page.locator("b").count() == (1 if name == "attr.html" else 0)
            strip = view.page.evaluate("[...document.querySelectorAll('.cl-strip span')].map(s => s.textContent)")
            assert strip[: len(HOSTILE)] == [visible(t).replace(" ", "\xa0") for t in HOSTILE]
            if name == "graph.html":
                (data,) = view.views()
                first = next(i for i, n in enumerate(data["nodes"]) if n["label"] == "embeddings@0")
                view.page.locator(f"svg.cl-graph [data-i='{first}']").hover()
                assert json.dumps(HOSTILE[0]) in view.page.locator(".cl-tip").inner_text()
        finally:
            view.close()


# ---------------------------------------------------------------------------- fit, tooltips, contrast
def _long_prompt(n_tokens: int) -> str:
    words = "the cat sat on the mat and the dog ran to the big red box".split()
    return " ".join(words[i % len(words)] for i in range(n_tokens - 1))  # + BOS


def _rects(page, selector: str) -> list[dict]:
    return page.evaluate(f"""[...document.querySelectorAll("{selector}")].filter(e => e.getClientRects().length)
        .map(e => {{ const r = e.getBoundingClientRect(); return {{left: r.left, top: r.top, right: r.right, bottom: r.bottom}}; }})""")


def _inside(rect: dict) -> bool:
    return rect["left"] >= 0 and rect["top"] >= 0 and rect["right"] <= WIDTH and rect["bottom"] <= HEIGHT


@pytest.mark.parametrize("n_tokens", [34, 120])
def test_every_node_and_the_target_fit_the_window(browser, tmp_path, n_tokens):
    model = random_model("gpt2", n_ctx=128)
    graph = circuit_graph(model, _long_prompt(n_tokens), " mary", levels="half")
    assert graph.n_pos == n_tokens
    view = Page(browser, write(tmp_path, "graph.html", graph.to_html()))
    try:
        page = view.page
        nodes = _rects(page, "svg.cl-graph [data-i]")
        assert len(nodes) == len(graph.node_list())
        assert [r for r in nodes if not _inside(r)] == []
        (target,) = _rects(page, "svg.cl-graph .cl-target")
        assert _inside(target)
        assert _inside(_rects(page, "svg.cl-graph")[0])  # the whole drawing, labels included
        # zoom in: the view shows less; "fit" brings every node back
        page.locator(".cl-zoom-in").click()
        page.locator(".cl-zoom-in").click()
        assert [r for r in _rects(page, "svg.cl-graph [data-i]") if not _inside(r)] != []
        page.locator(".cl-fit").click()
        assert [r for r in _rects(page, "svg.cl-graph [data-i]") if not _inside(r)] == []
        assert view.errors == []
    finally:
        view.close()


def test_tooltips_stay_inside_the_window(browser, tmp_path):
    graph = circuit_graph(random_model("gpt2", n_ctx=128), _long_prompt(34), " mary", levels="heads", top_p=0.9)
    view = Page(browser, write(tmp_path, "graph.html", graph.to_html()))
    try:
        page = view.page
        (data,) = view.views()
        boxes = _rects(page, "svg.cl-graph [data-i]")
        shown = [i for i, n in enumerate(data["nodes"]) if n["tier"] == 0]
        corners = {max(shown, key=lambda i: boxes[shown.index(i)]["right"]), data["targets"][0],
                   max(shown, key=lambda i: boxes[shown.index(i)]["bottom"]), min(shown, key=lambda i: boxes[shown.index(i)]["left"])}
        for i in corners:
            page.locator(f"svg.cl-graph [data-i='{i}']").hover()
            tip = _rects(page, ".cl-tip")
            assert len(tip) == 1 and _inside(tip[0]), (i, tip)
        # a node at the bottom edge of the window: the tooltip moves up instead of running out
        lowest = max(shown, key=lambda i: boxes[shown.index(i)]["bottom"])
        page.mouse.move(1, 1)
        shift = HEIGHT - 12 - boxes[shown.index(lowest)]["bottom"]
        page.evaluate(f"(() => {{ const d = document.createElement('div'); d.style.height = '{shift}px'; document.body.prepend(d); }})()")
        node = _rects(page, f"svg.cl-graph [data-i='{lowest}']")[0]
        assert HEIGHT - 40 < node["bottom"] <= HEIGHT
        page.mouse.move((node["left"] + node["right"]) / 2, (node["top"] + node["bottom"]) / 2)
        tip = _rects(page, ".cl-tip")
        assert len(tip) == 1 and _inside(tip[0]) and tip[0]["top"] < node["top"], tip
    finally:
        view.close()


def _contrast_failures(page) -> list:
    """Every text element on a coloured background whose rendered colours contrast less than 4.5:1."""
    from cage_lens.views.terminal import contrast_ratio

    cells = page.evaluate("""[...document.querySelectorAll('span, td, th, div')]
        .filter(e => e.textContent.trim() && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(e => { const s = getComputedStyle(e); return [e.textContent.slice(0, 20), s.color, s.backgroundColor]; })
        .filter(([_, c, b]) => b !== 'rgba(0, 0, 0, 0)' && !b.startsWith('rgba'))""")
    assert cells, "the page has text on coloured cells"
    return [(text, fg, bg, round(contrast_ratio(fg, bg), 2)) for text, fg, bg in cells if contrast_ratio(fg, bg) < 4.5]


def _bars_before_heatmaps(page) -> list:
    """Heatmaps (token strips, tables with coloured cells) without a colour bar before them, since the last
    table heatmap; and colour bars that do not state a scale."""
    return page.evaluate("""(() => {
        const items = [...document.querySelectorAll('.cl-bar, .cl-strip, table')]
            .filter(e => !e.matches('table') || e.querySelector("td[style*='background']"));
        const missing = []; let bar = false;
        for (const e of items) {
            if (e.matches('.cl-bar')) { if (!e.textContent.includes('±')) missing.push('no scale: ' + e.textContent); bar = true; continue; }
            if (!bar) missing.push(e.className || e.tagName);
            if (e.matches('table')) bar = false;
        }
        return missing; })()""")


def _pages(tmp_path) -> dict:
    from cage_lens.failure import explain_failure

    model = cached_model("gpt2")
    study_page = _study_report_page(tmp_path)
    hostile = attribute(model, PROMPT, target=" mat")
    return {
        "attribution": attribute(model, [PROMPT, "the dog ran"], target=" mat").to_html(),
        "graph": circuit_graph(model, PROMPT, " mary", levels="half").to_html(),
        "failure": explain_failure(model, PROMPT, wrong=" dog", correct=" cat").to_html(),
        "cage": cage(model, PROMPT, completion=" mary went . john sat .").to_html(),
        "notebook": html_page("notebook", hostile._repr_html_()),
        "study report": study_page,
    }


def _study_report_page(tmp_path) -> str:
    from cage_lens import study
    from cage_lens.zoo.datasets import dataset

    data = dataset("ioi", 12, seed=0)
    out = tmp_path / "study"
    study.run({"early": "ioi@100", "final": "ioi"}, data.records, out, checker=data.checker, cases_from="early",
              progress=False)
    return study.report(out, examples=2)


def test_every_page_reads_text_on_colour_and_explains_its_heatmaps(browser, tmp_path):
    for name, page in _pages(tmp_path).items():
        view = Page(browser, write(tmp_path, f"{name}.html", page))
        try:
            assert _contrast_failures(view.page) == [], name
            assert _bars_before_heatmaps(view.page) == [], name
            assert view.errors == [], name
        finally:
            view.close()


def test_the_graph_page_says_how_it_was_pruned_and_shows_more(browser, tmp_path):
    from cage_lens import zoo

    model = zoo.load("ioi")
    graph = circuit_graph(model, "when mary and john went to the store , john gave a drink to", " mary",
                          contrast=" john", levels="half")
    assert ("embeddings", 4) not in {k for k, _ in graph.node_list()}  # 'john'@4: second in the heatmap
    view = Page(browser, write(tmp_path, "graph.html", graph.to_html()))
    try:
        page = view.page
        notes = page.locator(".cl-note").all_inner_texts()
        assert any("top_p=0.85" in n and "node_threshold=0.01" in n for n in notes)
        assert any("'john'@4" in n for n in notes)  # named among the tokens without a node
        options = page.locator(".cl-tier option").all_inner_texts()
        assert len(options) >= 2 and options[-1].startswith("every computed edge")
        (data,) = view.views()
        page.locator(".cl-tier").select_option(str(len(options) - 1))
        everything = graph.prune(top_p=1.0)
        union = {k for k, _ in graph.node_list()} | {k for k, _ in everything.node_list()}
        assert page.locator("svg.cl-graph [data-i]:visible").count() == len(union) == len(data["nodes"])
        john = [n["label"] for n in data["nodes"]].index("embeddings@4")
        assert page.locator(f"svg.cl-graph [data-i='{john}']").is_visible()
        edges = sum(len(es) for es in everything.edges())
        assert page.get_attribute(".cage-lens-view", "data-visible-edges") == str(edges)
        # every metric column is explained on the page
        heads = page.evaluate("[...document.querySelectorAll('table th')].map(t => t.textContent)")
        defined = page.locator("dl.cl-defs dt").all_inner_texts()
        assert {"verticality", "tokens 90%", "look-back", "hubs"} <= set(defined) and set(defined) <= set(heads)
    finally:
        view.close()


# ---------------------------------------------------------------------------- size (no browser needed)
def test_pages_stay_under_the_budget_and_say_what_they_left_out():
    graph = circuit_graph(cached_model("gpt2"), " ".join([PROMPT] * 4), " mary", levels="heads", top_p=None, node_threshold=None)
    n_edges = sum(len(es) for es in graph.edges())
    page = graph.to_html()
    assert n_edges > 1500 and len(page.encode("utf-8")) <= PAGE_BUDGET_BYTES
    data = json.loads(page.split("class='cl-data'>")[1].split("</script>")[0])
    assert f"Showing the {len(data['edges'])} strongest edges of {n_edges}" in page
    kept = sorted((abs(e[2]) for e in data["edges"]), reverse=True)
    every = sorted((abs(v) for es in graph.edges() for v in es.values.tolist()), reverse=True)
    assert kept == every[: len(kept)]  # the strongest are the ones drawn
