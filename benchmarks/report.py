"""Reading the results: the bars bridge must meet, and Markdown tables; measures nothing.

report() is the full set of tables a run prints; summary() the one table per device in
the README (update_readme.py). Both take a results.json as loaded.
"""

from __future__ import annotations

from measure import BASELINE, METHODS, format_size, paired_ratio, ratio_interval
from training import CUTS, MODES

# One line under each table with ratios in brackets: what they are.
PER_REPEAT = ("In brackets: the median over repeats of each repeat's ratio to {}, "
              "which is not the ratio of the two medians shown.")  # fmt: skip
PER_STEP = ("In brackets: step time, the median over steps of each step's ratio to detach "
            "(not the ratio of the medians shown); peak memory, the ratio of the two peaks.")  # fmt: skip


def check_bars(device: str, results: dict) -> list[dict]:
    """The issue's bars for bridge, each with what this run measured.

    holds is None where the run cannot decide: a 95% interval spans the bar's edge, or,
    in a --quick run, the bar rests on timings from too few repeats.
    """
    quick = results.get("quick", False)
    bars = []
    latency = results.get("latency", [])
    if latency:
        ns = {(r["size_bytes"], r["requires_grad"], r["method"]): r["samples_ns"] for r in latency}
        cases = sorted({(r["size_bytes"], r["requires_grad"]) for r in latency})
        to_data = {case: paired_ratio(ns[(*case, "bridge")], ns[(*case, ".data")]) for case in cases}
        interval = {case: ratio_interval(ns[(*case, "bridge")], ns[(*case, ".data")]) for case in cases}
        # The case that decides: the surest miss if there is one, else the least sure pass.
        misses = [case for case in cases if interval[case][0] > 1]
        worst = max(misses or cases, key=lambda case: interval[case][0 if misses else 1])
        low, high = interval[worst]
        bars.append({
            "bar": "bridge per call <= .data at every size",
            "measured": f"bridge/.data {min(to_data.values()):.2f} to {max(to_data.values()):.2f}; "
                        f"{len(misses)} of {len(cases)} cases above 1 beyond noise; deciding case "
                        f"{to_data[worst]:.3f} [{low:.3f}, {high:.3f}] (95% interval) "
                        f"at {format_size(worst[0])}, requires_grad={worst[1]}",
            # Decided only where noise cannot carry the ratio across 1.
            "holds": None if quick else False if misses
                     else True if all(hi <= 1 for _, hi in interval.values()) else None,
        })  # fmt: skip
        small, large = cases[0][0], cases[-1][0]
        flat = [paired_ratio(ns[(large, g, "bridge")], ns[(small, g, "bridge")]) for g in (True, False)]
        bars.append({
            "bar": "bridge flat in size (largest/smallest within 0.9-1.1)",
            "measured": f"{format_size(large)}/{format_size(small)} = "
                        + ", ".join(f"{f:.2f}" for f in flat) + " (requires grad, not)",
            "holds": None if quick else all(0.9 <= f <= 1.1 for f in flat),
        })  # fmt: skip
    memory = [r for r in results.get("memory", []) if r["method"] == "bridge"]
    if memory:
        bars.append(no_work_bar("bridge allocates 0 bytes and launches 0 kernels", memory, device))
    training = results.get("training", [])
    if training:
        steps = {(r["mode"], r["method"]): r["step_ms_samples"] for r in training}
        times, verdicts = [], []
        for mode in MODES:
            ratio = paired_ratio(steps[(mode, "bridge")], steps[(mode, BASELINE)])
            low, high = ratio_interval(steps[(mode, "bridge")], steps[(mode, BASELINE)])
            times.append(f"{ratio:.3f} [{low:.3f}, {high:.3f}]")
            # Decided only where noise cannot move the ratio across the band's edge.
            verdicts.append(None if quick else True if 0.98 <= low and high <= 1.02
                            else False if high < 0.98 or low > 1.02 else None)  # fmt: skip
        peaks = [r["peak_ratio_to_detach"] for r in training if r["method"] == "bridge"]
        verdicts += [0.98 <= v <= 1.02 for v in peaks]  # bytes, not timings: decided
        bars.append({
            "bar": "training step time and peak memory within 0.98-1.02 of detach",
            "measured": "time " + ", ".join(times) + " (95% interval); peak "
                        + ", ".join(f"{v:.3f}" for v in peaks) + " (modes 0, 1, 2)",
            "holds": False if False in verdicts else None if None in verdicts else True,
        })  # fmt: skip
    bars += straight_through_bars(device, results)
    bars += routing_bars(device, results)
    bars += rotation_bars(device, results)
    return bars


