"""``salgl predict``: labels, top-k and the detected scene for image files (or encoded images), in plain torch.

Images are read, resized and normalised as the checkpoint's test transform does
(``pipeline.transforms``), scored in batches, and turned into one JSON-able record each. A file
that cannot be read or decoded gets a record with an ``error`` instead, and the rest go on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from jobs.inference.loading import score_images
from jobs.inference.options import DEFAULTS
from pipeline.transforms import decode_image, resize, to_normalized
from salgl.config import DataConfig
from salgl.model import SALGL

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# What a broken or unreadable file raises: OSError covers missing files, PIL's
# UnidentifiedImageError and truncated data; DecompressionBombError is a plain Exception.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# An image file, or an image's encoded bytes (what the MLflow model is given: jobs.inference.pyfunc).
Source = Union[Path, bytes]


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and the image files under each folder (recursive, sorted).

    A path that does not exist is kept, so that it is reported like any other unreadable file.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(path)
    return found


def load_image(source: Source, cfg: DataConfig, *, max_pixels: int | None = None) -> Image.Image:
    """The file (or encoded image) as an S x S RGB image; raises one of ``READ_ERRORS`` when it cannot
    be read, or has more than ``max_pixels`` pixels."""
    img = decode_image(source if isinstance(source, bytes) else source.read_bytes(), max_pixels=max_pixels)
    img.load()  # PIL decodes lazily: force it here, where a truncated file can be caught
    return resize(img, cfg.img_size)


def score_record(
    probs: np.ndarray, scene_probs: np.ndarray, vocabulary: Sequence[str], *, threshold: float, top_k: int
) -> dict[str, Any]:
    """One image's scores: labels >= threshold (best first) and theirs, the top-k with scores, the scene."""
    order = np.argsort(-probs, kind="stable")  # (n,)
    chosen = [i for i in order if probs[i] >= threshold]
    scene = int(scene_probs.argmax())
    return {
        "labels": [vocabulary[i] for i in chosen],
        "scores": [round(float(probs[i]), 6) for i in chosen],
        "top_k": [{"label": vocabulary[i], "score": round(float(probs[i]), 6)} for i in order[:top_k]],
        "scene": scene,
        "scene_probability": round(float(scene_probs[scene]), 6),
    }


def prediction_record(
    source: Source, probs: np.ndarray, scene_probs: np.ndarray, vocabulary: Sequence[str], *, threshold: float, top_k: int
) -> dict[str, Any]:
    """One image's JSON line: where it came from (a file's ``path``), then its ``score_record``."""
    return {**_origin(source), **score_record(probs, scene_probs, vocabulary, threshold=threshold, top_k=top_k)}


def error_record(source: Source, err: BaseException) -> dict[str, Any]:
    # PIL names the in-memory buffer (`<_io.BytesIO object at 0x...>`), not the file: say it plainly.
    reason = "cannot identify image file" if isinstance(err, UnidentifiedImageError) else str(err)
    return {**_origin(source), "error": f"{type(err).__name__}: {reason}"}


def _origin(source: Source) -> dict[str, str]:
    # Encoded bytes (the MLflow model's input) have no name; the caller keeps them in order.
    return {} if isinstance(source, bytes) else {"path": str(source)}


def predict_chunk(
    model: SALGL, cfg: DataConfig, vocabulary: Sequence[str], paths: Sequence[Source], *, threshold: float, top_k: int,
    max_pixels: int | None = None,
) -> list[dict[str, Any]]:
    """Records for ``paths`` (files or encoded images) in their order: the readable ones scored in one batch
    (an image over ``max_pixels`` gets an error record, undecoded)."""
    images: dict[int, Image.Image] = {}
    records: list[dict[str, Any] | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, cfg, max_pixels=max_pixels)
        except READ_ERRORS as err:
            records[i] = error_record(path, err)
    if images:
        batch = torch.from_numpy(to_normalized(list(images.values()), cfg.normalize))  # (b, 3, S, S)
        probs, scene_probs = score_images(model, batch)
        for row, i in enumerate(images):
            records[i] = prediction_record(paths[i], probs[row], scene_probs[row], vocabulary, threshold=threshold, top_k=top_k)
    return [r for r in records if r is not None]


def predict_files(
    model: SALGL,
    cfg: DataConfig,
    vocabulary: Sequence[str],
    paths: Sequence[Source],
    *,
    batch_size: int = DEFAULTS.batch_size,
    threshold: float = DEFAULTS.threshold,
    top_k: int = DEFAULTS.top_k,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Records for every path (or encoded image), in order, ``batch_size`` images per model call, with a progress bar."""
    from tqdm import tqdm

    model.eval()
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield from predict_chunk(model, cfg, vocabulary, chunk, threshold=threshold, top_k=top_k)
            bar.update(len(chunk))
