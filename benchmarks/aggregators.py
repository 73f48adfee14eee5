"""Benchmark of the byzps aggregation rules on CPU (not a test).

Usage (from the repository root)::

    .venv/bin/python benchmarks/aggregators.py [--repeats 5] [--threads 1] [--timeout 300]
                                               [--no-byzfl] [--rules krum,multi_krum]
                                               [--workloads 64x65536,80x65536,32x1000000]
                                               [--baseline /path/to/other/checkout]
                                               [--pairs 2]

Before/after comparisons: ``--baseline DIR`` also times the byzps of another checkout (e.g. a
detached worktree of an older commit: ``git worktree add --detach ../old COMMIT``) on the same
inputs, interleaved with this checkout call by call: one process loads both versions'
``byzps.aggregators`` packages (the package imports nothing else from byzps), warms both up,
then alternates single calls of the two, ``--repeats`` of each (the order flips every pair),
so that a load spike on a shared machine hits both alike; each reports its median call time.
``--pairs K`` repeats that process K times and keeps each version's smallest median. Columns
"baseline s" and "byzps/baseline" (above 1: this checkout is slower); the memory column then
comes from a separate run of this checkout alone.

Threads: by default every measurement runs with ``torch.set_num_threads(1)``, which gives
reproducible numbers on a shared or busy machine: when the cores are oversubscribed, each
parallel torch op waits at an OpenMP barrier for a descheduled thread, and the chunked rules
(many ops per call) slow down by one to two orders of magnitude (measured here under load:
byzps ``mean`` 0.009 s with one thread, 0.46 s with two). ``--threads 0`` keeps torch's
default; use it on an otherwise idle machine.

For every rule and workload it reports the median wall time of ``--repeats`` calls (after one
warm-up call), ``torch.mean(x, 0)`` on the same tensor for scale, and, when it can be
imported, ByzFL's implementation of the same rule on the same input. To include ByzFL::

    .venv/bin/pip install --no-deps byzfl scipy

(``--no-deps`` keeps pip away from torch; ByzFL's package ``__init__`` also imports
torchvision, matplotlib and seaborn, so this script loads only ``byzfl.aggregators``, whose one
extra requirement is scipy.)

Workloads (n x d, f): 64 x 65536 with f = 10; 80 x 65536 with f = 20 for the Krum family
(Bulyan needs n >= 4f + 3 = 83 and is reported as not applicable there); 32 x 1,000,000 with
f = 5. MDA enumerates C(n, f) subsets, so it runs with f = 2 on every workload.

Memory column: each measurement runs in its own subprocess. After the warm-up call (which
also pulls the kernels' code pages into memory) the script returns freed heap pages to the
kernel (glibc malloc_trim), resets the kernel's peak-RSS counter (writing "5" to
/proc/self/clear_refs), records VmRSS and makes one more call; "peak extra" is
VmHWM - VmRSS_before: the most resident memory the
call added on top of the input, whatever allocated it (torch's CPU allocator included, which
tracemalloc cannot see), output included. It is also shown as a multiple of the input size.
Where the kernel refuses the reset the column says "n/a".

Semantic differences with ByzFL worth knowing when comparing times: ByzFL's Krum/Multi-Krum
score with n - f - 1 neighbours (byzps: n - f - 2, Blanchard et al.), its median is
torch.quantile (no chunking; fails beyond 2**24 elements), its geometric median runs a fixed
T = 3 Weiszfeld iterations from zero (byzps: from the mean, or the coordinate-wise median when
the subgradient at the mean shows it was pulled away, until a step and the estimated distance
still to go are below tol times the median distance; the row "geometric_median[max_iter=3]" is
the like-for-like comparison), its centered clipping starts
from zero, its clipping and ARC modify the input in place (the benchmark hands them a fresh
copy each call, outside the timed region; byzps must not modify its input, so it writes an
(n, d) output: clipping and ARC cannot be much faster than an in-place rewrite), and its
bucketing is unseeded. ByzFL has no Bulyan. ByzFL accumulates in float32; byzps accumulates
means in float64 and computes distances in float64 (its mean is therefore slower than
``torch.mean``, which is ByzFL's mean).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = {
    "64x65536": (64, 65536, 10),
    "80x65536": (80, 65536, 20),
    "32x1000000": (32, 1_000_000, 5),
}
KRUM_FAMILY = ("krum", "multi_krum", "bulyan")

# (label, registry name, kind, extra byzps params)
RULES = [
    ("mean", "mean", "agg", {}),
    ("coordinate_wise_median", "coordinate_wise_median", "agg", {}),
    ("trimmed_mean", "trimmed_mean", "agg", {}),
    ("meamed", "meamed", "agg", {}),
    ("geometric_median", "geometric_median", "agg", {}),
    ("geometric_median[max_iter=3]", "geometric_median", "agg", {"max_iter": 3}),
    ("krum", "krum", "agg", {}),
    ("multi_krum", "multi_krum", "agg", {}),
    ("bulyan", "bulyan", "agg", {}),
    ("centered_clipping", "centered_clipping", "agg", {}),
    ("mda", "mda", "agg", {}),
    ("pre:clipping", "clipping", "pre", {}),
    ("pre:nnm", "nnm", "pre", {}),
    ("pre:bucketing", "bucketing", "pre", {}),
    ("pre:arc", "arc", "pre", {}),
]
RULE_INDEX = {label: (name, kind, extra) for label, name, kind, extra in RULES}


def rule_f(label: str, f: int) -> int:
    return 2 if RULE_INDEX[label][0] == "mda" else f


# ------------------------------------------------------------------------------------ child


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) * 1024 if match else -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_byzfl():
    """Import byzfl.aggregators without running byzfl/__init__.py (which needs torchvision,
    matplotlib, seaborn). Raises ImportError when ByzFL or scipy is missing."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("byzfl is not installed")
    if "byzfl" not in sys.modules:
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    return importlib.import_module("byzfl.aggregators")