def no_work_bar(bar: str, rows: list[dict], device: str) -> dict:
    """The bar that a method's rows show no allocation and (on CUDA) no kernel."""
    allocated, kernels = max(r["allocated_bytes"] for r in rows), max(r.get("kernels", 0) for r in rows)
    return {
        "bar": bar,
        "measured": f"max {allocated} B allocated"
                    + (f", max {kernels} kernels" if device == "cuda" else ", (no kernels on CPU)"),
        "holds": allocated == 0 and kernels == 0,
    }  # fmt: skip


def decide(low: float, high: float, lo_edge: float, hi_edge: float) -> bool | None:
    """Whether a ratio's 95% interval lies inside [lo_edge, hi_edge] (True), outside (False), or spans an edge."""
    return True if lo_edge <= low and high <= hi_edge else False if high < lo_edge or low > hi_edge else None


def all_of(verdicts: list[bool | None]) -> bool | None:
    return False if False in verdicts else None if None in verdicts else True


def straight_through_bars(device: str, results: dict) -> list[dict]:
    """straight_through's bars: no work in forward, flat and as cheap as bridge(t, -1.0), a faster step."""
    ste = results.get("straight_through")
    if not ste:
        return []
    quick, bars = results.get("quick", False), []
    ours = [r for r in ste["forward"] if r["method"] == "straight_through"]
    bars.append(no_work_bar("straight_through forward allocates 0 bytes and launches 0 kernels", ours, device))
    ns = {(r["size_bytes"], r["method"]): r["samples_ns"] for r in ste["per_call"]}
    sizes = sorted({r["size_bytes"] for r in ste["per_call"]})
    small, large = sizes[0], sizes[-1]
    flat = ratio_interval(ns[(large, "straight_through")], ns[(small, "straight_through")])
    to_ref = {s: ratio_interval(ns[(s, "straight_through")], ns[(s, "bridge(t, -1.0)")]) for s in sizes}
    bars.append({
        "bar": "straight_through per call flat in size (largest/smallest within 0.9-1.1) "
               "and within 1.5x of bridge(t, -1.0)",
        "measured": f"{format_size(large)}/{format_size(small)} "
                    f"{paired_ratio(ns[(large, 'straight_through')], ns[(small, 'straight_through')]):.2f} "
                    f"[{flat[0]:.2f}, {flat[1]:.2f}] (95% interval); to bridge(t, -1.0) "
                    + ", ".join(f"{paired_ratio(ns[(s, 'straight_through')], ns[(s, 'bridge(t, -1.0)')]):.2f}"
                                for s in sizes) + " (sizes ascending; decided on their 95% intervals)",
        "holds": None if quick else all_of([decide(*flat, 0.9, 1.1)] + [decide(*i, 0, 1.5) for i in to_ref.values()]),
    })  # fmt: skip
    # Eager: faster only where noise cannot carry the ratio up to 1.
    bars.append(step_bar("straight_through training step faster than the trick's", ste["step"], quick,
                         lambda lo, hi: decide(lo, hi, 0, 1 - 1e-9)))  # fmt: skip
    if "compiled_step" in ste:  # compiled, where inductor fuses the trick: slower only where noise cannot explain it
        bars.append(step_bar("compiled straight_through training step no slower than the compiled trick's "
                             "beyond noise", ste["compiled_step"], quick, lambda lo, hi: lo <= 1))  # fmt: skip
    return bars


