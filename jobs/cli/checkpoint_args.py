"""The CHECKPOINT argument and its options, shared by ``salgl evaluate``, ``predict`` and ``inspect``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the CLI parser must stay free of torch imports (`salgl --help` is fast)
    from jobs.inference.loading import Loaded
    from salgl.official import ReleasedFlags


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT plus the options that say how to read it."""
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint folder (or run folder), MLflow model URI (runs:/ID/model, models:/NAME/VERSION) or released SALGL .pth")
    p.add_argument("--which", choices=("ema", "live"), default="ema", help="weights of our checkpoints (default: ema)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    released = p.add_argument_group("released SALGL checkpoints (.pth)")
    released.add_argument("--vocabulary", metavar="FILE",
                          help="label names in the checkpoint's order: text file (one per line), JSON list, or dataset folder")
    released.add_argument("--backbone", help="timm name of the backbone (default: read off ResNet checkpoints)")
    released.add_argument("--released-steps", type=int, metavar="T", help="--num-steps of the released run (default 3)")
    for name, default in (("outmess", True), ("soft", False), ("normalize", True), ("ignore-self", False)):
        released.add_argument(f"--released-{name}", action=argparse.BooleanOptionalAction, default=None,
                              help=f"--{name} of the released run (default {'on' if default else 'off'})")


def released_flags(args: argparse.Namespace) -> ReleasedFlags:
    """``ReleasedFlags`` from the ``--released-*`` options; unset ones keep the dataclass defaults."""
    from salgl.official import ReleasedFlags

    given = {
        "num_steps": args.released_steps,
        "outmess": args.released_outmess,
        "soft": args.released_soft,
        "normalize": args.released_normalize,
        "ignore_self": args.released_ignore_self,
    }
    return ReleasedFlags(**{k: v for k, v in given.items() if v is not None})


def load_from_args(args: argparse.Namespace, vocabulary: Sequence[str] | None = None) -> Loaded:
    """The checkpoint named on the command line; ``--vocabulary`` wins over ``vocabulary``."""
    from jobs.inference.loading import load_for_inference, read_vocabulary

    if args.vocabulary:
        vocabulary = read_vocabulary(args.vocabulary)
    return load_for_inference(
        args.checkpoint,
        which=args.which,
        vocabulary=vocabulary,
        flags=released_flags(args),
        backbone=args.backbone,
        tracking_uri=args.tracking_uri,
    )

