"""
The STSS transformation (paper section 3.1, eq. 1): the dot product of every feature vector with each of its
(L, U, V) space-time neighbours. Features `(B, T, C, H, W)` in, similarities `(B, T, H, W, L, U, V)` out, with

    out[b, t, y, x, l, u, v] = <x[b, t, :, y, x], x[b, t + offsets[l], :, y + u - r, x + v - r]>,   r = window // 2,

and zero where the neighbour lies outside the clip or the map (the official code zero-pads its features). `u` is the
vertical displacement, `v` the horizontal one, as in the official `SpatialCorrelationSampler(1, window, 1, 0, 1)`.
Normalise the features over C first (`l2_normalize(x, dim=2)`) for cosine similarity.

`stss_reference` is the plain definition. `stss` computes the same tensor with batched matrix products:

- `"all_pairs"`: for every pair of frames that some offset relates, the product of all their positions
  (`(H*W) x (H*W)`), from which one gather picks each query's window. The pair (t, t + d) serves offset +d and,
  transposed, offset -d, and pairs reaching outside the clip are never formed, so a symmetric offset set costs about
  half the products of a per-offset loop. Its backward is written by hand (gradients accumulated in place, one
  product for a frame paired with itself). Fastest on small maps; time and memory grow as (H*W)^2.
- `"tiles"`: the map is cut into P x P tiles (P = 7 or 8) and each tile is multiplied with its (P + 2r) x (P + 2r)
  halo of neighbours at every offset; time and memory grow linearly with H*W. Its backward is written by hand so
  that the gradient of the overlapping halos is summed once, not zero-filled and added per offset.

`method="auto"` uses all-pairs up to `ALL_PAIRS_MAX_POSITIONS` positions per frame and tiles above (the crossover
measured with `selfy_hf.benchmarking.benchmark_stss`).

Mixed precision: under `torch.autocast` the fast paths multiply, and return, in the autocast dtype (bf16 or fp16, like
any matrix product under autocast); products of normalised features lie in [-1, 1], so fp16 cannot overflow. Their
gradient comes back in the dtype of `x`. `stss_reference` ignores autocast (elementwise products in the dtype of `x`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Measured crossover (CPU, fp32, 8 frames, C=128, window 9, L = 1, 5 and 7, forward+backward; benchmark_stss):
# all-pairs is faster up to 22x22 maps, tiles from 24x24 on (about even in between).
ALL_PAIRS_MAX_POSITIONS = 22 * 22
STSS_METHODS = ("auto", "all_pairs", "tiles", "reference")
_TILE_SIZES = (8, 7)
_INDEX_CACHE_SIZE = 32
_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """The official normalisation for cosine similarity: `x / sqrt(sum(x**2, dim) + eps)`; eps sits inside the root,
    so an all-zero vector stays zero."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True) + eps).sqrt()


