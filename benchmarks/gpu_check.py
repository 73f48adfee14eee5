"""The GPU paths of byzps in one short run (a benchmark and check for a machine with CUDA; not a
test: nothing in CI needs a GPU).

What it does, each step timed, into ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``:

1. ``devices``: torch's view of the machine (CUDA build, device names, memory).
2. ``tcp_cuda_workers``: ``byzps run`` over TCP on 127.0.0.1 (real processes), PS on the CPU,
   every worker's forward/backward on ``--device`` (``workers[].device``), a BatchNorm model
   (``cifar10``'s ``resnet20`` on generated images in the official binary format, or
   ``synthetic`` ``mlp_bn`` with ``--task synthetic``), Adam, ``close_at: all``. Checks: the run
   ends OK, no worker needed a resync, and every worker's final replica digest equals the PS's
   (the CPU step is authoritative whatever device computed the gradients). Reports the median
   seconds per round from the PS's metrics.
3. ``tcp_cpu_workers``: the same job with every worker on the CPU, for the s/round comparison.
4. ``aggregation``: seconds per call of coordinate-wise median, Multi-Krum and trimmed mean on
   an ``(n, d)`` float32 stack on the CPU and on ``--device`` (the rules are plain torch, so
   they run wherever their input lives), and whether the results agree (median and trimmed
   mean exactly; Multi-Krum's selection).

Usage (from the repository root, after ``bash scripts/setup_env.sh`` with a CUDA build of
torch in ``.venv``)::

    .venv/bin/python benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}" [--rounds 20]
        [--device cuda] [--task cifar10|synthetic]

With ``--device cpu`` every step runs on the CPU (a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from byzps import aggregators  # noqa: E402

DIGEST = re.compile(r"replica digest ([0-9a-f]{32})")


def devices() -> dict:
    """torch's CUDA build and the devices it sees."""
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name,
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def cifar_files(root: Path, records: int = 10_000) -> Path:
    """``root/cifar-10-batches-bin/`` in the official binary format (1 label byte + 3072 pixel
    bytes per record), filled with seeded random bytes: s/round does not depend on pixels."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        rec = rng.integers(0, 256, size=(records, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=records, dtype=np.uint8)
        (folder / name).write_bytes(rec.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]) + "\n")
    return folder


def job_config(task: str, device: str, rounds: int, port: int, workers: int = 4) -> dict:
    """The checked job: PS on the CPU, workers on ``device``."""
    params = {"model": "resnet20"} if task == "cifar10" else \
        {"model": "mlp_bn", "features": 64, "classes": 10, "hidden": 256}
    return {
        "task": {"ref": task, "params": params},
        "training": {"rounds": rounds, "batch_size": 32, "learning_rate": 0.001, "seed": 0,
                     "eval_every": rounds, "test_limit": 500, "round_timeout": 120.0,
                     "close_at": "all", "optimizer": {"name": "adam"}, "device": "cpu"},
        "aggregation": {"method": "coordinate_wise_median"},
        "server": {"host": "127.0.0.1", "port": port, "bind_host": "127.0.0.1",
                   "connect_timeout": 300.0},
        "workers": [{"id": i, "device": device} for i in range(workers)],
    }


def tcp_run(cfg: dict, folder: Path, data_root: Path) -> dict:
    """``byzps run`` of ``cfg``; the digests of every node and the s/round."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "import sys; from byzps.cli import byzps_main; "
                        "sys.exit(byzps_main(sys.argv[1:]))", "run", str(path),
                        "--run-dir", str(folder / "run"), "--data-root", str(data_root)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - started
    run = folder / "run"
    ps_log = (run / "server.log").read_text() if (run / "server.log").exists() else ""
    ps_digest = DIGEST.search(ps_log)
    worker_digests, resyncs = {}, 0
    for w in cfg["workers"]:
        log = run / f"worker-{w['id']}.log"
        text = log.read_text() if log.exists() else ""
        m = DIGEST.search(text)
        worker_digests[w["id"]] = m.group(1) if m else None
        resyncs += text.lower().count("resync")
    per_round = []
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("round", 0) > 0 and rec.get("test_accuracy") is None:
                per_round.append(rec["seconds_round"])
    return {"exit": r.returncode, "wall_s": round(wall, 1),
            "ps_digest": ps_digest.group(1) if ps_digest else None,
            "worker_digests": worker_digests, "resync_lines": resyncs,
            "digests_equal": bool(ps_digest) and all(
                d == ps_digest.group(1) for d in worker_digests.values()),
            "s_per_round_median": statistics.median(per_round) if per_round else None,
            "s_per_round_mean": statistics.fmean(per_round) if per_round else None,
            "tail": (r.stdout + r.stderr)[-1500:]}


