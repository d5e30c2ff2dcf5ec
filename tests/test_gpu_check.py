"""The GPU check (``python -m tests.bench.gpu_check``) on a machine without a GPU: it skips cleanly,
and its driver records a part that runs out of time without stopping the next one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.bench.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, **(env or {})})


def test_without_a_gpu_the_check_skips_with_a_message_exit_0_and_a_json_saying_so(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = _check("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a machine with one
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: no CUDA device"), proc.stdout
    report = json.loads(out.read_text())
    assert report["status"] == "skipped" and report["reason"].startswith("gpu_check: skipped")


def test_a_part_out_of_time_is_recorded_and_the_next_part_still_runs(tmp_path: Path) -> None:
    """The CPU dry run of the head step (ours against the released computation, fp32 and bf16) after
    a training-step part given 2 s: exit 1, the first recorded as out of time, the second complete."""
    out = tmp_path / "gpu_check.json"
    proc = _check("--device", "cpu", "--tiny", "--parts", "train_step", "head_step", "--budget", "train_step=2", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = json.loads(out.read_text())["parts"]
    assert parts["train_step"]["status"] == "timeout" and "2 s budget" in parts["train_step"]["error"]
    head = parts["head_step"]
    assert head["status"] == "ok", head
    assert set(head["result"]["rows"]) == {"released/fp32", "ours/fp32", "released/bf16", "ours/bf16"}
    assert head["result"]["counts_identical/fp32"] is True
    assert head["result"]["ours_vs_released/fp32"]["logits"]["relative"] < 1e-5