def step_bar(bar: str, rows: list[dict], quick: bool, verdict) -> dict:  # type: ignore[no-untyped-def]
    """A bar on straight_through's step time against the trick's, per dtype, decided on the 95% intervals."""
    steps = {(r["dtype"], r["method"]): r["step_ms_samples"] for r in rows}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    intervals = {d: ratio_interval(steps[(d, "straight_through")], steps[(d, "trick")]) for d in dtypes}
    return {
        "bar": f"{bar}, " + " and ".join(dtypes),
        "measured": ", ".join(f"{d} {paired_ratio(steps[(d, 'straight_through')], steps[(d, 'trick')]):.3f} "
                              f"[{lo:.3f}, {hi:.3f}]" for d, (lo, hi) in intervals.items()) + " (95% interval)",
        "holds": None if quick else all_of([verdict(lo, hi) for lo, hi in intervals.values()]),
    }  # fmt: skip


def routing_bars(device: str, results: dict) -> list[dict]:
    """bridge(x, mask)'s bars against the routing idiom: no work in forward, and no slower, at every shape and phase."""
    routing = results.get("routing")
    if not routing:
        return []
    ours = [r for r in routing["forward"] if r["method"] == "bridge(x, mask)"]
    ns = {(r["shape"], r["phase"], r["method"]): r["samples_ns"] for r in routing["per_call"]}
    cases = list(dict.fromkeys((r["shape"], r["phase"]) for r in routing["per_call"]))
    intervals = {c: ratio_interval(ns[(*c, "bridge(x, mask)")], ns[(*c, "idiom")]) for c in cases}
    return [
        no_work_bar("bridge(x, mask) forward allocates 0 bytes and launches 0 kernels", ours, device),
        {"bar": "bridge(x, mask) no slower than the routing idiom beyond noise, forward and forward + backward, "
                "at every shape",
         "measured": ", ".join(f"{shape} {phase} {paired_ratio(ns[(shape, phase, 'bridge(x, mask)')], ns[(shape, phase, 'idiom')]):.3g} "
                               f"[{lo:.3g}, {hi:.3g}]" for (shape, phase), (lo, hi) in intervals.items()) + " (95% interval)",
         # Slower only where the whole interval lies above 1.
         "holds": None if results.get("quick", False) else all(lo <= 1 for lo, _ in intervals.values())},
    ]  # fmt: skip


def rotation_bars(device: str, results: dict) -> list[dict]:
    """rotate_to's bars against the library's: no work in forward; 3x faster per call at the bar's shape; the step no slower."""
    rotation = results.get("rotation")
    if not rotation:
        return []
    ours, library = "gradbridge_ext.rotate_to", "rotate_to (vector-quantize-pytorch)"
    quick = results.get("quick", False)
    ns = {(r["shape"], r["method"]): r["samples_ns"] for r in rotation["per_call"]}
    shape = next(iter(dict.fromkeys(r["shape"] for r in rotation["per_call"])))
    lo, hi = ratio_interval(ns[(shape, ours)], ns[(shape, library)])
    steps = {r["method"]: r["samples_ns"] for r in rotation["step"]}
    step_lo, step_hi = ratio_interval(steps[ours], steps[library])
    return [
        no_work_bar("rotate_to forward allocates 0 bytes and launches 0 kernels", [r for r in rotation["forward"] if r["method"] == ours], device),
        {"bar": f"rotate_to forward + backward at least 3x faster than the library's at {shape}",
         "measured": f"{paired_ratio(ns[(shape, ours)], ns[(shape, library)]):.3f} [{lo:.3f}, {hi:.3f}] (95% interval; 1/3 is 0.333)",
         "holds": None if quick else decide(lo, hi, 0.0, 1 / 3)},
        {"bar": "VectorQuantize's training step with rotate_to no slower than with the library's beyond noise",
         "measured": f"{paired_ratio(steps[ours], steps[library]):.3f} [{step_lo:.3f}, {step_hi:.3f}] (95% interval)",
         "holds": None if quick else step_lo <= 1},
    ]  # fmt: skip


