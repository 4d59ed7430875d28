"""Screenshots of every page cage_lens writes, at 1400 × 1000 in headless Chromium, for docs/images/.

    PYTHONPATH=. python scripts/screenshots.py            # -> docs/images/*.png (README links them)

Each page is shot as a reader first sees it (the window, 1400 × 1000); long pages are shot whole as well
(``*-full.png``, 1400 px wide). PNGs are reduced to a 256-colour palette to keep the repository small.
circuit-tracer's own viewer is shot too when ``CAGE_LENS_CIRCUIT_TRACER_PYTHON`` and
``CAGE_LENS_CIRCUIT_TRACER_FRONTEND`` are set (see tests/test_circuit_tracer_frontend.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 1000
IOI_PROMPT = "when mary and john went to the store , john gave a drink to"
FAILING = "after mary and dan went to the house , dan gave a ball to"
LONG_IOI = ("when mary and john went to the store , john gave a drink to mary . "
            "then , anna and tom went to the park , and then tom gave a ball to")  # 34 tokens with <bos>


def pages(work: Path) -> dict[str, tuple[Path, bool]]:
    """``{name: (html file, whole page too)}`` of every page kind."""
    import cage_lens
    from cage_lens import study, zoo
    from cage_lens.cli import main
    from cage_lens.testing import random_model

    ioi, early = zoo.load("ioi"), zoo.load("ioi", checkpoint=100)
    out = {}

    def keep(name: str, page: str, whole: bool = False):
        path = work / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        out[name] = (path, whole)

    keep("attribution", cage_lens.attribute(ioi, IOI_PROMPT, target=" mary", contrast=" john").to_html(), whole=True)
    keep("graph", cage_lens.circuit_graph(ioi, IOI_PROMPT, target=" mary", contrast=" john", levels="half").to_html(), whole=True)
    long_graph = cage_lens.circuit_graph(ioi, LONG_IOI, target=" mary", contrast=" tom", levels="heads")
    assert long_graph.n_pos == 34
    keep("graph-34-tokens", long_graph.to_html())
    words = "the cat sat on the mat and the dog ran to the big red box".split()
    model = random_model("gpt2", n_ctx=128)
    keep("graph-120-tokens", cage_lens.circuit_graph(model, " ".join(words[i % len(words)] for i in range(119)), " mary",
                                                     levels="half").to_html())
    keep("failure", cage_lens.explain_failure(early, FAILING, correct=" mary").to_html(), whole=True)
    for name, args in (("cli-explain", ["explain", IOI_PROMPT, "--contrast", " john", "--no-color"]),
                       ("cli-cage", ["cage", "c > i ; f > m ; i > n ; start c :", "--model", "pointer-chase",
                                     "--completion", " i n"])):
        main([*args, "--out", str(work / f"{name}.html")])
        out[name] = (work / f"{name}.html", True)
    data = zoo.dataset("ioi", 40, seed=5)
    study.run({"step-100": "ioi@100", "final": "ioi"}, data.records, work / "study", checker=data.checker,
              cases_from="step-100", progress=False)
    keep("study-report", study.report(work / "study"), whole=True)
    return out


def shrink(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def circuit_tracer_shot(browser, work: Path, target: Path) -> None:
    """circuit-tracer's own viewer on our export (its server, its page, the libraries served locally)."""
    python, libraries = os.environ.get("CAGE_LENS_CIRCUIT_TRACER_PYTHON"), os.environ.get("CAGE_LENS_CIRCUIT_TRACER_FRONTEND")
    if not (python and libraries):
        print("circuit-tracer viewer: skipped (set CAGE_LENS_CIRCUIT_TRACER_PYTHON and CAGE_LENS_CIRCUIT_TRACER_FRONTEND)")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_circuit_tracer_frontend import _free_port, _serve, route_offline

    import cage_lens
    from cage_lens import zoo

    graph = cage_lens.circuit_graph(zoo.load("ioi"), IOI_PROMPT, target=" mary", contrast=" john", levels="half")
    graph.to_circuit_tracer(work / "graphs", slug="ioi")
    port = _free_port()
    server = _serve(python, work / "graphs", port)
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})

    try:
        route_offline(page, port, Path(libraries))
        page.goto(f"http://127.0.0.1:{port}/index.html?slug=ioi")
        page.wait_for_function("document.querySelectorAll('.node').length > 0", timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(target))
    finally:
        page.close()
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--chromium", default=os.environ.get("CAGE_LENS_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cage-lens-shots-"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            for name, (path, whole) in pages(work).items():
                page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
                page.goto(path.as_uri())
                page.wait_for_load_state("load")
                page.screenshot(path=str(out / f"{name}.png"))
                if whole and page.evaluate("document.documentElement.scrollHeight") > HEIGHT:
                    page.screenshot(path=str(out / f"{name}-full.png"), full_page=True)
                page.close()
            circuit_tracer_shot(browser, work, out / "circuit-tracer-viewer.png")
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = 0
    for png in sorted(out.glob("*.png")):
        shrink(png)
        total += png.stat().st_size
        print(f"{png.relative_to(ROOT)}  {png.stat().st_size // 1024} kB")
    print(f"total {total // 1024} kB")


if __name__ == "__main__":
    main()
