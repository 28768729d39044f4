"""Text batches without the padding after each caption: exact, and less compute for short captions.

Why it is exact: the text tower is causal and pools its first end-of-text position, so a caption's
feature depends only on its tokens up to that position. The padding that fills each row to
`context_length` (77) costs as much compute as the caption and changes nothing. Web alt-texts
average about 20 tokens, so most of a padded text tower's work is thrown away.

How: `pack_text` (on the host, which holds the token ids before they are copied to the device, so
that nothing waits for the device) sorts a batch's captions by length, splits them into
`num_groups` groups of near-equal size and cuts each group after its longest caption, rounded up to
`multiple` positions (a bounded set of shapes, and tensor-core-friendly ones).
`CLIP.encode_text(packed)` runs the per-position layers once over all groups' positions back to
back, attention group by group, and returns the features in the batch's original order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedText:
    """A batch of token rows sorted by caption length into groups, each cut after its longest caption."""

    groups: tuple[torch.Tensor, ...]  # [n, L] token rows per group, shortest captions first
    order: torch.Tensor  # [B] int64: packed row i (counting through the groups) is row order[i] of the batch
    # The end-of-text id the groups were cut at: a model with another one would pool cut-off captions.
    eot_token_id: int

    def __len__(self) -> int:
        """Captions in the batch (B), as len() of the padded [B, L] rows."""
        return self.order.shape[0]

    @property
    def num_tokens(self) -> int:
        """Positions the text tower computes (against batch size x context_length when padded)."""
        return sum(group.numel() for group in self.groups)

    def pin_memory(self) -> PackedText:
        groups = tuple(group.pin_memory() for group in self.groups)
        return PackedText(groups, self.order.pin_memory(), self.eot_token_id)

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedText:
        import torch._dynamo

        groups = tuple(group.to(device, non_blocking=non_blocking) for group in self.groups)
        for group in groups:
            # The lengths change from batch to batch: torch.compile then builds one graph with
            # symbolic lengths at once, instead of recompiling as each group's length first changes.
            torch._dynamo.maybe_mark_dynamic(group, 1)
        return PackedText(groups, self.order.to(device, non_blocking=non_blocking), self.eot_token_id)


def get_text_lengths(text: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """[B] positions up to and including each row's first end-of-text token.

    A row without one counts 1: the tower then pools position 0, as the padded forward does.
    """
    return (text == eot_token_id).int().argmax(dim=-1) + 1


def pack_text(text: torch.Tensor, eot_token_id: int, num_groups: int, multiple: int = 8) -> PackedText:
    """Token rows [B, L] packed into `num_groups` >= 1 groups (fewer if B is smaller) of
    consecutive lengths, each cut after its longest caption rounded up to `multiple` (at most L)."""
    if num_groups < 1 or multiple < 1:
        raise ValueError(f"num_groups={num_groups} and multiple={multiple} must be >= 1")
    if text.dim() != 2:
        raise ValueError(f"pack_text takes token rows [B, L], not a tensor of shape {tuple(text.shape)}")
    if text.shape[0] == 0:
        raise ValueError(f"cannot pack an empty batch (text of shape {tuple(text.shape)}): pass it padded")
    lengths = get_text_lengths(text, eot_token_id)  # [B]
    order = torch.argsort(lengths, stable=True)  # [B], shortest first
    sorted_lengths = lengths[order].tolist()
    batch, width = text.shape
    num_groups = min(num_groups, batch)
    bounds = [batch * group // num_groups for group in range(num_groups + 1)]
    groups = tuple(
        text[order[start:stop], : min(width, math.ceil(sorted_lengths[stop - 1] / multiple) * multiple)]
        for start, stop in itertools.pairwise(bounds)
    )
    return PackedText(groups, order, eot_token_id)