def rotation_tables(results: dict) -> list[str]:
    rotation, cuda = results["rotation"], results["environment"]["device"] == "cuda"
    by = {(r["shape"], r["method"]): r for r in rotation["per_call"]}
    names = list(dict.fromkeys(r["method"] for r in rotation["per_call"]))
    return [
        "\n### The rotation trick per call, forward + backward, x a leaf that requires grad "
        "(median, and ratio to the library's rotate_to)\n",
        PER_REPEAT.format("the library's") + "\n",
        table(["shape", *names], [[s] + [f"{format_ns(by[(s, m)]['median_ns'])} ({format_ratio(by[(s, m)]['ratio_to_library'])})"
                                         for m in names] for s in dict.fromkeys(s for s, _ in by)]),
        "\n### The rotation trick: one forward (" + rotation["forward"][0]["memory_source"] + ")\n",
        table(["shape", "method", "bytes allocated", "peak bytes", "ops (profiler)"] + (["CUDA kernels"] if cuda else []),
              [[r["shape"], r["method"], str(r["allocated_bytes"]), str(r["peak_bytes"]), str(r["ops"])]
               + ([str(r["kernels"])] if cuda else []) for r in rotation["forward"]]),
        "\n### VectorQuantize's training step (forward, backward, Adam), its rotate_to swapped\n",
        table(["method", "step time (median)", "ratio to the library's", "peak bytes"],
              [[r["method"], format_ns(r["median_ns"]), f"{r['ratio_to_library']:.3f}", str(r["peak_bytes"])] for r in rotation["step"]]),
    ]  # fmt: skip


def routing_tables(results: dict) -> list[str]:
    routing, cuda = results["routing"], results["environment"]["device"] == "cuda"
    by = {(r["shape"], r["phase"], r["method"]): r for r in routing["per_call"]}
    names = list(dict.fromkeys(r["method"] for r in routing["per_call"]))
    peaks = {(r["shape"], r["method"]): r["peak_bytes"] for r in routing["forward_backward_peak"]}
    return [
        "\n### Gradient routing per call, `mask * x + (1 - mask) * x.detach()` (the idiom) against `bridge(x, mask)`, "
        "x a leaf that requires grad (median, and ratio to the idiom)\n",
        PER_REPEAT.format("the idiom") + "\n",
        table(["shape", "phase", *names], [[routing["shapes"][s], p] + [
            f"{format_ns(by[(s, p, m)]['median_ns'])} ({format_ratio(by[(s, p, m)]['ratio_to_idiom'])})" for m in names]
            for s, p in dict.fromkeys((s, p) for s, p, _ in by)]),
        "\n### Gradient routing memory: one forward (" + routing["forward"][0]["memory_source"]
        + "), and the peak of one forward + backward\n",
        table(["shape", "method", "forward: bytes allocated", "forward: peak bytes", "ops (profiler)"]
              + (["CUDA kernels"] if cuda else []) + ["forward + backward: peak bytes"],
              [[routing["shapes"][r["shape"]], r["method"], str(r["allocated_bytes"]), str(r["peak_bytes"]), str(r["ops"])]
               + ([str(r["kernels"])] if cuda else []) + [str(peaks[(r["shape"], r["method"])])] for r in routing["forward"]]),
    ]  # fmt: skip


