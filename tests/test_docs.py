"""The README and docs/ say what runs: every ```python block runs as written, every
printed value matches the comment on its print line, and every relative link resolves.

A block runs in-process in a fresh namespace. A block meant to show an error catches it
and prints it, so a block that raises is a failure. Where a print line carries a trailing
comment, the comment must start with what the print wrote (`print(x.grad)  # None: ...`).
Blocks that use CUDA skip where torch sees no GPU.
"""

from __future__ import annotations

import builtins
import io
import linecache
import re
import sys
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def blocks() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first code line
            name = f"{page.relative_to(ROOT)}:{line}"
            found.append(pytest.param(name, match.group(1), line, id=name))
    return found


def trailing_comments(code: str) -> dict[int, str]:
    """Line number (1-based, in the block) -> the text of that line's comment."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return comments


@pytest.mark.parametrize("name, code, first_line", blocks())
def test_code_block_runs_as_written(name: str, code: str, first_line: int) -> None:
    if "cuda" in code and not torch.cuda.is_available():
        pytest.skip("the block uses CUDA; torch sees no GPU")
    printed: list[tuple[int, str]] = []

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != name:  # a print inside a lambda
            frame = frame.f_back
        printed.append((frame.f_lineno if frame else 0, sep.join(map(str, args))))
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)

    namespace = {"__name__": "__docs__", "print": recording_print}
    # torch.jit.script reads a function's source through inspect, which reads linecache.
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 (the docs' own code)
    comments = trailing_comments(code)
    for line, text in printed:
        comment = comments.get(line)
        if comment is not None:
            where = f"{name.split(':')[0]}:{first_line + line - 1}"
            assert comment.startswith(text), f"{where}: printed {text!r}, the comment says {comment!r}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # not comments in code
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_page_is_checked_and_docs_pages_open_with_a_summary() -> None:
    assert len(PAGES) >= 5 and all(p.exists() for p in PAGES)
    for page in PAGES[1:]:
        paragraphs = page.read_text().split("\n\n")
        assert paragraphs[0].startswith("# ") and len(paragraphs[1].split()) > 40, (
            f"{page.name}: a title, then a one-paragraph summary"
        )
