"""Image towers: OpenAI's ViT and ModifiedResNet, and any timm backbone.

Each tower maps images [B, 3, H, W] to unnormalised features [B, embed_dim] and exposes
`set_grad_checkpointing(enable)`. Key names follow OpenAI's checkpoints under the `visual.` prefix.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip.config import VisionConfig
from clip.models.layers import LayerNorm, Transformer


class PatchDropout(nn.Module):
    """FLIP patch dropout (arXiv:2212.00794): in training keep a random subset of patch tokens.

    The class token (position 0) is always kept. A no-op in eval mode. Draws from the global torch
    RNG, so code that replays a forward pass (gradient caching) must restore the RNG state first.
    """

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1 + N, D]
        if not self.training or self.prob == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        batch, num_patches, width = patches.shape
        num_keep = max(1, int(num_patches * (1.0 - self.prob)))
        keep = torch.rand(batch, num_patches, device=x.device).argsort(dim=-1)[:, :num_keep]  # [B, K]
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))  # [B, K, D]
        return torch.cat([cls_token, patches], dim=1)


class VisionTransformer(nn.Module):
    """ViT as in OpenAI's CLIP: patch conv, class token, ln_pre, blocks, ln_post on the class token, proj."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: type[nn.Module]):
        super().__init__()
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.input_resolution, self.output_dim = cfg.image_size, embed_dim  # OpenAI's attribute names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.forward_features(image))  # [B, E]

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """The class token after ln_post [B, D]: the features before the projection to the shared
        embedding space (what the CLIP paper's linear probes of ViTs read)."""
        x = self.conv1(image)  # [B, D, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, D]
        cls_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls_token, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1 + G*G, D]
        x = self.patch_dropout(x)
        x = self.ln_pre(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0])  # [B, D]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.proj  # [B, D] -> [B, E]


class Bottleneck(nn.Module):
    """ResNet bottleneck with OpenAI's anti-aliasing: strided convs become avgpool + stride-1 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # "-1" keeps OpenAI's key names ("downsample.0" conv, "downsample.1" bn).
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature, as a query, attends over all positions (plus itself)."""

    def __init__(self, grid_size: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid_size**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, G, G]
        return self.c_proj(self.attend(x))  # [B, E]

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, G, G]
        """The attention output before the output projection `c_proj` [B, C]."""
        x = x.flatten(2).transpose(1, 2)  # [B, G*G, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1 + G*G, C]
        x = x + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x[:, :1]).view(batch, 1, self.heads, head_dim).transpose(1, 2)  # [B, H, 1, Dh]
        k = self.k_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)  # [B, H, L, Dh]
        v = self.v_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, Dh]
        return out.transpose(1, 2).reshape(batch, width)  # [B, C]


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avgpool, anti-aliased stages, attention pooling instead of avgpool."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_stage(width, cfg.stage_blocks[0])
        self.layer2 = self._make_stage(width * 2, cfg.stage_blocks[1], stride=2)
        self.layer3 = self._make_stage(width * 4, cfg.stage_blocks[2], stride=2)
        self.layer4 = self._make_stage(width * 8, cfg.stage_blocks[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.grid_size, width * 32, cfg.heads, embed_dim)
        self.input_resolution, self.output_dim = cfg.image_size, embed_dim  # OpenAI's attribute names
        self.grad_checkpointing = False
        self._init_parameters()

    def _make_stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_parameters(self) -> None:
        # OpenAI's scheme: attention pool projections ~ N(0, 1/width); each block's last BN starts at
        # zero so every residual branch starts as identity.
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.forward_features(image))  # [B, E]

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """The attention pool's output before its projection `c_proj` to the embedding [B, 32 * width]."""
        x = self.relu1(self.bn1(self.conv1(image)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # [B, W, H/4, W/4]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool.attend(x)  # [B, 32 * width]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.attnpool.c_proj(features)  # [B, 32 * width] -> [B, E]


class TimmVisionTower(nn.Module):
    """Any timm backbone's pooled features followed by a linear projection (OpenCLIP's key names)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        import timm  # imported here so that `import clip` stays light

        # num_classes=0 removes the classifier and keeps the network's own global pooling.
        self.trunk = timm.create_model(cfg.timm_model, pretrained=cfg.timm_pretrained, num_classes=0)
        self.head = nn.Sequential(OrderedDict([("proj", nn.Linear(self.trunk.num_features, embed_dim, bias=False))]))
        self.input_resolution, self.output_dim = cfg.image_size, embed_dim  # OpenAI's attribute names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(self.forward_features(image))  # [B, E]

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features before the projection [B, trunk.num_features]."""
        return self.trunk(image)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # [B, E]


def build_vision_tower(cfg: VisionConfig, embed_dim: int, activation: type[nn.Module]) -> nn.Module:
    if cfg.kind == "vit":
        return VisionTransformer(cfg, embed_dim, activation)
    if cfg.kind == "resnet":
        return ModifiedResNet(cfg, embed_dim)
    if cfg.kind == "timm":
        return TimmVisionTower(cfg, embed_dim)
    raise ValueError(f"unknown vision tower kind {cfg.kind!r}")
