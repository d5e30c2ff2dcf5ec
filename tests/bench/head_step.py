"""Head step benchmark: our SALGL head vs the released computation, forward + backward.

    .venv/bin/python -m tests.bench.head_step [--out bench_out/head_step.json] [--repeats 3] [--batch 32] [--quick]

COCO size by default: n = 80 labels, K = 6 scenes, B = 32, m = 196 tokens, d_I = 2048, d_L = 768,
attention dims 1024 / 1024, T = 3, the official preset (token encoder, messages "both", hard
selection and counting, count before use, row-normalised P). ``--quick`` is a small size for smoke
runs. The released side is ``tests.reference.released_reference.ReleasedHead``; ours is
``head_from_official_state_dict`` of its state dict, so both hold the same weights and counts.

What one step is: training mode, counts reset to the same starting counts, forward with targets
(so the batch is counted before use), loss = <logits, g1> + <scene probs, g2> with fixed random
g1, g2, backward into every parameter. The token encoders run with dropout off (``eval()`` on the
encoder only): dropout draws differ between the two implementations, and with it off both steps are
deterministic, so the timed step is also the step whose outputs are compared. Dropout is a few
elementwise passes over (B, m, d) and costs the same on both sides.

Each variant runs in a fresh subprocess, one after the other, so that neither sees the other's
memory and ``VmHWM`` (the kernel's peak resident set, i.e. ``ru_maxrss``) can be reset right before
each step via ``/proc/self/clear_refs``. "step peak" is that peak minus the resident set just
before the step (activations, gradients, workspaces); "process peak" is the absolute peak during
the step (Python, torch and the weights included). Large tensors are mmapped by glibc and unmapped
on free, so resident memory follows what the step really holds, plus allocator slack.

Per-part times come from hooks: forward pre/post hooks on the token encoder, the attention and the
propagation; in backward, autograd runs nodes in reverse creation order, so a part's backward lies
between the moment the gradient of its output is complete (a tensor hook) and the moment that of
the part before it is. "rest" is the remainder: scene classifier, counting, label graph, Phi_c,
classifier, loss (the scene classifier's tiny backward falls into the attention's window).

Matmul floor: FLOPs of every matmul our step runs, forward and backward, counted exactly with
``torch.utils.flop_counter.FlopCounterMode`` (mm/addmm/bmm, plus formulas added here for CPU
flash attention and matrix-vector products), divided by the machine's float32 matmul rate
(best of several 2048^3 ``torch.matmul``). The rate of a shared 2-core VM swings widely (80-165
GFLOP/s between samples a minute apart), so it is sampled before and after the variants and right
before every timed step, and the fastest sample sets the floor: the ratio errs against us.
The step's matmuls are also recorded (op, shapes, strides) and replayed alone right after each
timed step: that is the floor at the rate the machine gives these shapes (its large matmuls run
slower per FLOP than 2048^3 on the development VM), and the step against it is what the rest of
the step costs.

Equality: the two compute the same function in float32 with different summation orders (ours
folds Phi_a into P, the released one applies P to every pair), so they agree to rounding only.
A quantity passes when max |ours - released| <= 1e-5 * max(1, max |released|): absolute for
values of order one or less, relative to the magnitude above that. Counts must match exactly.
Timing on a shared 2-core machine is noisy: every time is the minimum over ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from salgl.layers import TILE_BYTES
from salgl.official import ReleasedFlags, head_from_official_state_dict
from tests.reference.released_reference import ReleasedHead

PARTS = ("token_encoder", "attention", "propagation")
TOLERANCE = 1e-5
# Released key -> ours, for the parameter gradients compared as an extra check of the backward.
GRAD_KEYS = {
    "tb.layers.0.linear1.weight": "token_encoder.layers.0.linear1.weight",
    "scene_linear.weight": "scenes.prototypes.weight",
    "attention.linear1.weight": "attention.region_proj.weight",
    "attention.linear2.weight": "attention.label_proj.weight",
    "attention.hidden_linear.weight": "attention.hidden.weight",
    "attention.target_linear.weight": "attention.score.weight",
    "ggnn.fc3_u.weight": "propagation.hidden_candidate.weight",
    "fc.0.weight": "phi_c.0.weight",
    "classifier.weight": "classifier.weight",
}


@dataclass(frozen=True)
class Sizes:
    labels: int = 80  # n
    scenes: int = 6  # K
    batch: int = 32  # B
    regions: int = 196  # m (14 x 14 tokens)
    token_dim: int = 2048  # d_I
    label_dim: int = 768  # d_L
    attn_dim: int = 1024  # d1 = d2
    ffn: int = 2048
    steps: int = 3  # T


QUICK = Sizes(labels=12, scenes=3, batch=4, regions=16, token_dim=64, label_dim=24, attn_dim=32, ffn=96)


# ---------------------------------------------------------------------------------------------
# The two variants, built from one seed


def released_head(sizes: Sizes, seed: int) -> ReleasedHead:
    """The released module with seeded weights and counts as if 2,000 images had been seen."""
    torch.manual_seed(seed)
    ref = ReleasedHead(
        num_labels=sizes.labels, dim=sizes.token_dim, label_dim=sizes.label_dim, num_scenes=sizes.scenes,
        steps=sizes.steps, att_dim=sizes.attn_dim, ffn=sizes.ffn,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    targets = (torch.rand(2000, sizes.labels, generator=gen) < 0.05).float()  # (N, n)
    scenes = torch.nn.functional.one_hot(torch.randint(sizes.scenes, (2000,), generator=gen), sizes.scenes).float()
    ref.comatrix.copy_(torch.einsum("bk,bi,bj->kij", scenes, targets, targets))  # (K, n, n)
    return ref


@dataclass
class Variant:
    """One implementation behind a common interface: its module, parts, counts and forward."""

    model: nn.Module
    parts: dict[str, nn.Module]
    counts: Tensor
    forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # tokens, targets -> logits, scene probs
    grad_names: dict[str, str]  # released key -> this model's parameter name

    def deterministic_training_mode(self) -> None:
        self.model.train()
        self.parts["token_encoder"].eval()  # dropout off; see the module docstring


def build_variant(name: str, sizes: Sizes, seed: int) -> Variant:
    ref = released_head(sizes, seed)
    if name == "released":
        return Variant(
            ref, {"token_encoder": ref.tb, "attention": ref.attention, "propagation": ref.ggnn}, ref.comatrix,
            lambda tokens, targets: _released_outputs(ref(tokens, targets)), {k: k for k in GRAD_KEYS},
        )
    head = head_from_official_state_dict(ref.state_dict(), ReleasedFlags(num_steps=sizes.steps))
    del ref
    return Variant(
        head, {"token_encoder": head.token_encoder, "attention": head.attention, "propagation": head.propagation},
        head.counts, lambda tokens, targets: tuple(head(tokens, targets)[:2]), GRAD_KEYS,
    )


def _released_outputs(out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return out["logits"], out["scene_probs"]


def make_inputs(sizes: Sizes, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 2)
    return {
        "tokens": torch.randn(sizes.batch, sizes.regions, sizes.token_dim, generator=gen),  # (B, m, d)
        "targets": (torch.rand(sizes.batch, sizes.labels, generator=gen) < 0.05).float(),  # (B, n)
        "grad_logits": torch.randn(sizes.batch, sizes.labels, generator=gen),  # (B, n)
        "grad_scenes": torch.randn(sizes.batch, sizes.scenes, generator=gen),  # (B, K)
    }


# ---------------------------------------------------------------------------------------------
# Measuring one step


class PartClock:
    """Forward and backward wall-clock time of the token encoder, attention and propagation."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.marks: dict[str, float] = {}
        for name, module in parts.items():
            module.register_forward_pre_hook(partial(self._before, name))
            module.register_forward_hook(partial(self._after, name))

    def _before(self, name: str, module: nn.Module, args: Any) -> None:
        self.marks[f"{name}.fwd_start"] = time.perf_counter()

    def _after(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.marks[f"{name}.fwd_end"] = time.perf_counter()
        out = output[0] if isinstance(output, tuple) else output  # attention: (features, alpha)
        if out.requires_grad:
            out.register_hook(partial(self._grad_ready, name))

    def _grad_ready(self, name: str, grad: Tensor) -> None:
        self.marks[f"{name}.grad_ready"] = time.perf_counter()

    def breakdown(self, forward: tuple[float, float], backward: tuple[float, float]) -> dict[str, dict[str, float]]:
        m = self.marks
        fwd = {p: m[f"{p}.fwd_end"] - m[f"{p}.fwd_start"] for p in PARTS}
        fwd["rest"] = forward[1] - forward[0] - sum(fwd.values())
        # Backward order: rest, propagation, attention, token encoder.
        bwd = {
            "rest": m["propagation.grad_ready"] - backward[0],
            "propagation": m["attention.grad_ready"] - m["propagation.grad_ready"],
            "attention": m["token_encoder.grad_ready"] - m["attention.grad_ready"],
            "token_encoder": backward[1] - m["token_encoder.grad_ready"],
        }
        return {p: {"forward": fwd[p], "backward": bwd[p], "total": fwd[p] + bwd[p]} for p in (*PARTS, "rest")}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def run_step(variant: Variant, inputs: dict[str, Tensor], initial_counts: Tensor) -> dict[str, Any]:
    """One training step from the same starting counts; returns outputs, times, memory."""
    variant.model.zero_grad(set_to_none=True)
    variant.counts.copy_(initial_counts)
    gc.collect()
    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    logits, scene_probs = variant.forward(inputs["tokens"], inputs["targets"])
    loss = (logits * inputs["grad_logits"]).sum() + (scene_probs * inputs["grad_scenes"]).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = _status_kib("VmHWM")
    return {
        "time": t2 - t0, "forward": t1 - t0, "backward": t2 - t1, "marks": ((t0, t1), (t1, t2)),
        "step_peak_mib": (peak - rss_before) / 1024, "process_peak_mib": peak / 1024,
        "outputs": {"logits": logits.detach(), "scene_probs": scene_probs.detach(), "counts": variant.counts.double()},
    }


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad, query, key, value)


