"""``salgl train [CONFIG.yaml] [key=value ...] [--resume RUN] [--address ADDR]``."""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path
from typing import Any

# The bundled run configs: package data of `jobs` (jobs/configs/*.yaml), found the same way in a
# checkout, an editable install and a wheel.
CONFIG_DIR = Path(str(importlib.resources.files("jobs") / "configs"))
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def load_config_file(path: str | None) -> dict[str, Any]:
    import yaml

    from salgl.errors import NotFound

    file = Path(path) if path else DEFAULT_CONFIG
    if not file.is_file():
        bundled = CONFIG_DIR / (str(path) + ("" if str(path).endswith(".yaml") else ".yaml"))
        if path and bundled.is_file():
            file = bundled
        else:
            raise NotFound(f"config file {path!r} not found (bundled configs: {', '.join(p.stem for p in DEFAULT_CONFIG.parent.glob('*.yaml'))})")
    return yaml.safe_load(file.read_text()) or {}


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a config file (or bundled config name) unless it is key=value."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train SALGL on Ray Train (default: mosaic data, 2 workers)")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="config file or bundled name (default, voc2007, coco2014, nuswide, official), then overrides")
    p.add_argument("--resume", metavar="RUN", help="continue a stopped run (name under run.storage, or its folder)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.training.driver import train
    from salgl.config import load, parse_overrides

    config_file, override_items = split_config_and_overrides(args.args)
    overrides = parse_overrides(override_items)
    cfg = load(load_config_file(config_file), overrides)  # with --resume: where to look (run.storage)
    if args.resume:
        if "preset" in overrides:
            from salgl.config import ConfigError

            raise ConfigError("preset", "a resumed run keeps the preset it started with; give single keys to change")
        train(cfg, resume=args.resume, address=args.address, overrides=overrides)
    else:
        train(cfg, address=args.address)
    return 0
