"""Fused CPU kernels, compiled on first use (``salgl/kernels/*.c``): the attention scores and the
gated update of graph propagation.

Why: on CPU, elementwise work done with PyTorch ops makes one pass over memory per op, and
autograd adds as many again backward. The attention's (B, n, m, d1) intermediate takes one fused
pass forward and one backward, a quarter of the time of PyTorch tiles at COCO size
(tests/bench/head_step.py: 0.27 s against 1.1 - 1.3 s). The gated update's gates and outputs take
two passes each way instead of about twenty. ``torch.compile`` of the attention's plain expression
was slower than the PyTorch tiles (0.43 / 2.3 s), so the kernels are plain C built with the
system's C compiler (``$CC``, else ``cc``) into ``~/.cache/salgl/native`` (``SALGL_NATIVE_CACHE``).

Optional: without a compiler, when the build fails, or with ``SALGL_NATIVE_KERNELS=0``, the
callers fall back to their PyTorch path (one warning says why). Threads: the C code is
single-threaded; calls run on ``torch.get_num_threads()`` Python threads over disjoint ranges of
rows (ctypes releases the GIL during a call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from salgl.atomic_file import atomic_path

KERNELS = Path(__file__).parent / "kernels"
SOURCES = sorted(KERNELS.glob("*.c"))  # compiled together into one library
HEADERS = sorted(KERNELS.glob("*.h"))
DEFAULT_CACHE = Path("~/.cache/salgl/native")
# Tried in order: tuned for this CPU, then plain (a compiler that rejects the tuning flags).
FLAG_SETS = (
    ["-O3", "-march=native", *(["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []),
     "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3"],
)

_LONG, _PTR = ctypes.c_long, ctypes.c_void_p


def native_enabled() -> bool:
    return os.environ.get("SALGL_NATIVE_KERNELS", "1") != "0"


def usable(*tensors: Tensor) -> bool:
    """Whether the native kernels apply: enabled, built, and every tensor a CPU float32 one."""
    return (
        native_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and _library() is not None
    )


def logistic_dot(regions: Tensor, labels: Tensor, direction: Tensor) -> Tensor:
    """out[b, i, j] = p . logistic(2 u_bj * v_i): regions u (B, m, d1), labels v (n, d1), p (d1,) -> (B, n, m)."""
    regions, labels, direction = (t.detach().contiguous() for t in (regions, labels, direction))
    (batch, num_regions, dim), num_labels = regions.shape, labels.shape[0]
    out = regions.new_empty(batch, num_labels, num_regions)  # (B, n, m)
    lib = _library()
    _run_parallel(_split(num_regions), lambda j0, j1, _: lib.bilinear_logistic_forward(
        regions.data_ptr(), labels.data_ptr(), direction.data_ptr(), out.data_ptr(),
        batch, num_labels, num_regions, dim, j0, j1))
    return out


def logistic_grad_sums(regions: Tensor, labels: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """With s = logistic(2 u_bj * v_i), w = g s (1 - s) and g = grad (B, n, m):
    (sum_i w v_i (B, m, d1), sum_bj w u_bj (n, d1), sum_bij g s (d1,))."""
    regions, labels, grad = (t.detach().contiguous() for t in (regions, labels, grad))
    (batch, num_regions, dim), num_labels = regions.shape, labels.shape[0]
    d_regions = torch.zeros_like(regions)  # (B, m, d1): threads write disjoint region rows
    ranges = _split(num_regions)
    d_labels = regions.new_zeros(len(ranges), num_labels, dim)  # one accumulator per thread
    d_direction = regions.new_zeros(len(ranges), dim)
    lib = _library()
    _run_parallel(ranges, lambda j0, j1, t: lib.bilinear_logistic_backward(
        regions.data_ptr(), labels.data_ptr(), grad.data_ptr(), d_regions.data_ptr(),
        d_labels[t].data_ptr(), d_direction[t].data_ptr(), batch, num_labels, num_regions, dim, j0, j1))
    return d_regions, d_labels.sum(0), d_direction.sum(0)


# The gated update (salgl/kernels/gated_update.c has the formulas). Rows are nodes: gi (N, 3d) is
# x [W1; W2; W3]^T, gh (N, 2d) is h [U1; U2]^T, the biases are summed per gate (b_zr (2d,), b_c
# (d,)), every other operand is (N, d); all contiguous.


def gated_gates(gi: Tensor, gh: Tensor, b_zr: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """z = sigma(gi_z + gh_z + b_z), r = sigma(gi_r + gh_r + b_r) and r h, each (N, d)."""
    z, r, rh = (torch.empty_like(h) for _ in range(3))
    _rows(h, lambda lib, d, r0, r1: lib.gated_update_gates(
        gi.data_ptr(), gh.data_ptr(), b_zr.data_ptr(), h.data_ptr(), z.data_ptr(), r.data_ptr(), rh.data_ptr(), d, r0, r1))
    return z, r, rh


def gated_output(gi: Tensor, uc: Tensor, b_c: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """c = tanh(gi_c + uc + b_c) and h' = h + z (c - h), each (N, d)."""
    c, h_new = torch.empty_like(h), torch.empty_like(h)
    _rows(h, lambda lib, d, r0, r1: lib.gated_update_output(
        gi.data_ptr(), uc.data_ptr(), b_c.data_ptr(), h.data_ptr(), z.data_ptr(), c.data_ptr(), h_new.data_ptr(), d, r0, r1))
    return c, h_new