def straight_through_tables(results: dict) -> list[str]:
    ste, cuda = results["straight_through"], results["environment"]["device"] == "cuda"
    sizes = sorted({r["size_bytes"] for r in ste["per_call"]})
    names = list(dict.fromkeys(r["method"] for r in ste["per_call"]))
    by = {(r["size_bytes"], r["method"]): r for r in ste["per_call"]}
    cfg = results["config"]
    exact = {(r["quantizer"], r["dtype"], r["method"]): r["share_differ"] for r in ste["exactness"]}
    quantizers = list(dict.fromkeys(r["quantizer"] for r in ste["exactness"]))
    dtypes = list(dict.fromkeys(r["dtype"] for r in ste["exactness"]))
    pairs = {(r["size_bytes"], r["method"]): r for r in ste.get("compiled_pair", [])}
    pair_names = list(dict.fromkeys(m for _, m in pairs))
    return [
        "\n### Straight-through per call, x requires grad (median, and ratio to bridge(t, -1.0))\n",
        PER_REPEAT.format("bridge(t, -1.0)") + "\n",
        table(["size", *names], [[format_size(s)] + [
            f"{format_ns(by[(s, m)]['median_ns'])} ({by[(s, m)]['ratio_to_bridge']:.2f})" for m in names] for s in sizes]),
        "\n### Straight-through forward, one call (" + ste["forward"][0]["memory_source"] + ")\n",
        table(["size", "method", "bytes allocated", "peak bytes", "ops (profiler)"] + (["CUDA kernels"] if cuda else []),
              [[format_size(r["size_bytes"]), r["method"], str(r["allocated_bytes"]), str(r["peak_bytes"]), str(r["ops"])]
               + ([str(r["kernels"])] if cuda else []) for r in ste["forward"]]),
        f"\n### BitNet-style MLP training step ({cfg['depth']} BitLinear layers of {cfg['width']}, batch "
        f"{cfg['batch']}, {cfg['train_steps']} steps; median, and ratio to the trick)\n",
        PER_STEP.replace("detach", "the trick") + "\n",
        step_table(ste["step"]),
        *([f"\n### The same step compiled (torch.compile, inductor, fullgraph; median, and ratio to the compiled trick)\n",
           PER_STEP.replace("detach", "the compiled trick") + "\n", step_table(ste["compiled_step"])]
          if "compiled_step" in ste else []),
        *(["\n### Compiled, the estimate returned beside q (forward per call; median, and ratio to the trick)\n",
            PER_REPEAT.format("the compiled trick") + "\n",
            table(["size", *pair_names], [[format_size(s)] + [
                f"{format_ns(pairs[(s, m)]['median_ns'])} ({pairs[(s, m)]['ratio_to_trick']:.2f})" for m in pair_names]
                for s in sorted({size for size, _ in pairs})])] if pairs else []),
        "\n### Straight-through exactness: share of the result's elements that differ from q (trick / ours)\n",
        table(["quantizer", *dtypes], [[k] + [f"{exact[(k, d, 'trick')]:.4f} / {exact[(k, d, 'straight_through')]:.4f}"
                                              for d in dtypes] for k in quantizers]),
    ]  # fmt: skip


def step_table(rows: list[dict]) -> str:
    return table(["dtype", "method", "step time", "peak memory", "final loss"],
                 [[r["dtype"], r["method"], f"{r['step_ms_median']:.2f} ms ({r['ratio_to_trick']:.3f})",
                   f"{r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_ratio_to_trick']:.3f})", f"{r['final_loss']:.6f}"]
                  for r in rows])  # fmt: skip


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(holds: bool | None, quick: bool) -> str:
    undecided = "too few repeats in a --quick run" if quick else "an interval spans the bar's edge"
    return {True: "yes", False: "**no**", None: f"**undecided**: {undecided}"}[holds]


def bars_table(results: dict) -> str:
    return table(
        # "for bridge" while every bar is bridge's (the README's tables); "bar" once straight_through's join.
        ["bar" if results.get("straight_through") else "bar for bridge", "measured", "holds"],
        [[b["bar"], b["measured"], verdict(b["holds"], results.get("quick", False))]
         for b in results["bars"]],
    )  # fmt: skip


def format_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:,.0f}"
    return f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.1e}"  # a ratio far below 1 keeps its digits


