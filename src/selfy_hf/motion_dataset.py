"""
A synthetic motion-only benchmark: classes that differ only by motion and by the direction of time.

Every class has a partner whose videos are the same videos played backwards (moving left / right, up / down,
approaching / receding, rotating clockwise / counter-clockwise), so the *set* of frames of a video says nothing about
its class within a pair: an order-blind frame-averaging model (TSN) sits at chance within each pair, while a model
that sees motion (TSM, SELFYNet) can tell them apart. Appearance is random (textures from scikit-image's sample
images, colours, sizes, positions, speeds). Videos are stored losslessly (FFV1 in Matroska): lossy codecs make key
frames sharper than the rest, which would leak the time direction to a frame-set model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PAIRS = [
    ("moving left", "moving right"),
    ("moving up", "moving down"),
    ("approaching", "receding"),
    ("rotating clockwise", "rotating counter-clockwise"),
]
LABELS = [name for pair in PAIRS for name in pair]
ROTATION_STEP = 0.15  # radians per frame
TEXTURES = ["brick", "grass", "gravel", "camera", "coffee", "astronaut", "rocket", "chelsea"]


@dataclass
class MotionDatasetSpec:
    """What `make_motion_dataset` builds: sizes, frames, and videos per class and split."""

    frames: int = 16
    size: int = 64
    train_per_class: int = 48
    validation_per_class: int = 16
    seed: int = 0


def _texture_bank() -> list[torch.Tensor]:
    import skimage.data

    bank = []
    for name in TEXTURES:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        bank.append(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    return bank


def _random_patch(bank, size: int, rng: np.random.Generator) -> torch.Tensor:
    texture = bank[rng.integers(len(bank))]
    side = int(rng.integers(size, min(texture.shape[1:]) + 1))
    top = int(rng.integers(0, texture.shape[1] - side + 1))
    left = int(rng.integers(0, texture.shape[2] - side + 1))
    patch = F.interpolate(
        texture[None, :, top : top + side, left : left + side], size=(size, size), mode="area"
    )[0]
    tint = torch.from_numpy(rng.uniform(0.6, 1.4, size=(3, 1, 1)).astype(np.float32))
    return (patch * tint).clamp(0, 1)


def _forward_video(pair: int, spec: MotionDatasetSpec, bank, rng: np.random.Generator) -> torch.Tensor:
    """One video of the first class of `pair`, `(T, 3, size, size)` in [0, 1]; its partner is its reverse."""
    size, frames = spec.size, spec.frames
    background = _random_patch(bank, size, rng) * 0.6
    rotating = pair == 3
    # A rotating object is a long bar: a disc or a textured square would hardly change when turned.
    object_size = int(
        rng.integers(size // 2, size * 3 // 4) if rotating else rng.integers(size // 3, size // 2)
    )
    sprite = _random_patch(bank, object_size, rng)
    radius = object_size / 2
    yy, xx = torch.meshgrid(
        torch.arange(object_size) - radius + 0.5, torch.arange(object_size) - radius + 0.5, indexing="ij"
    )
    if rotating:
        mask = (yy.abs() <= object_size / 8).float()
    elif rng.random() < 0.5:
        mask = ((yy**2 + xx**2) <= radius**2).float()
    else:
        mask = torch.ones(object_size, object_size)
    sprite = sprite * 0.7 + 0.3  # brighter than the background, so the object stands out
    speed = rng.uniform(1.5, 2.5) * size / 64
    start = rng.uniform(size * 0.3, size * 0.7, size=2)
    angle0 = rng.uniform(0, 2 * math.pi)
    video = []
    for t in range(frames):
        centre, scale, angle = start.copy(), 1.0, 0.0
        step = t - (frames - 1) / 2
        if pair == 0:
            centre[1] -= speed * step  # leftwards
        elif pair == 1:
            centre[0] -= speed * step  # upwards
        elif pair == 2:
            scale = 0.6 + 0.8 * t / (frames - 1)  # growing: approaching
        else:
            # clockwise as displayed (a growing angle turns the sampled image counter-clockwise); under pi/2
            # between the frames TSN sampling keeps, as a bar looks the same after half a turn
            angle = angle0 - ROTATION_STEP * t
        video.append(_composite(background, sprite, mask, centre, scale, angle))
    return torch.stack(video)


def _composite(background, sprite, mask, centre, scale: float, angle: float) -> torch.Tensor:
    """Paste the sprite, scaled and rotated, at `centre` (row, col) over the background."""
    size = background.shape[-1]
    cos, sin = math.cos(angle), math.sin(angle)
    extent = sprite.shape[-1] * scale / size
    theta = torch.tensor(
        [[cos / extent, -sin / extent, 0.0], [sin / extent, cos / extent, 0.0]], dtype=torch.float32
    )
    offset = torch.tensor([(centre[1] / size) * 2 - 1, (centre[0] / size) * 2 - 1], dtype=torch.float32)
    theta[:, 2] = -theta[:, :2] @ offset
    grid = F.affine_grid(theta[None], (1, 4, size, size), align_corners=False)
    layers = torch.cat([sprite, mask[None]])[None]
    placed = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    alpha = placed[3:]
    return background * (1 - alpha) + placed[:3] * alpha


def _write_lossless(path: Path, video: torch.Tensor, fps: int = 8) -> None:
    import av

    frames = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # bitexact: no muxer version strings or random ids, so the same seed gives byte-identical files
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps, options={"flags": "+bitexact"})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_motion_dataset(
    output_dir: str | Path, spec: MotionDatasetSpec | None = None, progress: bool = True
) -> Path:
    """
    Write the dataset as `output_dir/{train,validation}/<label>/<index>.mkv` (the class-folder layout our loader
    and `datasets`' `videofolder` read) plus `labels.json` (the label order). Deterministic by `spec.seed`.
    Returns `output_dir`. Skips the work if a complete dataset with the same spec is already there.
    """
    from tqdm.auto import tqdm

    spec = spec or MotionDatasetSpec()
    output_dir = Path(output_dir)
    manifest = output_dir / "labels.json"
    wanted = {"labels": LABELS, "pairs": [list(p) for p in PAIRS], "spec": spec.__dict__}
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return output_dir
    bank = _texture_bank()
    jobs = [("train", spec.train_per_class), ("validation", spec.validation_per_class)]
    total = sum(n for _, n in jobs) * len(PAIRS)
    with tqdm(total=total * 2, desc="motion dataset", disable=not progress) as bar:
        for split_index, (split, per_class) in enumerate(jobs):
            rng = np.random.default_rng([spec.seed, split_index])
            for pair_index, (forward_name, backward_name) in enumerate(PAIRS):
                for index in range(per_class):
                    video = _forward_video(pair_index, spec, bank, rng)
                    for name, clip in ((forward_name, video), (backward_name, video.flip(0))):
                        folder = output_dir / split / name.replace(" ", "_")
                        folder.mkdir(parents=True, exist_ok=True)
                        _write_lossless(folder / f"{index:05d}.mkv", clip)
                        bar.update()
    manifest.write_text(json.dumps(wanted, indent=2))
    return output_dir


__all__ = ["LABELS", "PAIRS", "MotionDatasetSpec", "make_motion_dataset"]
