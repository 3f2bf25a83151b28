"""
Showing the motion a SELFY block sees: its STSS tensor (paper section 3.1, eq. 1) at one query position, and the
soft-argmax displacement field (eq. 2) it implies, drawn over the video's frames.

- [`capture_stss`] runs a model on one clip and takes the STSS tensor `(T, H, W, L, U, V)` of one SELFY block with
  a forward hook on the block's `transform` (the model computes it; nothing here repeats its math).
- [`stss_displacements`] turns such a tensor into displacements `(T, L, H, W, 2)`: the expectation of the window
  offset under `softmax(similarity / temperature)` over the U x V window (eq. 2, temperature 0.01 by default).
- [`render_stss`] draws (a) the frames t + l around the query frame t with the query point and its soft-argmax
  match, (b) the (L, U, V) similarity volume at the query as one U x V heat map per temporal offset l (shared colour
  scale) and (c) the displacement field of every offset as arrows over frame t, at the block's feature resolution,
  scaled to image pixels by the feature stride; it saves a PNG and, optionally, an animated GIF of the arrows of one
  offset over all frames.

Sign convention: a displacement is `(dx, dy)`, where in frame t + l the content of the query (t, y, x) lies, minus
the query position: +dx is rightwards, +dy downwards (image rows). A pattern moving right by s feature pixels per
frame gives `dx = +s * l`: +x arrows for the forward offsets (l > 0), -x arrows for the backward ones. Note the
order: `(dx, dy)`, the reverse of the STSS window axes `(u, v)` (vertical first) and of the model's own soft-argmax
features.

`python scripts/visualize_stss.py --model DIR --video PATH [--query t,y,x] [--block 0] --output stss.png --gif
stss.gif` runs [`main`].
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .video_processing_selfy import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_TEMPERATURE = 0.01  # the paper's tau (eq. 2), for cosine similarities
MAX_ARROWS_PER_SIDE = 12  # denser fields are subsampled for drawing


# --- capturing the STSS tensor -------------------------------------------------------------------------------------


@dataclass
class StssCapture:
    """The STSS tensor of one SELFY block for one clip, with what is needed to place it over the frames."""

    similarities: torch.Tensor  # (T, H, W, L, U, V), float32 on the CPU
    temporal_offsets: tuple[int, ...]  # the L offsets, in the tensor's order
    block_name: str  # the key in `selfy_blocks`, e.g. "layer2"
    image_size: tuple[int, int]  # (height, width) of the input frames

    @property
    def num_frames(self) -> int:
        return self.similarities.shape[0]

    @property
    def feature_size(self) -> tuple[int, int]:
        return tuple(self.similarities.shape[1:3])

    @property
    def window(self) -> int:
        return self.similarities.shape[-1]

    @property
    def stride(self) -> tuple[float, float]:
        """Image pixels per feature pixel, `(vertical, horizontal)`."""
        (height, width), (rows, cols) = self.image_size, self.feature_size
        return height / rows, width / cols

    def feature_to_image(self, y: float, x: float) -> tuple[float, float]:
        """The image-pixel coordinates `(row, column)` of the centre of feature cell (y, x)."""
        stride_y, stride_x = self.stride
        return (y + 0.5) * stride_y - 0.5, (x + 0.5) * stride_x - 0.5

    def displacements(
        self, temperature: float = DEFAULT_TEMPERATURE, in_pixels: bool = False
    ) -> torch.Tensor:
        """[`stss_displacements`] of this tensor `(T, L, H, W, 2)`, NaN where frame t + l is outside the clip; in
        feature pixels, or with `in_pixels` in image pixels (scaled by the stride)."""
        out = stss_displacements(self.similarities, temperature, temporal_offsets=self.temporal_offsets)
        if in_pixels:
            stride_y, stride_x = self.stride
            out = out * torch.tensor([stride_x, stride_y])
        return out


def _backbone(model: nn.Module) -> nn.Module:
    """The `SelfyModel` of a `SelfyForVideoClassification` (or the model itself), found by its `selfy_blocks`."""
    for candidate in (getattr(model, "selfy", None), model):
        if isinstance(getattr(candidate, "selfy_blocks", None), nn.ModuleDict):
            return candidate
    raise ValueError(
        f"{type(model).__name__} is not a SELFY model: expected a SelfyForVideoClassification or SelfyModel "
        "(a module with `selfy_blocks`)"
    )


def selfy_block_names(model: nn.Module) -> list[str]:
    """The SELFY blocks of a model, in the order `block=0, 1, ...` selects them (e.g. `["layer2"]`)."""
    return list(_backbone(model).selfy_blocks.keys())


def _select_block(model: nn.Module, block: int | str) -> tuple[str, nn.Module]:
    blocks = _backbone(model).selfy_blocks
    names = list(blocks.keys())
    if not names:
        raise ValueError(
            "this model has no SELFY blocks (config.selfy_stages is empty): there is no STSS to show"
        )
    if isinstance(block, bool) or not isinstance(block, (int, str)):
        raise ValueError(f"block must be an index or a name such as {names[0]!r}, got {block!r}")
    if isinstance(block, str) and not block.lstrip("-").isdigit():
        if block not in blocks:
            raise ValueError(f"no SELFY block named {block!r}; this model has {names}")
        return block, blocks[block]
    index = int(block)
    if not 0 <= index < len(names):
        raise ValueError(
            f"block index {index} is out of range: this model has {len(names)} SELFY block(s), "
            f"0..{len(names) - 1} = {names}"
        )
    return names[index], blocks[names[index]]


def _single_clip(pixel_values: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """`(1, T, 3, H, W)` from `(T, 3, H, W)` or `(1, T, 3, H, W)`; anything else is refused."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() == 4:
        pixel_values = pixel_values[None]
    if pixel_values.dim() != 5 or pixel_values.shape[0] != 1:
        raise ValueError(
            "pixel_values must be one clip, (T, 3, H, W) or (1, T, 3, H, W), got shape "
            f"{tuple(pixel_values.shape)} (for several views, pass one: pixel_values[:, 0])"
        )
    frames = _backbone(model).config.num_frames
    if pixel_values.shape[1] != frames:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} frames, the model takes {frames}")
    return pixel_values


