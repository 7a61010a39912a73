"""The README stays a front page, and the documentation's links and module paths point at files that exist.

Plain file reads: no import of the package, so a moved module fails here by name, not by an ImportError.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "architecture.md"
README_MAX_LINES = 300
CHECKED_PREFIXES = ("platform/", "jobs/", "pipelines/", "infra/", "tests/")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# [text](target) or [text](target "title"); an image's ![alt](src) is a link too.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def prose(text: str) -> str:
    """The text without fenced code blocks: a link or a path inside an example is not the page's own."""
    return FENCE.sub("", text)


def relative_links(text: str) -> list[str]:
    """The targets of the page's relative links, anchors stripped (same-page anchors are dropped)."""
    targets = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path = target.split("#", 1)[0]
        if path:
            targets.append(path)
    return targets


def backtick_paths(text: str) -> list[str]:
    """Repository paths named in inline code: the span's first word, when it starts with a checked folder."""
    paths = []
    for _, span in CODE_SPAN.findall(prose(text)):
        words = span.split()
        if words and words[0].startswith(CHECKED_PREFIXES):
            paths.append(words[0].rstrip(".,;:"))
    return paths


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_at_most_300_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the depth into docs/ and link it"
    )


def test_relative_links_point_at_files_that_exist() -> None:
    broken = []
    for page in doc_pages():
        for target in relative_links(page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_architecture_names_only_paths_that_exist() -> None:
    missing = sorted({p for p in backtick_paths(ARCHITECTURE.read_text(encoding="utf-8")) if not (REPO / p).exists()})
    assert not missing, "docs/architecture.md names paths that do not exist:\n" + "\n".join(missing)


def test_the_checks_see_what_they_check() -> None:
    """The checks above pass vacuously if their patterns stop matching: they must find the README's links into
    docs/, the architecture's module paths, and a broken link or path in a page made to hold one."""
    readme = README.read_text(encoding="utf-8")
    assert {t for t in relative_links(readme) if t.startswith("docs/")} >= {"docs/architecture.md"}
    assert len(backtick_paths(ARCHITECTURE.read_text(encoding="utf-8"))) >= 20

    sample = (
        "See [ops](docs/operations.md#faults) and [web](https://example.com/x.md), [here](#top).\n"
        "```\n[in a fence](docs/fenced.md) `platform/fenced.py`\n```\n"
        "The driver is `platform/metaformer_platform/launch/driver.py`, run as `jobs/pretrain.py --config x`;\n"
        "``platform/metaformer_platform/storage/`` and `python jobs/export.py` (not a path).\n"
    )
    assert relative_links(sample) == ["docs/operations.md"]
    assert backtick_paths(sample) == [
        "platform/metaformer_platform/launch/driver.py", "jobs/pretrain.py", "platform/metaformer_platform/storage/",
    ]
