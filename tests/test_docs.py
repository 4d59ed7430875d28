"""References into docs/ resolve: every ``docs/<page>.md`` named in code, tests, benchmarks or tutorials
exists, and every ``#anchor`` matches a heading of its page (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"docs/([\w-]+\.md)(#[\w-]+)?")


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def references() -> list[tuple[Path, str, str]]:
    files = [p for d in ("cage_lens", "tests", "benchmarks", "tutorials", "scripts") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    return [(f, m.group(1), (m.group(2) or "")[1:]) for f in files for m in REFERENCE.finditer(f.read_text())]


def test_docs_references_resolve():
    refs = references()
    assert refs, "the code points to docs/"
    broken = []
    for source, page, anchor in refs:
        path = ROOT / "docs" / page
        if not path.exists():
            broken.append(f"{source.relative_to(ROOT)}: docs/{page} does not exist")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{source.relative_to(ROOT)}: docs/{page}#{anchor} is not a heading")
    assert broken == []


def test_no_references_to_the_external_spec_or_tracker():
    modules = ["cage_graph", "spans", "metrics", "viz", "failure", "inputs", "targets", "cli"]
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "cage_eval.py",
             ROOT / "benchmarks" / "bench_cage.py", *[ROOT / "cage_lens" / f"{m}.py" for m in modules],
             *(ROOT / "tutorials").glob("*.py"), *(ROOT / "docs").glob("*.md")]
    pattern = re.compile(r"SPEC(\.md| §)|issue \d|item \d")
    assert [str(f.relative_to(ROOT)) for f in files if pattern.search(f.read_text())] == []
