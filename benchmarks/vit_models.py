"""Vision transformers for Fashion-MNIST given to ``ccamerge merge --model`` (the
benchmark of torch_transformers.py): 28 px images in patches of 7 (16 tokens and a class
token), width 64, 3 layers, 4 heads, MLP width 128, the class token's output classified.

* ``torch_vit``: built from ``nn.TransformerEncoder`` (pre-LN, GELU, no dropout);
* ``timm_vit``: timm's ``VisionTransformer`` of the same size (needs timm, which needs
  torchvision: the benchmark environment of benchmarks/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = dict(image=28, patch=7, dim=64, depth=3, heads=4, mlp=128, classes=10)


class TorchViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        d, tokens = SIZE["dim"], (SIZE["image"] // SIZE["patch"]) ** 2
        self.patches = nn.Conv2d(1, d, SIZE["patch"], stride=SIZE["patch"])
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, d))
        layer = nn.TransformerEncoderLayer(
            d, SIZE["heads"], SIZE["mlp"], dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(
            layer, SIZE["depth"], norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, SIZE["classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.encoder(x + self.pos_embed)[:, 0])


def torch_vit() -> nn.Module:
    return TorchViT()


def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=SIZE["image"], patch_size=SIZE["patch"], in_chans=1,
        num_classes=SIZE["classes"], embed_dim=SIZE["dim"], depth=SIZE["depth"],
        num_heads=SIZE["heads"], mlp_ratio=SIZE["mlp"] / SIZE["dim"],
    )  # fmt: skip