def _mv_flops(matrix: Any, vector: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * matrix[0] * matrix[1]


def _addmv_flops(bias: Any, matrix: Any, vector: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * matrix[0] * matrix[1]


def _addmm_inplace_flops(self: Any, mat1: Any, mat2: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * mat1[0] * mat1[1] * mat2[1]


# FlopCounterMode knows mm/addmm/bmm and the GPU attention kernels; the CPU ones and the in-place
# forms (the fused gated update's backward accumulates with addmm_) are added here.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    torch.ops.aten.mv: _mv_flops,
    torch.ops.aten.addmv: _addmv_flops,
    torch.ops.aten.addmv_: _addmv_flops,
    torch.ops.aten.addmm_: _addmm_inplace_flops,
}


def count_step_flops(variant: Variant, inputs: dict[str, Tensor], initial_counts: Tensor) -> dict[str, int]:
    """Matmul FLOPs of one step, forward and backward counted separately (also the warm-up step)."""
    variant.model.zero_grad(set_to_none=True)
    variant.counts.copy_(initial_counts)
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as fwd:
        logits, scene_probs = variant.forward(inputs["tokens"], inputs["targets"])
        loss = (logits * inputs["grad_logits"]).sum() + (scene_probs * inputs["grad_scenes"]).sum()
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as bwd:
        loss.backward()
    return {"forward": fwd.get_total_flops(), "backward": bwd.get_total_flops()}


# The ops whose FLOPs make the floor (the keys of FlopCounterMode's own table that run on CPU, plus
# EXTRA_FLOP_FORMULAS'), recorded with their shapes and strides so they can be replayed alone.
MATMUL_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.mv.default, torch.ops.aten.addmv.default,
    torch.ops.aten.addmm_.default, torch.ops.aten.addmv_.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype)

    def make(self) -> Tensor:
        """Random values laid out like the original (transposed and expanded layouts included)."""
        extent = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride) if size > 0)
        return torch.randn(extent, dtype=self.dtype).as_strided(self.shape, self.stride)


