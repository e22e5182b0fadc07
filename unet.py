"""A small class-conditional UNet for 32x32 images (DDPM / ADM style), predicting v.

    v = alpha_t * eps - sigma_t * x_0          (Salimans & Ho 2022, arXiv 2202.00512, App. D)

Layout: conv in -> [ResBlock x num_blocks (+ attention at the listed resolutions), downsample] per
level -> middle ResBlock, attention, ResBlock -> mirrored up path with skip connections -> GroupNorm,
SiLU, zero-initialised conv out. Time t in [0, 1] and the class label (10 = the null class used by
classifier-free guidance) are embedded, summed and injected into every ResBlock as a scale and shift
of its second GroupNorm (ADM's "scale-shift norm").

`forward(..., return_features=True)` also returns the bottleneck feature map [B, C_mid, 4, 4] (at
the default depth), which DMD2's optional GAN head reads. Nothing else lives here.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    """Sinusoidal embedding of continuous t in [0, 1], scaled to the usual 0..1000 range. [B, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)          # -> (scale, shift) of norm2
        self.norm2, self.drop = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)   # block starts as identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, as linear layers on tokens (a 1x1 conv by
    another name, but a plain matmul: faster, and free of copies for channels_last inputs)."""
    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.proj = norm(ch), nn.Linear(ch, 3 * ch), nn.Linear(ch, ch)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                                 # [B, HW, C]
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                                      # [B, heads, HW, d]
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Block(nn.Module):
    """A ResBlock optionally followed by self-attention; the unit of both UNet paths."""
    def __init__(self, c_in, c_out, emb_dim, dropout, attn):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = Attention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 2, 2, 2), num_blocks=2, attn_res=(16,), dropout=0.1,
                 num_classes=10, img_res=32, in_ch=3):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=tuple(ch_mult), num_blocks=num_blocks, attn_res=tuple(attn_res),
                           dropout=dropout, num_classes=num_classes, img_res=img_res, in_ch=in_ch)
        emb_dim = 4 * ch
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)   # index num_classes = null class (CFG)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Down path: remember every skip's channel count for the mirrored up path.
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, img_res
        for level, mult in enumerate(ch_mult):
            for _ in range(num_blocks):
                self.down.append(Block(c, ch * mult, emb_dim, dropout, res in attn_res))
                c = ch * mult
                skips.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([Block(c, c, emb_dim, dropout, True), Block(c, c, emb_dim, dropout, False)])
        self.mid_channels = c

        # Up path: num_blocks + 1 blocks per level, each eating one skip, then upsample.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_blocks + 1):
                self.up.append(Block(c + skips.pop(), ch * mult, emb_dim, dropout, res in attn_res))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y, return_features=False):
        """x: [B, 3, H, W] noisy image z_t; t: [B] in [0, 1]; y: [B] labels in {0..num_classes}
        (num_classes = unconditional). Returns v [B, 3, H, W] (and the bottleneck map if asked)."""
        emb = self.time_mlp(timestep_embedding(t, self.ch)) + self.class_emb(y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        features = h
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
        v = self.conv_out(F.silu(self.norm_out(h)))
        return (v, features) if return_features else v
