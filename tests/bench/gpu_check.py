"""GPU check: what the day a GPU is lent should run, in at most 8 minutes on one GPU.

    .venv/bin/python -m tests.bench.gpu_check [--out bench_out/gpu_check.json]
    .venv/bin/python -m tests.bench.gpu_check --device cpu --tiny     # every part at tiny sizes on CPU

Without a CUDA device (and ``--device cuda``, the default) it prints why, writes a JSON saying
``skipped`` and exits 0. On a GPU it runs five parts, each in its own process with its own time
budget, so that a part that fails, hangs or runs out of memory is recorded and the others still run
(the parts are in ``tests/bench/gpu_parts.py``):

- ``gpu_tests``: the tests marked ``gpu`` (``pytest -m gpu``).
- ``head_step``: the head's training step at COCO size (n 80, K 6, B 32, m 196, d 2048, the
  official preset) in fp32 and bf16, ours against the released computation
  (``tests.reference.released_reference``) on the same GPU: time, peak memory, output differences.
- ``train_step``: a 448 px ResNet-101 training step at batch 32 (random weights), the full SALGL
  model against the same backbone with a plain linear multi-label head: the head's share in %.
- ``decode``: the Ray Data ingest's decode rate at 448 px with this machine's CPUs, as a 1-GPU
  ``salgl train`` would size it, set against what the training step consumes (images/s).
- ``ray_train``: tiny ``salgl train`` runs through Ray Train on one GPU (``run.device=cuda``,
  ``run.workers=1``, ``jobs/configs/tiny.yaml``, a mosaic dataset made here): fp32, fp16 with
  channels-last (the gradient scaler's path), bf16 with a compiled backbone.

GPU timings come from CUDA events between ``torch.cuda.synchronize()`` calls, after warm-up steps.
``--device cpu --tiny`` runs every part at tiny sizes on CPU (bf16 where a GPU part would use
fp16), so that the code paths are exercised on a machine without a GPU; its numbers mean nothing.
Exit status: 0 when every part ran (or the check skipped), 1 when a part failed or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 480  # the whole check on one GPU, parts and start-up included
# Seconds per part on a GPU, and at tiny sizes on a 2-core CPU machine (Ray starts slower there).
BUDGETS_S = {
    "gpu_tests": (45, 150),
    "head_step": (70, 90),
    "train_step": (80, 90),
    "decode": (80, 150),
    "ray_train": (170, 300),
}
PART_NAMES = tuple(BUDGETS_S)
SKIP_MESSAGE = "gpu_check: skipped: no CUDA device"


# ---------------------------------------------------------------------------------------------
# Driver: one process per part


def child(args: argparse.Namespace) -> int:
    """Run one part in this process; its result (or the error) goes to ``args.result`` as it grows."""
    from tests.bench.gpu_parts import PARTS

    path = Path(args.result)

    def record(result: dict[str, Any]) -> None:
        path.write_text(json.dumps({"result": result}, default=str))

    try:
        PARTS[args.part](args, record)
        return 0
    except Exception as err:  # noqa: BLE001 - recorded in the JSON, next to what the part finished
        done = json.loads(path.read_text()).get("result") if path.exists() else None
        path.write_text(json.dumps({"result": done, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]},
                                   default=str))
        return 1


def run_part(name: str, budget_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """The part in a fresh process (its own CUDA context and Ray instance), its process group
    killed when the budget runs out (a Ray instance it started goes with it)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "tests.bench.gpu_check", "--part", name, "--device", args.device,
                "--result", str(result_path), "--budget-s", str(budget_s), *(["--tiny"] if args.tiny else [])]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=budget_s)
            status = "ok" if proc.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - start
        found = json.loads(result_path.read_text()) if result_path.exists() else {}
    entry = {"status": status, "seconds": round(seconds, 1), "budget_s": budget_s, "result": found.get("result")}
    if status != "ok":
        entry["error"] = found.get("error") or (f"ran out of its {budget_s:g} s budget" if status == "timeout" else f"exit {proc.returncode}")
        entry["output_tail"] = (output or "")[-3000:]
        entry["traceback"] = found.get("traceback")
    return entry


def environment(device: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(), "device": device}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def skip_reason(device: str) -> str | None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return f"{SKIP_MESSAGE} (torch.cuda.is_available() is False; torch {torch.__version__}); run it where a GPU is, or --device cpu --tiny to exercise it here"
    return None


