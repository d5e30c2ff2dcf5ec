"""Fused CPU kernels for the attention scores, compiled on first use (``salgl/kernels/*.c``).

Why: on CPU, the attention's elementwise work over the (B, n, m, d1) intermediate done with
PyTorch ops makes several passes over each tile (product, logistic, reductions); one fused pass
forward and one backward take a quarter of the time at COCO size (tests/bench/head_step.py:
0.27 s against 1.1 - 1.3 s for forward + backward). ``torch.compile`` of the plain expression was
slower than the PyTorch tiles (0.43 / 2.3 s), so the kernel is plain C built with the system's
C compiler (``$CC``, else ``cc``) into ``~/.cache/salgl/native`` (``SALGL_NATIVE_CACHE``).

Optional: without a compiler, when the build fails, or with ``SALGL_NATIVE_KERNELS=0``, the
callers fall back to their PyTorch path (one warning says why). Threads: the C code is
single-threaded; calls run on ``torch.get_num_threads()`` Python threads over disjoint region
ranges (ctypes releases the GIL during a call).
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

SOURCE = Path(__file__).parent / "kernels" / "bilinear_logistic.c"
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
    _run_over_regions(_region_ranges(num_regions), lambda j0, j1, _: lib.bilinear_logistic_forward(
        regions.data_ptr(), labels.data_ptr(), direction.data_ptr(), out.data_ptr(),
        batch, num_labels, num_regions, dim, j0, j1))
    return out


def logistic_grad_sums(regions: Tensor, labels: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """With s = logistic(2 u_bj * v_i), w = g s (1 - s) and g = grad (B, n, m):
    (sum_i w v_i (B, m, d1), sum_bj w u_bj (n, d1), sum_bij g s (d1,))."""
    regions, labels, grad = (t.detach().contiguous() for t in (regions, labels, grad))
    (batch, num_regions, dim), num_labels = regions.shape, labels.shape[0]
    d_regions = torch.zeros_like(regions)  # (B, m, d1): threads write disjoint region rows
    ranges = _region_ranges(num_regions)
    d_labels = regions.new_zeros(len(ranges), num_labels, dim)  # one accumulator per thread
    d_direction = regions.new_zeros(len(ranges), dim)
    lib = _library()
    _run_over_regions(ranges, lambda j0, j1, t: lib.bilinear_logistic_backward(
        regions.data_ptr(), labels.data_ptr(), grad.data_ptr(), d_regions.data_ptr(),
        d_labels[t].data_ptr(), d_direction[t].data_ptr(), batch, num_labels, num_regions, dim, j0, j1))
    return d_regions, d_labels.sum(0), d_direction.sum(0)


# ---------------------------------------------------------------------------------------------
# Threads


def _region_ranges(num_regions: int) -> list[tuple[int, int]]:
    if num_regions == 0:
        return [(0, 0)]  # nothing to compute; one (empty) call keeps the callers uniform
    step = -(-num_regions // max(1, min(torch.get_num_threads(), num_regions)))
    return [(j0, min(num_regions, j0 + step)) for j0 in range(0, num_regions, step)]


def _run_over_regions(ranges: list[tuple[int, int]], call) -> None:
    """call(j0, j1, thread_index) for each region range, one per thread, waiting for all."""
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
        warnings.warn("salgl: no C compiler found (set CC); the attention uses its PyTorch path on CPU", stacklevel=3)
        return None
    errors = []
    for flags in FLAG_SETS:
        path = _cache_dir() / f"bilinear_logistic-{_build_key(compiler, flags)}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, path)
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(f"{' '.join(flags)}: {getattr(err, 'stderr', None) or err}".strip()[-500:])
    warnings.warn("salgl: building the native attention kernel failed; the attention uses its PyTorch path "
                  "on CPU.\n" + "\n".join(errors), stacklevel=3)
    return None


def _compile(compiler: str, flags: list[str], path: Path) -> None:
    """Compile to a temporary file beside ``path``, then rename it there (concurrent builders race safely)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the temporary folder of _cache_dir's fallback
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.so")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.bilinear_logistic_forward.argtypes = [_PTR] * 4 + [_LONG] * 6
    lib.bilinear_logistic_forward.restype = None
    lib.bilinear_logistic_backward.argtypes = [_PTR] * 6 + [_LONG] * 6
    lib.bilinear_logistic_backward.restype = None
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
    """Source, compiler, flags and CPU: ``-march=native`` code must not run on another CPU model
    (a cache directory shared by a cluster's nodes)."""
    parts = [SOURCE.read_text(), compiler, *flags, platform.machine(), _cpu_identity()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in info.splitlines() if line.startswith(("vendor_id", "model name", "flags")))
