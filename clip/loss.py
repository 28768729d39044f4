"""Contrastive losses over a batch spread across ranks: CLIP's softmax loss and SigLIP's sigmoid loss.

Notation: the global batch has N = W * n pairs, n per rank; rank r holds image features x_i and
text features y_i (L2-normalised) for its n pairs and all-gathers everyone's, with gradient. The
logits are l_ij = t * <x_i, y_j> (+ b for SigLIP), t = exp(logit_scale).

Both losses split into a term per *row* (one local feature against all N global columns) minus
the logits of the positive pairs, which are local to the rank:

    CLIP (arXiv:2103.00020): mean_i [ (lse_j l_ij + lse_j l_ji) / 2 - l_ii ]     (symmetric InfoNCE)
    SigLIP (arXiv:2303.15343): (1/n) sum_i [ sum_j softplus(l_ij) - l_ii ]       (-log sigmoid(+-l))

(since -log sigmoid(-l) = softplus(l) for negatives and -log sigmoid(l) = softplus(l) - l). Each
rank returns the mean over its own rows, so the mean over ranks is the global-batch loss. DDP
averages gradients over ranks, and the all-gather's backward sums over ranks the gradients that
every rank's rows send to a feature, so after DDP the encoder, temperature and bias gradients are
those of one process computing the loss on the whole global batch (tests/test_loss.py proves it).

`chunk_size > 0` bounds memory for very large global batches: the row terms are computed over
column chunks of that size, each chunk under activation checkpointing, so forward and backward
only ever hold [n, chunk] logits (the backward recomputes them chunk by chunk) instead of [n, N].
The per-chunk results (a logsumexp or a sum per row) combine exactly, so values and gradients
equal the plain mode's up to floating-point rounding.

The loss is computed in float32 (float64 inputs stay float64), with autocast disabled.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip.config import LossConfig
from clip.distributed import all_gather_with_grad


class _ReduceColumns(torch.autograd.Function):
    """Per row of logits [n, C]: logsumexp (CLIP) or the sum of softplus (SigLIP) -> [n].

    Autograd's own backward of these holds two or three [n, C] temporaries at once; this one turns
    the saved logits into their gradient in place (softmax or sigmoid, times the incoming
    gradient), which takes the plain loss's peak from about five [n, N] matrices to three. The
    logits must be private to the loss, and the graph can be backpropagated only once.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, kind: str) -> torch.Tensor:
        result = torch.logsumexp(logits, dim=1) if kind == "logsumexp" else F.softplus(logits).sum(dim=1)
        ctx.save_for_backward(logits, result)
        ctx.kind, ctx.consumed = kind, False
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("the contrastive loss's graph can be backpropagated only once (retain_graph=True)")
        ctx.consumed = True
        logits, result = ctx.saved_tensors
        if ctx.kind == "logsumexp":
            derivative = logits.sub_(result[:, None]).exp_()  # softmax over the columns
        else:
            derivative = logits.sigmoid_()  # d softplus(x) / dx
        return derivative.mul_(grad[:, None]), None


def _row_term(rows, columns, scale, bias, kind: str) -> torch.Tensor:
    logits = scale * rows @ columns.T  # [n, C], a fresh tensor that only _ReduceColumns uses
    if bias is not None:
        logits.add_(bias)
    return _ReduceColumns.apply(logits, kind)  # [n]


def _reduce_rows(
    rows: torch.Tensor,
    columns: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    kind: str,
    chunk_size: int,
) -> torch.Tensor:
    """Logsumexp or sum of softplus of the logits over all columns [N, D], for each row [n, D] -> [n].

    Both reductions are associative (a logsumexp of logsumexps, a sum of sums), so with
    chunk_size > 0 they are applied to column chunks and then to the per-chunk results.
    """
    if chunk_size <= 0 or chunk_size >= columns.shape[0]:
        return _row_term(rows, columns, scale, bias, kind)
    # Checkpointing keeps only each chunk's [n] result; the [n, chunk] logits are recomputed in
    # the backward pass one chunk at a time. split() views share one backward that concatenates.
    partials = [
        checkpoint(_row_term, rows, chunk, scale, bias, kind, use_reentrant=False)
        for chunk in columns.split(chunk_size)
    ]
    partials = torch.stack(partials, dim=1)  # [n, num_chunks]
    return torch.logsumexp(partials, dim=1) if kind == "logsumexp" else partials.sum(dim=1)


def _to_loss_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _ContrastiveLoss(nn.Module):
    """Shared frame: dtype and autocast handling, the all-gather, and argument checks."""

    uses_bias: bool

    def __init__(self, chunk_size: int = 0):
        super().__init__()
        if chunk_size < 0:
            raise ValueError(f"chunk_size={chunk_size} must be >= 0 (0: no chunking)")
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Rank-local loss (its mean over ranks is the global-batch loss) from this rank's
        L2-normalised features [n, D] and the exponentiated temperature `logit_scale`."""
        name = type(self).__name__
        if self.uses_bias and logit_bias is None:
            raise ValueError(f"{name} needs a learned logit_bias: set model.init_logit_bias (SigLIP: -10)")
        if not self.uses_bias and logit_bias is not None:
            raise ValueError(
                f"{name} does not use logit_bias, but the model has one: unset model.init_logit_bias "
                "(an unused parameter would also stall DDP)"
            )
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features {tuple(image_features.shape)} and text_features "
                f"{tuple(text_features.shape)} must have the same shape [n, D]"
            )
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image, text, scale = map(_to_loss_dtype, (image_features, text_features, logit_scale))
            bias = None if logit_bias is None else _to_loss_dtype(logit_bias)
            return self._loss(image, text, scale, bias)

    def _loss(self, image, text, scale, bias) -> torch.Tensor:
        raise NotImplementedError


class ClipLoss(_ContrastiveLoss):
    """CLIP's symmetric InfoNCE over the global batch: each image against all texts and vice versa."""

    uses_bias = False

    def _loss(self, image, text, scale, bias):
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)  # [N, D]
        image_to_text = _reduce_rows(image, all_text, scale, None, "logsumexp", self.chunk_size)  # [n]
        text_to_image = _reduce_rows(text, all_image, scale, None, "logsumexp", self.chunk_size)
        positive = scale * (image * text).sum(dim=1)  # [n]
        return ((image_to_text + text_to_image) / 2 - positive).mean()


class SigLipLoss(_ContrastiveLoss):
    """SigLIP's pairwise sigmoid loss over all N x N pairs of the global batch, with a learned bias.

    The SigLIP paper initialises the temperature at 10 and the bias at -10: set
    model.init_logit_scale=ln(10) and model.init_logit_bias=-10.
    """

    uses_bias = True

    def _loss(self, image, text, scale, bias):
        # Rows are local images, columns all texts: every pair of the global batch is one rank's row.
        all_text = all_gather_with_grad(text)  # [N, D]
        all_pairs = _reduce_rows(image, all_text, scale, bias, "softplus", self.chunk_size)  # [n]
        positive = scale * (image * text).sum(dim=1) + bias  # [n]
        return (all_pairs - positive).mean()


def build_loss(cfg: LossConfig) -> _ContrastiveLoss:
    """The loss named by `loss.name` ("clip" or "siglip")."""
    losses = {"clip": ClipLoss, "siglip": SigLipLoss}
    if cfg.name not in losses:
        raise ValueError(f"loss.name={cfg.name!r} is not one of {tuple(losses)}")
    return losses[cfg.name](chunk_size=cfg.chunk_size)