def parse_budgets(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS_S:
            raise SystemExit(f"--budget: unknown part {name!r} (parts: {', '.join(PART_NAMES)})")
        out[name] = float(seconds)
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every part chosen, in order, each within its budget and the whole within ``TOTAL_BUDGET_S``
    on a GPU (a part that would start with under 10 s left is recorded as not run)."""
    budgets = {name: BUDGETS_S[name][1 if args.tiny else 0] for name in PART_NAMES} | parse_budgets(args.budget)
    total = TOTAL_BUDGET_S * (2 if args.tiny else 1)
    start = time.monotonic()
    parts: dict[str, Any] = {}
    for name in args.parts:
        left = total - (time.monotonic() - start)
        if left < 10:
            parts[name] = {"status": "not run", "error": f"the check's {total} s budget is spent"}
            continue
        print(f"gpu_check: {name} (budget {min(budgets[name], left):.0f} s) ...", flush=True)
        parts[name] = run_part(name, min(budgets[name], left), args)
        print(f"gpu_check: {name}: {parts[name]['status']} in {parts[name]['seconds']} s", flush=True)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run of every code path, minutes on CPU)")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES))
    parser.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS", help="override a part's time budget")
    parser.add_argument("--part", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return child(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reason = skip_reason(args.device)
    if reason:
        print(reason, flush=True)
        out.write_text(json.dumps({"status": "skipped", "reason": reason, "environment": environment("cpu")}, indent=1) + "\n")
        return 0
    started = time.perf_counter()
    parts = run_all(args)
    report = {"status": "ran", "tiny": args.tiny, "environment": environment(args.device), "parts": parts,
              "seconds": round(time.perf_counter() - started, 1)}
    report["summary"] = summarize(parts)
    print_table(report)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out} ({report['seconds']} s)")
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


# ---------------------------------------------------------------------------------------------
# Report


def summarize(parts: dict[str, Any]) -> dict[str, Any]:
    """The numbers the docs want, from whatever parts finished (absent where a part did not)."""
    def result(name: str) -> dict[str, Any]:
        return (parts.get(name) or {}).get("result") or {}

    summary: dict[str, Any] = {}
    head, train, decode = result("head_step"), result("train_step"), result("decode")
    for key in ("speedup/fp32", "speedup/bf16", "counts_identical/fp32", "counts_identical/bf16"):
        if key in head:
            summary[f"head_step.{key}"] = head[key]
    for key, value in train.items():
        if key.startswith("head_share_pct/"):
            summary[f"train_step.{key}"] = value
    if "images_per_s" in decode:
        summary["decode.images_per_s"] = decode["images_per_s"]
        for name, row in train.get("rows", {}).items():
            if name.startswith("salgl/"):
                summary[f"decode_over_step.{name}"] = decode["images_per_s"] / row["images_per_s"]
    return summary


def _row_line(name: str, row: dict[str, Any]) -> str:
    peak = "-" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"
    rate = f"{row['images_per_s']:.1f}" if "images_per_s" in row else "-"
    return f"  {name:<34}{1000 * row['min_s']:>10.1f}{1000 * row['median_s']:>10.1f}{peak:>10}{rate:>10}"


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\ngpu_check on {env.get('gpu', env['device'])} (torch {env['torch']}, CUDA {env['cuda']}, {env['cpus']} CPUs)"
          f"{'; tiny sizes: the numbers mean nothing' if report['tiny'] else ''}")
    print(f"{'part':<12}{'status':>10}{'seconds':>10}{'budget':>8}  error")
    for name, part in report["parts"].items():
        print(f"{name:<12}{part['status']:>10}{part.get('seconds', 0):>10}{part.get('budget_s', 0):>8.0f}  {part.get('error', '')}")
    for name in ("head_step", "train_step"):
        rows = ((report["parts"].get(name) or {}).get("result") or {}).get("rows", {})
        if rows:
            print(f"\n{name}: {'':<26}{'min ms':>10}{'med ms':>10}{'peak MiB':>10}{'img/s':>10}")
            for row_name, row in rows.items():
                print(_row_line(row_name, row))
    for key, value in report["summary"].items():
        print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
    runs = (((report["parts"].get("ray_train") or {}).get("result")) or {}).get("runs", [])
    for run in runs:
        print(f"  salgl train {run['overrides']}: exit {run['exit_code']} in {run['seconds']:.0f} s; {run.get('start_line')}")


if __name__ == "__main__":
    raise SystemExit(main())
