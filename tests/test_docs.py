"""The documentation holds together: README.md stays short, and every relative link resolves.

A link resolves when its file exists and, for `file#anchor` or `#anchor`, when the target has a
heading whose GitHub anchor is that anchor.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_WORDS = 2000

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, characters other than
    letters, digits, `_`, `-` and spaces dropped, each space turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    targets = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = REFERENCE_DEF.match(line)
        if m:
            targets.append(m.group(1))
            continue
        targets += INLINE_LINK.findall(INLINE_CODE.sub("", line))
    return [t for t in targets if not EXTERNAL.match(t)]


def broken_links(path: Path) -> list[str]:
    """`path: link (why)` for each relative link of `path` that does not resolve."""
    problems = []
    for link in relative_links(path):
        file_part, _, anchor = link.partition("#")
        target = (path.parent / file_part).resolve() if file_part else path
        if not target.exists():
            problems.append(f"{path.relative_to(REPO)}: {link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{path.relative_to(REPO)}: {link} (no heading #{anchor} in {target.name})")
        elif anchor and target.suffix != ".md":
            problems.append(f"{path.relative_to(REPO)}: {link} (anchor into a file that is not Markdown)")
    return problems


def test_readme_has_at_most_2000_words():
    words = len((REPO / "README.md").read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words; move detail into docs/"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert path.exists()
    assert not broken_links(path), "\n".join(broken_links(path))


def test_anchor_rules_follow_github():
    assert github_anchor("Flags of `causal_train.py`") == "flags-of-causal_trainpy"
    assert github_anchor("Where the time goes now (12×768 → 6 layers, 4×128, CPU)") == (
        "where-the-time-goes-now-12768--6-layers-4128-cpu"
    )
    assert github_anchor("Stopping, preemption and requeueing") == "stopping-preemption-and-requeueing"
    assert github_anchor("See [data](data.md) here") == "see-data-here"


def test_link_checker_reports_missing_files_and_headings(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "target.md").write_text("# Title\n\n## Same\n\n## Same\n\n```\n# Not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](target.md#title) [ok](target.md#same-1) [self](#top) [web](https://example.com/x)\n"
        "`[code](missing.md)`\n\n# Top\n\n"
        "[gone](missing.md) [bad](target.md#same-2) [fenced](target.md#not-a-heading)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: target.md#same-2 (no heading #same-2 in target.md)",
        "page.md: target.md#not-a-heading (no heading #not-a-heading in target.md)",
    ]


def test_the_readme_layout_names_every_module_and_folder_of_the_tree():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = set(block.split())
    modules = {p.name for p in REPO.glob("*.py")}
    folders = {f"{p.name}/" for p in REPO.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")}
    folders -= {"__pycache__/"}
    missing = sorted((modules | folders) - named)
    assert not missing, f"README layout misses {missing}"
    first = {line.split()[0] for line in block.splitlines() if line.strip()}
    stale = sorted(n for n in first if n.endswith(".py") and n not in modules)
    assert not stale, f"README layout names modules that do not exist: {stale}"