def format_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def latency_table(results: dict, requires_grad: bool) -> str:
    rows = [r for r in results["latency"] if r["requires_grad"] == requires_grad]
    by = {(r["size_bytes"], r["method"]): r for r in rows}
    return table(
        ["size", *METHODS],
        [[format_size(s)] + [f"{format_ns(by[(s, m)]['median_ns'])} ({format_ratio(by[(s, m)]['ratio_to_detach'])})"
                             for m in METHODS] for s in sorted({r["size_bytes"] for r in rows})],
    )  # fmt: skip


def memory_table(results: dict) -> str:
    cuda = results["environment"]["device"] == "cuda"
    return table(
        ["size", "method", "bytes allocated", "peak bytes", "ops (profiler)"]
        + (["CUDA kernels"] if cuda else []),
        [[format_size(r["size_bytes"]), r["method"], str(r["allocated_bytes"]), str(r["peak_bytes"]),
          str(r["ops"])] + ([str(r["kernels"])] if cuda else []) for r in results["memory"]],
    )  # fmt: skip


def training_table(results: dict) -> str:
    return table(
        ["mode", "method", "step time", "peak memory", "final loss"],
        [[f"{r['mode']}: {MODES[r['mode']]}", r["method"],
          f"{r['step_ms_median']:.2f} ms ({r['ratio_to_detach']:.3f})",
          f"{r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_ratio_to_detach']:.3f})",
          f"{r['final_loss']:.6f}"] for r in results["training"]],
    )  # fmt: skip


