"""Patch <-> image reshapes and fixed 2-D sin-cos position tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patches in row-major grid order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: image {h}x{w} is not a multiple of the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, gh, gw, p(row), p(col), C
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, gh*p, gw*p); a square grid unless ``grid`` is given."""
    b, n, d = patches.shape
    if d != patch * patch * channels:
        raise ValueError(f"unpatchify: last dim {d} != patch^2 * channels = {patch * patch * channels}")
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"unpatchify: {n} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, gh, p, gw, p
    return x.reshape(b, channels, gh * patch, gw * patch)


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """The encoder's view of the high-resolution image: bicubic resize to ``size`` (no anti-aliasing)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=False)


def sincos_table_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim): first half sines, second half cosines, frequencies 1 / 10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos table needs an even width, got {dim}")
    freqs = 1.0 / (10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2)))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_table_2d(dim: int, grid: int, cls_token: bool = True, device=None) -> torch.Tensor:
    """(1, [1 +] grid*grid, dim) fixed 2-D sin-cos table: half the width encodes the row, half the column;
    the class token's entry (first row) is zero. Row-major order, matching :func:`patchify`."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos table needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64, device=device)
    rows = coords.repeat_interleave(grid)  # 0,0,...,1,1,...
    cols = coords.repeat(grid)  # 0,1,...,0,1,...
    table = torch.cat([sincos_table_1d(dim // 2, rows), sincos_table_1d(dim // 2, cols)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype, device=table.device), table], dim=0)
    return table.to(torch.float32).unsqueeze(0)
