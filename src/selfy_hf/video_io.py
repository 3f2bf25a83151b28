"""Reading video frames: files and bytes through PyAV (its wheel bundles FFmpeg), and folders of frame images."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoDecodeError(ValueError):
    """A video could not be read; the message names the file (or `<bytes>`) and the problem."""


def describe_source(source) -> str:
    """A short name for error messages: the path, or `<N bytes>` for in-memory videos."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def is_frame_folder(source) -> bool:
    """Whether `source` is a directory of frame images (the Something-Something V1 `img_00001.jpg` layout)."""
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir()


def list_frame_files(folder) -> list[Path]:
    """The image files of a frame folder, in natural order (`img_2.jpg` before `img_10.jpg`)."""
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise VideoDecodeError(f"{folder}: frame folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: (len(p.stem), p.stem))


def _open(source):
    import av

    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise VideoDecodeError(f"{name}: no such video file")
        if Path(source).stat().st_size == 0:
            raise VideoDecodeError(f"{name}: the file is empty")
        target = str(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoDecodeError(f"{name}: no bytes to decode")
        target = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        target = source
    else:
        raise TypeError(
            f"cannot read a video from {type(source).__name__}: give a path, bytes or a file object"
        )
    try:
        container = av.open(target, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"{name}: not a readable video ({error})") from error
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{name}: contains no video stream")
    return container


def count_frames(source) -> int:
    """
    The number of frames. Uses the container's count where it has one; webm/VP9 (Something-Something V2) and other
    containers that report 0 are counted by demuxing packets, which needs no decoding.
    """
    if is_frame_folder(source):
        return len(list_frame_files(source))
    import av

    container = _open(source)
    try:
        stream = container.streams.video[0]
        count = stream.frames
        if count <= 0:
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{describe_source(source)}: corrupt video ({error})") from error
    finally:
        container.close()
    if count == 0:
        raise VideoDecodeError(f"{describe_source(source)}: the video has zero frames")
    return count


def read_frames(source, indices: Sequence[int]) -> np.ndarray:
    """
    Frames at `indices` as RGB uint8 `(len(indices), H, W, 3)`, in the order given, repeated indices repeated.
    Decoding stops after the last index needed. If the stream ends early (containers whose frame count is an
    estimate), indices past the end get the last frame; a video yielding no frame at all is an error.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices must not be empty")
    if min(indices) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
    if is_frame_folder(source):
        return _read_frame_folder(source, indices)
    return _decode(source, indices)


def _read_frame_folder(folder, indices: list[int]) -> np.ndarray:
    from PIL import Image

    files = list_frame_files(folder)
    frames = {}
    for index in sorted(set(indices)):
        path = files[min(index, len(files) - 1)]
        try:
            with Image.open(path) as image:
                frames[index] = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise VideoDecodeError(f"{path}: unreadable frame image ({error})") from error
    return np.stack([frames[i] for i in indices])


def _decode(source, indices: list[int]) -> np.ndarray:
    import av

    wanted, last_needed = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    last_frame = None
    container = _open(source)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                frames[position] = frame.to_ndarray(format="rgb24")
            last_frame = frame
            if position >= last_needed:
                break
        if last_frame is not None and position < last_needed:
            tail = last_frame.to_ndarray(format="rgb24")
            frames.update({i: tail for i in wanted if i > position})
    except av.FFmpegError as error:
        raise VideoDecodeError(f"{describe_source(source)}: corrupt or truncated video ({error})") from error
    except ValueError as error:  # PyAV raises ValueError for pixel formats it cannot convert
        raise VideoDecodeError(f"{describe_source(source)}: unsupported pixel format ({error})") from error
    finally:
        container.close()
    if last_frame is None:
        raise VideoDecodeError(f"{describe_source(source)}: no frame could be decoded")
    return np.stack([frames[i] for i in indices])


__all__ = [
    "VideoDecodeError",
    "count_frames",
    "describe_source",
    "is_frame_folder",
    "list_frame_files",
    "read_frames",
]
