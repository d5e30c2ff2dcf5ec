"""Training losses: asymmetric loss (eq. 17) and the scene entropy terms (eq. 9-11).

Notation: B batch, n labels, K scenes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from salgl.config import LossConfig


class LossTerms(NamedTuple):
    total: Tensor  # L_cls + lambda * (L1 + scale * L2 + w * L_q)
    classification: Tensor  # ASL
    sample_entropy: Tensor  # L1
    balance_entropy: Tensor  # L2 (unscaled)
    scene_target: Tensor  # L_q, cross-entropy to the label-mixture posterior (0 without targets)


def asymmetric_loss(logits: Tensor, targets: Tensor, cfg: LossConfig, mask: Tensor | None = None) -> Tensor:
    """Asymmetric loss (Ridnik et al. 2021) as eq. 17 uses it, gamma+ = 0 and gamma- = 2 by default.

    Negatives' probabilities are shifted by ``clip`` (0 as released), log-probabilities clamp at
    ``eps`` (1e-5 as released) and, unless ``focal_grad``, the focal weights carry no gradient
    (released ``disable_torch_grad_focal_loss``). Reduction: ``mean`` over images and labels (the
    paper), or ``released``: -sum / (B n) * 1000. ``mask`` (B, n) True excludes an entry.
    """
    y = targets.to(logits.dtype)  # (B, n)
    p_pos = torch.sigmoid(logits)
    p_neg = 1.0 - p_pos
    if cfg.clip > 0:
        p_neg = (p_neg + cfg.clip).clamp(max=1.0)
    loss = y * torch.log(p_pos.clamp(min=cfg.eps)) + (1.0 - y) * torch.log(p_neg.clamp(min=cfg.eps))
    if cfg.gamma_pos > 0 or cfg.gamma_neg > 0:
        with torch.set_grad_enabled(cfg.focal_grad and torch.is_grad_enabled()):
            p_true = p_pos * y + p_neg * (1.0 - y)
            gamma = cfg.gamma_pos * y + cfg.gamma_neg * (1.0 - y)
            weight = torch.pow(1.0 - p_true, gamma)
        loss = loss * weight
    if mask is not None:
        loss = loss.masked_fill(mask, 0.0)
    batch, num_labels = logits.shape
    if cfg.reduction == "released":
        return -loss.sum() / (batch * num_labels) * 1000.0
    kept = loss.numel() - (int(mask.sum()) if mask is not None else 0)
    return -loss.sum() / max(kept, 1)


def entropy(probs: Tensor, eps: float) -> Tensor:
    """H(p) = -sum_k p_k log(p_k + eps) along the last axis."""
    return -(probs * torch.log(probs + eps)).sum(-1)


def sample_entropy(scene_probs: Tensor, eps: float = 1e-7) -> Tensor:
    """Eq. 9, L1: mean over the batch of H(pi_b). Small when each image picks one scene."""
    return entropy(scene_probs, eps).mean()


def balance_entropy(scene_probs: Tensor, eps: float = 1e-7) -> Tensor:
    """Eq. 10, L2: H_max - H(mean_b pi_b). Small when the batch spreads over all scenes.

    H_max is the entropy of the uniform distribution computed with the same eps (released), so a
    perfectly balanced batch gives exactly 0.
    """
    num_scenes = scene_probs.shape[-1]
    h_max = -math.log(1.0 / num_scenes + eps)
    return h_max - entropy(scene_probs.mean(0), eps)


def scene_target_loss(scene_probs: Tensor, scene_targets: Tensor, eps: float = 1e-7) -> Tensor:
    """L_q = the cross-entropy -sum_k q_k log pi_k (``salgl.scenes``), averaged over the images
    that have a target: a row of zeros (an image without labels) takes no part."""
    with_target = scene_targets.sum(-1)  # (B,): 1 with a target, 0 without
    return -(scene_targets * torch.log(scene_probs + eps)).sum() / with_target.sum().clamp(min=1.0)


def salgl_loss(
    logits: Tensor,
    scene_probs: Tensor,
    targets: Tensor,
    cfg: LossConfig,
    mask: Tensor | None = None,
    scene_targets: Tensor | None = None,
) -> LossTerms:
    """Eq. 11 and the total: L = L_cls + lambda (L1 + s L2 + w L_q), s = 1 (paper) or 100 (released).

    Both entropies are per device batch, as released. ``scene_targets`` (B, K), the label-mixture
    posterior q(k | y), adds L_q with weight w (``scene_target_weight``); lambda weighs every scene
    term, so lambda = 0 still trains no scene at all, as in the paper's ablation.
    """
    cls = asymmetric_loss(logits, targets, cfg, mask)
    l1 = sample_entropy(scene_probs, cfg.entropy_eps)
    l2 = balance_entropy(scene_probs, cfg.entropy_eps)
    lq = scene_target_loss(scene_probs, scene_targets, cfg.entropy_eps) if scene_targets is not None else l1.new_zeros(())
    total = cls + cfg.entropy_weight * (l1 + cfg.balance_scale * l2 + cfg.scene_target_weight * lq)
    return LossTerms(total, cls, l1, l2, lq)
