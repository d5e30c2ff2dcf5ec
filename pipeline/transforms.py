"""Image and label transforms over numpy batches: plain functions, no Ray (STYLE habit 11).

A batch is what Ray Data's ``map_batches(batch_format="numpy")`` hands over, and what a torch
DataLoader baseline builds from the same parquet rows: ``image`` (object array of encoded
JPEG/PNG bytes), ``labels`` and ``ignore`` (object arrays of int32 label indices), ``id`` (str),
optional ``scene`` (int32). ``transform_batch`` turns it into model inputs.

Train pipeline (SPEC section 2, "augmentation" row, as released): resize to S x S -> horizontal
flip (p 0.5) -> Cutout (one box of half the side, random solid colour, p ``cutout_p``) ->
RandAugment (``randaugment_ops`` of 15 ops, each applied with p ``randaugment_p``) -> tensor ->
normalisation. Test pipeline: resize -> tensor -> normalisation. ``augment="none"`` makes the
train pipeline the test pipeline.

Randomness: one seed per batch, derived from the caller's seed and the batch's ids, so a run is
reproducible whatever process transforms the batch. The ingest folds the epoch into the seed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import random
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from salgl.config import DataConfig

if TYPE_CHECKING:  # torch loads only where ``normalize_tensor`` runs (the consumer)
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def mean_std(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) of a ``data.normalize`` name, in [0, 1] units."""
    return (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else (HALF_MEAN, HALF_STD)


# Columns a batch carries that ``transform_batch`` consumes; every other column passes through.
CONSUMED = ("image", "labels", "ignore")


# ---------------------------------------------------------------------------------------------
# Single images (PIL in, PIL out)


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image (greyscale, palette and RGBA sources are converted).

    ``max_pixels``: refuse an image with more pixels before decoding it (``DecompressionBombError``,
    as PIL's own limit, ``Image.MAX_IMAGE_PIXELS``, does at twice its size), so a small file that
    declares a huge canvas costs nothing.

    16- and 32-bit greyscale (``I;16*``, ``I``: 16-bit PNG, TIFF) is scaled to 8 bits by its
    bit depth first (``I`` holding values up to 65535 counts as 16-bit); PIL's own conversion
    clips it, so nearly every pixel would become white.
    """
    img = Image.open(io.BytesIO(data))
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise Image.DecompressionBombError(
            f"{img.width} x {img.height} = {img.width * img.height:,} pixels is over the limit of {max_pixels:,}")
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.asarray(img, dtype=np.float64)
        bits = 16 if img.mode.startswith("I;16") or pixels.max(initial=0) <= 65535 else 32
        pixels = pixels * (255.0 / (2**bits - 1))
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB") if img.mode != "RGB" else img


def resize(img: Image.Image, size: int) -> Image.Image:
    """Square resize without keeping the aspect ratio, as ``transforms.Resize((S, S))`` released."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BILINEAR)


def hflip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    if rng.random() < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def cutout(img: Image.Image, rng: np.random.Generator, p: float, factor: float = 0.5) -> Image.Image:
    """Released Cutout (ASL's ``CutoutPIL``): a box of ``factor`` times each side, centred anywhere
    (clipped at the border), filled with one random colour.

    Written here rather than taken from torchvision: ``RandomErasing`` works on normalised tensors
    (so it would have to run after RandAugment, not before as released), keeps the box inside the
    image and fills it with per-pixel noise or a fixed value, not one random colour.
    """
    if rng.random() >= p:
        return img
    w, h = img.size
    box_w, box_h = int(factor * w + 0.5), int(factor * h + 0.5)
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, w)
    y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, h)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    img = img.copy()
    ImageDraw.Draw(img).rectangle([x0, y0, x1, y1], fill=colour)
    return img


