"""What training minimises: the diffusion loss of a config, and its gradient in any dtype.

Shared by the one-process update (:func:`engine.training.train.compiled_update`) and the
data-parallel one (:mod:`engine.training.parallel`), whose processes each rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map

from engine.config import Config
from engine.sampling.diffusion import diffusion_loss

Loss = Callable[..., mx.array]
"""``loss_fn(model, x0, key[, labels]) -> scalar``, ``x0`` a data batch (B, H, W, C), ``key``
its noise, ``labels`` (B,) its classes where the model is class-conditional."""

LOSS_SCALE = {"float32": 1.0, "bfloat16": 1.0, "float16": 1024.0}
"""Static loss scale per compute dtype: fp16 gradients of a mean loss underflow without it."""


def loss_and_grad(model: nn.Module, loss_fn: Loss, dtype: str) -> Callable:
    """``(x0, key) -> (loss, grads)`` w.r.t. the fp32 master weights, forward in ``dtype``.

    MLX has no autocast: the weights are cast inside the differentiated function, so the
    activations are low precision while the gradients (through ``astype``) and the
    optimizer state stay float32 (Micikevicius et al. 2018, mixed-precision training).
    """
    if dtype == "float32":
        return nn.value_and_grad(model, lambda x0, key, *y: loss_fn(model, x0, key, *y))
    low, scale = getattr(mx, dtype), LOSS_SCALE[dtype]

    def scaled_loss(params: dict, x0: mx.array, key: mx.array, *y: mx.array) -> mx.array:
        model.update(tree_map(lambda p: p.astype(low), params))
        return loss_fn(model, x0, key, *y).astype(mx.float32) * scale

    grad_fn = mx.value_and_grad(scaled_loss)

    def value_and_grad(x0: mx.array, key: mx.array, *y: mx.array) -> tuple[mx.array, dict]:
        master = model.trainable_parameters()
        loss, grads = grad_fn(master, x0, key, *y)
        model.update(master)  # the optimizer steps the fp32 weights, never the casts
        return loss / scale, tree_map(lambda g: g / scale, grads)

    return value_and_grad


def base_loss(config: Config, rows: tuple[int, int] | None = None) -> Loss:
    """The diffusion loss of ``config.schedule`` (its prediction target and beta schedule),
    weighted as ``config.train.loss_weight`` says; a class-conditional network's labels
    are dropped to the null label at ``config.train.label_dropout``.

    ``rows = (lo, hi)`` makes it the share of rows ``lo:hi`` in the whole batch's loss
    (``diffusion_loss``'s ``rows``): the shares of a split batch sum to its loss.
    """
    loss = partial(diffusion_loss, prediction=config.schedule.prediction,
                   kind=config.schedule.beta_schedule, weighting=config.train.loss_weight,
                   rows=rows)
    if config.unet.num_classes == 0:
        return loss

    def conditional(model: nn.Module, x0: mx.array, key: mx.array, y: mx.array) -> mx.array:
        return loss(model, x0, key, labels=y, label_dropout=config.train.label_dropout)

    return conditional