def _time(fn, x, repeats: int = 5) -> tuple[float, torch.Tensor]:
    out = fn(x)                          # warm-up (and CUDA kernels compiled)
    if x.is_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def aggregation(device: str, n: int = 32, d: int = 1_000_000, f: int = 5) -> list[dict]:
    """Seconds per call on the CPU and on ``device`` for three rules on an (n, d) stack."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    x[:f] *= 100.0                                    # f far rows
    rows = []
    for name, params in (("coordinate_wise_median", {}), ("trimmed_mean", {"f": f}),
                         ("multi_krum", {"f": f})):
        rule = aggregators.build(name, **params)
        cpu_s, cpu_out = _time(rule, x)
        dev_s, dev_out = _time(rule, x.to(device))
        rows.append({"rule": name, "n": n, "d": d, "f": f, "cpu_s": round(cpu_s, 4),
                     "device_s": round(dev_s, 4),
                     "equal": bool(torch.equal(cpu_out, dev_out.cpu())),
                     "max_abs_diff": float((cpu_out - dev_out.cpu()).abs().max())})
    return rows


def report(result: dict) -> str:
    """The markdown summary of ``result``."""
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             f"Machine: {platform.machine()} {os.cpu_count()} CPUs, torch "
             f"{result['devices']['torch']} (CUDA {result['devices']['cuda_build']}), "
             f"devices {result['devices']['devices']}; worker device {result['device']}.", "",
             "| run | exit | digests equal | resync lines | s/round median | wall s |",
             "|---|---|---|---|---|---|"]
    for key in ("tcp_cuda_workers", "tcp_cpu_workers"):
        r = result.get(key)
        if r:
            lines.append(f"| {key} | {r['exit']} | {r['digests_equal']} | {r['resync_lines']} "
                         f"| {r['s_per_round_median']} | {r['wall_s']} |")
    lines += ["", "| rule | n x d | CPU s | device s | equal | max abs diff |",
              "|---|---|---|---|---|---|"]
    for a in result.get("aggregation", []):
        lines.append(f"| {a['rule']} | {a['n']} x {a['d']} | {a['cpu_s']} | {a['device_s']} | "
                     f"{a['equal']} | {a['max_abs_diff']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--task", choices=("cifar10", "synthetic"), default="cifar10")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"devices": devices(), "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(tmp) / "data"
        if args.task == "cifar10":
            cifar_files(data_root)
        else:
            data_root.mkdir()
        for key, dev in (("tcp_cuda_workers", args.device), ("tcp_cpu_workers", "cpu")):
            port = 29_000 + (os.getpid() % 1000) + (0 if dev == args.device else 1000)
            result[key] = tcp_run(job_config(args.task, dev, args.rounds, port),
                                  Path(tmp) / key, data_root)
            print(key, {k: v for k, v in result[key].items() if k != "tail"}, flush=True)
    result["aggregation"] = aggregation(args.device)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(report(result))
    print(report(result))
    ok = result["tcp_cuda_workers"]["exit"] == 0 and result["tcp_cuda_workers"]["digests_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
