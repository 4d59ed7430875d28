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
    """Heading slugs and explicit ``<a id="...">`` anchors."""
    text = page.read_text()
    headings = {slug(re.sub(r"<[^>]+>", "", line.lstrip("#"))) for line in text.splitlines() if line.startswith("#")}
    return headings | set(re.findall(r'<a id="([\w-]+)"></a>', text))


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
    """The repository is read on its own: no pointers to the project's external reference, to tracker
    items, or to paths of a developer's machine."""
    files = [p for d in ("cage_lens", "tests", "benchmarks", "tutorials", "scripts", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md") and p.name != "test_docs.py"]
    files += [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / ".ci" / "run"]
    pattern = re.compile(r"SPEC(\.md| §)|issue \d|item \d|/work/venvs")
    assert [str(f.relative_to(ROOT)) for f in files if pattern.search(f.read_text())] == []


def test_readme_coverage_summary_is_the_generated_one():
    """The README's family table is what ``scripts/coverage.py`` renders from the committed raw results."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("coverage_script", ROOT / "scripts" / "coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(script.README_START), readme.index(script.README_END) + len(script.README_END)
    assert readme[start:end] == script.render_summary()
    assert (ROOT / "benchmarks" / "results" / "coverage.md").read_text() == script.render() + "\n"