def capture_stss(model: nn.Module, pixel_values: torch.Tensor, block: int | str = 0) -> StssCapture:
    """
    Run `model` (a `SelfyForVideoClassification` or `SelfyModel`) on one clip, `pixel_values` `(1, T, 3, H, W)` or
    `(T, 3, H, W)`, and return the STSS tensor of its SELFY block `block` (an index into [`selfy_block_names`], or
    a name such as `"layer2"`), taken by a forward hook on the block's `transform`. The model runs in evaluation
    mode without gradients (its mode is restored afterwards).
    """
    name, selfy_block = _select_block(model, block)
    pixel_values = _single_clip(pixel_values, model)
    backbone = _backbone(model)
    parameter = next(backbone.parameters())
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output.detach())

    handle = selfy_block.transform.register_forward_hook(hook)
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(pixel_values.to(device=parameter.device, dtype=parameter.dtype))
    finally:
        handle.remove()
        backbone.train(was_training)
    if len(captured) != 1:
        raise RuntimeError(f"expected the SELFY block {name!r} to run once, it ran {len(captured)} times")
    offsets = tuple(int(offset) for offset in selfy_block.transform.correlation.temporal_offsets)
    return StssCapture(
        similarities=captured[0][0].float().cpu(),
        temporal_offsets=offsets,
        block_name=name,
        image_size=tuple(pixel_values.shape[-2:]),
    )


# --- soft-argmax displacements -------------------------------------------------------------------------------------