@functools.lru_cache(maxsize=8)
def randaugment(num_ops: int, p: float, img_size: int, normalize: str = "imagenet"):
    """timm's RandAugment: 15 ops, ``num_ops`` drawn per image (with replacement), each applied
    with probability ``p``, magnitude 9 with std 0.5 (timm's ImageNet recipe).

    timm rather than torchvision: torchvision's ``RandAugment`` has 14 ops (one is Identity) and
    always applies the ops it draws; timm's has the 15 ops of the released recipe and a per-op
    probability (``-p``), default 0.5, which is "2 of 15 ops, p 0.5 each". Its randomness comes from
    Python's ``random`` and NumPy's global state; ``_seeded_globals`` pins both per batch.
    """
    from timm.data.auto_augment import rand_augment_transform

    mean, _ = mean_std(normalize)
    hparams = {  # as timm.data.create_transform sets them for its own RandAugment
        "translate_const": int(img_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    return rand_augment_transform(f"rand-m9-n{num_ops}-p{p}-mstd0.5", hparams)


@contextlib.contextmanager
def _seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global RNGs (timm draws from them) and restore them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def train_image(img: Image.Image, cfg: DataConfig, rng: np.random.Generator) -> Image.Image:
    """resize -> flip -> Cutout -> RandAugment (released order). Global RNGs must be seeded."""
    img = resize(img, cfg.img_size)
    if cfg.augment == "none":
        return img
    img = hflip(img, rng)
    img = cutout(img, rng, cfg.cutout_p)
    if cfg.randaugment_ops > 0 and cfg.randaugment_p > 0:
        img = randaugment(cfg.randaugment_ops, cfg.randaugment_p, cfg.img_size, cfg.normalize)(img)
    return img


@functools.lru_cache(maxsize=2)
def _normalize_lut(normalize: str) -> np.ndarray:
    """(3, 256) float32: ``(v / 255 - mean_c) / std_c`` for every byte value v and channel c."""
    mean, std = mean_std(normalize)
    values = np.arange(256, dtype=np.float64)[None, :] / 255.0  # (1, 256)
    return ((values - np.asarray(mean)[:, None]) / np.asarray(std)[:, None]).astype(np.float32)


def to_pixels(images: Sequence[Image.Image]) -> np.ndarray:
    """S x S RGB images -> uint8 (B, 3, S, S): what the ingest ships, a quarter of float32's bytes."""
    pixels = np.stack([np.asarray(img, dtype=np.uint8) for img in images])  # (B, S, S, 3)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def normalize_pixels(pixels: np.ndarray, normalize: str) -> np.ndarray:
    """uint8 (B, 3, S, S) -> float32 ``(x / 255 - mean) / std``, on the host.

    A per-channel lookup table writes each output value once: about twice as fast as
    ``astype`` + multiply + subtract, which make three passes over the float32 array. NumPy, not
    torch, because the ingest calls it from Ray's collate thread: a torch op there runs an OpenMP
    team of its own (the worker's thread setting is per thread) that competes with the training
    step for the cores.
    """
    lut = _normalize_lut(normalize)
    out = np.empty(pixels.shape, dtype=np.float32)  # (B, 3, S, S)
    for c in range(3):
        np.take(lut[c], pixels[:, c], out=out[:, c])
    return out


def to_normalized(images: Sequence[Image.Image], normalize: str) -> np.ndarray:
    """S x S RGB images -> float32 (B, 3, S, S), ``(x / 255 - mean) / std``."""
    return normalize_pixels(to_pixels(images), normalize)


def normalize_tensor(pixels: torch.Tensor, normalize: str) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 ``(x / 255 - mean) / std`` on the tensor's device.

    On the host it is ``normalize_pixels`` (the same values wherever a CPU normalises); on an
    accelerator, after a 4x smaller host-to-device copy than float32's, one conversion and two
    in-place passes (the fastest torch form measured), equal to the host's up to float32 rounding
    (< 1e-6).
    """
    import torch

    if pixels.device.type == "cpu":
        return torch.from_numpy(normalize_pixels(pixels.numpy(), normalize))
    return _normalize_arithmetic(pixels, normalize)


def _normalize_arithmetic(pixels: torch.Tensor, normalize: str) -> torch.Tensor:
    """``normalize_tensor``'s accelerator form, in torch arithmetic on any device."""
    import torch

    mean, std = mean_std(normalize)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=pixels.device)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=pixels.device)
    return pixels.to(torch.float32).mul_(scale.view(1, 3, 1, 1)).add_(bias.view(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------
# Labels


def multi_hot(index_lists: Sequence[Sequence[int]], num_labels: int, ids: Sequence[str] | None = None) -> np.ndarray:
    """Lists of label indices -> multi-hot (B, n) of ones at those indices (float32)."""
    out = np.zeros((len(index_lists), num_labels), dtype=np.float32)
    lengths = np.fromiter((len(x) for x in index_lists), dtype=np.int64, count=len(index_lists))
    if lengths.sum() == 0:
        return out
    rows = np.repeat(np.arange(len(index_lists)), lengths)
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in index_lists])
    bad = (cols < 0) | (cols >= num_labels)
    if bad.any():
        row = int(rows[np.argmax(bad)])
        where = f"row {row}" + (f" (id {ids[row]!r})" if ids is not None else "")
        raise ValueError(f"{where}: label index {int(cols[np.argmax(bad)])} outside [0, {num_labels})")
    out[rows, cols] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Batches


def batch_seed(seed: int | None, ids: Sequence[str]) -> int | None:
    """One 64-bit seed from the caller's seed and the batch's ids (None stays None: fresh entropy)."""
    if seed is None:
        return None
    digest = hashlib.blake2b("\0".join(map(str, ids)).encode(), digest_size=8).digest()
    return int(np.random.SeedSequence([seed % 2**63, int.from_bytes(digest, "little")]).generate_state(1, np.uint64)[0])


def transform_batch(
    batch: dict[str, np.ndarray],
    *,
    cfg: DataConfig,
    num_labels: int,
    train: bool,
    seed: int | None,
    normalized: bool = True,
) -> dict[str, np.ndarray]:
    """Parquet rows -> model inputs.

    Returns ``image`` float32 (B, 3, S, S) (``normalized`` False: uint8 pixels, which the
    consumer turns into the same values with ``normalize_pixels`` or ``normalize_tensor``), ``target`` float32 (B, n) multi-hot of ``labels``,
    ``ignore`` bool (B, n) (True where that label is excluded from the image's AP; all False when
    the batch has no ``ignore`` column), and every other input column unchanged (``id``,
    ``scene``, ...). ``seed`` None draws fresh randomness; an int makes the batch reproducible.
    """
    ids = [str(x) for x in batch["id"]] if "id" in batch else [str(i) for i in range(len(batch["image"]))]
    images = [decode_image(bytes(b)) for b in batch["image"]]
    if train and cfg.augment != "none":
        s = batch_seed(seed, ids)
        rng = np.random.default_rng(s)
        with _seeded_globals(s if s is not None else int(rng.integers(2**63))):
            images = [train_image(img, cfg, rng) for img in images]
    else:
        images = [resize(img, cfg.img_size) for img in images]
    out = {name: np.asarray(col) for name, col in batch.items() if name not in CONSUMED}
    out["image"] = to_normalized(images, cfg.normalize) if normalized else to_pixels(images)
    out["target"] = multi_hot(batch["labels"], num_labels, ids)
    if "ignore" in batch:
        out["ignore"] = multi_hot(batch["ignore"], num_labels, ids).astype(bool)
    else:
        out["ignore"] = np.zeros((len(ids), num_labels), dtype=bool)
    return out
