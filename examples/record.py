"""Run every example and commit what it printed: examples/results/<name>.txt, the figures the README points to.

Each file starts with the machine, torch, the commit and the run's wall time, so a figure
is never typed in by hand and always says where it came from (`make example-results`).

    python examples/record.py [NAME ...]
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Each example and its arguments; a picture goes beside its output.
EXAMPLES = {
    "independent_layers": [],
    "probe_digits": ["--plot", str(RESULTS / "probe_digits.png")],
    "straight_through": [],
    "domain_adversarial": ["--plot", str(RESULTS / "domain_adversarial.png")],
    "gradient_routing": ["--plot", str(RESULTS / "gradient_routing.png")],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True)
    return run.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def record(name: str) -> int:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *EXAMPLES[name]], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    header = (
        f"# python examples/{name}.py {' '.join(a if not a.startswith(str(HERE)) else os.path.relpath(a, HERE.parent) for a in EXAMPLES[name])}\n"
        f"# {datetime.date.today()}, commit {commit()}; {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"Python {platform.python_version()}; exit {run.returncode} after {seconds:.1f} s\n\n"
    )
    (RESULTS / f"{name}.txt").write_text(header + run.stdout + (run.stderr if run.returncode else ""))
    print(f"examples/results/{name}.txt: exit {run.returncode}, {seconds:.1f} s", file=sys.stderr)
    return run.returncode


if __name__ == "__main__":
    names = sys.argv[1:] or list(EXAMPLES)
    sys.exit(max(record(name) for name in names))