def stss_displacements(
    similarities: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    temporal_offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """
    Soft-argmax displacements (paper eq. 2) of an STSS tensor.

    Args:
        similarities: `(T, H, W, L, U, V)` or `(1, T, H, W, L, U, V)`, as `selfy_hf.stss.stss` returns: entry
            `[t, y, x, l, u, v]` compares position (t, y, x) with (t + offset_l, y + u - r, x + v - r), r = U // 2.
        temperature: softmax temperature tau (0.01 in the paper, for cosine similarities).
        temporal_offsets: the L offsets; when given, displacements towards frames outside the clip are NaN (their
            similarities are all zero, so their soft-argmax would be a meaningless 0).

    Returns:
        `(T, L, H, W, 2)` float32 displacements `(dx, dy)` in feature pixels: the expected position, in frame t + l,
        of the content of (t, y, x), minus (x, y). +dx is rightwards, +dy downwards.
    """
    if not isinstance(similarities, torch.Tensor):
        raise ValueError(f"similarities must be a tensor, got {type(similarities).__name__}")
    if similarities.dim() == 7:
        if similarities.shape[0] != 1:
            raise ValueError(f"similarities must hold one clip, got batch {similarities.shape[0]}")
        similarities = similarities[0]
    if (
        similarities.dim() != 6
        or similarities.shape[-1] != similarities.shape[-2]
        or similarities.shape[-1] % 2 == 0
    ):
        raise ValueError(
            f"similarities must be (T, H, W, L, U, V) with an odd square window, got {tuple(similarities.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    frames, height, width, offsets, window = similarities.shape[:5]
    radius = window // 2
    steps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=similarities.device)
    weights = torch.softmax(similarities.float().flatten(-2) / temperature, dim=-1)
    weights = weights.unflatten(-1, (window, window))  # (T, H, W, L, U, V)
    dy = (weights.sum(dim=-1) * steps).sum(dim=-1)  # u: rows
    dx = (weights.sum(dim=-2) * steps).sum(dim=-1)  # v: columns
    out = torch.stack((dx, dy), dim=-1).permute(0, 3, 1, 2, 4).contiguous()  # (T, L, H, W, 2)
    if temporal_offsets is not None:
        temporal_offsets = [int(offset) for offset in temporal_offsets]
        if len(temporal_offsets) != offsets:
            raise ValueError(f"got {len(temporal_offsets)} temporal offsets for L = {offsets}")
        target = torch.arange(frames)[:, None] + torch.tensor(temporal_offsets)[None, :]
        outside = (target < 0) | (target >= frames)
        out[outside.to(out.device)] = float("nan")
    return out


def default_query(capture: StssCapture, displacements: torch.Tensor | None = None) -> tuple[int, int, int]:
    """
    `(t, y, x)`: at the centre frame `T // 2`, the feature position with the largest displacement that the temporal
    offsets agree on. Every non-zero offset l whose frame is in the clip gives a velocity `d_l / l` (image pixels per
    frame; forward and backward offsets agree for steady motion); a position scores the smallest of these velocities'
    components along their median direction, so a stray match of one offset (an occlusion, a texture-less patch)
    cannot win over motion seen at every offset. The centre of the map when nothing moves. Positions whose window is
    cut by the map's edge (a band of U // 2 cells) are skipped when the map has an interior: content entering the map
    there has no match in the window.
    """
    if displacements is None:
        displacements = capture.displacements(in_pixels=True)
    t = capture.num_frames // 2
    height, width = capture.feature_size
    moving = [i for i, offset in enumerate(capture.temporal_offsets) if offset != 0]
    if not moving:
        return t, height // 2, width // 2
    spans = torch.tensor([capture.temporal_offsets[i] for i in moving], dtype=torch.float32)
    velocity = displacements[t, moving] / spans.view(-1, 1, 1, 1)  # (L', H, W, 2), NaN outside the clip
    median = velocity.nanmedian(dim=0).values.nan_to_num(nan=0.0)  # (H, W, 2)
    direction = median / median.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    along = (velocity * direction).sum(dim=-1).nan_to_num(nan=float("inf"))  # (L', H, W)
    score = along.amin(dim=0).clamp_min(0.0).nan_to_num(posinf=0.0)
    radius = capture.window // 2
    if height > 2 * radius and width > 2 * radius:
        interior = torch.zeros_like(score, dtype=torch.bool)
        interior[radius : height - radius, radius : width - radius] = True
        score = score.where(interior, torch.full_like(score, -1.0))
    if score.max() <= 1e-6:
        return t, height // 2, width // 2
    flat = int(score.flatten().argmax())
    return t, flat // width, flat % width


def _check_query(query: Sequence[int], capture: StssCapture) -> tuple[int, int, int]:
    frames, (height, width) = capture.num_frames, capture.feature_size
    try:
        t, y, x = (int(v) for v in query)
    except (TypeError, ValueError):
        raise ValueError(f"query must be three ints (t, y, x), got {query!r}") from None
    if not (0 <= t < frames and 0 <= y < height and 0 <= x < width):
        raise ValueError(
            f"query (t, y, x) = {(t, y, x)} is outside the STSS of block {capture.block_name!r}: t in 0..{frames - 1}, "
            f"y in 0..{height - 1}, x in 0..{width - 1} (feature-map coordinates, stride "
            f"{capture.stride[0]:g} x {capture.stride[1]:g} image pixels)"
        )
    return t, y, x


# --- drawing -------------------------------------------------------------------------------------------------------


@dataclass
class StssRendering:
    """What [`render_stss`] drew: the figure, the query used, the capture and its displacements in image pixels."""

    figure: object  # matplotlib.figure.Figure
    query: tuple[int, int, int]
    capture: StssCapture
    displacements: torch.Tensor  # (T, L, H, W, 2), (dx, dy) in image pixels, NaN outside the clip


def unnormalize_frames(
    pixel_values: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """`(1, T, 3, H, W)` or `(T, 3, H, W)` normalised frames to displayable `(T, H, W, 3)` floats in [0, 1]."""
    frames = pixel_values.detach().float().cpu().reshape(-1, *pixel_values.shape[-3:])
    frames = frames * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return frames.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _grid(capture: StssCapture) -> tuple[np.ndarray, np.ndarray, slice, slice]:
    """Image coordinates of the feature cells and the subsampling slices for drawing arrows."""
    height, width = capture.feature_size
    step = max(1, math.ceil(max(height, width) / MAX_ARROWS_PER_SIDE))
    rows, cols = slice(step // 2, None, step), slice(step // 2, None, step)
    stride_y, stride_x = capture.stride
    ys = (np.arange(height)[rows] + 0.5) * stride_y - 0.5
    xs = (np.arange(width)[cols] + 0.5) * stride_x - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return grid_x, grid_y, rows, cols


def _draw_arrows(
    axis, frame: np.ndarray, field: np.ndarray, capture: StssCapture, color: str = "yellow"
) -> None:
    """Frame t, dimmed, with the `(H, W, 2)` image-pixel field (NaN skipped) as arrows of true length."""
    axis.imshow(frame, alpha=0.6)
    grid_x, grid_y, rows, cols = _grid(capture)
    field = field[rows, cols]
    valid = np.isfinite(field).all(axis=-1)
    if valid.any():
        axis.quiver(
            grid_x[valid],
            grid_y[valid],
            field[..., 0][valid],
            field[..., 1][valid],  # angles="xy": from (x, y) to (x + dx, y + dy) in data (image) coordinates
            angles="xy",
            scale_units="xy",
            scale=1,
            color=color,
            edgecolor="black",
            linewidth=0.5,
            width=0.012,
            headwidth=3.5,
            headlength=4,
            headaxislength=3.5,
        )
    axis.set_xlim(-0.5, frame.shape[1] - 0.5)
    axis.set_ylim(frame.shape[0] - 0.5, -0.5)
    axis.set_xticks([])
    axis.set_yticks([])


def _new_figure(width: float, height: float, dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="constrained")


def render_stss(
    model: nn.Module,
    pixel_values: torch.Tensor,
    query: Sequence[int] | None = None,
    block: int | str = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    output: str | Path | None = None,
    gif: str | Path | None = None,
    gif_offset: int | None = None,
    gif_fps: float = 2.0,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    dpi: int = 100,
) -> StssRendering:
    """
    Draw what SELFY block `block` of `model` sees in one clip.

    Args:
        model: a `SelfyForVideoClassification` or `SelfyModel`.
        pixel_values: one normalised clip, `(1, T, 3, H, W)` or `(T, 3, H, W)` (e.g. from `SelfyVideoProcessor`).
        query: `(t, y, x)` in the block's feature-map coordinates (frame, row, column); default: at the centre frame,
            the position that moves most, by the soft-argmax displacements ([`default_query`]).
        block: which SELFY block, an index into [`selfy_block_names`] or a name such as `"layer2"`.
        temperature: the soft-argmax temperature tau of eq. 2.
        output: where to save the figure (PNG); `None` only returns it.
        gif: where to save an animated GIF of frames 0..T-1 with the arrows of offset `gif_offset` (default: the
            smallest positive offset, else the offset of smallest magnitude other than 0).
        image_mean, image_std: the normalisation of `pixel_values`, undone for display.

    Returns:
        a [`StssRendering`] with the matplotlib figure (rows: (a) frames t + l with the query (circle) and its
        soft-argmax match (cross), (b) the U x V similarities at the query per offset l, one colour scale,
        (c) the displacement field of each offset as arrows over frame t).
    """
    capture = capture_stss(model, pixel_values, block)
    displacements = capture.displacements(temperature, in_pixels=True)
    query = default_query(capture, displacements) if query is None else _check_query(query, capture)
    frames = unnormalize_frames(_single_clip(pixel_values, model), image_mean, image_std)
    figure = _draw_figure(capture, displacements, frames, query, temperature)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=dpi)
    if gif is not None:
        save_displacement_gif(
            capture, displacements, frames, gif, offset=gif_offset, fps=gif_fps, query=query
        )
    return StssRendering(figure=figure, query=query, capture=capture, displacements=displacements)


def _draw_figure(
    capture: StssCapture,
    displacements: torch.Tensor,
    frames: np.ndarray,
    query: tuple[int, int, int],
    tau: float,
):
    t, y, x = query
    offsets = capture.temporal_offsets
    radius = capture.window // 2
    columns = len(offsets)
    figure = _new_figure(max(6.0, 2.3 * columns + 1.0), 7.6)
    axes = figure.subplots(3, columns, squeeze=False)
    volume = capture.similarities[t, y, x]  # (L, U, V)
    in_clip = [0 <= t + offset < capture.num_frames for offset in offsets]
    shown = volume[torch.tensor(in_clip)] if any(in_clip) else volume
    vmin, vmax = float(shown.min()), float(shown.max())
    if vmax <= vmin:
        vmax = vmin + 1e-6
    query_row, query_col = capture.feature_to_image(y, x)
    stride_y, stride_x = capture.stride
    field = displacements.numpy()
    image = None
    for column, offset in enumerate(offsets):
        frame_axis, heat_axis, arrow_axis = axes[:, column]
        label = f"l = {offset:+d}" if offset else "l = 0"
        if not in_clip[column]:
            for axis in (frame_axis, heat_axis, arrow_axis):
                axis.axis("off")
            frame_axis.set_title(f"{label}: frame {t + offset}\noutside the clip", fontsize=9)
            continue
        dx, dy = field[t, column, y, x]
        # (a) frame t + l: the query's place (circle) and where its content went (cross).
        frame_axis.imshow(frames[t + offset])
        frame_axis.plot(query_col, query_row, "o", mfc="none", mec="cyan", ms=9, mew=1.6)
        if offset:
            frame_axis.plot(query_col + dx, query_row + dy, "x", color="red", ms=9, mew=2)
        frame_axis.set_title(
            f"frame {t + offset} (t{offset:+d})" if offset else f"frame {t} (query)", fontsize=9
        )
        frame_axis.set_xticks([])
        frame_axis.set_yticks([])
        # (b) the U x V similarities of (t, y, x) with frame t + l; the cross is the soft-argmax, in feature pixels.
        extent = (-radius - 0.5, radius + 0.5, radius + 0.5, -radius - 0.5)
        image = heat_axis.imshow(volume[column].numpy(), cmap="viridis", vmin=vmin, vmax=vmax, extent=extent)
        heat_axis.plot(dx / stride_x, dy / stride_y, "x", color="red", ms=8, mew=2)
        heat_axis.set_title(f"similarity, {label}", fontsize=9)
        heat_axis.set_xticks(range(-radius, radius + 1))
        heat_axis.set_yticks(range(-radius, radius + 1))
        heat_axis.tick_params(labelsize=7)
        heat_axis.set_xlabel("dx (feature px)", fontsize=8)
        if column == 0:
            heat_axis.set_ylabel("dy (feature px)", fontsize=8)
        # (c) the soft-argmax field of offset l over frame t.
        _draw_arrows(arrow_axis, frames[t], field[t, column], capture)
        arrow_axis.plot(query_col, query_row, "o", mfc="none", mec="cyan", ms=9, mew=1.6)
        arrow_axis.set_title(f"soft-argmax, {label}", fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=list(axes[1]), shrink=0.9, label="similarity")
    figure.suptitle(
        f"STSS of SELFY block {capture.block_name!r} at query t={t}, y={y}, x={x} (feature map "
        f"{capture.feature_size[0]}x{capture.feature_size[1]}, stride {stride_y:g}x{stride_x:g} px; "
        f"image pixel ({query_row:.0f}, {query_col:.0f})), tau={tau:g}",
        fontsize=10,
    )
    return figure


def save_displacement_gif(
    capture: StssCapture,
    displacements: torch.Tensor,
    frames: np.ndarray,
    path: str | Path,
    offset: int | None = None,
    fps: float = 2.0,
    query: tuple[int, int, int] | None = None,
    dpi: int = 80,
) -> Path:
    """An animated GIF of every frame t with the soft-argmax arrows of temporal offset `offset` (default: the
    smallest positive one); `displacements` `(T, L, H, W, 2)` in image pixels, `frames` `(T, H, W, 3)` in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    offsets = capture.temporal_offsets
    if offset is None:
        positive = [o for o in offsets if o > 0]
        moving = [o for o in offsets if o != 0]
        if not moving:
            raise ValueError(f"no temporal offset other than 0 to animate (offsets {list(offsets)})")
        offset = min(positive) if positive else min(moving, key=abs)
    if offset not in offsets:
        raise ValueError(f"gif offset {offset} is not one of the block's temporal offsets {list(offsets)}")
    column = offsets.index(offset)
    field = displacements.numpy()
    height, width = frames.shape[1:3]
    images = []
    for t in range(capture.num_frames):
        side = 3.2 / max(height, width)
        figure = _new_figure(side * width + 0.2, side * height + 0.45, dpi=dpi)
        canvas = FigureCanvasAgg(figure)
        axis = figure.subplots()
        _draw_arrows(axis, frames[t], field[t, column], capture)
        if query is not None and query[0] == t:
            row, col = capture.feature_to_image(query[1], query[2])
            axis.plot(col, row, "o", mfc="none", mec="cyan", ms=9, mew=1.6)
        target = f"frame {t + offset}" if 0 <= t + offset < capture.num_frames else "outside the clip"
        axis.set_title(f"t = {t}, l = {offset:+d} ({target})", fontsize=9)
        canvas.draw()
        images.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


# --- command line --------------------------------------------------------------------------------------------------


def parse_query(text: str) -> tuple[int, int, int]:
    """`"t,y,x"` to `(t, y, x)`."""
    parts = [part.strip() for part in text.split(",")]
    try:
        t, y, x = (int(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"--query must be t,y,x (three ints, feature-map coordinates), got {text!r}"
        ) from None
    return t, y, x


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Show the motion a SELFY block sees: its STSS at a query point and the soft-argmax "
        "displacement field, as a PNG (and an animated GIF)."
    )
    parser.add_argument("--model", required=True, help="a save_pretrained directory with the video processor")
    parser.add_argument("--video", required=True, help="a video file or a folder of frame images")
    parser.add_argument(
        "--query",
        default=None,
        help="t,y,x in the block's feature-map coordinates (default: the largest motion at the centre frame)",
    )
    parser.add_argument("--block", default="0", help="SELFY block index (0 = the first) or name, e.g. layer2")
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, help="soft-argmax tau (eq. 2)"
    )
    parser.add_argument("--output", default="stss.png", help="the figure (PNG)")
    parser.add_argument(
        "--gif", default=None, help="also write an animated GIF of the arrows over the frames"
    )
    parser.add_argument(
        "--gif-offset", type=int, default=None, help="temporal offset the GIF shows (default +1)"
    )
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    return parser


def main(argv: list[str] | None = None) -> StssRendering:
    """`python scripts/visualize_stss.py`: load a saved model and its processor, decode the video as for
    evaluation (one centre clip), and draw [`render_stss`]."""
    from .modeling_selfy import SelfyForVideoClassification
    from .video_processing_selfy import SelfyVideoProcessor

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        query = parse_query(args.query) if args.query is not None else None
    except ValueError as error:
        parser.error(str(error))
    model = SelfyForVideoClassification.from_pretrained(args.model).to(args.device or "cpu").eval()
    processor = SelfyVideoProcessor.from_pretrained(args.model)
    pixel_values = processor(
        args.video, num_frames=model.config.num_frames, num_clips=1, num_crops=1, training=False
    )["pixel_values"]
    rendering = render_stss(
        model,
        pixel_values,
        query=query,
        block=args.block,
        temperature=args.temperature,
        output=args.output,
        gif=args.gif,
        gif_offset=args.gif_offset,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )
    t, y, x = rendering.query
    print(f"block {rendering.capture.block_name}, query t={t}, y={y}, x={x}: {args.output}")
    if args.gif:
        print(f"animation: {args.gif}")
    return rendering


__all__ = [
    "DEFAULT_TEMPERATURE",
    "StssCapture",
    "StssRendering",
    "capture_stss",
    "default_query",
    "main",
    "parse_query",
    "render_stss",
    "save_displacement_gif",
    "selfy_block_names",
    "stss_displacements",
    "unnormalize_frames",
]
