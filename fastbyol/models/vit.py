"""Vision Transformers with timm's parameter names and shapes, attention by `F.scaled_dot_product_attention`.

    cls_token (1, 1, D)   pos_embed (1, 1 + (S / P)^2, D)   patch_embed.proj  Conv2d(3, D, P, stride P)
    blocks.N.norm1 -> attn.qkv -> SDPA -> attn.proj (+ residual) -> blocks.N.norm2 -> mlp.fc1 -> GELU -> mlp.fc2 (+)
    norm (LayerNorm, eps 1e-6)

so an encoder exported at 224 px loads into `timm.create_model("vit_small_patch16_224")` strictly except its `head`
(tests/test_vit.py checks the names and shapes against a key list taken from timm). The encoder has no head: its
feature is the class token after the final norm, (B, D). That is the feature timm's classifier reads
(`global_pool="token"`) and the one MoCo v3 and DINO train their projector on, so the exported model's own head sees
the features BYOL shaped; the mean of the patch tokens would be a second, untrained readout.

Parameter counts (tests/test_vit.py): vit_small_patch16 at 224 px 21,665,664, plus timm's 1000-class head 22,050,664;
vit_base_patch16 85,798,656, with the head 86,567,656. The patch-4 models are for 28-32 px images (7x7 or 8x8 patches).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H / P) * (W / P), D): one Conv2d with kernel = stride = P."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, SDPA (flash / memory-efficient kernels on the GPU), one proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT: embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (3, B, heads, N, head_dim): timm's layout of the qkv output, so its weights mean the same here
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT encoder without a head: (B, 3, S, S) -> (B, D), the class token after the final norm.

    pos_embed has one row per patch of an `image_size` input (a multiple of `patch_size`) plus the class token's;
    other sizes get it resampled (`position_embedding`). Init as timm's: truncated normal (std 0.02) for pos_embed
    and every Linear, zero biases, class token N(0, 1e-6), the patch projection as a Linear over its flattened kernel
    (LeCun normal)."""

    # never weight-decayed nor LARS-adapted (with the norms and biases): `fastbyol.optim.excluded_parameters` reads it
    no_weight_decay_names = ("pos_embed", "cls_token")

    def __init__(self, image_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, in_channels: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: image side {image_size} px is not a multiple of the patch size {patch_size}")
        self.patch_size, self.image_size = patch_size, image_size
        self.num_features = self.feature_dim = embed_dim
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)  # LeCun normal
        nn.init.zeros_(proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 1 + gh * gw, D): pos_embed, its patch rows resampled bicubically (as timm's `resample_abs_pos_embed`)
        when the input's patch grid is not the one it was built for (the kNN monitor reads the dataset's own size)."""
        side = self.image_size // self.patch_size
        if grid == (side, side):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False).to(cls.dtype)
        return torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding(grid)  # (B, 1 + N, D)
        return self.norm(self.blocks(tokens))[:, 0]  # (B, D): the class token after the final norm


# name -> (patch, embed_dim, depth, heads): timm's vit_tiny/small/base widths
VIT_SIZES: dict[str, tuple[int, int, int]] = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def vit(size: str, patch_size: int, image_size: int = 224, **overrides) -> VisionTransformer:
    """A timm-sized ViT (`size` tiny | small | base) at `patch_size` for `image_size` px inputs."""
    dim, depth, heads = VIT_SIZES[size]
    kwargs = dict(embed_dim=dim, depth=depth, num_heads=heads) | overrides
    return VisionTransformer(image_size=image_size, patch_size=patch_size, **kwargs)
