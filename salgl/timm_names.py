"""Is a name one of timm's architectures? Answered without importing timm where possible.

Importing timm costs about 2 s on a 2-core machine (it pulls in torchvision and ``torch._dynamo``).
A process that only rebuilds a config from dotted keys (a Tune trial, the CLI before it submits
work) would pay that just to check ``model.backbone.name``. So the architectures of the installed
timm version are written to ``~/.cache/salgl`` the first time timm is asked, and later checks read
that list. Only known names are answered from the file; a name not in it is always put to timm
itself, so a stale or partial file can never reject a valid name.
"""

from __future__ import annotations

import functools
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from salgl.atomic_file import write_atomic

CACHE_DIR = Path("~/.cache/salgl")


def is_timm_model(name: str) -> bool:
    """``timm.is_model(name)``; a pretrained tag (``resnet50.a1_in1k``) names the part before the dot."""
    architecture = name.split(".", 1)[0]
    if "timm" not in sys.modules and architecture in _cached_architectures():
        return True
    import timm

    known = timm.is_model(name)
    if known:
        _remember(timm.list_models)
    return known


@functools.cache
def _cache_file() -> Path | None:
    """One file per timm version (looked up once per process: config checks run on every rebuild)."""
    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None
    return CACHE_DIR.expanduser() / f"timm-{version}-architectures.txt"


def _cached_architectures() -> frozenset[str]:
    path = _cache_file()
    try:
        return frozenset(path.read_text().split()) if path else frozenset()
    except OSError:
        return frozenset()


def _remember(list_architectures: Callable[[], list[str]]) -> None:
    """Write the list once per timm version; a read-only or full disk only costs the speed-up."""
    path = _cache_file()
    if path is None or path.is_file():
        return
    text = "\n".join(sorted(list_architectures())) + "\n"
    try:
        write_atomic(path, lambda handle: handle.write(text.encode()))
    except OSError:
        pass
