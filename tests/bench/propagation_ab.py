"""The propagation phase alone, ours against the released computation, interleaved (issue #28 item 6).

    .venv/bin/python -m tests.bench.propagation_ab [--rounds 4] [--out bench_out/propagation_ab.json]

COCO size as in ``tests.bench.head_step``: B = 32, n = 80, d = 2048, T = 3, messages "both",
a dense row-normalised graph. ``GatedPropagation`` against the released ``GatedGNN``
(``tests.reference.released_reference``) holding the same weights, forward + backward of a fixed
random linear loss, in one process and alternating (released, ours) per round: on a shared 2-core
machine whose speed drifts over minutes, adjacent runs see the same machine, where head_step's
variants run minutes apart. Wall time and process CPU time (both threads) per run; the first
round is a warm-up. The outputs and the gradient of h are compared too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salgl.layers import GatedPropagation
from tests.reference.released_reference import GatedGNN

BATCH, LABELS, DIM, STEPS = 32, 80, 2048, 3


def build_pair(seed: int = 0) -> tuple[GatedGNN, GatedPropagation]:
    """The released module and ours with its weights ([W1; W2; W3], [U1; U2], U3 stacked as ours holds them)."""
    torch.manual_seed(seed)
    ref = GatedGNN(DIM, STEPS, True)
    ours = GatedPropagation(DIM, steps=STEPS, message="both")
    with torch.no_grad():
        for target, parts in ((ours.input_proj, (ref.fc1_w, ref.fc2_w, ref.fc3_w)), (ours.hidden_gates, (ref.fc1_u, ref.fc2_u)),
                              (ours.hidden_candidate, (ref.fc3_u,))):
            target.weight.copy_(torch.cat([p.weight for p in parts]))
            target.bias.copy_(torch.cat([p.bias for p in parts]))
    return ref, ours


def run_once(module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    module.zero_grad(set_to_none=True)
    h = inputs["h"].clone().requires_grad_()
    wall, cpu = time.perf_counter(), time.process_time()
    out = module(h, inputs["graph"])
    (out * inputs["grad"]).sum().backward()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "out": out.detach(), "dh": h.grad}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds, the first a warm-up")
    parser.add_argument("--out", default="bench_out/propagation_ab.json")
    args = parser.parse_args(argv)
    modules = dict(zip(("released", "ours"), build_pair()))
    gen = torch.Generator().manual_seed(1)
    graph = torch.rand(BATCH, LABELS, LABELS, generator=gen)
    inputs = {"h": torch.randn(BATCH, LABELS, DIM, generator=gen), "graph": graph / graph.sum(-1, keepdim=True),
              "grad": torch.randn(BATCH, LABELS, DIM, generator=gen)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modules}
    for i in range(args.rounds):
        for name, module in modules.items():
            runs[name].append(run_once(module, inputs))
            print(f"round {i} {name}: wall {runs[name][-1]['wall_s']:.2f} s, cpu {runs[name][-1]['cpu_s']:.2f} s", flush=True)
    rep: dict[str, Any] = {"sizes": {"batch": BATCH, "labels": LABELS, "dim": DIM, "steps": STEPS}, "threads": torch.get_num_threads()}
    for name, r in runs.items():
        timed = r[1:] or r
        rep[name] = {key: {"min": min(x[key] for x in timed), "median": statistics.median(x[key] for x in timed),
                           "all": [x[key] for x in r]} for key in ("wall_s", "cpu_s")}
    rep["max_abs_diff"] = {k: (runs["ours"][-1][k] - runs["released"][-1][k]).abs().max().item() for k in ("out", "dh")}
    for key in ("wall_s", "cpu_s"):
        print(f"{key}: released min {rep['released'][key]['min']:.2f} / median {rep['released'][key]['median']:.2f}, "
              f"ours min {rep['ours'][key]['min']:.2f} / median {rep['ours'][key]['median']:.2f}")
    print(f"max |ours - released|: h^T {rep['max_abs_diff']['out']:.1e}, dL/dh {rep['max_abs_diff']['dh']:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()
