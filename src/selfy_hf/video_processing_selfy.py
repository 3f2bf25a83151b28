"""SelfyVideoProcessor: videos (files, bytes, frame folders, arrays, PIL frames) to SELFYNet `pixel_values`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BaseVideoProcessor, BatchFeature

from .video_io import count_frames, read_frames

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Multi-scale crop of the TSN/TSM/SELFY training recipe: crop sides are these fractions of the shorter side.
MULTI_SCALE_CROP_SCALES = [1.0, 0.875, 0.75, 0.66]


def sample_segment_indices(
    num_total_frames: int,
    num_frames: int,
    num_clips: int = 1,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """
    TSN segment-based sampling, shared by training, evaluation and the pipeline: split the video into `num_frames`
    equal segments and take one frame from each, a random one for training, for evaluation the centre (one clip)
    or `num_clips` evenly spread positions inside every segment. Videos shorter than `num_frames` repeat frames,
    in temporal order. Returns `num_clips` lists of `num_frames` indices.
    """
    if num_total_frames < 1:
        raise ValueError(f"cannot sample from a video with {num_total_frames} frames")
    segment = num_total_frames / num_frames
    clips = []
    for clip in range(num_clips):
        if training:
            positions = torch.rand(num_frames, generator=generator).tolist()
        else:
            positions = [(clip + 0.5) / num_clips] * num_frames
        indices = [min(int(segment * (i + p)), num_total_frames - 1) for i, p in enumerate(positions)]
        clips.append(indices)
    return clips


def _is_single_frame_list(videos) -> bool:
    from PIL import Image

    return isinstance(videos, (list, tuple)) and len(videos) > 0 and isinstance(videos[0], Image.Image)


def _as_batch(videos) -> list:
    """A single video becomes a batch of one; lists and 5D arrays are batches already."""
    if _is_single_frame_list(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return list(videos) if videos.ndim == 5 else [videos]
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("no videos given")
        return list(videos)
    return [videos]


def _frames_tensor(frames) -> torch.Tensor:
    """Decoded or given frames as float `(T, 3, H, W)` in [0, 255]."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(image.convert("RGB")) for image in frames])
    tensor = torch.as_tensor(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        shape = tuple(tensor.shape) if hasattr(tensor, "shape") else type(tensor).__name__
        raise ValueError(f"a video array must have 4 dims (T, H, W, C) or (T, C, H, W), got {shape}")
    if tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    elif tensor.shape[1] not in (1, 3):
        raise ValueError(f"a video array needs 1 or 3 colour channels, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("the video has zero frames")
    was_float = tensor.is_floating_point()
    tensor = tensor.float()
    if was_float and tensor.max() <= 1.0:  # float frames in [0, 1]
        tensor = tensor * 255.0
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor


class SelfyVideoProcessor(BaseVideoProcessor):
    r"""
    Turns videos into SELFYNet `pixel_values`: TSN segment sampling, resize, crop, ImageNet normalisation; training
    augmentation (multi-scale crop, direction-aware horizontal flip); multi-clip and three-crop evaluation views.

    Args:
        num_frames (`int`, defaults to 8): frames per clip (one per TSN segment).
        num_clips (`int`, defaults to 1): evaluation clips per video, evenly offset inside the segments.
        num_crops (`int`, defaults to 1): evaluation crops per clip, 1 (centre) or 3 (along the longer side).
        size (`dict`, defaults to `{"shortest_edge": 256}`): resize before cropping; `{"height": 240, "width": 320}`
            reproduces the official SELFY preprocessing.
        crop_size (`int`, defaults to 224): side of the square crop.
        image_mean, image_std (`list[float]`): ImageNet statistics by default.
        multi_scale_crop_scales (`list[float]`): training crop sides as fractions of the shorter side (official
            1, .875, .75, .66, aspect distortion of at most one step).
        do_flip (`bool`, defaults to `False`): random horizontal flips in training, only for clips whose label is in
            `flip_label_map`, whose label then becomes the mapped one (e.g. "left to right" <-> "right to left";
            map symmetric classes to themselves). Clips of other classes are never flipped, so labels never lie.
        flip_label_map (`dict[int, int]`, *optional*): label -> label of the mirrored video.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        num_frames: int = 8,
        num_clips: int = 1,
        num_crops: int = 1,
        size: dict | None = None,
        crop_size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        multi_scale_crop_scales: Sequence[float] | None = None,
        do_flip: bool = False,
        flip_label_map: dict | None = None,
        **kwargs,
    ):
        for name in ("crop_size", "size", "image_mean", "image_std", "num_frames"):
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        self.num_frames = num_frames
        self.num_clips = num_clips
        self.num_crops = num_crops
        self.size = dict(size) if size is not None else {"shortest_edge": 256}
        if set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(
                f"size must be {{'shortest_edge': n}} or {{'height': h, 'width': w}}, got {self.size}"
            )
        self.crop_size = crop_size["height"] if isinstance(crop_size, dict) else int(crop_size)
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.multi_scale_crop_scales = list(multi_scale_crop_scales or MULTI_SCALE_CROP_SCALES)
        self.do_flip = do_flip
        # JSON turns int keys into strings: restore them.
        self.flip_label_map = {int(k): int(v) for k, v in flip_label_map.items()} if flip_label_map else None
        if do_flip and not self.flip_label_map:
            raise ValueError("do_flip=True needs a flip_label_map (label -> label of the mirrored video)")

    def __call__(self, videos, labels=None, **kwargs) -> BatchFeature:
        return self.preprocess(videos, labels=labels, **kwargs)

    def preprocess(
        self,
        videos,
        labels: Sequence[int] | torch.Tensor | None = None,
        training: bool = False,
        num_frames: int | None = None,
        num_clips: int | None = None,
        num_crops: int | None = None,
        generator: torch.Generator | None = None,
        return_tensors: str | None = "pt",
        **unused: Any,
    ) -> BatchFeature:
        """
        Sample, decode and preprocess a video or a batch of videos.

        Returns a `BatchFeature` with `pixel_values` `(B, T, 3, crop, crop)`, or `(B, views, T, 3, crop, crop)` when
        evaluating `num_clips * num_crops > 1` views, and `labels` (a LongTensor, swapped where a clip was flipped)
        when labels are given. `training=True` samples a random frame per segment and augments. Extra keyword
        arguments from the `video-classification` pipeline (`do_sample_frames`, ...) are accepted and ignored.

        Example:

        ```python
        >>> import numpy as np
        >>> from selfy_hf import SelfyVideoProcessor
        >>> processor = SelfyVideoProcessor(num_frames=8, crop_size=112, size={"shortest_edge": 128})
        >>> video = np.random.randint(0, 255, (40, 120, 160, 3), dtype=np.uint8)
        >>> tuple(processor(video)["pixel_values"].shape)
        (1, 8, 3, 112, 112)
        ```
        """
        num_frames = num_frames or self.num_frames
        views = (1, 1) if training else (num_clips or self.num_clips, num_crops or self.num_crops)
        batch = _as_batch(videos)
        label_list = self._check_labels(labels, len(batch))
        pixel_values, out_labels = [], []
        for index, video in enumerate(batch):
            label = None if label_list is None else label_list[index]
            clips = self._sample(video, num_frames, views[0], training, generator)
            if training:
                clip, label = self._augment(clips[0], label, generator)
                pixel_values.append(clip[None])
            else:
                pixel_values.append(torch.cat([self._evaluation_views(clip, views[1]) for clip in clips]))
            out_labels.append(label)
        stacked = torch.stack(pixel_values)
        data = {"pixel_values": stacked[:, 0] if stacked.shape[1] == 1 else stacked}
        if label_list is not None:
            data["labels"] = torch.tensor(out_labels, dtype=torch.long)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_labels(self, labels, batch_size: int) -> list[int] | None:
        if labels is None:
            if self.do_flip:
                raise ValueError("do_flip=True needs the labels, to swap the labels of flipped clips")
            return None
        labels = [int(labels)] if isinstance(labels, int) else [int(label) for label in labels]
        if len(labels) != batch_size:
            raise ValueError(f"got {len(labels)} labels for {batch_size} videos")
        return labels

    def _sample(
        self, video, num_frames: int, num_clips: int, training: bool, generator
    ) -> list[torch.Tensor]:
        """Pick the frames of each clip, decoding only those for file, bytes and frame-folder inputs."""
        if isinstance(video, (str, os.PathLike, bytes, bytearray)) or hasattr(video, "read"):
            source = video.read() if hasattr(video, "read") else video
            clips = sample_segment_indices(count_frames(source), num_frames, num_clips, training, generator)
            flat = [i for clip in clips for i in clip]
            frames = _frames_tensor(read_frames(source, flat))
            return list(frames.split(num_frames))
        frames = _frames_tensor(video)
        clips = sample_segment_indices(frames.shape[0], num_frames, num_clips, training, generator)
        return [frames[clip] for clip in clips]

    def _resize(self, frames: torch.Tensor) -> torch.Tensor:
        height, width = frames.shape[-2:]
        if "shortest_edge" in self.size:
            scale = self.size["shortest_edge"] / min(height, width)
            target = (max(1, round(height * scale)), max(1, round(width * scale)))
        else:
            target = (self.size["height"], self.size["width"])
        if target == (height, width):
            return frames
        return F.interpolate(frames, size=target, mode="bilinear", align_corners=False, antialias=True)

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.image_std).view(1, 3, 1, 1) * 255.0
        return (frames - mean) / std

    def _evaluation_views(self, frames: torch.Tensor, num_crops: int) -> torch.Tensor:
        """`(num_crops, T, 3, crop, crop)`: the centre crop, or three crops along the longer side."""
        frames = self._resize(frames)
        height, width = frames.shape[-2:]
        crop = self.crop_size
        if min(height, width) < crop:
            frames = F.interpolate(
                frames, size=(max(height, crop), max(width, crop)), mode="bilinear", align_corners=False
            )
            height, width = frames.shape[-2:]
        top, left = (height - crop) // 2, (width - crop) // 2
        if num_crops == 1:
            corners = [(top, left)]
        elif width >= height:
            corners = [(top, 0), (top, left), (top, width - crop)]
        else:
            corners = [(0, left), (top, left), (height - crop, left)]
        return torch.stack([self._normalize(frames[..., y : y + crop, x : x + crop]) for y, x in corners])

    def _augment(self, frames: torch.Tensor, label: int | None, generator) -> tuple[torch.Tensor, int | None]:
        """Multi-scale crop (the same crop for every frame) resized to the crop size, then the optional flip."""
        frames = self._resize(frames)
        height, width = frames.shape[-2:]
        crop_h, crop_w, top, left = self._multi_scale_window(height, width, generator)
        frames = frames[..., top : top + crop_h, left : left + crop_w]
        frames = F.interpolate(
            frames, size=(self.crop_size, self.crop_size), mode="bilinear", align_corners=False
        )
        if self.do_flip and label in self.flip_label_map and torch.rand(1, generator=generator).item() < 0.5:
            frames, label = frames.flip(-1), self.flip_label_map[label]
        return self._normalize(frames), label

    def _multi_scale_window(self, height: int, width: int, generator) -> tuple[int, int, int, int]:
        """A crop of sides drawn from the scales (aspect distortion of at most one scale step) at one of 13 fixed
        positions (corners, centre, edge midpoints and quarter points), as the official multi-scale crop."""
        sides = [int(min(height, width) * scale) for scale in self.multi_scale_crop_scales]
        sides = [self.crop_size if abs(side - self.crop_size) < 3 else side for side in sides]
        pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
        crop_h, crop_w = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        crop_h, crop_w = min(crop_h, height), min(crop_w, width)
        step_h, step_w = (height - crop_h) / 4, (width - crop_w) / 4
        grid = [
            (0, 0),
            (0, 4),
            (4, 0),
            (4, 4),
            (2, 2),
            (0, 2),
            (4, 2),
            (2, 0),
            (2, 4),
            (1, 1),
            (1, 3),
            (3, 1),
            (3, 3),
        ]
        row, col = grid[int(torch.randint(len(grid), (1,), generator=generator))]
        return crop_h, crop_w, math.floor(row * step_h), math.floor(col * step_w)


__all__ = ["SelfyVideoProcessor", "sample_segment_indices"]