class MatmulRecorder(TorchDispatchMode):
    """Records every matmul-class op a step runs (forward and backward): op, argument specs, count."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple[Any, str], tuple[Any, Any, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in MATMUL_OPS:
            spec = tree_map_only(Tensor, TensorSpec.of, (args, kwargs))
            key = (func, repr(spec))
            count = self.calls[key][2] + 1 if key in self.calls else 1
            self.calls[key] = (func, spec, count)
        return func(*args, **kwargs)


def record_step_matmuls(variant: Variant, inputs: dict[str, Tensor], initial_counts: Tensor) -> list[tuple[Any, Any, int]]:
    recorder = MatmulRecorder()
    with recorder:
        run_step(variant, inputs, initial_counts)
    return list(recorder.calls.values())


def replay_matmuls(calls: list[tuple[Any, Any, int]], repeats: int = 3) -> float:
    """Seconds the step's matmuls take alone, at the step's own shapes and layouts: each distinct
    call timed on fresh random operands (the best of ``repeats``) times the number of such calls.
    The floor at the rate this machine gets on these shapes, which large or skinny matmuls need
    not share with 2048^3."""
    total = 0.0
    for func, spec, count in calls:
        args, kwargs = tree_map_only(TensorSpec, TensorSpec.make, spec)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - start)
        total += count * best
    return total


def profile_step(variant: Variant, inputs: dict[str, Tensor], initial_counts: Tensor, top: int = 15) -> list[dict[str, Any]]:
    """The ops that take the most self CPU time in one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(variant, inputs, initial_counts)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in rows]


