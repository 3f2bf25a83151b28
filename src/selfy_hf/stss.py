"""
The STSS correlation (paper eq. 1): dot products of every feature vector with its (L, U, V) space-time neighbours.

`stss_reference` is the plain definition; `stss` computes the same tensor with matrix products, choosing between an
all-pairs product per frame pair (fastest on small maps) and a row-band product (memory linear in the map size on
large maps). Neighbours outside the clip or the map contribute zero, as the official zero padding does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Above this many positions per frame the all-pairs product's (H*W)^2 memory outweighs its speed (measured on CPU:
# all-pairs is faster up to ~28x28 maps).
ALL_PAIRS_MAX_POSITIONS = 32 * 32
_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Official cosine-similarity normalisation: `x / sqrt(sum(x^2) + eps)` (eps inside the root; zeros stay zero)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True) + eps).sqrt()


def _check(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"stss expects features of shape (B, T, C, H, W), got {tuple(x.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window}")
    if len(temporal_offsets) == 0:
        raise ValueError("temporal_offsets must not be empty")


def _frames_at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """Frame t + offset for every t of `(B, T, ...)`, zeros where that frame is outside the clip."""
    frames = x.shape[1]
    if abs(offset) >= frames:
        return torch.zeros_like(x)
    if offset >= 0:
        padding = [0, 0] * (x.dim() - 2) + [0, offset]
        return F.pad(x[:, offset:], padding)
    padding = [0, 0] * (x.dim() - 2) + [-offset, 0]
    return F.pad(x[:, :offset], padding)


def stss_reference(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    """
    The definition, one displacement at a time. `x`: `(B, T, C, H, W)` features (normalise them first for cosine
    similarity). Returns `(B, T, H, W, L, U, V)` with
    `out[b, t, y, x, l, u, v] = <x[b, t, :, y, x], x[b, t + offsets[l], :, y + u - r, x + v - r]>`, r = window // 2,
    and zero where the neighbour lies outside the clip or the map.
    """
    _check(x, temporal_offsets, window)
    height, width = x.shape[-2:]
    radius = window // 2
    per_offset = []
    for offset in temporal_offsets:
        neighbours = F.pad(_frames_at_offset(x, offset), (radius, radius, radius, radius))
        maps = [
            (x * neighbours[..., u : u + height, v : v + width]).sum(dim=2)
            for u in range(window)
            for v in range(window)
        ]
        per_offset.append(torch.stack(maps, dim=-1).unflatten(-1, (window, window)))
    return torch.stack(per_offset, dim=4)


def _window_index(positions: int, window: int, device: torch.device) -> torch.Tensor:
    """
    For a line of `positions` cells, the index of each cell's `window` neighbours, with `positions` (one past the end,
    pointing at an appended zero) for neighbours off the line. Shape `(positions, window)`.
    """
    key = ("line", positions, window, str(device))
    if key not in _INDEX_CACHE:
        radius = window // 2
        index = torch.arange(positions)[:, None] + torch.arange(-radius, radius + 1)[None, :]
        index = torch.where((index >= 0) & (index < positions), index, torch.full_like(index, positions))
        _INDEX_CACHE[key] = index.to(device)
    return _INDEX_CACHE[key]


def _grid_index(height: int, width: int, window: int, device: torch.device) -> torch.Tensor:
    """For an H x W map, the flat index of each position's window x window neighbours (H*W for off-map ones)."""
    key = ("grid", height, width, window, str(device))
    if key not in _INDEX_CACHE:
        rows = _window_index(height, window, torch.device("cpu"))  # (H, U), H = off-map
        cols = _window_index(width, window, torch.device("cpu"))  # (W, V), W = off-map
        flat = rows[:, None, :, None] * width + cols[None, :, None, :]  # (H, W, U, V)
        off_map = (rows[:, None, :, None] == height) | (cols[None, :, None, :] == width)
        flat = torch.where(off_map, torch.full_like(flat, height * width), flat)
        _INDEX_CACHE[key] = flat.reshape(height * width, window * window).to(device)
    return _INDEX_CACHE[key]


def _stss_all_pairs(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    """All-pairs similarity per (frame, offset) as one matrix product, then the window picked out by a gather."""
    batch, frames, channels, height, width = x.shape
    positions = height * width
    queries = x.reshape(batch * frames, channels, positions).transpose(1, 2)  # (BT, HW, C)
    index = _grid_index(height, width, window, x.device).expand(batch * frames, -1, -1)
    per_offset = []
    for offset in temporal_offsets:
        keys = _frames_at_offset(x, offset).reshape(batch * frames, channels, positions)
        similarity = F.pad(torch.bmm(queries, keys), (0, 1))  # a zero column for off-map neighbours
        per_offset.append(similarity.gather(2, index))
    out = torch.stack(per_offset, dim=2)  # (BT, HW, L, UV)
    return out.reshape(batch, frames, height, width, len(temporal_offsets), window, window)


def _stss_row_bands(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    """
    Per vertical displacement u, each query row against the neighbour row (W x W products), then the horizontal
    window picked out: memory and time grow as H*W*W, not (H*W)^2.
    """
    batch, frames, channels, height, width = x.shape
    radius = window // 2
    queries = x.permute(0, 1, 3, 4, 2).reshape(batch * frames * height, width, channels)  # (BTH, W, C)
    index = _window_index(width, window, x.device).expand(batch * frames * height, -1, -1)
    per_offset = []
    for offset in temporal_offsets:
        keys = _frames_at_offset(x, offset).permute(0, 1, 3, 2, 4)  # (B, T, H, C, W)
        keys = F.pad(keys, (0, 0, 0, 0, radius, radius))  # zero rows above and below the map
        per_row_shift = []
        for u in range(window):
            rows = keys[:, :, u : u + height].reshape(batch * frames * height, channels, width)
            band = F.pad(torch.bmm(queries, rows), (0, 1))  # (BTH, W, W + 1), last column zero
            per_row_shift.append(band.gather(2, index))  # (BTH, W, V)
        per_offset.append(torch.stack(per_row_shift, dim=2))  # (BTH, W, U, V)
    out = torch.stack(per_offset, dim=2)  # (BTH, W, L, U, V)
    return out.reshape(batch, frames, height, width, len(temporal_offsets), window, window)


STSS_METHODS = {"all_pairs": _stss_all_pairs, "row_bands": _stss_row_bands, "reference": stss_reference}


def stss(x: torch.Tensor, temporal_offsets: Sequence[int], window: int, method: str = "auto") -> torch.Tensor:
    """
    Fast STSS with the same result as [`stss_reference`]: `(B, T, C, H, W)` in, `(B, T, H, W, L, U, V)` out.

    `method`: `"auto"` (all-pairs up to `ALL_PAIRS_MAX_POSITIONS` positions per frame, row bands above),
    `"all_pairs"`, `"row_bands"` or `"reference"`. Under autocast the matrix products run in the autocast dtype.
    """
    _check(x, temporal_offsets, window)
    if method == "auto":
        method = "all_pairs" if x.shape[-2] * x.shape[-1] <= ALL_PAIRS_MAX_POSITIONS else "row_bands"
    if method not in STSS_METHODS:
        raise ValueError(f"Unknown stss method {method!r}; choose 'auto' or one of {sorted(STSS_METHODS)}")
    return STSS_METHODS[method](x, temporal_offsets, window).contiguous()


__all__ = ["ALL_PAIRS_MAX_POSITIONS", "STSS_METHODS", "l2_normalize", "stss", "stss_reference"]
