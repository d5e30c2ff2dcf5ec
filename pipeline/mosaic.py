"""Scene mosaics: the built-in offline multi-label dataset (SPEC section 4).

What this data is: each image is a small RGB canvas holding a few *real* Fashion-MNIST product
photos (28x28 grayscale items from Zalando's catalogue), resized and placed at random. A latent
scene decides which items co-occur; by default nothing else shows it (``scene_cue="none"``: one
neutral background for every scene), so a model can only tell the scene from the items it sees.
``scene_cue="tint"`` also tints each scene's background, a colour cue that gives the scene away.
Train images use only items of the official Fashion-MNIST train file, test images only items of
the official t10k (test) file.

What it is not: the scenes, which classes co-occur in them, the tints and the layout are a
synthetic design of ours, made so that label co-occurrence depends on a hidden scene (the
structure SALGL models). It is not a benchmark from the SALGL paper and numbers on it are not
comparable with published ones. The true scene id is stored in the ``scene`` column so scene
recovery can be measured.

Generation (everything from one seed, so output is byte-identical run to run):
- scene k owns ``classes_per_scene`` of the 10 classes (consecutive in a seeded permutation, so the
  scenes together cover the classes and neighbours share some) with Dirichlet(3) weights, and a
  background tint (evenly spaced hues, muted), painted only with ``scene_cue="tint"``;
- an image draws a scene uniformly, then ``min_items..max_items`` items: with probability
  ``in_scene`` a class from the scene's weights (classes not yet in the image first), otherwise any
  of the 10 classes uniformly; then a random item of that class from the split's file;
- each item is scaled to ``min_scale..max_scale`` of the canvas and placed at random, avoiding
  heavy overlap, and alpha-blended in white using its own intensity as alpha (the texture stays).

``design="context"``: scene context is needed, and what it says differs by scene. In the default
design ("classes") a scene only favours some classes and items are drawn independently given the
scene, so every bit of context the scene gives is already in the pairwise co-occurrences (one
global graph holds it), and every item is plainly visible. The context design changes both:
- one item per image is degraded: down-sampled to ``degrade_px`` x ``degrade_px`` (box filter),
  its brightness and contrast set to fixed values (they would otherwise tell the classes apart)
  and scaled back up, so that the pixels say "one of the ``ambiguous`` pair" (default Pullover and
  Coat, the most confusable Fashion-MNIST pair) but hardly which;
- the scenes are K = 2^b combinations of b binary slots: slot j shows one of its own two context
  classes (clear items), the bits of scene k choosing which. The degraded item's class is the pair's
  first or second class by the parity of the bits (with probability ``in_scene``; the other class
  otherwise). So each context class goes with the first class in half of its scenes and with the
  second in the other half: no single co-occurring label, and no sum of them (a pairwise graph or a
  logistic regression on the other labels), tells the pair apart, while the scene, read from the
  combination of clear items, does, through its own co-occurrence. With b = 1 (K = 2) each context
  class decides the pair alone, a control that pairwise context resolves;
- the remaining classes are fillers, drawn uniformly to bring the image to ``min_items..max_items``
  items (it always holds its b slot items and the degraded one), in random drawing order.
Both pair classes occur only as degraded items. The ``degraded`` column records, per image, a
bitmask over label indices: bit i is set when every item of label i in the image is degraded.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.prepare import Example, PrepareResult, write_dataset
from pipeline.shards import file_sha256
from salgl.errors import BadValue, CorruptFile

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
)
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SCENE_CUES = ("none", "tint")
DESIGNS = ("classes", "context")
DEGRADED_MEAN, DEGRADED_STD = 120.0, 60.0  # fixed brightness and contrast of a degraded item (0..255)
NEUTRAL_BACKGROUND = np.array([88, 88, 88], np.int64)  # muted grey, as dark as the tints
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"


@dataclass(frozen=True)
class MosaicConfig:
    """Sizes for a CPU training run of about ten minutes."""

    scenes: int = 4
    classes_per_scene: int = 4
    min_items: int = 2
    max_items: int = 4
    canvas: int = 96  # pixels, square
    min_scale: float = 0.3  # item side as a fraction of the canvas side
    max_scale: float = 0.5
    in_scene: float = 0.9  # probability an item's class comes from the image's scene
    train: int = 4000  # images
    test: int = 1000
    seed: int = 0
    image_format: str = "png"  # "png" (lossless) or "jpeg"
    scene_cue: str = "none"  # "none": one neutral background; "tint": the scene's tint gives it away
    design: str = "classes"  # "classes": scenes favour classes; "context": see the module docstring
    degrade_px: int = 2  # context design: side the degraded item is down-sampled to (1: a flat patch)
    ambiguous: tuple[int, int] = (2, 4)  # context design: the degraded pair (Pullover, Coat)

    def __post_init__(self) -> None:
        if not 1 <= self.classes_per_scene <= len(FASHION_MNIST_CLASSES):
            raise BadValue("classes_per_scene must be in 1..10")
        if not 1 <= self.min_items <= self.max_items:
            raise BadValue("need 1 <= min_items <= max_items")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise BadValue("need 0 < min_scale <= max_scale <= 1")
        if not 0 <= self.in_scene <= 1:
            raise BadValue("in_scene is a probability")
        if self.scenes < 1 or self.canvas < 8 or self.train < 0 or self.test < 0:
            raise BadValue("scenes >= 1, canvas >= 8 and non-negative split sizes")
        if self.image_format not in ("png", "jpeg"):
            raise BadValue("image_format is 'png' or 'jpeg'")
        if self.scene_cue not in SCENE_CUES:
            raise BadValue(f"scene_cue is one of {', '.join(SCENE_CUES)}")
        if self.design not in DESIGNS:
            raise BadValue(f"design is one of {', '.join(DESIGNS)}")
        if self.design == "context":
            self._check_context()

    def _check_context(self) -> None:
        slots = self.scenes.bit_length() - 1
        if self.scenes < 2 or self.scenes != 1 << slots or 2 * slots + 2 > len(FASHION_MNIST_CLASSES):
            raise BadValue("the context design needs scenes = 2, 4, 8 or 16 (2^slots, two classes per slot)")
        a, b = self.ambiguous
        if a == b or not (0 <= a < len(FASHION_MNIST_CLASSES) and 0 <= b < len(FASHION_MNIST_CLASSES)):
            raise BadValue("ambiguous is two different class indices in 0..9")
        if not 1 <= self.degrade_px <= 28:
            raise BadValue("degrade_px must be in 1..28")


class FashionMNISTNotFound(FileNotFoundError):
    """The Fashion-MNIST idx files are missing; the message says how to get them."""


@dataclass(frozen=True)
class SceneDesign:
    """The latent structure: per scene its classes, their weights and its background tint."""

    classes: np.ndarray  # (K, m) class indices (context design: the scene's slot classes)
    weights: np.ndarray  # (K, m) probabilities, rows sum to 1
    tints: np.ndarray  # (K, 3) uint8 RGB
    resolves_to: np.ndarray | None = None  # context design, (K,): the degraded item's class per scene
    fillers: tuple[int, ...] = ()  # context design: the classes that carry no scene

    def describe(self) -> list[dict[str, Any]]:
        scenes = [
            {"classes": [FASHION_MNIST_CLASSES[c] for c in cls],
             "weights": [round(float(w), 4) for w in wts], "tint": [int(v) for v in tint]}
            for cls, wts, tint in zip(self.classes, self.weights, self.tints)
        ]
        if self.resolves_to is not None:
            for scene, cls in zip(scenes, self.resolves_to):
                scene["degraded_class"] = FASHION_MNIST_CLASSES[cls]
                scene["fillers"] = [FASHION_MNIST_CLASSES[c] for c in self.fillers]
        return scenes


# ------------------------------------------------------------------------------- Fashion-MNIST


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (the MNIST format): magic 0x000008<ndim>, big-endian dims, then uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise CorruptFile(f"{path}: not an idx file of {ndim} dimension(s) (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise CorruptFile(f"{path}: truncated ({data.size} values for dims {dims})")
    return data.reshape(dims)


def fashion_mnist_files(directory: str | os.PathLike[str] | None = None) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) idx files per split, or :class:`FashionMNISTNotFound` with advice."""
    where = Path(directory) if directory is not None else DEFAULT_FASHION_MNIST_DIR
    found, missing = {}, []
    for split, names in FASHION_MNIST_FILES.items():
        paths = [_idx_path(where, name) for name in names]
        missing += [name for name, p in zip(names, paths) if p is None]
        found[split] = tuple(paths)
    if missing:
        all_files = ", ".join(n for names in FASHION_MNIST_FILES.values() for n in names)
        raise FashionMNISTNotFound(
            f"Fashion-MNIST files not found in {where} (missing: {', '.join(missing)}). "
            f"On Debian/Ubuntu install them with `sudo apt-get install dataset-fashion-mnist` "
            f"(puts them in {DEFAULT_FASHION_MNIST_DIR}); elsewhere download the four files "
            f"{all_files} from {FASHION_MNIST_URL} into a folder and pass --fashion-mnist DIR "
            f"(fashion_mnist=DIR from Python)."
        )
    return found


