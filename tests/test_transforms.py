"""pipeline.transforms without Ray: shapes, dtypes, seeds, the released augmentation steps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms as tv

from pipeline import transforms as T
from salgl.config import DataConfig

N_LABELS = 6


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos of different sizes and aspect ratios."""
    return [
        Image.fromarray(skimage.data.astronaut()).resize((160, 120)),
        Image.fromarray(skimage.data.chelsea()),  # 451 x 300
        Image.fromarray(skimage.data.coffee()).crop((0, 0, 200, 300)),
    ]


def _batch(photos: list[Image.Image], ids: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(photos)
    return {
        "image": np.array([_encode(p) for p in photos], dtype=object),
        "labels": np.array([np.array([0, 2], np.int32), np.array([5], np.int32), np.array([1, 3, 4], np.int32)][:n], dtype=object),
        "ignore": np.array([np.array([], np.int32), np.array([1], np.int32), np.array([], np.int32)][:n], dtype=object),
        "id": np.array(ids or [f"img{i}" for i in range(n)], dtype=object),
        "scene": np.arange(n, dtype=np.int32),
    }


def _cfg(**kw) -> DataConfig:
    return DataConfig(img_size=kw.pop("img_size", 64), **kw)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("normalize", ["imagenet", "half"])
def test_shapes_dtypes_and_passthrough(photos, train, normalize):
    batch = _batch(photos)
    out = T.transform_batch(batch, cfg=_cfg(normalize=normalize), num_labels=N_LABELS, train=train, seed=0)
    assert out["image"].shape == (3, 3, 64, 64) and out["image"].dtype == np.float32
    assert out["image"].flags.c_contiguous
    assert out["target"].shape == (3, N_LABELS) and out["target"].dtype == np.float32
    assert out["ignore"].shape == (3, N_LABELS) and out["ignore"].dtype == np.bool_
    assert list(out["id"]) == ["img0", "img1", "img2"]
    np.testing.assert_array_equal(out["scene"], [0, 1, 2])
    assert set(out) == {"image", "target", "ignore", "id", "scene"}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("normalize", ["imagenet", "half"])
def test_uint8_pixels_normalised_by_the_consumer_match_the_float_output(photos, train, normalize):
    """The ingest ships ``normalized=False`` pixels and the consumer normalises them: the same
    images (same seed, same augmentations) as the float output, exactly on the host
    (``normalize_pixels``, and ``normalize_tensor`` on a CPU tensor), to float32 rounding in the
    torch arithmetic an accelerator runs."""
    cfg = _cfg(normalize=normalize)
    floats = T.transform_batch(_batch(photos), cfg=cfg, num_labels=N_LABELS, train=train, seed=3)
    pixels = T.transform_batch(_batch(photos), cfg=cfg, num_labels=N_LABELS, train=train, seed=3, normalized=False)
    assert pixels["image"].dtype == np.uint8 and pixels["image"].shape == (3, 3, 64, 64) and pixels["image"].flags.c_contiguous
    np.testing.assert_array_equal(T.normalize_pixels(pixels["image"], normalize), floats["image"])  # the host path
    np.testing.assert_array_equal(T.normalize_tensor(torch.from_numpy(pixels["image"]), normalize).numpy(), floats["image"])
    out = T._normalize_arithmetic(torch.from_numpy(pixels["image"]), normalize)  # what an accelerator runs
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), floats["image"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pixels["target"], floats["target"])


def test_targets_and_ignore_mask(photos):
    out = T.transform_batch(_batch(photos), cfg=_cfg(), num_labels=N_LABELS, train=False, seed=None)
    expected = np.zeros((3, N_LABELS), np.float32)
    expected[0, [0, 2]] = expected[1, 5] = expected[2, [1, 3, 4]] = 1
    np.testing.assert_array_equal(out["target"], expected)
    ignore = np.zeros((3, N_LABELS), bool)
    ignore[1, 1] = True
    np.testing.assert_array_equal(out["ignore"], ignore)


def test_missing_ignore_column_gives_all_false(photos):
    batch = _batch(photos)
    del batch["ignore"]
    out = T.transform_batch(batch, cfg=_cfg(), num_labels=N_LABELS, train=False, seed=None)
    assert not out["ignore"].any() and out["ignore"].shape == (3, N_LABELS)


def test_label_out_of_range_names_the_row(photos):
    batch = _batch(photos)
    batch["labels"][1] = np.array([N_LABELS], np.int32)
    with pytest.raises(ValueError, match="img1"):
        T.transform_batch(batch, cfg=_cfg(), num_labels=N_LABELS, train=False, seed=None)


def test_multi_hot_empty_lists():
    out = T.multi_hot([np.array([], np.int32), np.array([], np.int32)], 4)
    assert out.shape == (2, 4) and not out.any()


