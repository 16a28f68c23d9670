"""The user documentation: README stays a short front door, and every relative link in README.md
and docs/*.md points at a file that exists (and at a heading that exists, for #anchors)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(doc):
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, broken


def test_docs_speak_to_newcomers():
    """No project-history talk that a new reader cannot follow."""
    phrases = ("the training issue", "lent machine", "60 MB limit", "this session", "the lead")
    for doc in DOCS:
        text = doc.read_text().lower()
        assert not [p for p in phrases if p in text], doc.name


def test_api_settings_table_is_the_codes():
    """docs/api.md says its settings table is generated from the code: it must be that table."""
    from app.settings import ServiceSettings

    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index("## Settings"):text.index("## Errors")]
    assert ServiceSettings.table().strip() in section
