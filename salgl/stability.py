"""Scene stability probes: does an image keep its argmax scene (eq. 4-6, s = argmax_k pi_k) when
something that should not matter changes?

Notation: P probe images, K scenes. Each probe returns two (P,) tensors of argmax scene ids, to be
compared position by position (``jobs.scene_metrics`` turns them into shares):

- ``train_eval_scenes``: train mode against eval mode. Differs where BatchNorm normalises with
  batch statistics in training, or dropout changes the features.
- ``batch_scenes``: inside the probe batch against alone (a batch of 1), dropout off. Differs
  where an image's features depend on the rest of its batch (batch-statistic BatchNorm).
- ``train_mode_scenes`` of two views of the same images (two training augmentations; the same
  tensor twice to isolate dropout): how much of an image's scene is augmentation or dropout noise.

Every probe leaves the model as it found it: its mode, and BatchNorm's running statistics and
counters (momentum 0 while probing). Without targets the head counts nothing (eq. 7-8).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Within: BatchNorm running statistics frozen (momentum 0); after: mode and counters restored."""
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = 1 * running + 0 * batch
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        model.train(was_training)


def _scenes(model: nn.Module, images: Tensor) -> Tensor:
    return model(images).scene_probs.argmax(-1)  # (B,)


@torch.no_grad()
def train_mode_scenes(model: nn.Module, images: Tensor) -> Tensor:
    """The argmax scene of each image (B,) as training sees it: train mode, dropout and all.

    Called on two augmentations of the same images, it measures how much of an image's scene is
    the augmentation's (and dropout's) doing; on the same tensor twice, dropout's alone.
    """
    with _state_kept(model):
        model.train()
        return _scenes(model, images)


@torch.no_grad()
def train_eval_scenes(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax scene of each image (B,) with ``model`` in train mode, then in eval mode.

    Where they differ, what training learned to call a scene is not what testing sees: BatchNorm
    normalising with batch statistics, dropout, anything else that depends on the mode or on the
    rest of the batch. With frozen BatchNorm and no dropout they agree by construction.
    """
    with _state_kept(model):
        model.train()
        in_train = _scenes(model, images)
        model.eval()
        in_eval = _scenes(model, images)
    return in_train, in_eval


@torch.no_grad()
def batch_scenes(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax scene of each image (B,) forwarded inside ``images``, then alone (a batch of 1).

    BatchNorm layers run as they do in training (batch statistics, or stored ones where frozen);
    everything else runs as in eval mode, so dropout's noise, which ``train_mode_scenes`` sees, is
    not counted here: what remains is one image's dependence on the rest of its batch. Where a
    batch of 1 cannot be normalised with its own statistics (one value per channel: a feature map
    of 1 x 1), every image depends on its batch, and its "alone" scene is -1.
    """
    with _state_kept(model):
        model.train()
        in_training = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        model.eval()
        for m in in_training:
            m.train()
        in_batch = _scenes(model, images)
        try:
            alone = torch.cat([_scenes(model, images[i : i + 1]) for i in range(len(images))])  # (B,)
        except ValueError:  # "Expected more than 1 value per channel when training"
            if not in_training:
                raise
            alone = torch.full_like(in_batch, -1)
    return in_batch, alone
