"""Rewrite the README's benchmark tables from the committed results; measures nothing.

    python benchmarks/update_readme.py           # after committing new results/<device>/
    python benchmarks/update_readme.py --check   # exit 1 if the README is out of date
"""

from __future__ import annotations

import json
import sys

from bench_bridge import RESULTS
from report import headline, straight_through_headline, summary

README = RESULTS.parent.parent / "README.md"
START = "<!-- benchmark tables: written by benchmarks/update_readme.py -->"
END = "<!-- end of benchmark tables -->"
MACHINES = {"cpu": "The development machine, CPU only", "cuda": "The lent GPU machine"}


def render() -> str:
    parts = [START]
    for device, machine in MACHINES.items():
        path = RESULTS / device / "results.json"
        if not path.exists():
            continue
        parts += [
            "",
            f"**{machine}** ([full results]({path.relative_to(README.parent)}))",
            "",
            headline(results := json.loads(path.read_text())),
            "",
            *([line, ""] if (line := straight_through_headline(results)) else []),
            summary(results),
            "",
            f"![latency against size, {device}]({(path.parent / 'latency.png').relative_to(README.parent)})",
        ]
    return "\n".join(parts + ["", END])


def updated(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{README}: no benchmark section; add the two markers {START!r} and {END!r}")
    head, rest = readme.split(START, 1)
    return head + render() + rest.split(END, 1)[1]


if __name__ == "__main__":
    current = README.read_text()
    if "--check" in sys.argv[1:]:
        if updated(current) != current:
            raise SystemExit("README benchmark tables differ from benchmarks/results: "
                             "run python benchmarks/update_readme.py")
    else:
        README.write_text(updated(current))