def test_test_transform_matches_torchvision(photos):
    """Resize + normalise equals torchvision's Resize((S, S)) -> ToTensor -> Normalize."""
    ref = tv.Compose([tv.Resize((64, 64)), tv.ToTensor(), tv.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
    batch = _batch(photos)
    out = T.transform_batch(batch, cfg=_cfg(), num_labels=N_LABELS, train=False, seed=None)
    expected = torch.stack([ref(T.decode_image(b)) for b in batch["image"]]).numpy()
    np.testing.assert_allclose(out["image"], expected, atol=1e-5)


def test_half_normalisation_range(photos):
    out = T.transform_batch(_batch(photos), cfg=_cfg(normalize="half"), num_labels=N_LABELS, train=False, seed=None)
    assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0


def test_none_mode_is_resize_and_normalise(photos):
    batch = _batch(photos)
    cfg = _cfg(augment="none", cutout_p=1.0)
    a = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=True, seed=1)
    b = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=False, seed=None)
    np.testing.assert_array_equal(a["image"], b["image"])


def test_same_seed_same_batch_different_seed_different(photos):
    batch, cfg = _batch(photos), _cfg()
    a = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=True, seed=7)
    b = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=True, seed=7)
    c = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=True, seed=8)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_seed_depends_on_batch_content(photos):
    cfg = _cfg()
    a = T.transform_batch(_batch(photos, ["a", "b", "c"]), cfg=cfg, num_labels=N_LABELS, train=True, seed=7)
    b = T.transform_batch(_batch(photos, ["x", "y", "z"]), cfg=cfg, num_labels=N_LABELS, train=True, seed=7)
    assert not np.array_equal(a["image"], b["image"])


def test_augmentation_leaves_global_rng_state_alone(photos):
    import random

    random.seed(3)
    np.random.seed(3)
    expected = (random.random(), np.random.random())
    random.seed(3)
    np.random.seed(3)
    T.transform_batch(_batch(photos), cfg=_cfg(), num_labels=N_LABELS, train=True, seed=0)
    assert (random.random(), np.random.random()) == expected


def test_hflip_at_p1_mirrors(photos):
    img = photos[0]
    out = T.hflip(img, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[:, ::-1])
    assert np.array_equal(np.asarray(T.hflip(img, np.random.default_rng(0), p=0.0)), np.asarray(img))


def test_cutout_at_p1_paints_one_colour_box(photos):
    img = T.resize(photos[1], 64)
    out = np.asarray(T.cutout(img, np.random.default_rng(0), p=1.0)).astype(int)
    changed = (out != np.asarray(img)).any(axis=2)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    box = out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (box == box[0, 0]).all(), "the box is one solid colour"
    assert box.shape[0] <= 33 and box.shape[1] <= 33, "at most half the side (+1 for the inclusive edge)"
    assert np.array_equal(np.asarray(T.cutout(img, np.random.default_rng(0), p=0.0)), np.asarray(img))


def test_cutout_p1_changes_the_train_batch(photos):
    batch = _batch(photos)
    cfg = _cfg(cutout_p=1.0, randaugment_ops=0)  # flip may or may not fire; Cutout always does
    train = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=True, seed=0)["image"]
    test = T.transform_batch(batch, cfg=cfg, num_labels=N_LABELS, train=False, seed=None)["image"]
    for i in range(len(photos)):
        assert not np.array_equal(train[i], test[i]) and not np.array_equal(train[i], test[i][..., ::-1])


def test_randaugment_is_two_of_fifteen_at_half():
    ra = T.randaugment(2, 0.5, 448)
    assert ra.num_layers == 2 and len(ra.ops) == 15
    assert {op.prob for op in ra.ops} == {0.5}


def test_decode_converts_grey_and_rgba_to_rgb():
    grey = Image.fromarray(skimage.data.camera()).resize((32, 32))
    rgba = Image.fromarray(skimage.data.astronaut()).resize((32, 32)).convert("RGBA")
    for img, fmt in ((grey, "JPEG"), (rgba, "PNG")):
        assert T.decode_image(_encode(img, fmt)).mode == "RGB"


def test_16_bit_images_keep_their_range() -> None:
    """A 16-bit PNG is scaled to 8 bits, not clipped (PIL's convert("RGB") turns it nearly white)."""
    import io

    from PIL import Image

    from pipeline.transforms import decode_image

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    encoded = io.BytesIO()
    Image.fromarray(ramp).save(encoded, "PNG")
    pixels = np.asarray(decode_image(encoded.getvalue()))
    assert pixels.shape == (64, 64, 3) and pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_allclose(pixels[..., 0], ramp / 257.0, atol=0.5)
