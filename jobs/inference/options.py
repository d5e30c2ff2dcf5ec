"""What every way of predicting shares (``salgl predict``, ``salgl serve``, the MLflow model): the
options' defaults and how an image sent as text is decoded. Plain Python: the CLI imports it to
build its help before torch loads."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass


@dataclass(frozen=True)
class PredictionDefaults:
    """The options every way of predicting shares (``salgl predict``, ``salgl serve``, the MLflow model)."""

    threshold: float = 0.5  # score at which a label is predicted
    top_k: int = 5  # best labels listed with their scores
    batch_size: int = 32  # images per model call


DEFAULTS = PredictionDefaults()


def decode_base64(text: str) -> bytes:
    """Strict base64 (line breaks allowed: ``base64.encodebytes`` wraps lines); ``ValueError`` when it is not."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as err:  # a ValueError subclass: name it plainly
        raise ValueError(f"not valid base64: {err}") from None
