"""
Evaluating SELFYNets: multi-clip x multi-crop accuracy, confusion matrices, and the robustness study of the paper
(section 4.7, Fig. 5): occlusion and motion blur of the centre frame of every clip at growing severity.

Corruptions act on the *normalised* `pixel_values` the processor returns, which is equivalent to corrupting the
raw frames before normalisation: the motion blur is a convolution whose kernel sums to one with replicated borders,
so it commutes with the per-channel affine normalisation; the occlusion fills its rectangle with zeros, i.e. the
normalisation mean (the dataset's mean colour, ImageNet's by default), as cutout does.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import (
    VideoClassificationDataset,
    VideoSplit,
    collate_videos,
    load_class_folder,
    load_hub_dataset,
    load_list_file,
)
from .flops import count_complexity
from .metrics import classification_metrics, confusion_matrix

CORRUPTIONS = ("occlusion", "motion_blur")
DEFAULT_SEVERITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# At severity 1 the blur streak is this fraction of the shorter frame side (57 px at 224: heavy camera shake).
MAX_BLUR_FRACTION = 0.25
DEFAULT_BLUR_ANGLE = 0.0  # degrees; horizontal streaks, the dominant camera motion


def parse_views(views: str | Sequence[int]) -> tuple[int, int]:
    """`"2x3"` (clips x crops) or `(2, 3)` to `(num_clips, num_crops)`; crops are 1 (centre) or 3."""
    if isinstance(views, str):
        parts = views.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"views must look like 'CLIPSxCROPS', e.g. '2x3', got {views!r}")
        views = tuple(int(p) for p in parts)
    clips, crops = (int(v) for v in views)
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views needs >= 1 clip and 1 or 3 crops, got {clips}x{crops}")
    return clips, crops


def format_views(views: str | Sequence[int]) -> str:
    """The canonical `"CLIPSxCROPS"` name of a views setting."""
    clips, crops = parse_views(views)
    return f"{clips}x{crops}"


def motion_blur_kernel(length: int, angle: float = DEFAULT_BLUR_ANGLE) -> torch.Tensor:
    """
    A `(length, length)` linear motion-blur kernel (odd `length`): a line through the centre at `angle` degrees,
    rasterised, with equal weights summing to one (as imgaug's `MotionBlur`, the blur of Hendrycks & Dietterich's
    corruption benchmark, ref. [12] of the paper). `length=1` is the identity kernel.
    """
    if length < 1 or length % 2 == 0:
        raise ValueError(f"motion blur length must be a positive odd int, got {length}")
    radius = (length - 1) / 2
    steps = torch.linspace(-radius, radius, 4 * length)
    theta = math.radians(angle)
    rows = (radius - steps * math.sin(theta)).round().long()
    cols = (radius + steps * math.cos(theta)).round().long()
    kernel = torch.zeros(length, length)
    kernel[rows, cols] = 1.0
    return kernel / kernel.sum()


def _blur_length(severity: float, height: int, width: int) -> int:
    return 2 * round(severity * min(height, width) * MAX_BLUR_FRACTION / 2) + 1


def _occlusion_box(severity: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A centred rectangle with the frame's aspect ratio covering `severity` of its area: (top, left, h, w)."""
    side = math.sqrt(severity)
    box_h, box_w = round(height * side), round(width * side)
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def corrupt_frames(
    frames: torch.Tensor, kind: str, severity: float, blur_angle: float = DEFAULT_BLUR_ANGLE
) -> torch.Tensor:
    """
    Corrupt a batch of normalised frames `(N, C, H, W)` (a new tensor; severity 0 returns an unchanged copy).

    - `occlusion`: a centred rectangle of `severity` times the frame area, filled with 0 (the normalisation mean).
    - `motion_blur`: a linear blur of length `2 * round(severity * min(H, W) * 0.25 / 2) + 1` pixels at
      `blur_angle` degrees, with replicated borders.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption kind must be one of {CORRUPTIONS}, got {kind!r}")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must lie in [0, 1], got {severity}")
    if frames.dim() != 4:
        raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
    height, width = frames.shape[-2:]
    if kind == "occlusion":
        out = frames.clone()
        top, left, box_h, box_w = _occlusion_box(severity, height, width)
        out[..., top : top + box_h, left : left + box_w] = 0.0
        return out
    length = _blur_length(severity, height, width)
    if length == 1:
        return frames.clone()
    channels, radius = frames.shape[1], length // 2
    kernel = motion_blur_kernel(length, blur_angle).to(frames)
    padded = F.pad(frames, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, length, length), groups=channels)


def corrupt_centre_frame(
    pixel_values: torch.Tensor, kind: str, severity: float, blur_angle: float = DEFAULT_BLUR_ANGLE
) -> torch.Tensor:
    """
    Apply [`corrupt_frames`] to the centre frame (index `T // 2`) of every clip of `pixel_values`
    `(B, T, C, H, W)` or `(B, views, T, C, H, W)`, as the paper corrupts "a single center-frame for every clip".
    Returns a new tensor; all other frames are untouched.
    """
    if pixel_values.dim() not in (5, 6):
        raise ValueError(
            f"pixel_values must be (B, T, C, H, W) or (B, views, T, C, H, W), got shape {tuple(pixel_values.shape)}"
        )
    centre = pixel_values.shape[-4] // 2
    out = pixel_values.clone()
    frames = pixel_values[..., centre, :, :, :]
    corrupted = corrupt_frames(frames.reshape(-1, *frames.shape[-3:]), kind, severity, blur_angle)
    out[..., centre, :, :, :] = corrupted.reshape(frames.shape)
    return out


def _views_loader(
    dataset: VideoSplit, processor, views: str | Sequence[int], batch_size: int, num_workers: int
) -> DataLoader:
    """Evaluation batches of `dataset` with `views` (clips x crops) per video, through the processor."""
    num_clips, num_crops = parse_views(views)
    views_processor = copy.deepcopy(processor)
    views_processor.num_clips, views_processor.num_crops = num_clips, num_crops
    items = VideoClassificationDataset(dataset, views_processor, training=False)
    return DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_videos)


Transform = Callable[[torch.Tensor], torch.Tensor] | None


def _collect_logits(
    model: nn.Module,
    loader: DataLoader,
    transforms: Mapping[str, Transform],
    device: torch.device | str | None,
    progress: bool,
    description: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `model` (moved to `device`, default its own) on every batch once per transform (None: the clean input);
    logits per transform, and labels."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in transforms}
    labels = []
    try:
        for batch in tqdm(loader, desc=description, disable=not progress, unit="batch"):
            pixel_values = batch["pixel_values"].to(device)
            with torch.inference_mode():
                for name, transform in transforms.items():
                    inputs = pixel_values if transform is None else transform(pixel_values)
                    logits[name].append(model(pixel_values=inputs).logits.float().cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("the dataset to evaluate holds no videos")
    return {name: torch.cat(values) for name, values in logits.items()}, torch.cat(labels)


def _check_labels(dataset: VideoSplit, model: nn.Module) -> None:
    num_labels = model.config.num_labels
    if dataset.labels and max(dataset.labels) >= num_labels:
        raise ValueError(
            f"the dataset has label ids up to {max(dataset.labels)}, but the model has only {num_labels} classes"
        )


def evaluate_model(
    model: nn.Module,
    dataset: VideoSplit,
    processor,
    views: str | Sequence[int] = "1x1",
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict:
    """
    Accuracy of `model` on `dataset` (a [`~selfy_hf.data.VideoSplit`]) with `views` = clips x crops per video:
    the processor samples `num_clips` clips and `num_crops` crops of each, and the model averages the logits of the
    views. Returns `top1`, `top5`, `mean_class_accuracy` (fractions), `num_samples`, `views` (e.g. `"2x3"`), and
    `confusion_matrix` (rows: true labels, columns: predictions; a list of lists of counts). The model runs in eval
    mode on `device` (default: where it is; it is left there) and gets its train/eval mode back.
    """
    _check_labels(dataset, model)
    loader = _views_loader(dataset, processor, views, batch_size, num_workers)
    logits, labels = _collect_logits(
        model, loader, {"clean": None}, device, progress, f"eval {format_views(views)}"
    )
    results = classification_metrics(logits["clean"], labels)
    matrix = confusion_matrix(logits["clean"].argmax(dim=1), labels, model.config.num_labels)
    results.update(views=format_views(views), confusion_matrix=matrix.tolist())
    return results


def robustness_curves(
    model: nn.Module,
    dataset: VideoSplit,
    processor,
    kinds: Sequence[str] = CORRUPTIONS,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    views: str | Sequence[int] = "1x1",
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    blur_angle: float = DEFAULT_BLUR_ANGLE,
    progress: bool = True,
) -> dict[str, list[dict]]:
    """
    The paper's Fig. 5 for one model: accuracy when the centre frame of every clip is corrupted by each of `kinds`
    at each severity in [0, 1] (see [`corrupt_frames`]). Videos are decoded once; every corruption and severity runs
    on the same clips. Returns `{kind: [{"severity", "top1", "top5", "mean_class_accuracy"}, ...]}`.
    """
    _check_labels(dataset, model)
    for kind in kinds:
        if kind not in CORRUPTIONS:
            raise ValueError(f"corruption kind must be one of {CORRUPTIONS}, got {kind!r}")
    if not severities or not all(0.0 <= s <= 1.0 for s in severities):
        raise ValueError(f"severities must be values in [0, 1], got {list(severities)}")
    transforms: dict[str, Transform] = {"clean": None}
    for kind in kinds:
        for severity in severities:
            if severity > 0:
                transforms[f"{kind}@{severity}"] = lambda x, k=kind, s=severity: corrupt_centre_frame(
                    x, k, s, blur_angle
                )
    loader = _views_loader(dataset, processor, views, batch_size, num_workers)
    logits, labels = _collect_logits(model, loader, transforms, device, progress, "robustness")
    curves = {}
    for kind in kinds:
        points = []
        for severity in severities:
            metrics = classification_metrics(
                logits[f"{kind}@{severity}" if severity > 0 else "clean"], labels
            )
            points.append(
                {
                    "severity": float(severity),
                    **{k: metrics[k] for k in ("top1", "top5", "mean_class_accuracy")},
                }
            )
        curves[kind] = points
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    matrix: torch.Tensor | Sequence[Sequence[int]],
    label_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """
    Save the row-normalised confusion matrix (each row: how the videos of one true class were classified) as a PNG.
    Class names label the axes up to 60 classes, and cells show percentages up to 20 classes.
    """
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    num_labels = counts.shape[0]
    if counts.shape != (num_labels, num_labels) or len(label_names) != num_labels:
        raise ValueError(
            f"confusion matrix {tuple(counts.shape)} does not match {len(label_names)} class names"
        )
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    plt = _pyplot()
    side = min(40.0, max(5.0, 0.3 * num_labels + 3))
    figure, axis = plt.subplots(figsize=(side + 1.5, side))
    image = axis.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_labels <= 60:
        names = [str(name).replace("_", " ") for name in label_names]
        axis.set_xticks(range(num_labels), names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(num_labels), names, fontsize=8)
    if num_labels <= 20:
        for row in range(num_labels):
            for col in range(num_labels):
                value = rates[row, col].item()
                color = "white" if value > 0.5 else "black"
                axis.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color=color)
    axis.set(
        xlabel="predicted class", ylabel="true class", title=title or "confusion matrix (rows normalised)"
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_robustness(
    curves_by_model: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    path: str | Path,
    metric: str = "top1",
) -> Path:
    """
    Save accuracy (`metric`, in %) against severity as a PNG, one panel per corruption (as the paper's Fig. 5a/5b)
    and one line per model. `curves_by_model` maps a model name to the output of [`robustness_curves`].
    """
    if not curves_by_model:
        raise ValueError("no robustness curves to plot")
    kinds = list(dict.fromkeys(kind for curves in curves_by_model.values() for kind in curves))
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for name, curves in curves_by_model.items():
            if kind in curves:
                points = curves[kind]
                axis.plot(
                    [p["severity"] for p in points], [100 * p[metric] for p in points], marker="o", label=name
                )
        values = [100 * p[metric] for curves in curves_by_model.values() for p in curves.get(kind, [])]
        axis.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 5))
        axis.set(
            title=kind.replace("_", " ") + " of the centre frame", xlabel="severity", ylabel=f"{metric} (%)"
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def motion_label_names() -> list[str]:
    """The class-folder names of the synthetic motion dataset, in label order (as the training script sees them)."""
    from .motion_dataset import LABELS

    return [name.replace(" ", "_") for name in LABELS]


def load_evaluation_split(
    dataset: str | None, split: str = "validation", label_names: Sequence[str] | None = None
) -> VideoSplit:
    """
    One split of a dataset: `None` (the synthetic motion dataset, built on first use), a class-folder root
    (`root/<split>/<class>/<video>`, or `root/<class>/<video>`), an official list file, or a `datasets` Hub id or
    local path. `label_names` fixes the label order of class folders (pass the model's `id2label`).
    """
    if dataset is None:
        from .motion_dataset import make_motion_dataset
        from .training import DEFAULT_MOTION_DIR

        make_motion_dataset(DEFAULT_MOTION_DIR)
        return load_class_folder(DEFAULT_MOTION_DIR / split, list(label_names or motion_label_names()))
    path = Path(dataset)
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        return load_class_folder(folder, list(label_names) if label_names else None)
    if path.is_file():
        return load_list_file(path, label_names=list(label_names) if label_names else None)
    return load_hub_dataset(dataset, split)


def _model_label_names(model: nn.Module) -> list[str] | None:
    """The model's class names in id order, or None when they are transformers' placeholders (`LABEL_3`)."""
    id2label = model.config.id2label
    names = [id2label[i] for i in range(model.config.num_labels)]
    return None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


def load_model_and_processor(name_or_path: str, trust_remote_code: bool = False):
    """A SELFY video classifier and its video processor from a saved directory or a Hub repo."""
    from transformers import AutoModelForVideoClassification
    from transformers.utils import VIDEO_PROCESSOR_NAME

    from .video_processing_selfy import SelfyVideoProcessor

    model = AutoModelForVideoClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        processor = SelfyVideoProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(
            f"{name_or_path}: no {VIDEO_PROCESSOR_NAME}; save the SelfyVideoProcessor next to the model"
        ) from error
    return model, processor


def run_evaluation(
    models: Sequence[str],
    dataset: str | None = None,
    split: str = "validation",
    views: Sequence[str] = ("1x1",),
    robustness: Sequence[str] = (),
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    robustness_views: str = "1x1",
    output_dir: str | Path | None = None,
    model_names: Sequence[str] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """
    Evaluate one or more saved models (directories or Hub ids) on one split: accuracy for every views setting, a
    confusion-matrix PNG per model and setting, and, with `robustness` kinds, the robustness curves of all models in
    one PNG. Writes `results.json` to `output_dir` (default: `<model>/evaluation` for a single local model, else
    `evaluation`) and returns the same report.
    """
    if model_names is not None and len(model_names) != len(models):
        raise ValueError(f"got {len(model_names)} model names for {len(models)} models")
    names = list(model_names or [Path(m).name if Path(m).is_dir() else m.replace("/", "--") for m in models])
    if output_dir is None:
        output_dir = (
            Path(models[0]) / "evaluation" if len(models) == 1 and Path(models[0]).is_dir() else "evaluation"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {
        "dataset": dataset or "synthetic motion",
        "split": split,
        "output_dir": str(output_dir),
        "models": {},
    }
    split_data = None
    for name, source in zip(names, models):
        model, processor = load_model_and_processor(source, trust_remote_code)
        label_names = _model_label_names(model)
        if split_data is None:
            split_data = load_evaluation_split(dataset, split, label_names)
            report.update(num_videos=len(split_data.videos), label_names=list(split_data.label_names))
        class_names = (
            label_names or list(split_data.label_names) or [str(i) for i in range(model.config.num_labels)]
        )
        complexity = count_complexity(model, image_size=processor.crop_size)
        entry: dict = {
            "source": source,
            "gmacs_per_view": round(complexity.gmacs, 4),
            "mparams": round(complexity.mparams, 4),
            "crop_size": processor.crop_size,
            "num_frames": model.config.num_frames,
            "views": {},
        }
        for setting in views:
            results = evaluate_model(
                model, split_data, processor, setting, batch_size, num_workers, device, progress
            )
            setting = results["views"]
            results["gmacs_all_views"] = round(complexity.gmacs * math.prod(parse_views(setting)), 4)
            plot_confusion_matrix(
                results["confusion_matrix"],
                class_names,
                output_dir / f"confusion_matrix_{name}_{setting}.png",
                title=f"{name}, {split}, {setting} views: top-1 {100 * results['top1']:.1f}%",
            )
            entry["views"][setting] = results
        if robustness:
            entry["robustness"] = robustness_curves(
                model,
                split_data,
                processor,
                robustness,
                severities,
                robustness_views,
                batch_size,
                num_workers,
                device,
                progress=progress,
            )
        report["models"][name] = entry
    if robustness:
        curves = {name: entry["robustness"] for name, entry in report["models"].items()}
        report["robustness_plot"] = str(plot_robustness(curves, output_dir / "robustness.png"))
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate SELFY video classifiers: multi-view accuracy, confusion matrices, robustness (Fig. 5)."
    )
    parser.add_argument("--model", nargs="+", required=True, help="saved model directories or Hub repo ids")
    parser.add_argument(
        "--model-names", nargs="+", help="names for the plots and the report (default: derived)"
    )
    parser.add_argument(
        "--dataset",
        help="class-folder root, list file, or datasets Hub id/path (default: the synthetic motion dataset)",
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument(
        "--views", nargs="+", default=["1x1"], help="clips x crops settings, e.g. 1x1 2x1 2x3"
    )
    parser.add_argument(
        "--robustness", nargs="*", default=[], choices=CORRUPTIONS, help="corruptions to study"
    )
    parser.add_argument("--severities", nargs="+", type=float, default=list(DEFAULT_SEVERITIES))
    parser.add_argument("--robustness-views", default="1x1")
    parser.add_argument(
        "--output-dir", help="default: <model>/evaluation for one local model, else ./evaluation"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--trust-remote-code", action="store_true", help="load the code saved in the repo")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`selfy-evaluate` / `python scripts/evaluate.py`: parse the arguments and run [`run_evaluation`]."""
    args = _parser().parse_args(argv)
    for setting in [*args.views, args.robustness_views]:
        parse_views(setting)
    report = run_evaluation(
        models=args.model,
        dataset=args.dataset,
        split=args.split,
        views=args.views,
        robustness=args.robustness,
        severities=args.severities,
        robustness_views=args.robustness_views,
        output_dir=args.output_dir,
        model_names=args.model_names,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    for name, entry in report["models"].items():
        for setting, results in entry["views"].items():
            print(
                f"{name} [{setting}]: top-1 {100 * results['top1']:.2f}  top-5 {100 * results['top5']:.2f}  "
                f"mean class {100 * results['mean_class_accuracy']:.2f}  ({results['num_samples']} videos)"
            )
    print(f"results: {Path(report['output_dir']) / 'results.json'}")


__all__ = [
    "CORRUPTIONS",
    "DEFAULT_SEVERITIES",
    "corrupt_centre_frame",
    "corrupt_frames",
    "evaluate_model",
    "format_views",
    "load_evaluation_split",
    "load_model_and_processor",
    "main",
    "motion_blur_kernel",
    "motion_label_names",
    "parse_views",
    "plot_confusion_matrix",
    "plot_robustness",
    "robustness_curves",
    "run_evaluation",
]