def load_fashion_mnist(files: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split's idx files."""
    images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
    if len(images) != len(labels):
        raise CorruptFile(f"{files[0]} and {files[1]} hold different numbers of items")
    return images, labels


# ------------------------------------------------------------------------------------ generation


def scene_design(config: MosaicConfig) -> SceneDesign:
    if config.design == "context":
        return context_design(config)
    n_classes, k, m = len(FASHION_MNIST_CLASSES), config.scenes, config.classes_per_scene
    rng = np.random.default_rng([config.seed, 0])
    perm = rng.permutation(n_classes)
    # Scene s starts at floor(s * 10 / K) in the permutation: the windows tile the classes and
    # neighbouring scenes share a class or two, so a label alone does not give the scene away.
    starts = [s * n_classes // k for s in range(k)]
    classes = np.array([[perm[(start + j) % n_classes] for j in range(m)] for start in starts])
    weights = rng.dirichlet(np.full(m, 3.0), size=k)
    offset = rng.random()
    tints = [colorsys.hsv_to_rgb((offset + s / k) % 1.0, 0.35, 0.42) for s in range(k)]
    return SceneDesign(classes=classes, weights=weights, tints=np.round(np.array(tints) * 255).astype(np.uint8))


def context_design(config: MosaicConfig) -> SceneDesign:
    """Scene k = the bits of k over log2 K slots; slot j shows context class 2j + bit_j (of a seeded
    order of the non-ambiguous classes); the degraded class is the ambiguous pair's by bit parity."""
    rng = np.random.default_rng([config.seed, 3])
    k, slots = config.scenes, config.scenes.bit_length() - 1
    others = [int(c) for c in rng.permutation(len(FASHION_MNIST_CLASSES)) if c not in config.ambiguous]
    context, fillers = others[: 2 * slots], tuple(others[2 * slots :])
    bits = (np.arange(k)[:, None] >> np.arange(slots)) & 1  # (K, slots)
    classes = np.array(context).reshape(slots, 2)[np.arange(slots), bits]  # (K, slots)
    pair = np.array(config.ambiguous)[rng.permutation(2)]  # which class odd parity means is seeded too
    offset = rng.random()
    tints = [colorsys.hsv_to_rgb((offset + s / k) % 1.0, 0.35, 0.42) for s in range(k)]
    return SceneDesign(
        classes=classes, weights=np.full((k, slots), 1.0 / slots),
        tints=np.round(np.array(tints) * 255).astype(np.uint8), resolves_to=pair[bits.sum(1) % 2], fillers=fillers,
    )


def degrade(item: np.ndarray, px: int) -> np.ndarray:
    """A 28x28 item down-sampled to ``px`` x ``px`` with fixed brightness and contrast, (px, px) uint8."""
    small = np.asarray(Image.fromarray(item).resize((px, px), Image.Resampling.BOX), np.float32)
    spread = small.std()
    flat = (small - small.mean()) * (DEGRADED_STD / spread) if spread > 0 else np.zeros_like(small)
    return np.clip(flat + DEGRADED_MEAN + 0.5, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, side: int, canvas: int, boxes: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A random top-left corner for a ``side`` square; a few tries to keep overlap small."""
    best, best_overlap = (0, 0), 2.0
    for _ in range(12):
        y, x = int(rng.integers(canvas - side + 1)), int(rng.integers(canvas - side + 1))
        overlap = 0.0
        for by, bx, bs in boxes:
            inter = max(0, min(y + side, by + bs) - max(y, by)) * max(0, min(x + side, bx + bs) - max(x, bx))
            overlap = max(overlap, inter / min(side, bs) ** 2)
        if overlap < best_overlap:
            best, best_overlap = (y, x), overlap
        if overlap <= 0.2:
            break
    return best


def _draw_class(rng: np.random.Generator, design: SceneDesign, scene: int, used: set[int], in_scene: float) -> int:
    """With probability ``in_scene`` a class of the scene (by its weights, preferring classes not yet
    in the image, so items add labels rather than repeat them), otherwise any class uniformly."""
    if rng.random() >= in_scene:
        return int(rng.integers(len(FASHION_MNIST_CLASSES)))
    classes, weights = design.classes[scene].tolist(), design.weights[scene].tolist()
    fresh = [(c, w) for c, w in zip(classes, weights) if c not in used] or list(zip(classes, weights))
    r = rng.random() * sum(w for _, w in fresh)
    for c, w in fresh:
        r -= w
        if r < 0:
            return c
    return fresh[-1][0]  # r landed on the float rounding margin


@dataclass(frozen=True)
class Mosaic:
    pixels: np.ndarray  # (H, W, 3) uint8
    classes: list[int]  # sorted, unique
    scene: int
    items: list[int]  # indices into the split's Fashion-MNIST file, in drawing order
    degraded: list[int] = field(default_factory=list)  # classes whose every item is degraded

    @property
    def degraded_mask(self) -> int:
        """The ``degraded`` column: bit i set for label index i in ``degraded``."""
        return sum(1 << c for c in self.degraded)


def compose(
    rng: np.random.Generator, images: np.ndarray, pools: Sequence[np.ndarray], design: SceneDesign, config: MosaicConfig
) -> Mosaic:
    """One mosaic; ``pools[c]`` are the indices of class ``c`` items in ``images``."""
    k = config.canvas
    scene = int(rng.integers(config.scenes))
    base = design.tints[scene].astype(np.int64) if config.scene_cue == "tint" else NEUTRAL_BACKGROUND
    background = np.clip(base + rng.integers(-8, 9, size=3), 0, 255)
    canvas = np.empty((k, k, 3), np.float32)  # (H, W, 3)
    canvas[:] = background
    classes: set[int] = set()
    items, boxes, degraded, clear = [], [], set(), set()
    plan = _context_classes(rng, design, scene, config) if config.design == "context" else None
    count = len(plan) if plan is not None else int(rng.integers(config.min_items, config.max_items + 1))
    for n in range(count):
        cls, blur = plan[n] if plan is not None else (_draw_class(rng, design, scene, classes, config.in_scene), False)
        item = int(pools[cls][rng.integers(len(pools[cls]))])
        side = int(round(k * (config.min_scale + (config.max_scale - config.min_scale) * rng.random())))
        y, x = _place(rng, side, k, boxes)
        source = degrade(images[item], config.degrade_px) if blur else images[item]
        resized = Image.fromarray(source).resize((side, side), Image.Resampling.BILINEAR)
        alpha = np.asarray(resized, np.float32)[..., None] * (1.0 / 255.0)  # (s, s, 1)
        region = canvas[y : y + side, x : x + side]  # (s, s, 3) view
        region += alpha * (255.0 - region)  # = region * (1 - alpha) + 255 * alpha
        classes.add(cls)
        (degraded if blur else clear).add(cls)
        items.append(item)
        boxes.append((y, x, side))
    pixels = (canvas + 0.5).astype(np.uint8)  # values are within [0, 255]: rounding, no clipping
    return Mosaic(pixels=pixels, classes=sorted(classes), scene=scene, items=items, degraded=sorted(degraded - clear))


def _context_classes(
    rng: np.random.Generator, design: SceneDesign, scene: int, config: MosaicConfig
) -> list[tuple[int, bool]]:
    """The context design's items as (class, degraded), in a random drawing order: the scene's slot
    classes, the degraded item (the scene's class with probability ``in_scene``) and fillers."""
    assert design.resolves_to is not None
    odd = int(design.resolves_to[scene])
    if rng.random() >= config.in_scene:
        odd = config.ambiguous[1] if odd == config.ambiguous[0] else config.ambiguous[0]
    plan = [(int(c), False) for c in design.classes[scene]] + [(odd, True)]
    wanted = int(rng.integers(config.min_items, config.max_items + 1))
    if design.fillers:
        plan += [(int(design.fillers[i]), False) for i in rng.integers(len(design.fillers), size=max(0, wanted - len(plan)))]
    return [plan[i] for i in rng.permutation(len(plan))]


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buf, format="JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def iter_mosaics(
    images: np.ndarray, labels: np.ndarray, design: SceneDesign, config: MosaicConfig, split: str
) -> Iterator[Mosaic]:
    """The ``config.<split>`` mosaics of one split, drawn from that split's items only."""
    pools = [np.flatnonzero(labels == c) for c in range(len(FASHION_MNIST_CLASSES))]
    empty = [FASHION_MNIST_CLASSES[c] for c, pool in enumerate(pools) if len(pool) == 0]
    if empty:
        raise BadValue(f"the Fashion-MNIST {split} file has no items of {empty}")
    rng = np.random.default_rng([config.seed, 1 if split == "train" else 2])
    for _ in range(getattr(config, split)):
        yield compose(rng, images, pools, design, config)


def _examples(files: tuple[Path, Path], design: SceneDesign, config: MosaicConfig, split: str) -> Iterator[Example]:
    images, labels = load_fashion_mnist(files)  # loaded lazily, one split at a time
    for n, mosaic in enumerate(iter_mosaics(images, labels, design, config, split)):
        yield Example(
            id=f"{split}-{n:06d}", image=encode(mosaic.pixels, config.image_format),
            labels=[FASHION_MNIST_CLASSES[c] for c in mosaic.classes], extra=_extra(mosaic, config),
        )


def _extra(mosaic: Mosaic, config: MosaicConfig) -> dict[str, int]:
    extra = {"scene": mosaic.scene}
    if config.design == "context":
        extra["degraded"] = mosaic.degraded_mask
    return extra


def extra_columns(config: MosaicConfig) -> list[str]:
    """The mosaic's columns beyond the base ones: ``scene``, and ``degraded`` in the context design."""
    return ["scene", "degraded"] if config.design == "context" else ["scene"]


DESIGN_TEXT = {
    "classes": "",
    "context": " In this context design one item per image, of {pair}, is degraded (down-sampled to "
               "{degrade_px}x{degrade_px} px, fixed brightness and contrast) so that only the other items can "
               "tell which it is, and which they imply depends on the scene; the `degraded` column is a "
               "bitmask over label indices of the labels whose items are all degraded.",
}
CUE_TEXT = {
    "none": "on one neutral background; which of {scenes} latent scenes an image belongs to shows only "
            "in which items co-occur",
    "tint": "on a background tinted by one of {scenes} latent scenes (a colour cue that gives the scene away)",
}
DESCRIPTION = (
    "Scene mosaics: {canvas}x{canvas} RGB images, each composed of {min_items}-{max_items} real "
    "Fashion-MNIST product photos (28x28 grayscale items, resized and placed at random) {cue}. "
    "The item pixels are real: train images use "
    "only items of the official Fashion-MNIST train file, test images only items of the official "
    "t10k test file. The scene design (which classes co-occur, with in-scene probability "
    "{in_scene}), the tints and the layout are synthetic and ours. This is not a benchmark of the "
    "SALGL paper; results on it are not comparable with published numbers. The true scene id is in "
    "the `scene` column."
)


def _description(config: MosaicConfig) -> str:
    cue = CUE_TEXT[config.scene_cue].format(scenes=config.scenes)
    pair = " or ".join(FASHION_MNIST_CLASSES[c] for c in config.ambiguous)
    design = DESIGN_TEXT[config.design].format(pair=pair, degrade_px=config.degrade_px)
    return DESCRIPTION.format(cue=cue, **asdict(config)) + design


def convert_mosaic(
    out: str | os.PathLike[str],
    config: MosaicConfig = MosaicConfig(),
    *,
    fashion_mnist: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PrepareResult:
    """Generate the mosaic dataset into ``out`` (splits ``train`` and ``test``, extra ``scene``, and
    ``degraded`` in the context design).

    ``fashion_mnist`` is the folder of the four idx files (default: the Debian package's).
    ``options`` are :func:`~pipeline.prepare.write_dataset`'s keyword arguments.
    """
    files = fashion_mnist_files(fashion_mnist)  # fail early, before any work
    design = scene_design(config)
    checksums = {p.name: file_sha256(p) for pair in files.values() for p in pair}
    return write_dataset(
        out,
        {split: _examples(files[split], design, config, split) for split in ("train", "test")},
        totals={"train": config.train, "test": config.test},
        vocabulary=FASHION_MNIST_CLASSES,
        extra_columns=extra_columns(config),
        inputs=[p for pair in files.values() for p in pair],
        source={"converter": "mosaic", "parameters": {
            **asdict(config), "scene_design": design.describe(), "fashion_mnist_sha256": checksums}},
        description=_description(config),
        **options,
    )
