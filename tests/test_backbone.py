"""Backbone tokens and weight loading (unit tier: CPU, timm test models, offline weights)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from salgl.backbone import Backbone, efficientnet_lite0_state_dict, load_backbone_weights
from salgl.config import BackboneConfig


def _backbone(name: str, keep_prefix_tokens: bool = False) -> Backbone:
    return Backbone(BackboneConfig(name=name, weights="none", keep_prefix_tokens=keep_prefix_tokens)).eval()


@pytest.mark.parametrize(
    ("name", "size", "tokens", "dim"),
    [
        ("test_resnet", 64, 2 * 2, 96),  # stride 32: 64 / 32 = 2
        ("test_efficientnet", 64, 2 * 2, 256),
        ("test_resnet", 128, 4 * 4, 96),
    ],
)
def test_cnn_tokens_are_the_flattened_map(name: str, size: int, tokens: int, dim: int) -> None:
    bb = _backbone(name)
    with torch.no_grad():
        out = bb(torch.randn(2, 3, size, size))
    assert bb.token_dim == dim
    assert out.shape == (2, tokens, dim)


def test_cnn_tokens_keep_the_spatial_order() -> None:
    # Token j must be map position (j // w, j % w) with its channel vector, not a scrambled view.
    bb = _backbone("test_resnet")
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        fmap = bb.model.forward_features(images)  # (1, C, 3, 3)
        out = bb(images)
    assert torch.equal(out[0, 4], fmap[0, :, 1, 1])
    assert torch.equal(out[0, 5], fmap[0, :, 1, 2])


def test_vit_drops_prefix_tokens_unless_asked() -> None:
    images = torch.randn(2, 3, 160, 160)  # test_vit: patch 16 -> 100 patches, plus one CLS token
    torch.manual_seed(0)
    bb = _backbone("test_vit")
    with torch.no_grad():
        patches = bb(images)
        bb.keep_prefix_tokens = True
        everything = bb(images)
    assert bb.num_prefix_tokens == 1 and bb.token_dim == 64
    assert patches.shape == (2, 100, 64)
    assert everything.shape == (2, 101, 64)
    assert torch.equal(everything[:, 1:], patches)


def test_data_config_comes_from_timm() -> None:
    cfg = _backbone("tf_efficientnet_lite0").data_config
    assert cfg["input_size"] == (3, 224, 224)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 offline weights.


def _chelsea_224() -> torch.Tensor:
    """scikit-image's cat photo, resized to 224 and normalised with mean = std = 0.5."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1).float() / 255  # (3, H, W)
    img = torch.nn.functional.interpolate(img[None], size=(224, 224), mode="bilinear", antialias=True)
    return (img - 0.5) / 0.5  # (1, 3, 224, 224)


def test_mapped_efficientnet_lite0_sees_a_cat() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    with torch.no_grad():
        probs = model(_chelsea_224()).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(probs[281:286].sum()) > 0.8


def test_offline_weights_fill_the_headless_backbone() -> None:
    bb = Backbone(BackboneConfig(name="tf_efficientnet_lite0", weights="efficientnet_lite0_offline")).eval()
    load_backbone_weights(bb, "efficientnet_lite0_offline")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(efficientnet_lite0_state_dict())
    images = _chelsea_224()
    with torch.no_grad():
        tokens = bb(images)  # (1, 49, 1280)
        logits = full.forward_head(tokens.mean(1)[:, :, None, None])
        assert torch.allclose(logits, full(images), atol=1e-4)
    assert tokens.shape == (1, 49, 1280)


def test_offline_weights_refuse_other_architectures() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        load_backbone_weights(_backbone("test_efficientnet"), "efficientnet_lite0_offline")


# ---------------------------------------------------------------------------------------------
# State dict files and errors.


def test_bad_weights_path_names_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found.*nope.pth"):
        load_backbone_weights(_backbone("test_resnet"), str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.backbone.", "model."])
def test_state_dict_file_round_trips_with_prefixes(tmp_path, prefix: str) -> None:
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", pretrained=False)  # with its classifier: dropped on load
    state = {prefix + k: v for k, v in src.state_dict().items()}
    if "backbone." in prefix:  # a whole SALGL checkpoint: its other parts are not the backbone's
        state[prefix.replace("backbone.", "") + "scene_linear.weight"] = torch.zeros(3, 3)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    bb = _backbone("test_resnet")
    load_backbone_weights(bb, str(path))
    assert torch.equal(bb.model.conv1[0].weight, src.conv1[0].weight)


def test_safetensors_file_loads(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = _backbone("test_resnet")
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    bb = _backbone("test_resnet")
    load_backbone_weights(bb, str(path))
    assert torch.equal(bb.model.conv1[0].weight, src.model.conv1[0].weight)


def test_mismatched_state_dict_lists_the_keys(tmp_path) -> None:
    state = _backbone("test_resnet").model.state_dict()
    del state["conv1.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing \['conv1.0.weight'\], 1 unexpected \['extra.weight'\]"):
        load_backbone_weights(_backbone("test_resnet"), str(path))


def test_timm_weights_offline_give_a_clear_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    bb = _backbone("test_resnet")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="needs internet.*efficientnet_lite0_offline"):
        load_backbone_weights(bb, "timm")