def worker(name: str, sizes: Sizes, repeats: int, seed: int, result_path: Path, profile: bool) -> None:
    """Everything measured for one variant, in this (fresh) process; results to ``result_path``."""
    load_before = os.getloadavg()[0]
    variant = build_variant(name, sizes, seed)
    variant.deterministic_training_mode()
    clock = PartClock(variant.parts)
    inputs = make_inputs(sizes, seed)
    initial_counts = variant.counts.clone()
    flops = count_step_flops(variant, inputs, initial_counts)  # also the warm-up step
    matmul_calls = record_step_matmuls(variant, inputs, initial_counts)
    steps = []
    for i in range(repeats):
        rate = matmul_rate()  # sampled around the steps too: the fastest the machine showed counts
        step = run_step(variant, inputs, initial_counts)
        step["parts"] = clock.breakdown(*step.pop("marks"))
        step["matmul_rate"] = rate
        step["matmul_rate_after"] = matmul_rate()
        step["own_shape_matmuls_s"] = replay_matmuls(matmul_calls)
        print(f"  {name}: step {i + 1}/{repeats} {step['time']:.2f} s (matmul rate just before: {rate / 1e9:.0f} GFLOP/s)",
              file=sys.stderr, flush=True)
        steps.append(step)
    best = min(steps, key=lambda s: s["time"])
    grads = dict(variant.model.named_parameters())
    torch.save(
        {**best["outputs"], **{f"grad:{k}": grads[ours].grad for k, ours in variant.grad_names.items()}},
        result_path.with_suffix(".pt"),
    )
    summary = {
        "times": [s["time"] for s in steps], "time": best["time"], "forward": best["forward"],
        "matmul_rates": [s["matmul_rate"] for s in steps],
        "matmul_rates_after": [s["matmul_rate_after"] for s in steps],
        "own_shape_matmuls_s": [s["own_shape_matmuls_s"] for s in steps],
        "backward": best["backward"], "parts": best["parts"],
        "step_peak_mib": max(s["step_peak_mib"] for s in steps),
        "process_peak_mib": max(s["process_peak_mib"] for s in steps),
        "matmul_flops": flops, "threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # other processes on the machine
    }
    if profile:
        summary["profile"] = profile_step(variant, inputs, initial_counts)
    result_path.write_text(json.dumps(summary))


# ---------------------------------------------------------------------------------------------
# Driver


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of the best of ``repeats`` square matmuls."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def run_worker(name: str, sizes: Sizes, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    result = tmp / f"{name}.json"
    command = [
        sys.executable, "-m", "tests.bench.head_step", "--worker", name, "--sizes", json.dumps(asdict(sizes)),
        "--repeats", str(args.repeats), "--seed", str(args.seed), "--result", str(result),
    ] + (["--profile"] if args.profile else [])
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(result.read_text()), torch.load(result.with_suffix(".pt"), weights_only=True)