def gated_output_backward(grad: Tensor, z: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """From g = dL/dh': dgi (N, 3d) with its z and candidate parts set (the r part is left for
    ``gated_gates_backward``) and dh = g (1 - z) (N, d)."""
    dgi, dh = h.new_empty(h.shape[0], 3 * h.shape[1]), torch.empty_like(h)
    _rows(h, lambda lib, d, r0, r1: lib.gated_update_output_backward(
        grad.data_ptr(), z.data_ptr(), c.data_ptr(), h.data_ptr(), dgi.data_ptr(), dh.data_ptr(), d, r0, r1))
    return dgi, dh


def gated_gates_backward(drh: Tensor, r: Tensor, h: Tensor, dgi: Tensor, dh: Tensor) -> None:
    """From drh = dL/d(r h): sets dgi's r part and adds drh r to dh, in place."""
    _rows(h, lambda lib, d, r0, r1: lib.gated_update_gates_backward(
        drh.data_ptr(), r.data_ptr(), h.data_ptr(), dgi.data_ptr(), dh.data_ptr(), d, r0, r1))


def _rows(h: Tensor, call) -> None:
    """call(lib, d, row0, row1) over h's rows split between threads. Every operand the kernels
    read or write has h's row count; the wrappers' callers pass contiguous float32 CPU tensors."""
    lib, (num_rows, dim) = _library(), h.shape
    _run_parallel(_split(num_rows), lambda r0, r1, _: call(lib, dim, r0, r1))


# ---------------------------------------------------------------------------------------------
# Threads


def _split(count: int) -> list[tuple[int, int]]:
    """[0, count) in one contiguous range per thread (regions of the attention, rows of the update)."""
    if count == 0:
        return [(0, 0)]  # nothing to compute; one (empty) call keeps the callers uniform
    step = -(-count // max(1, min(torch.get_num_threads(), count)))
    return [(j0, min(count, j0 + step)) for j0 in range(0, count, step)]


def _run_parallel(ranges: list[tuple[int, int]], call) -> None:
    """call(j0, j1, thread_index) for each range, one per thread, waiting for all."""
    if len(ranges) == 1:
        call(*ranges[0], 0)
        return
    pool = _pool(len(ranges), os.getpid())
    futures = [pool.submit(call, j0, j1, t) for t, (j0, j1) in enumerate(ranges)]
    for future in futures:
        future.result()


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process: a forked child must not reuse its parent's pool,
    whose threads do not exist in the child."""
    return ThreadPoolExecutor(threads, thread_name_prefix="salgl-native")


# ---------------------------------------------------------------------------------------------
# Build and load


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("salgl: no C compiler found (set CC); the attention and the gated update use their "
                      "PyTorch paths on CPU", stacklevel=3)
        return None
    errors = []
    for flags in FLAG_SETS:
        path = _cache_dir() / f"salgl_native-{_build_key(compiler, flags)}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, path)
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(f"{' '.join(flags)}: {getattr(err, 'stderr', None) or err}".strip()[-500:])
    warnings.warn("salgl: building the native kernels failed; the attention and the gated update use their "
                  "PyTorch paths on CPU.\n" + "\n".join(errors), stacklevel=3)
    return None


def _compile(compiler: str, flags: list[str], path: Path) -> None:
    """Compile to a temporary file beside ``path``, then rename it there (concurrent builders race safely)."""
    with atomic_path(path, suffix=".tmp.so") as tmp:
        subprocess.run([compiler, *flags, "-fPIC", "-shared", *map(str, SOURCES), "-o", str(tmp)],
                       check=True, capture_output=True, text=True, timeout=120)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.bilinear_logistic_forward.argtypes = [_PTR] * 4 + [_LONG] * 6
    lib.bilinear_logistic_forward.restype = None
    lib.bilinear_logistic_backward.argtypes = [_PTR] * 6 + [_LONG] * 6
    lib.bilinear_logistic_backward.restype = None
    for name, pointers in (("gated_update_gates", 7), ("gated_update_output", 7),
                           ("gated_update_output_backward", 6), ("gated_update_gates_backward", 5)):
        getattr(lib, name).argtypes = [_PTR] * pointers + [_LONG] * 3
        getattr(lib, name).restype = None
    return lib


def _cache_dir() -> Path:
    """``SALGL_NATIVE_CACHE`` or ~/.cache/salgl/native; a per-user temporary folder if that is not writable."""
    path = Path(os.environ.get("SALGL_NATIVE_CACHE") or DEFAULT_CACHE).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"salgl-native-{os.getuid()}"
    return path


def _build_key(compiler: str, flags: list[str]) -> str:
    """Sources, compiler, flags and CPU: ``-march=native`` code must not run on another CPU model
    (a cache directory shared by a cluster's nodes)."""
    parts = [*(path.read_text() for path in (*SOURCES, *HEADERS)), compiler, *flags, platform.machine(), _cpu_identity()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in info.splitlines() if line.startswith(("vendor_id", "model name", "flags")))
