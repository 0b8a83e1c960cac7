"""Documentation links stay inside the repository (issue 10, item 10): every relative link (and image) in
README.md, docs/*.md and the other Markdown files of the repository resolves to a file or folder inside it,
with its ``#anchor`` when it names one; no link is absolute or climbs out of the repository; the README links
the math (docs/math.md)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", ".venv-triton-latest", ".cache", ".pytest_cache", "runs", "build", "dist",
             "node_modules"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def markdown_files():
    files = [p for p in ROOT.rglob("*.md")
             if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return sorted(files)


def links(text):
    """Link targets of Markdown ``text`` (inline links, images, reference definitions), code excluded."""
    text = FENCE.sub("", text)
    text = CODE.sub("", text)
    return INLINE.findall(text) + REFDEF.findall(text)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces to hyphens."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def problems(md, text=None, root=ROOT):
    """What is wrong with the links of ``md`` (a path; ``text`` overrides its contents)."""
    text = md.read_text(encoding="utf-8") if text is None else text
    out = []
    for target in links(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):                # a scheme
            if not target.startswith(("http://", "https://", "mailto:")):
                out.append(f"{target}: not a web link (file:, …)")
            continue
        path, _, fragment = target.partition("#")
        if path.startswith("/") or path.startswith("\\"):
            out.append(f"{target}: absolute path")
            continue
        resolved = (md.parent / path).resolve() if path else md.resolve()
        try:
            resolved.relative_to(root)
        except ValueError:
            out.append(f"{target}: leaves the repository")
            continue
        if not resolved.exists():
            out.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            out.append(f"{target}: no heading #{fragment} in {resolved.relative_to(root)}")
    return out


def test_the_docs_are_found():
    names = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "docs/math.md"} <= names


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(md):
    assert problems(md) == []


def test_readme_links_the_math():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert any(t.split("#")[0] == "docs/math.md" for t in links(readme))
    assert "../shared" not in readme and "DESIGN.md" not in readme


def test_the_checker_catches_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Title here\n## `code` (x): y\n")
    md = tmp_path / "docs" / "a.md"
    text = ("[ok](b.md) [ok](b.md#title-here) [ok](b.md#code-x-y) [ok](../docs) [web](https://example.org)\n"
            "[out](../../outside.md) [abs](/etc/passwd) [missing](c.md) [anchor](b.md#nope) [f](file:///x)\n"
            "![img](../img.png)\n[ref]: ../../shared/DESIGN.md\n`[in code](../../x)`\n```\n[fenced](../../y)\n```\n")
    found = problems(md, text, root=tmp_path.resolve())
    assert len(found) == 7, found
    for bad in ("../../outside.md", "/etc/passwd", "c.md", "b.md#nope", "file:///x", "../img.png",
                "../../shared/DESIGN.md"):
        assert any(f.startswith(bad + ":") for f in found), bad