def attached_table(results: dict) -> str:
    rows = results["attached"]
    keys = sorted({(r["phase"], r["size_bytes"]) for r in rows}, key=lambda k: (k[0] != "forward", k[1]))
    by = {(r["phase"], r["size_bytes"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    reference = "bridge(t, -1.0)"
    return table(
        ["method"] + [f"{phase}, {format_size(size)} ({reference}: {format_ns(by[(phase, size, reference)]['median_ns'])})"
                      for phase, size in keys],
        [[name] + [format_ratio(by[(*k, name)]["ratio_to_bridge"]) for k in keys] for name in methods],
    )  # fmt: skip


def report(results: dict) -> str:
    """Every table of one device's run, with its environment."""
    env, cfg = results["environment"], results["config"]
    parts = [
        f"## {env['device']}: {env['device_name']}",
        f"torch {env['torch']}, Python {env['python']}, CPU {env['cpu']} "
        f"({env['cpu_threads']} threads), {env['date']}, commit {env['gradbridge_ext_commit']}",
    ]
    for requires_grad in (True, False):
        if any(r["requires_grad"] == requires_grad for r in results.get("latency", [])):
            parts += [
                f"\n### Latency per call, input {'requires' if requires_grad else 'does not require'} "
                "grad (median, and ratio to detach)\n",
                PER_REPEAT.format("detach") + "\n",
                latency_table(results, requires_grad),
            ]  # fmt: skip
    if results.get("memory"):
        parts += [
            f"\n### Memory and work per call (input requires grad; {results['memory'][0]['memory_source']})\n",
            memory_table(results),
            "\nOps are counted by the profiler, which makes bridge dispatch (1 op); a call "
            "with no profiler or mode active skips the dispatcher (0 ops), same kernel.",
        ]  # fmt: skip
    if results.get("training"):
        parts += [
            f"\n### Training step (width {cfg['width']}, batch {cfg['batch']}, B = {cfg['depth']} "
            f"linear layers, {cfg['train_steps']} steps; median, and ratio to detach)\n",
            PER_STEP + "\n",
            training_table(results),
        ]  # fmt: skip
    if results.get("attached"):
        parts += [
            "\n### Attached forms per call, input a leaf that requires grad "
            "(median, and ratio to bridge(t, -1.0))\n",
            PER_REPEAT.format("bridge(t, -1.0)") + "\n",
            attached_table(results),
        ]
    if results.get("straight_through"):
        parts += straight_through_tables(results)
    if results.get("routing"):
        parts += routing_tables(results)
    if results.get("rotation"):
        parts += rotation_tables(results)
    if results.get("test_device"):
        parts += [
            "\n### Per call on the test device (tests/testdev: an out-of-tree PrivateUse1 backend over host "
            "memory), input requires grad (median, and ratio to detach)\n",
            PER_REPEAT.format("detach") + " No bar: it shows that the device-generic path costs what "
            "detach() costs on a device plugged in from outside torch.\n",
            ratio_to_detach_table(results["test_device"], methods_down=False),
        ]
    if results.get("fallback"):
        parts += [
            "\n### Per call, the pure-Python fallback beside the native operator (what a process without a "
            "compiler runs: gradbridge_ext.NATIVE is False), input a leaf that requires grad (median, and ratio to detach)\n",
            PER_REPEAT.format("detach") + " No bar: it is the cost the fallback's import warning names.\n",
            ratio_to_detach_table(results["fallback"], methods_down=True),
        ]
    if results.get("bars"):
        quick = " (a --quick run: too few repeats to decide the timed ones)" if results.get("quick") else ""
        parts += [f"\n### Bars{quick}\n", bars_table(results)]
    return "\n".join(parts)


def ratio_to_detach_table(rows: list[dict], methods_down: bool) -> str:
    """Per call, by size and method: the median, and in brackets the ratio to detach."""
    cells = {(r["size_bytes"], r["method"]): f"{format_ns(r['median_ns'])} ({r['ratio_to_detach']:.2f})" for r in rows}
    sizes, names = sorted({size for size, _ in cells}), list(dict.fromkeys(m for _, m in cells))
    if methods_down:
        return table(["method", *map(format_size, sizes)], [[f"`{m}`", *(cells[(s, m)] for s in sizes)] for m in names])
    return table(["size", *names], [[format_size(s), *(cells[(s, m)] for m in names)] for s in sizes])


def headline(results: dict) -> str:
    """The one-sentence reading of a device's results, in one statistic: ratios measured interleaved."""
    ratio = {(r["size_bytes"], r["method"]): r["ratio_to_detach"] for r in results["latency"] if r["requires_grad"]}
    small, large = min(size for size, _ in ratio), max(size for size, _ in ratio)
    allocated = max(r["allocated_bytes"] for r in results["memory"] if r["method"] == "bridge")
    data = next((b for b in results.get("bars", []) if b["bar"].startswith("bridge per call <= .data")), None)

    def at(name: str) -> str:
        return f"{format_ratio(ratio[(small, name)])} at {format_size(small)}, {format_ratio(ratio[(large, name)])} at {format_size(large)}"

    return (
        f"Headline, {results['environment']['device']}, as ratios to `detach()`'s time per call (the median of "
        f"interleaved repeats): `bridge(t)` {at('bridge')}; `t.data` {at('.data')}; the `set_` trick {at('set_ trick')}; "
        f"`bridge(t)` allocates {allocated} bytes"
        + (f"; paired with `t.data` directly, {data['measured'].split(';')[0]}" if data else "")
        + "."
    )


def straight_through_headline(results: dict) -> str:
    """The README's line on straight_through against the trick, from the results; empty if not measured."""
    ste = results.get("straight_through")
    if not ste:
        return ""
    ratio = {(r["size_bytes"], r["method"]): r["ratio_to_bridge"] for r in ste["per_call"]}
    sizes = sorted({size for size, _ in ratio})
    small, large = sizes[0], sizes[-1]
    allocated = max(r["allocated_bytes"] for r in ste["forward"] if r["method"] == "straight_through")
    steps = ", ".join(f"{r['ratio_to_trick']:.2f} in {r['dtype']}" for r in ste["step"] if r["method"] == "straight_through")
    compiled = ", ".join(f"{r['ratio_to_trick']:.2f} in {r['dtype']}" for r in ste.get("compiled_step", [])
                         if r["method"] == "straight_through")  # fmt: skip
    worst = max(ste["exactness"], key=lambda r: r["share_differ"] if r["method"] == "trick" else -1)
    ours_off = max(r["share_differ"] for r in ste["exactness"] if r["method"] == "straight_through")

    def at(name: str) -> str:
        return f"{format_ratio(ratio[(small, name)])} at {format_size(small)}, {format_ratio(ratio[(large, name)])} at {format_size(large)}"

    return (
        f"Straight-through, {results['environment']['device']}, as ratios to `bridge(t, -1.0)`'s time per call (the "
        f"median of interleaved repeats): `straight_through(x, q)` {at('straight_through')}; the trick "
        f"`x + (q - x).detach()` {at('trick')}; `straight_through` allocates {allocated} bytes. A BitNet-style "
        f"training step takes {steps} of the trick's time"
        + (f" ({compiled} of the compiled trick's, compiled with inductor)" if compiled else "")
        + f"; {ours_off:.0%} of its elements differ from `q`, "
        f"against up to {worst['share_differ']:.1%} of the trick's ({worst['quantizer']}, {worst['dtype']})."
    )


def summary(results: dict) -> str:
    """One table per device for the README: each method's cost at a glance."""
    env, cfg = results["environment"], results["config"]
    latency = [r for r in results["latency"] if r["requires_grad"]]
    sizes = sorted({r["size_bytes"] for r in latency})
    small, large = sizes[0], sizes[-1]
    time = {(r["size_bytes"], r["method"]): r for r in latency}
    memory = {r["method"]: r for r in results["memory"] if r["size_bytes"] == large}
    training = {(r["mode"], r["method"]): r for r in results["training"]}
    cuda = env["device"] == "cuda"

    def per_call(size: int, name: str) -> str:
        return format_ratio(time[(size, name)]["ratio_to_detach"])

    rows = []
    for name in [m for m in CUTS if (0, m) in training]:  # older results lack newer rows
        measured = name in METHODS
        row = [name if name != "bridge" else "**bridge**"]
        row += [per_call(small, name), per_call(large, name)] if measured else ["", ""]
        row += [str(memory[name]["allocated_bytes"])] if measured else [""]
        if cuda:
            row += [str(memory[name]["kernels"])] if measured else [""]
        row += [" / ".join(f"{training[(m, name)][key]:.3f}" for m in MODES)
                for key in ("ratio_to_detach", "peak_ratio_to_detach")]  # fmt: skip
        rows.append(row)
    header = ["method", *(f"per call, {format_size(size)} (detach: {format_ns(time[(size, 'detach')]['median_ns'])})"
                          for size in (small, large)),
              f"bytes allocated, {format_size(large)}"] + (["CUDA kernels"] if cuda else []) + [
              "training step time, modes 0 / 1 / 2", "training peak memory, modes 0 / 1 / 2"]  # fmt: skip
    return "\n".join([
        # The machine is named above the table (update_readme.py); here, what ran on it and when.
        f"torch {env['torch']}, Python {env['python']}; measured {env['date'][:10]} at this repository's "
        f"commit {env['gradbridge_ext_commit']}. Every figure is a ratio to detach, measured "
        "interleaved: per call from Python (input requires grad), the median over repeats of each "
        "repeat's ratio (detach's own median time is in the header); training step time, the same "
        f"over steps (width {cfg['width']}, batch {cfg['batch']}, B = {cfg['depth']} layers); peak "
        "memory, the ratio of the two peaks.",
        "",
        table(header, rows),
        "",
        bars_table(results),
    ] + ([
        "",
        "Attached forms: per call from Python, on a leaf that requires grad, the median over repeats "
        "of each repeat's ratio to `bridge(t, -1.0)` (its own median time in the header); forward + "
        "backward runs `torch.autograd.backward` on the result.",
        "",
        attached_table(results),
    ] if results.get("attached") else []))  # fmt: skip