def make_callable(impl: str, label: str, f: int, src: str | None = None):
    """Return (fn, needs_fresh_copy) computing the rule on a tensor; ``src``: the source folder
    byzps is imported from (default: this checkout's src/)."""
    import torch

    if impl == "torch":
        return (lambda x: torch.mean(x, dim=0)), False
    name, kind, extra = RULE_INDEX[label]
    if impl == "byzps":
        sys.path.insert(0, src or str(ROOT / "src"))
        from byzps import aggregators as A

        obj = (A.build if kind == "agg" else A.build_pre)(name, f=f, **extra)
        return obj, False
    mod = load_byzfl()
    table = {
        "mean": lambda: mod.Average(),
        "coordinate_wise_median": lambda: mod.Median(),
        "trimmed_mean": lambda: mod.TrMean(f=f),
        "meamed": lambda: mod.Meamed(f=f),
        "geometric_median": lambda: mod.GeometricMedian(),
        "krum": lambda: mod.Krum(f=f),
        "multi_krum": lambda: mod.MultiKrum(f=f),
        "centered_clipping": lambda: mod.CenteredClipping(tau=10.0, L=1),
        "mda": lambda: mod.MDA(f=f),
        "clipping": lambda: mod.Clipping(c=1.0),
        "nnm": lambda: mod.NNM(f=f),
        "bucketing": lambda: mod.Bucketing(s=2),
        "arc": lambda: mod.ARC(f=f),
    }
    if name not in table:
        raise LookupError("no ByzFL equivalent")
    return table[name](), name in ("clipping", "arc")


