"""Every benchmark figure on the README and docs/ is the committed one.

benchmarks/update_readme.py writes each figure a page takes from a benchmark between two
markers, from benchmarks/results/<device>/results.json. A figure copied by hand drifts
from the results it came from (the pages once gave three costs for one call), so:

- the generated regions must be what the committed results give (the script's --check);
- outside them, a page may not state a timing (`300 ns`, `1.6-1.9 us`) or a ratio
  (`0.6 of detach()'s time`, `9x`, `26%`): such a figure goes in a generated region, or
  its source (an example, a CI run) belongs to a page this test does not scan.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import update_readme  # noqa: E402

# README's "Run it" and "Examples" give what `make` and the examples take and print on a
# stated machine, measured by those runs, not by the benchmark; docs/install.md likewise
# (build and test times). Everything else on these pages is scanned.
SCANNED = {
    ROOT / "README.md": ("## Run it", "## Examples"),
    ROOT / "docs" / "semantics.md": (),
    ROOT / "docs" / "benchmarks.md": (),
    ROOT / "docs" / "stack.md": (),
}
RANGE = r"(?:\s?(?:-|–|to)\s?\d*\.?\d+)?"
FIGURE = re.compile(
    rf"\d*\.?\d+{RANGE}\s?(?:ns|us|µs|μs|ms)\b"  # a time: 300 ns, 1.6-1.9 us
    rf"|\b\d*\.?\d+{RANGE}\s?(?:x|×|times)(?![\w(])"  # a factor: 9x, 1.5 times
    rf"|\b\d*\.\d+{RANGE}\s+of\b"  # a fraction: 0.6 of detach()'s time
    rf"|\b\d*\.?\d+{RANGE}\s?%(?!\s*(?:bootstrap\s+)?interval)"  # a share, but not a 95% interval's name
)
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)


def blank(match: re.Match) -> str:
    """The match's text with everything but line breaks removed, so line numbers hold."""
    return re.sub(r"[^\n]", " ", match.group(0))


def hand_written_figures(text: str, skipped_sections: tuple[str, ...] = ()) -> list[str]:
    """'line N: figure' for each timing or ratio outside generated regions and code blocks."""
    text = update_readme.REGION.sub(blank, text)
    text = FENCE.sub(blank, text)
    for heading in skipped_sections:
        text = re.sub(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", blank, text, flags=re.S | re.M)
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in FIGURE.finditer(text)]


def test_generated_figures_are_the_committed_results() -> None:
    assert not update_readme.stale(), "run python benchmarks/update_readme.py"


def test_update_readme_check_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_readme.py"), "--check"],
                         cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("page", SCANNED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_figure_is_written_by_hand(page: Path) -> None:
    found = hand_written_figures(page.read_text(), SCANNED[page])
    assert not found, (
        f"{page.relative_to(ROOT)}: figures outside the generated regions {found}; write them from "
        "benchmarks/results in benchmarks/update_readme.py, or say in words what they compare"
    )


def test_every_page_with_figures_has_its_generated_regions() -> None:
    # A page that lost its markers would pass the check with nothing to check.
    for page, names in update_readme.PAGES.items():
        found = {m.group(2) for m in update_readme.REGION.finditer(page.read_text())}
        assert names <= found, f"{page.relative_to(ROOT)}: missing generated regions {names - found}"


def test_a_changed_figure_fails_both_checks() -> None:
    # The two checks above must be able to fail: a figure edited by hand inside a region,
    # and one written outside any region.
    page = update_readme.SEMANTICS
    text = page.read_text()
    region = next(m for m in update_readme.REGION.finditer(text) if m.group(2) == "attached-cost")
    figure = re.search(r"\d+\.\d+ us|\d+ ns", region.group(3))
    assert figure, "the attached-cost region gives no timing"
    start = region.start(3) + figure.start()
    edited = text[:start] + "9" + text[start + 1:]
    assert edited != text and update_readme.updated(edited, page) != edited
    assert update_readme.updated(text, page) == text
    assert hand_written_figures("An attached call costs about 1.6-1.9 us; the cut 300-350 ns.") == [
        "line 1: '1.6-1.9 us'", "line 1: '300-350 ns'"
    ]  # fmt: skip
    assert len(hand_written_figures("about 0.6 of `detach()`'s time, 9x faster, 26.0% off")) == 3
    assert hand_written_figures("its 95% interval spans the edge; torch 2.1 to 2.15") == []
