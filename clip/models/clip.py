"""CLIP: an image tower and a causal text tower projected into one space, with a learned temperature.

The text tower's parameters sit at the top level of the module (`token_embedding`,
`positional_embedding`, `transformer`, `ln_final`, `text_projection`) and the image tower under
`visual`, exactly as in OpenAI's checkpoints, so OpenAI and OpenCLIP state dicts load with no
renaming and our state dicts load in their code.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from clip.config import ModelConfig, validate_model_config
from clip.models.layers import LayerNorm, Transformer, get_activation
from clip.models.text_packing import PackedText, get_text_lengths
from clip.models.vision import build_vision_tower


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.config = cfg
        activation = get_activation(cfg.activation)
        self.visual = build_vision_tower(cfg.vision, cfg.embed_dim, activation)

        text = cfg.text
        self.context_length, self.vocab_size = text.context_length, text.vocab_size  # OpenAI's attributes
        self.eot_token_id = text.eot_token_id
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_width, activation)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, cfg.embed_dim))

        # A log-temperature: the logits are exp(logit_scale) * cosine similarity.
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        self._init_text_parameters()

    def _init_text_parameters(self) -> None:
        # OpenAI's initialisation of the text tower; residual-branch outputs are scaled down by
        # sqrt(2 * layers) so the residual stream's variance stays O(1) with depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (inputs are cast to it, as in OpenAI's API)."""
        return self.text_projection.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image.to(self.dtype))  # [B, E]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor | PackedText, normalize: bool = False) -> torch.Tensor:
        """Token ids [B, L] (L <= context_length, each row holding an end-of-text token) -> [B, E].

        Or the same rows packed by `clip.models.text_packing.pack_text`, which skips the positions
        after each caption's end-of-text token: they cannot change its feature.
        """
        if isinstance(text, PackedText):
            x = self._pool_packed(text)
        else:
            x = self.transformer(self._embed(text), is_causal=True)  # [B, L, D]
            # Causal attention makes the end-of-text position a summary of the whole caption. Pooling
            # before ln_final is equivalent to OpenAI's order (LayerNorm acts per position) and cheaper.
            end = get_text_lengths(text, self.eot_token_id) - 1  # [B]
            x = x[torch.arange(x.shape[0], device=x.device), end]  # [B, D]
        features = self.ln_final(x) @ self.text_projection  # [B, E]
        return F.normalize(features, dim=-1) if normalize else features

    def _embed(self, text: torch.Tensor) -> torch.Tensor:
        """Token and position embeddings of token rows [n, L] -> [n, L, D]."""
        self._check_length(text.shape[1])
        x = self.token_embedding(text).to(self.dtype)
        return x + self.positional_embedding[: text.shape[1]].to(x.dtype)

    def _check_length(self, length: int) -> None:
        if length > self.context_length:
            raise ValueError(
                f"text has {length} tokens, more than the model's context_length={self.context_length}: "
                "tokenize with clip.get_tokenizer(model.config.text), or "
                f"clip.tokenize(texts, context_length={self.context_length})"
            )

    def _pool_packed(self, packed: PackedText) -> torch.Tensor:
        """The end-of-text positions' outputs [B, D] of packed token rows, in the batch's order."""
        # Host-side checks (no device read): a mistake here would give wrong features, not an error.
        if packed.eot_token_id != self.eot_token_id:
            raise ValueError(
                f"text packed at end-of-text id {packed.eot_token_id}, but this model's is {self.eot_token_id}: "
                "pack with pack_text(tokens, model.eot_token_id, ...)"
            )
        if packed.order.device != self.positional_embedding.device:
            raise ValueError(
                f"packed text is on {packed.order.device}, the model on {self.positional_embedding.device}: "
                "move it with packed.to(device)"
            )
        shapes = tuple((group.shape[0], group.shape[1]) for group in packed.groups)  # (n, L) per group
        for _, length in shapes:
            self._check_length(length)
        # One embedding lookup for all groups: each lookup's backward zero-fills a whole [vocab, D]
        # gradient, so one per group would cost as much as the text tower on small models.
        x = self.token_embedding(torch.cat([group.flatten() for group in packed.groups])).to(self.dtype)  # [T, D]
        # Repeated rather than gathered: repeat's backward is a plain sum, the same on every run (a
        # gather's backward accumulates with atomics on GPUs).
        x = x + torch.cat([self.positional_embedding[:length].repeat(n, 1) for n, length in shapes]).to(x.dtype)
        x = self.transformer(x, is_causal=True, packed_groups=shapes)
        # A caption's end-of-text output is at: its group's start + its row x L + its length - 1.
        starts = itertools.accumulate((n * length for n, length in shapes), initial=0)
        ends = torch.cat([
            start + length * torch.arange(n, device=x.device) + get_text_lengths(group, self.eot_token_id) - 1
            for start, group, (n, length) in zip(starts, packed.groups, shapes)
        ])  # [B], packed order
        return x[ends][torch.argsort(packed.order)]  # [B, D]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI's contract: (logits_per_image [N_img, N_txt], logits_per_text [N_txt, N_img])."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()
