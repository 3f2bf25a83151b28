"""Video classification datasets (Hub datasets, class folders, official list files) and their collator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .video_io import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


@dataclass
class VideoSplit:
    """The videos of one split (paths, bytes or frame folders), their label ids, and the label names in order."""

    videos: list
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def load_class_folder(root: str | Path, label_names: list[str] | None = None) -> VideoSplit:
    """
    `root/<class>/<video>` (video files of any common container, `.webm` included, or frame folders). Labels follow
    `label_names` when given (so the user's order is kept; unknown class folders are an error), else sorted names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = list(label_names) if label_names is not None else classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the given labels {names}")
    videos, labels = [], []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        for item in sorted(folder.iterdir()):
            if item.suffix.lower() in VIDEO_SUFFIXES or (
                item.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in item.iterdir())
            ):
                videos.append(str(item))
                labels.append(label)
    if not videos:
        raise ValueError(f"{root}: no videos found in the class folders")
    return VideoSplit(videos, labels, names)


def load_list_file(
    list_file: str | Path, root: str | Path | None = None, label_names: list[str] | None = None
) -> VideoSplit:
    """The official list format: one `path num_frames label` line per video, paths of frame folders (relative to
    `root`, default the list file's folder)."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    videos, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{list_file}:{number}: expected 'path num_frames label', got {line!r}")
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else root / parts[0]
        if not path.exists():
            raise FileNotFoundError(f"{list_file}:{number}: {path} does not exist")
        videos.append(str(path))
        labels.append(int(parts[-1]))
    num_labels = max(labels) + 1
    return VideoSplit(
        videos, labels, list(label_names) if label_names else [str(i) for i in range(num_labels)]
    )


def load_hub_dataset(
    name: str,
    split: str,
    video_column: str = "video",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> VideoSplit:
    """
    A `datasets.load_dataset` dataset (Hub id or local path) with a video column (paths or bytes) and a label
    column. The `Video` feature is read with `decode=False` (decoding it needs torchcodec); our processor decodes.

    Labels: a `ClassLabel` column gives the label names. `label_names` is for columns of plain ints (names of ids
    0, 1, ...) or strings (each mapped to its position in `label_names`); given with a `ClassLabel` column, it
    reorders the ids to its order by name (as `load_class_folder` does). Without it, string labels are numbered in
    sorted order and int labels named "0", "1", .... A label that `label_names` does not hold is a `ValueError`.

    Offline (`HF_HUB_OFFLINE=1`), `datasets` resolves a Hub id only from its own prepared cache (a previous
    `load_dataset` of it); a dataset that only sits in the Hub cache (`hf download --repo-type dataset`,
    `snapshot_download`) is then loaded from its cached snapshot folder.
    """
    import datasets

    table = _load_dataset_split(name, split)
    if video_column not in table.column_names or label_column not in table.column_names:
        raise ValueError(
            f"{name}: needs columns {video_column!r} and {label_column!r}, has {table.column_names}"
        )
    if isinstance(table.features[video_column], datasets.Video):
        table = table.cast_column(video_column, datasets.Video(decode=False))
    videos = [v["bytes"] or v["path"] if isinstance(v, dict) else v for v in table[video_column]]
    labels, names = _label_ids(table[label_column], table.features[label_column], label_names, name)
    return VideoSplit(videos, labels, names)


def _load_dataset_split(name: str, split: str):
    """`datasets.load_dataset(name, split=split)`; when the Hub cannot be reached (offline mode included) and `name`
    is a Hub id held in the Hub cache, the cached snapshot folder instead."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ConnectionError as error:
        if Path(name).exists() or name.count("/") != 1:
            raise
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise error from None
        return datasets.load_dataset(snapshot, split=split)


def _label_ids(
    values: list, feature, label_names: Sequence[str] | None, name: str
) -> tuple[list[int], list[str]]:
    """Label ids and names from a label column (see `load_hub_dataset`)."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        if label_names is None:
            return [int(v) for v in values], list(feature.names)
        values = [feature.int2str(int(v)) for v in values]
    if label_names is not None:
        names = [str(label) for label in label_names]
        position = {label: index for index, label in enumerate(names)}
        if all(isinstance(v, str) for v in values):
            unknown = sorted(set(values) - set(position))
            ids = [position.get(v) for v in values]
        else:
            unknown = sorted({int(v) for v in values if not 0 <= int(v) < len(names)})
            ids = [int(v) for v in values]
        if unknown:
            shown = ", ".join(map(repr, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise ValueError(f"{name}: labels {shown} are not among the given label_names {names}")
        return ids, names
    if values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        position = {label: index for index, label in enumerate(names)}
        return [position[v] for v in values], names
    ids = [int(v) for v in values]
    return ids, [str(i) for i in range(max(ids, default=-1) + 1)]


class VideoClassificationDataset(Dataset):
    """Runs the processor per item: random segment frames and augmentation for training (reproducible from the
    seed, the epoch and the index, so resumed runs see the same data), centre frames for evaluation."""

    def __init__(self, split: VideoSplit, processor, training: bool, seed: int = 0):
        self.split, self.processor, self.training, self.seed = split, processor, training, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split.videos)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        features = self.processor(
            self.split.videos[index],
            labels=[self.split.labels[index]],
            training=self.training,
            generator=generator,
        )
        return {"pixel_values": features["pixel_values"][0], "labels": int(features["labels"][0])}


def collate_videos(batch: list[dict]) -> dict:
    """Stack items into `pixel_values` and `labels`: the collator for `Trainer` and for Accelerate loops."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "labels": torch.tensor([item["labels"] for item in batch], dtype=torch.long),
    }


__all__ = [
    "VideoClassificationDataset",
    "VideoSplit",
    "collate_videos",
    "load_class_folder",
    "load_hub_dataset",
    "load_list_file",
]