def _check_arguments(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"stss expects a floating-point tensor x, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if x.dim() != 5:
        raise ValueError(f"stss expects x of shape (B, T, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    offsets = list(temporal_offsets)
    if not offsets:
        raise ValueError("temporal_offsets must not be empty")
    if any(isinstance(offset, bool) or not isinstance(offset, int) for offset in offsets):
        raise TypeError(f"temporal_offsets must be ints, got {offsets!r}")
    if len(set(offsets)) != len(offsets):
        raise ValueError(f"temporal_offsets must be distinct, got {offsets!r}")


def _frames_at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """Frame t + offset for every t of `(B, T, ...)`, zeros where that frame is outside the clip."""
    frames = x.shape[1]
    if abs(offset) >= frames:
        return torch.zeros_like(x)
    padding = [0, 0] * (x.dim() - 2)
    if offset >= 0:
        return F.pad(x[:, offset:], padding + [0, offset])
    return F.pad(x[:, :offset], padding + [-offset, 0])


def stss_reference(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    """
    The definition, one displacement at a time: `x` `(B, T, C, H, W)` in, `(B, T, H, W, L, U, V)` out with
    `out[b, t, y, x, l, u, v] = <x[b, t, :, y, x], x[b, t + temporal_offsets[l], :, y + u - r, x + v - r]>`,
    `r = window // 2`, and zero where the neighbour lies outside the clip or the map.
    """
    _check_arguments(x, temporal_offsets, window)
    height, width = x.shape[-2:]
    radius = window // 2
    per_offset = []
    for offset in temporal_offsets:
        neighbours = F.pad(_frames_at_offset(x, offset), (radius, radius, radius, radius))
        per_displacement = [
            (x * neighbours[..., u : u + height, v : v + width]).sum(dim=2)
            for u in range(window)
            for v in range(window)
        ]
        per_offset.append(torch.stack(per_displacement, dim=-1).unflatten(-1, (window, window)))
    return torch.stack(per_offset, dim=4)


def _cached(key: tuple, build: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Index tensors per (geometry, device), built once. Under `torch.compile` / `torch.export` they are built inside
    the graph instead, so that no fake or functional tensor of a trace is ever cached."""
    if torch.compiler.is_compiling():
        return build()
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        # Built as normal tensors even under `torch.inference_mode`: a training step may save them for backward
        # later, which autograd refuses for inference tensors.
        with torch.inference_mode(False):
            _INDEX_CACHE[key] = build()
    return _INDEX_CACHE[key]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: autocast's for float32 inputs when it is on, else x's own. Devices
    without autocast (`meta`, which `count_complexity` runs on) have no autocast state to ask about."""
    device_type = x.device.type
    if (
        x.dtype == torch.float32
        and torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
    ):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --- all pairs ----------------------------------------------------------------------------------------------------


def _pair_distances(frames: int, temporal_offsets: Sequence[int]) -> list[int]:
    """The frame distances |offset| that fit in the clip: the pairs (t, t + d) of each are formed once."""
    return sorted({abs(offset) for offset in temporal_offsets if abs(offset) < frames}) or [0]


def _all_pairs_layout(
    frames: int, height: int, width: int, temporal_offsets: tuple[int, ...], window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    `(query_frames, key_frames, index)`. Product k multiplies frame `query_frames[k]` with `key_frames[k]` over
    H*W + 1 positions (the last one a zero vector); the pairs come distance by distance (`_pair_distances`), each
    distance d as (0, d), (1, 1 + d), ... `index` `(1, T*H*W*L*U*V)` picks every similarity out of the flattened
    products: element (query, neighbour) for a forward offset, (neighbour, query) of the pair's transpose for a
    backward one, and a zero element for neighbours outside the clip or the map.
    """
    distances = _pair_distances(frames, temporal_offsets)
    first_pair = dict(zip(distances, [sum(frames - d for d in distances[:i]) for i in range(len(distances))]))
    query_frames = torch.cat([torch.arange(frames - d, device=device) for d in distances])
    key_frames = torch.cat([torch.arange(d, frames, device=device) for d in distances])

    positions = height * width
    side = positions + 1  # positions plus the zero vector
    radius = window // 2
    time = torch.arange(frames, device=device).view(-1, 1, 1, 1)
    query = torch.arange(positions, device=device).view(1, -1, 1, 1)
    offset = torch.tensor(temporal_offsets, device=device).view(1, 1, -1, 1)
    pair_base = torch.tensor([first_pair.get(abs(o), 0) for o in temporal_offsets], device=device).view(
        1, 1, -1, 1
    )
    displacement = torch.arange(window * window, device=device).view(1, 1, 1, -1)
    row = query // width + displacement // window - radius
    col = query % width + displacement % window - radius
    on_map = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    neighbour = torch.where(on_map, row * width + col, positions)
    other_frame = time + offset
    pair = pair_base + torch.minimum(time, other_frame)
    element = torch.where(offset >= 0, query * side + neighbour, neighbour * side + query)
    in_clip = (other_frame >= 0) & (other_frame < frames)
    index = torch.where(in_clip, pair * side * side + element, side * side - 1)  # pair 0, (zero, zero): 0
    return query_frames, key_frames, index.reshape(1, -1)


def building_graph() -> bool:
    """Tracing, compiling or exporting (TorchScript, dynamo, `torch.export`, ONNX): a graph is being recorded, so
    eager-only formulations must stay out of it (the all-pairs products per clip would fix the batch size that ONNX
    exports as dynamic)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return (
        torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting or torch.onnx.is_in_onnx_export()
    )


def _samples(tensor: torch.Tensor) -> list[torch.Tensor]:
    """What the eager all-pairs path runs its matrix products on: each clip of the batch on CPU, where 3D views
    let `bmm` write straight into the products and read the frames without copies (~15% faster than 4D
    `matmul`); the whole batch elsewhere, where one kernel launch per product beats one per clip."""
    return list(tensor.unbind(0)) if tensor.device.type == "cpu" else [tensor]


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.is_contiguous():
        torch.matmul(a, b, out=out)
    else:
        out.copy_(torch.matmul(a, b))


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.dim() == 3:
        out.baddbmm_(a, b)
    else:
        out += torch.matmul(a, b)


def _gather_windows(
    products: torch.Tensor, index: torch.Tensor, flat_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Every query's window out of the `(B, pairs, S, S)` products, by the layout's flat `index`. `flat_index`, the
    same as int32, is given for a single clip: a gather along one row runs on one thread, `index_select` over the
    flattened products on all of them (CPU, the R18 block's clip: 1.17 -> 0.75 ms)."""
    if flat_index is not None:
        return products.reshape(-1).index_select(0, flat_index)[None]
    batch = products.shape[0]
    return products.reshape(batch, -1).gather(1, index.expand(batch, -1))


def _pair_products(flat: torch.Tensor, distances: Sequence[int]) -> torch.Tensor:
    """`(B, pairs, S, S)` products of the frame pairs of `_all_pairs_layout` from `(B, T, C, S)` features."""
    batch, frames, _, side = flat.shape
    products = flat.new_empty(batch, sum(frames - d for d in distances), side, side)
    for features, pairs in zip(_samples(flat), _samples(products)):
        first = 0
        for distance in distances:
            count = frames - distance
            queries, keys = features.narrow(-3, 0, count), features.narrow(-3, distance, count)
            _matmul_into(pairs.narrow(-3, first, count), queries.transpose(-1, -2), keys)
            first += count
    return products


class _AllPairsFunction(torch.autograd.Function):
    """Eager all-pairs with a hand-written backward: each frame's gradient is accumulated in place, and a frame
    paired with itself (offset 0) takes one product, `x (G + G^T)`, instead of two."""

    @staticmethod
    def forward(
        ctx, flat: torch.Tensor, distances: list[int], index: torch.Tensor, flat_index: torch.Tensor | None
    ) -> torch.Tensor:
        products = _pair_products(flat, distances)
        ctx.save_for_backward(flat, index)
        ctx.distances, ctx.products_shape = distances, products.shape
        return _gather_windows(products, index, flat_index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        flat, index = ctx.saved_tensors
        batch, frames = flat.shape[:2]
        grad_products = flat.new_zeros(ctx.products_shape)
        grad_products.view(batch, -1).scatter_add_(1, index.expand(batch, -1), grad_output.to(flat.dtype))
        grad_flat = torch.zeros_like(flat)
        for features, grads, grad_features in zip(
            _samples(flat), _samples(grad_products), _samples(grad_flat)
        ):
            first = 0
            for distance in ctx.distances:
                count = frames - distance
                block = grads.narrow(-3, first, count)
                if distance == 0:
                    _add_matmul(grad_features, features, block + block.transpose(-1, -2))
                else:
                    queries, keys = features.narrow(-3, 0, count), features.narrow(-3, distance, count)
                    _add_matmul(grad_features.narrow(-3, 0, count), keys, block.transpose(-1, -2))
                    _add_matmul(grad_features.narrow(-3, distance, count), queries, block)
                first += count
        return grad_flat, None, None, None


def _stss_all_pairs(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    batch, frames, channels, height, width = x.shape
    offsets = tuple(temporal_offsets)
    query_frames, key_frames, index = _cached(
        ("all_pairs", frames, height, width, offsets, window, x.device),
        lambda: _all_pairs_layout(frames, height, width, offsets, window, x.device),
    )
    flat = F.pad(x.reshape(batch, frames, channels, height * width), (0, 1))  # append the zero position
    if building_graph():
        products = torch.matmul(
            flat.index_select(1, query_frames).transpose(2, 3), flat.index_select(1, key_frames)
        )
        out = _gather_windows(products, index)
    else:
        flat, distances = flat.to(_compute_dtype(x)), _pair_distances(frames, offsets)
        flat_index = None
        if batch == 1 and x.device.type == "cpu":
            (flat_index,) = _cached(
                ("all_pairs_int32", frames, height, width, offsets, window), lambda: (index.view(-1).int(),)
            )
        if torch.is_grad_enabled() and flat.requires_grad:
            out = _AllPairsFunction.apply(flat, distances, index, flat_index)
        else:
            out = _gather_windows(_pair_products(flat, distances), index, flat_index)
    return out.view(batch, frames, height, width, len(offsets), window, window)


# --- tiles --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TileGeometry:
    """How `(B, T, C, H, W)` features are cut into tiles of `tile` x `tile` queries and `halo` x `halo` neighbours."""

    batch: int
    frames: int
    height: int
    width: int
    offsets: tuple[int, ...]
    window: int
    tile: int

    @property
    def radius(self) -> int:
        return self.window // 2

    @property
    def halo(self) -> int:
        return self.tile + 2 * self.radius

    @property
    def tiles_y(self) -> int:
        return math.ceil(self.height / self.tile)

    @property
    def tiles_x(self) -> int:
        return math.ceil(self.width / self.tile)

    @property
    def tiles_per_frame(self) -> int:
        """Tiles in one frame of every clip: the row stride between frames in the tile-major layouts."""
        return self.batch * self.tiles_y * self.tiles_x

    @property
    def live_offsets(self) -> list[int]:
        """Offsets that reach at least one frame of the clip (the others give zeros)."""
        return [offset for offset in self.offsets if abs(offset) < self.frames]

    @property
    def frames_before(self) -> int:
        return max([0] + [-offset for offset in self.live_offsets])

    @property
    def frames_after(self) -> int:
        return max([0] + self.live_offsets)

    def first_key_row(self, offset: int) -> int:
        """The row of the halo tensor where the neighbours of frame 0 at `offset` start."""
        return (self.frames_before + offset) * self.tiles_per_frame


def _tile_size(height: int, width: int) -> int:
    """7 or 8, whichever pads the map less (8 on ties): small tiles waste few products on the halo, but tiles below
    7 make matrix products too small to run efficiently."""
    return min(_TILE_SIZES, key=lambda tile: math.ceil(height / tile) * math.ceil(width / tile) * tile * tile)


def _tile_window_index(tile: int, window: int, device: torch.device) -> tuple[torch.Tensor]:
    """`(tile*tile, window*window)`: where each query's window lies in its tile's flattened halo (the same for every
    tile, since the halo carries the zero padding)."""
    halo = tile + window - 1
    start = torch.arange(tile, device=device)[:, None] + torch.arange(window, device=device)[None, :]
    index = start[:, None, :, None] * halo + start[None, :, None, :]
    return (index.reshape(tile * tile, window * window),)


def _halo_pieces(geometry: _TileGeometry) -> list[tuple[int, int]]:
    """A halo spans ceil(halo / tile) tiles per axis: (first row or column, length) of each piece within the halo."""
    g = geometry
    return [(start, min(g.tile, g.halo - start)) for start in range(0, g.halo, g.tile)]


def _key_canvas(frames_first: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """
    The neighbours' frames `(T', B, C, H, W)`, zero-padded in time by the frames the offsets reach and in space by
    the window radius, then to whole tiles, viewed as a tile grid `(T', B, rows, cols, C, tile, tile)`.
    """
    g = geometry
    pieces = len(_halo_pieces(g))
    rows, cols = g.tiles_y + pieces - 1, g.tiles_x + pieces - 1
    r = g.radius
    padding = (r, cols * g.tile - g.width - r, r, rows * g.tile - g.height - r)
    keys = F.pad(frames_first, (*padding, 0, 0, 0, 0, g.frames_before, g.frames_after))
    keys = keys.reshape(keys.shape[0], g.batch, keys.shape[2], rows, g.tile, cols, g.tile)
    return keys.permute(0, 1, 3, 5, 2, 4, 6)


def _cut_halos(canvas: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """`(T'*B*tiles, C, halo*halo)`: each tile's halo, assembled from the pieces of the tiles it spans, first along
    x, then along y (slices and concatenations, which every exporter supports)."""
    g = geometry
    pieces = _halo_pieces(g)
    wide = torch.cat(
        [canvas[:, :, :, b : b + g.tiles_x, ..., :width] for b, (_, width) in enumerate(pieces)], -1
    )
    halos = torch.cat(
        [wide[:, :, a : a + g.tiles_y, ..., :height, :] for a, (_, height) in enumerate(pieces)], -2
    )
    return halos.reshape(-1, halos.shape[4], g.halo * g.halo)


def _tile_inputs(x: torch.Tensor, geometry: _TileGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Queries `(T*B*tiles, tile*tile, C)` and halos `(T'*B*tiles, C, halo*halo)`, frame-major so that the neighbours
    of all frames at one offset are a contiguous block of halo rows; T' = T plus the zero frames the offsets reach.
    """
    g = geometry
    channels = x.shape[2]
    pad_y, pad_x = g.tiles_y * g.tile - g.height, g.tiles_x * g.tile - g.width
    frames_first = x.transpose(0, 1).to(_compute_dtype(x))
    queries = F.pad(frames_first, (0, pad_x, 0, pad_y))
    queries = queries.reshape(g.frames, g.batch, channels, g.tiles_y, g.tile, g.tiles_x, g.tile)
    queries = queries.permute(0, 1, 3, 5, 4, 6, 2).reshape(-1, g.tile * g.tile, channels)
    halos = _cut_halos(_key_canvas(frames_first, g), g)
    return queries, halos


def _tile_similarities(
    queries: torch.Tensor, halos: torch.Tensor, window_index: torch.Tensor, geometry: _TileGeometry
) -> torch.Tensor:
    """`(L, T*B*tiles, tile*tile, U*V)`: each tile's queries against its halo at every offset, windows gathered."""
    rows = queries.shape[0]
    index = window_index.expand(rows, -1, -1)
    per_offset = []
    for offset in geometry.offsets:
        if abs(offset) >= geometry.frames:
            per_offset.append(queries.new_zeros(rows, *window_index.shape))
            continue
        start = geometry.first_key_row(offset)
        per_offset.append(torch.bmm(queries, halos[start : start + rows]).gather(2, index))
    return torch.stack(per_offset)


def _tiles_to_output(similarities: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """`(L, T*B*tiles, tile*tile, U*V)` to the contiguous `(B, T, H, W, L, U, V)` result, tile padding cut off."""
    g = geometry
    out = similarities.view(
        len(g.offsets), g.frames, g.batch, g.tiles_y, g.tiles_x, g.tile, g.tile, g.window**2
    )
    out = out.permute(2, 1, 3, 5, 4, 6, 0, 7).reshape(
        g.batch, g.frames, g.tiles_y * g.tile, g.tiles_x * g.tile, len(g.offsets), g.window, g.window
    )
    return out[:, :, : g.height, : g.width].contiguous()


def _output_to_tiles(out: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """The inverse of `_tiles_to_output` (for the gradient), zeros on the tile padding."""
    g = geometry
    padded = F.pad(out, (0, 0, 0, 0, 0, 0, 0, g.tiles_x * g.tile - g.width, 0, g.tiles_y * g.tile - g.height))
    padded = padded.reshape(
        g.batch, g.frames, g.tiles_y, g.tile, g.tiles_x, g.tile, len(g.offsets), g.window**2
    )
    return padded.permute(6, 1, 0, 2, 4, 3, 5, 7).reshape(len(g.offsets), -1, g.tile * g.tile, g.window**2)


def _queries_to_frames(grad_queries: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """Undo the query tiling: `(T*B*tiles, tile*tile, C)` to `(T, B, C, H, W)`."""
    g = geometry
    channels = grad_queries.shape[-1]
    grad = grad_queries.view(g.frames, g.batch, g.tiles_y, g.tiles_x, g.tile, g.tile, channels)
    grad = grad.permute(0, 1, 6, 2, 4, 3, 5).reshape(
        g.frames, g.batch, channels, g.tiles_y * g.tile, g.tiles_x * g.tile
    )
    return grad[..., : g.height, : g.width]


def _fold_halos(grad_halos: torch.Tensor, geometry: _TileGeometry) -> torch.Tensor:
    """The adjoint of `_cut_halos`: sum the overlapping halos' gradient back onto the frames, `(T, B, C, H, W)`,
    piece by piece onto the tile grid (a few dense adds)."""
    g = geometry
    channels = grad_halos.shape[1]
    halos = grad_halos.view(-1, g.batch, g.tiles_y, g.tiles_x, channels, g.halo, g.halo)
    pieces = _halo_pieces(g)
    rows, cols = g.tiles_y + len(pieces) - 1, g.tiles_x + len(pieces) - 1
    canvas = halos.new_zeros(halos.shape[0], g.batch, rows, cols, channels, g.tile, g.tile)
    for a, (first_row, height) in enumerate(pieces):
        for b, (first_col, width) in enumerate(pieces):
            piece = halos[..., first_row : first_row + height, first_col : first_col + width]
            canvas[:, :, a : a + g.tiles_y, b : b + g.tiles_x, :, :height, :width] += piece
    canvas = canvas.permute(0, 1, 4, 2, 5, 3, 6).reshape(-1, g.batch, channels, rows * g.tile, cols * g.tile)
    r = g.radius
    return canvas[g.frames_before : g.frames_before + g.frames, :, :, r : r + g.height, r : r + g.width]


class _TilesFunction(torch.autograd.Function):
    """The tiles path with a hand-written backward: per offset, the gradient of the products is scattered into one
    reused buffer and multiplied straight into the query and halo gradients (no per-offset zero-filled copies)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, geometry: _TileGeometry, window_index: torch.Tensor) -> torch.Tensor:
        queries, halos = _tile_inputs(x, geometry)
        ctx.save_for_backward(queries, halos, window_index)
        ctx.geometry = geometry
        ctx.input_dtype = x.dtype
        return _tiles_to_output(_tile_similarities(queries, halos, window_index, geometry), geometry)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        queries, halos, window_index = ctx.saved_tensors
        geometry = ctx.geometry
        grad_tiles = _output_to_tiles(grad_output.to(queries.dtype), geometry)
        rows = queries.shape[0]
        index = window_index.expand(rows, -1, -1)
        grad_queries = torch.zeros_like(queries)
        grad_halos = torch.zeros_like(halos)
        # Every offset scatters into the same positions, so the buffer needs zeroing only once.
        grad_products = queries.new_zeros(rows, queries.shape[1], halos.shape[2])
        for position, offset in enumerate(geometry.offsets):
            if abs(offset) >= geometry.frames:
                continue
            keys = slice(geometry.first_key_row(offset), geometry.first_key_row(offset) + rows)
            grad_products.scatter_(2, index, grad_tiles[position])
            grad_queries.baddbmm_(grad_products, halos[keys].transpose(1, 2))
            grad_halos[keys].baddbmm_(queries.transpose(1, 2), grad_products)
        grad = _queries_to_frames(grad_queries, geometry) + _fold_halos(grad_halos, geometry)
        return grad.transpose(0, 1).to(ctx.input_dtype).contiguous(), None, None


def _stss_tiles(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    batch, frames, _, height, width = x.shape
    geometry = _TileGeometry(
        batch, frames, height, width, tuple(temporal_offsets), window, _tile_size(height, width)
    )
    (window_index,) = _cached(
        ("tiles", geometry.tile, window, x.device),
        lambda: _tile_window_index(geometry.tile, window, x.device),
    )
    if torch.is_grad_enabled() and x.requires_grad:
        return _TilesFunction.apply(x, geometry, window_index)
    queries, halos = _tile_inputs(x, geometry)  # inference, export: the same forward, no autograd.Function
    return _tiles_to_output(_tile_similarities(queries, halos, window_index, geometry), geometry)


_METHODS = {"all_pairs": _stss_all_pairs, "tiles": _stss_tiles, "reference": stss_reference}


def select_stss_method(height: int, width: int) -> str:
    """The method `stss(..., method="auto")` uses for an H x W map: all-pairs up to `ALL_PAIRS_MAX_POSITIONS`."""
    return "all_pairs" if height * width <= ALL_PAIRS_MAX_POSITIONS else "tiles"


def stss(x: torch.Tensor, temporal_offsets: Sequence[int], window: int, method: str = "auto") -> torch.Tensor:
    """
    Fast STSS, the same tensor as [`stss_reference`]: `x` `(B, T, C, H, W)` in, contiguous `(B, T, H, W, L, U, V)`
    out, zero for neighbours outside the clip or the map.

    Args:
        x: features (normalise them over C first for cosine similarity).
        temporal_offsets: distinct ints, e.g. `[-2, -1, 0, 1, 2]`; L = their number, in their order.
        window: odd spatial window U = V.
        method: `"auto"` (all-pairs for maps of up to `ALL_PAIRS_MAX_POSITIONS` positions, tiles above),
            `"all_pairs"`, `"tiles"` or `"reference"`.

    Under `torch.autocast` the products and the result are in the autocast dtype (see the module docstring).
    """
    _check_arguments(x, temporal_offsets, window)
    if method not in STSS_METHODS:
        raise ValueError(f"Unknown stss method {method!r}; choose one of {STSS_METHODS}")
    if method == "auto":
        method = select_stss_method(x.shape[-2], x.shape[-1])
    return _METHODS[method](x, temporal_offsets, window)


__all__ = [
    "ALL_PAIRS_MAX_POSITIONS",
    "STSS_METHODS",
    "building_graph",
    "l2_normalize",
    "select_stss_method",
    "stss",
    "stss_reference",
]