def child(impl: str, label: str, workload: str, repeats: int, budget: float,
          threads: int, src: str | None = None) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    n, d, f = WORKLOADS[workload]
    if label != "torch.mean":
        f = rule_f(label, f)
    try:
        fn, fresh = make_callable(impl, label, f, src)
    except (ImportError, LookupError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    torch.manual_seed(0)
    x = torch.randn(n, d)
    arg = (lambda: x.clone()) if fresh else (lambda: x)
    t0 = time.perf_counter()
    try:
        fn(arg())  # warm-up: loads kernels' code pages, thread pools
    except Exception as err:  # noqa: BLE001 - report whatever the implementation raised
        return {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    first = time.perf_counter() - t0
    count = repeats if first * repeats <= budget else max(1, int(budget / max(first, 1e-9)))
    # memory of a steady-state call: give freed heap pages back to the kernel first so the
    # call's allocations show up in the resident set again
    inp = arg()
    gc.collect()
    _malloc_trim()
    peak = None
    if _reset_peak():
        rss0 = _status("VmRSS")
        fn(inp)
        peak = _status("VmHWM") - rss0
    del inp
    times = []
    for _ in range(count):
        inp = arg()
        t0 = time.perf_counter()
        fn(inp)
        times.append(time.perf_counter() - t0)
        del inp
    return {"median_s": statistics.median(times), "runs": len(times), "peak_extra": peak,
            "input_bytes": x.numel() * x.element_size()}


def load_aggregators(src: str, alias: str):
    """Import ``<src>/byzps/aggregators`` as the top-level package ``alias`` (so two versions
    can live in one process)."""
    folder = Path(src) / "byzps" / "aggregators"
    spec = importlib.util.spec_from_file_location(
        alias, folder / "__init__.py", submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


def pair_child(label: str, workload: str, repeats: int, threads: int, baseline_src: str
               ) -> dict:
    """Median call times of this checkout's rule and the baseline's on one input, calls
    alternating (see the module docstring)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    n, d, f = WORKLOADS[workload]
    f = rule_f(label, f)
    name, kind, extra = RULE_INDEX[label]
    fns = {}
    for key, src in (("ours", str(ROOT / "src")), ("old", baseline_src)):
        mod = load_aggregators(src, f"_aggregators_{key}")
        fns[key] = (mod.build if kind == "agg" else mod.build_pre)(name, f=f, **extra)
    torch.manual_seed(0)
    x = torch.randn(n, d)
    times: dict[str, list[float]] = {"ours": [], "old": []}
    try:
        for key in ("old", "ours"):
            fns[key](x)  # warm-up
        for r in range(repeats):
            for key in (("old", "ours") if r % 2 == 0 else ("ours", "old")):
                t0 = time.perf_counter()
                fns[key](x)
                times[key].append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - report whatever the implementation raised
        return {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    return {key: {"median_s": statistics.median(t), "runs": len(t)} for key, t in times.items()}


# ------------------------------------------------------------------------------------ parent


def run_child(impl, label, workload, args, src: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, label, workload, "--repeats",
           str(args.repeats), "--budget", str(args.budget), "--threads", str(args.threads)]
    if src:
        cmd += ["--src", src]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of_pairs(label: str, workload: str, args, baseline_src: str) -> tuple[dict, dict]:
    """(this checkout, baseline): from ``args.pairs`` interleaved pair runs (``pair_child``),
    each version's smallest median; this checkout's memory from one run of its own."""
    runs = []
    for _ in range(max(1, args.pairs)):
        cmd = [sys.executable, __file__, "--child", "pair", label, workload, "--repeats",
               str(args.repeats), "--threads", str(args.threads), "--src", baseline_src]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            runs.append({"error": f"timeout after {args.timeout} s"})
            continue
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            runs.append({"error": f"exit {proc.returncode}: {tail[:120]}"})
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0], runs[0]
    mem = run_child("byzps", label, workload, argparse.Namespace(
        repeats=1, budget=args.budget, timeout=args.timeout, threads=args.threads))
    ours = dict(min((r["ours"] for r in good), key=lambda r: r["median_s"]))
    for key in ("peak_extra", "input_bytes"):
        if key in mem:
            ours[key] = mem[key]
    return ours, min((r["old"] for r in good), key=lambda r: r["median_s"])


def fmt_time(res: dict | None) -> str:
    if not res:
        return "-"
    if "error" in res:
        return "n/a"
    return f"{res['median_s']:.4f}"


def fmt_mem(res: dict | None) -> str:
    if not res or "error" in res or res.get("peak_extra") is None:
        return "-" if not res or "error" in res else "n/a"
    mib = max(res["peak_extra"], 0) / 2**20
    return f"{mib:.0f} MiB ({max(res['peak_extra'], 0) / res['input_bytes']:.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds of timed calls per measurement before cutting repeats")
    ap.add_argument("--timeout", type=float, default=300.0, help="per measurement")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads per measurement (0: torch's default)")
    ap.add_argument("--no-byzfl", action="store_true")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rules", default=",".join(label for label, *_ in RULES))
    ap.add_argument("--baseline", default=None,
                    help="root of another byzps checkout to time interleaved with this one")
    ap.add_argument("--pairs", type=int, default=1,
                    help="with --baseline: alternate the two this many times per measurement")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "RULE", "WORKLOAD"))
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        impl, label, workload = args.child
        if impl == "pair":
            print(json.dumps(pair_child(label, workload, args.repeats, args.threads, args.src)))
            return
        print(json.dumps(child(impl, label, workload, args.repeats, args.budget,
                                args.threads, args.src)))
        return

    byzfl_ok = False
    if not args.no_byzfl:
        probe = run_child("byzfl", "mean", "64x65536", argparse.Namespace(
            repeats=1, budget=1.0, timeout=args.timeout, threads=args.threads))
        byzfl_ok = "error" not in probe
        if not byzfl_ok:
            print(f"# ByzFL not used: {probe['error']}")
    import torch

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{threads} torch thread(s), load average at start "
          f"{os.getloadavg()[0]:.1f}; median of {args.repeats} calls after one warm-up")
    header = ["rule", "workload", "f", "byzps s", "torch.mean s", "ByzFL s", "byzps/mean",
              "ByzFL/byzps", "byzps peak extra", "ByzFL peak extra"]
    baseline_src = None
    if args.baseline:
        baseline_src = str(Path(args.baseline).resolve() / "src")
        header[4:4] = ["baseline s", "byzps/baseline"]
        print(f"# baseline: {baseline_src}; {args.pairs} process(es) per measurement, each "
              f"alternating {args.repeats} calls of either version")
    rows = []
    for workload in args.workloads.split(","):
        n, d, f = WORKLOADS[workload]
        base = run_child("torch", "torch.mean", workload, args)
        for label in args.rules.split(","):
            name = RULE_INDEX[label][0]
            if workload == "80x65536" and name not in KRUM_FAMILY:
                continue
            if baseline_src:
                ours, old = best_of_pairs(label, workload, args, baseline_src)
            else:
                ours, old = run_child("byzps", label, workload, args), None
            theirs = run_child("byzfl", label, workload, args) if byzfl_ok else None
            ratio_mean = (f"{ours['median_s'] / base['median_s']:.1f}"
                          if "error" not in ours and "error" not in base else "-")
            ratio_byzfl = (f"{theirs['median_s'] / ours['median_s']:.2f}"
                           if theirs and "error" not in theirs and "error" not in ours else "-")
            row = [label, workload, str(rule_f(label, f)), fmt_time(ours), fmt_time(base),
                   fmt_time(theirs), ratio_mean, ratio_byzfl, fmt_mem(ours), fmt_mem(theirs)]
            if baseline_src:
                ratio_old = (f"{ours['median_s'] / old['median_s']:.2f}"
                             if "error" not in ours and "error" not in old else "-")
                row[4:4] = [fmt_time(old), ratio_old]
            rows.append(row)
            notes = [f"byzps: {ours['error']}"] if "error" in ours else []
            if old and "error" in old:
                notes.append(f"baseline: {old['error']}")
            if theirs and "error" in theirs:
                notes.append(f"ByzFL: {theirs['error']}")
            print(" | ".join(row) + ("   # " + "; ".join(notes) if notes else ""),
                  file=sys.stderr, flush=True)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