def compare(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in ref:
        diff = (ours[key].double() - ref[key].double()).abs().max().item()
        scale = ref[key].double().abs().max().item()
        limit = 0.0 if key == "counts" else TOLERANCE * max(1.0, scale)
        out[key] = {"max_abs_diff": diff, "max_abs_value": scale, "relative": diff / max(scale, 1e-30), "ok": diff <= limit}
    return out


def report(sizes: Sizes, results: dict[str, dict[str, Any]], diffs: dict[str, Any], rate: float) -> dict[str, Any]:
    ours = results["ours"]
    flops = ours["matmul_flops"]["forward"] + ours["matmul_flops"]["backward"]
    # The fastest rate sampled anywhere in the run: the floor is the lowest it could honestly be.
    samples = [r for v in results.values() for key in ("matmul_rates", "matmul_rates_after") for r in v.get(key, [])]
    rate = max([rate, *samples])
    floor = flops / rate
    out: dict[str, Any] = {
        "sizes": asdict(sizes), "attention_tile_mib": TILE_BYTES / 2**20, "variants": results,
        "matmul_rate_gflops": rate / 1e9,
        "ours_matmul_gflop": flops / 1e9, "ours_matmul_gflop_3x_forward": 3 * ours["matmul_flops"]["forward"] / 1e9,
        "matmul_floor_s": floor, "ours_over_floor": ours["time"] / floor,
        "matmul_rates_sampled_gflops": [r / 1e9 for r in samples],
        # Each step against the rate sampled just before and just after it (their mean): the
        # machine's speed drifts over minutes, so a rate sampled minutes away says little about
        # what a given step could get.
        "ours_over_paired_floor": [
            t / (flops / ((before + after) / 2))
            for t, before, after in zip(ours["times"], ours["matmul_rates"], ours["matmul_rates_after"])
        ],
    }
    # Each step against its own matmuls replayed alone right after it: what is not matmul work,
    # whatever rate the machine gives these shapes.
    out["ours_over_own_shape_matmuls"] = [t / m for t, m in zip(ours["times"], ours["own_shape_matmuls_s"])]
    out["own_shape_matmuls_over_floor"] = [m / (flops / rate) for m in ours["own_shape_matmuls_s"]]
    if "released" in results:
        out["speedup"] = results["released"]["time"] / ours["time"]
        out["max_diffs"] = diffs
        out["outputs_match"] = all(d["ok"] for k, d in diffs.items() if not k.startswith("grad:"))
    return out


def print_table(rep: dict[str, Any]) -> None:
    variants = rep["variants"]
    names = list(variants)
    row = "{:<34}" + "{:>14}" * len(names)
    print(row.format("", *names))
    print(row.format("time per step, s (min)", *(f"{variants[n]['time']:.2f}" for n in names)))
    print(row.format("  forward / backward, s", *(f"{variants[n]['forward']:.1f}/{variants[n]['backward']:.1f}" for n in names)))
    for part in (*PARTS, "rest"):
        print(row.format(f"  {part} (fwd+bwd), s", *(f"{variants[n]['parts'][part]['total']:.2f}" for n in names)))
    print(row.format("step peak memory, MiB", *(f"{variants[n]['step_peak_mib']:.0f}" for n in names)))
    print(row.format("process peak memory, MiB", *(f"{variants[n]['process_peak_mib']:.0f}" for n in names)))
    print(row.format("load average before/after", *("{:.1f}/{:.1f}".format(*variants[n]["load_average_1min"]) for n in names)))
    print(row.format("matmul GFLOP (fwd+bwd)", *(f"{sum(variants[n]['matmul_flops'].values()) / 1e9:.0f}" for n in names)))
    sampled = ", ".join(f"{r:.0f}" for r in rep["matmul_rates_sampled_gflops"])
    print(f"matmul rate {rep['matmul_rate_gflops']:.1f} GFLOP/s (the best of every sample: {sampled}); "
          f"our floor {rep['matmul_floor_s']:.2f} s; ours / floor = {rep['ours_over_floor']:.3f}")
    paired = rep["ours_over_paired_floor"]
    print(f"each step against the rate sampled just before and after it: ours / floor = median "
          f"{statistics.median(paired):.3f} ({', '.join(f'{r:.3f}' for r in paired)}; target <= 1.15)")
    own = rep["ours_over_own_shape_matmuls"]
    print(f"the step's matmuls alone at its own shapes, replayed after each step: "
          f"{', '.join(f'{t:.2f}' for t in rep['variants']['ours']['own_shape_matmuls_s'])} s, "
          f"{', '.join(f'{r:.3f}' for r in rep['own_shape_matmuls_over_floor'])} x the floor; "
          f"ours / them = median {statistics.median(own):.3f} ({', '.join(f'{r:.3f}' for r in own)})")
    if "speedup" in rep:
        print(f"speed-up {rep['speedup']:.2f}x; outputs match (<= {TOLERANCE:g}): {rep['outputs_match']}")
        for key, d in rep["max_diffs"].items():
            print(f"  {key:<44} max|diff| {d['max_abs_diff']:.2e}  max|value| {d['max_abs_value']:.2e}  rel {d['relative']:.1e}")
    if "profile" in variants["ours"]:
        print("ours, top ops by self CPU time:")
        for e in variants["ours"]["profile"]:
            print(f"  {e['self_s']:8.3f} s {e['calls']:6d}x  {e['op']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/head_step.json")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch", type=int, help=f"B (default {Sizes.batch}; {QUICK.batch} with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--variants", nargs="+", default=["released", "ours"], choices=["released", "ours"])
    parser.add_argument("--profile", action="store_true", help="also profile one step of each variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["released", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, Sizes(**json.loads(args.sizes)), args.repeats, args.seed, Path(args.result), args.profile)
        return {}
    sizes = QUICK if args.quick else Sizes()
    sizes = replace(sizes, batch=args.batch or sizes.batch)
    rate = matmul_rate()
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(args.variants, key=("released", "ours").index):
            print(f"{name}: {sizes}", file=sys.stderr, flush=True)
            results[name], outputs[name] = run_worker(name, sizes, args, Path(tmp))
    rate = max(rate, matmul_rate())
    diffs = compare(outputs["ours"], outputs["released"]) if len(outputs) == 2 else {}
    rep = report(sizes, results, diffs, rate)
    print_table(rep)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()
