"""Small transformers for the attention tests, built by ``make_net(name)`` (a ``--model``
factory): torch.nn's encoder layers, a language model on ``nn.MultiheadAttention`` with a
causal mask, and a vision transformer written as timm writes its own (fused ``qkv``
projection reshaped into heads, a class token concatenated to the patches, position
embeddings added, layer scale, the class token's output read by ``x[:, 0]``), also with
separate query/key/value projections and a causal mask written out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, TOKENS, FEATURES, VOCAB, CLASSES = 16, 4, 6, 8, 11, 5


class Encoder(nn.Module):
    """Feature tokens ``(batch, TOKENS, FEATURES)`` through ``nn.TransformerEncoder``."""

    def __init__(self, norm_first: bool = True, activation: str = "relu") -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.pos = nn.Parameter(0.1 * torch.randn(1, TOKENS, DIM))
        layer = nn.TransformerEncoderLayer(
            DIM, HEADS, 2 * DIM, dropout=0.0, activation=activation, batch_first=True,
            norm_first=norm_first,
        )  # fmt: skip
        norm = nn.LayerNorm(DIM) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, 2, norm=norm, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(dim=1))


class CausalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(DIM, 3 * DIM), nn.Linear(3 * DIM, DIM)
        mask = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TokenLM(nn.Module):
    """Token ids ``(batch, TOKENS)`` -> next-token logits, two causal blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)
        self.positions = nn.Embedding(TOKENS, DIM)
        self.blocks = nn.Sequential(CausalBlock(), CausalBlock())
        self.ln = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        return self.out(self.ln(self.blocks(self.tokens(ids) + self.positions(where))))


class Attention(nn.Module):
    """timm's way: one ``qkv`` Linear reshaped into heads, SDPA, ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CausalSeparateAttention(nn.Module):
    """Separate query, key and value projections, the scores written out, causal."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.n_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (
            p(x).view(B, N, self.n_heads, C // self.n_heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        scores = q @ k.transpose(-2, -1) / (C // self.n_heads) ** 0.5
        future = torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(B, N, C))


class NotAttention(Attention):
    """The same tensors, another function: not recognised as attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.tanh(q) * v + k)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, attention: type[nn.Module] = Attention) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), attention(dim, HEADS), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), Mlp(dim), LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Images ``(batch, 1, 8, 8)``: four 4x4 patches and a class token."""

    def __init__(self, attention: type[nn.Module] = Attention) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(DIM)
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 5, DIM))
        self.blocks = nn.Sequential(Block(DIM, attention), Block(DIM, attention))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0])


NETS = {
    "encoder": lambda: Encoder(norm_first=True),
    "encoder_post_ln": lambda: Encoder(norm_first=False, activation="gelu"),
    "token_lm": TokenLM,
    "timm_vit": VisionTransformer,
    "separate_qkv": lambda: VisionTransformer(CausalSeparateAttention),
    "not_attention": lambda: VisionTransformer(NotAttention),
}
SHAPES = {
    "token_lm": (TOKENS,),
    **{n: (1, 8, 8) for n in ("timm_vit", "separate_qkv", "not_attention")},
}


def make_net(name: str = "encoder") -> nn.Module:
    return NETS[name]()


def inputs(name: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if name == "token_lm":
        return torch.randint(0, VOCAB, (n, TOKENS), generator=gen)
    return torch.randn(n, *SHAPES.get(name, (TOKENS, FEATURES)), generator=gen)
