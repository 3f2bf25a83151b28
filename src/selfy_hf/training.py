"""Training SELFYNet with Accelerate: the recipe, atomic checkpoints, exact resumption, logs and curves."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .configuration_selfy import SelfyConfig
from .data import (
    VideoClassificationDataset,
    VideoSplit,
    collate_videos,
    load_class_folder,
    load_hub_dataset,
    load_list_file,
)
from .metrics import classification_metrics
from .modeling_selfy import SelfyForVideoClassification
from .motion_dataset import make_motion_dataset
from .video_processing_selfy import SelfyVideoProcessor

DEFAULT_MOTION_DIR = Path("data/motion")


@dataclass
class TrainingConfig:
    """Everything a run depends on; saved with every checkpoint. `recipe="official"` is the authors' SGD recipe
    (lr 0.01 per 64 clips, Nesterov momentum 0.9, weight decay 5e-4, steps at 30/40 of 50 epochs, clipping 20);
    `recipe="scratch"` is AdamW with cosine decay, for small models trained from scratch on CPU. `schedule` swaps
    the recipe's learning-rate schedule (e.g. the official SGD with warm-up and cosine decay)."""

    output_dir: str = "outputs/selfynet-tiny-motion"
    dataset: str | None = (
        None  # hub id, class folder root (with train/ and validation/) or list file; None: motion
    )
    train_split: str = "train"
    validation_split: str = "validation"
    model_preset: str = "selfynet-tiny"
    config_overrides: dict = field(default_factory=dict)
    recipe: str = "scratch"
    epochs: int = 12
    batch_size: int = 16
    learning_rate: float | None = None  # None: the recipe's, scaled linearly with the global batch
    weight_decay: float | None = None
    schedule: str | None = (
        None  # "steps" (x0.1 at lr_steps) or "cosine" (warm-up, cosine); None: the recipe's
    )
    lr_steps: tuple[int, ...] = (30, 40)
    warmup_epochs: float = 1.0  # cosine schedule only
    max_grad_norm: float = 20.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    num_frames: int = 8
    crop_size: int = 64
    resize_shortest_edge: int = 64
    num_workers: int = 0
    seed: int = 0
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    keep_checkpoints: int = 2
    imagenet_backbone: str | None = None
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # after training: 1x1 and 2x1 views and the centre-frame robustness curves, in output_dir/evaluation (the card
    # reports them)
    final_evaluation: bool = True


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block (BatchNorm statistics are kept exact, see `modeling_selfy`). transformers 5.x renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable`; use whichever this version has."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch): resumed runs replay exactly the order of the interrupted epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; none on BatchNorm parameters and biases (official recipe)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            (no_decay if is_norm or name == "bias" else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer_and_scheduler(
    model: nn.Module, config: TrainingConfig, steps_per_epoch: int, world_size: int = 1
):
    """The one recipe that the Accelerate script and the `Trainer` recipe share."""
    global_batch = config.batch_size * config.gradient_accumulation_steps * world_size
    total_steps = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.recipe == "official":
        lr = config.learning_rate or 0.01 * global_batch / 64
        decay = 5e-4 if config.weight_decay is None else config.weight_decay
        optimizer = torch.optim.SGD(parameter_groups(model, decay), lr=lr, momentum=0.9, nesterov=True)
    elif config.recipe == "scratch":
        lr = config.learning_rate or 2e-3 * global_batch / 16
        decay = 0.05 if config.weight_decay is None else config.weight_decay
        optimizer = torch.optim.AdamW(parameter_groups(model, decay), lr=lr)
    else:
        raise ValueError(f"recipe must be 'official' or 'scratch', got {config.recipe!r}")
    schedule = config.schedule or ("steps" if config.recipe == "official" else "cosine")
    milestones = [step * steps_per_epoch for step in config.lr_steps]

    def steps(step: int) -> float:
        return 0.1 ** sum(step >= m for m in milestones)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if schedule not in ("steps", "cosine"):
        raise ValueError(f"schedule must be 'steps' or 'cosine', got {schedule!r}")
    factor = steps if schedule == "steps" else cosine
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_splits(config: TrainingConfig) -> tuple[VideoSplit, VideoSplit]:
    """Train and validation splits of the configured dataset (the motion dataset, built on first use, by default)."""
    source = config.dataset
    if source is None:
        source = str(make_motion_dataset(DEFAULT_MOTION_DIR))
    path = Path(source)
    if path.is_dir():
        train = load_class_folder(path / config.train_split, _declared_label_order(path))
        return train, load_class_folder(path / config.validation_split, train.label_names)
    if path.is_file():
        return load_list_file(path), load_list_file(_validation_list_file(path, config))
    return load_hub_dataset(source, config.train_split), load_hub_dataset(source, config.validation_split)


def _validation_list_file(train_list: Path, config: TrainingConfig) -> Path:
    """The validation list beside a train list file: the same name with the split names swapped."""
    validation_file = train_list.with_name(
        train_list.name.replace(config.train_split, config.validation_split)
    )
    if validation_file == train_list:
        raise ValueError(
            f"{train_list}: name the train list file with {config.train_split!r} so the validation list is found"
        )
    return validation_file


def declared_label_pairs(config: TrainingConfig, label_names: list[str]) -> list[tuple[int, int]]:
    """Label-id pairs of classes that are each other's time reversal, as a dataset's `labels.json` declares them
    (`{"pairs": [[name, name], ...]}`, as the motion dataset writes it); none for other datasets."""
    root = Path(config.dataset) if config.dataset is not None else DEFAULT_MOTION_DIR
    manifest = root / "labels.json"
    if not manifest.is_file():
        return []
    declared = json.loads(manifest.read_text())
    index = {name: i for i, name in enumerate(label_names)}
    pairs = declared.get("pairs", []) if isinstance(declared, dict) else []
    return [(index[a.replace(" ", "_")], index[b.replace(" ", "_")]) for a, b in pairs]


def _declared_label_order(root: Path) -> list[str] | None:
    """Class-folder names in the order a dataset's `labels.json` gives (a list, or {"labels": [...]}), if any."""
    manifest = root / "labels.json"
    if not manifest.exists():
        return None
    declared = json.loads(manifest.read_text())
    names = declared["labels"] if isinstance(declared, dict) else declared
    return [name.replace(" ", "_") for name in names]


def _atomic_save_state(accelerator, directory: Path, meta: dict, keep: int) -> None:
    """Write a checkpoint to a temporary folder and rename it into place: an interrupted save leaves no half
    checkpoint behind, and the previous ones stay loadable."""
    if accelerator.is_main_process:
        directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.with_name(directory.name + ".tmp")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    # Every process writes its own RNG state into the folder: rename it only once all of them are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "progress.json").write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(temporary, directory)
        checkpoints = sorted(directory.parent.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        for old in checkpoints[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    checkpoints = sorted(
        (Path(output_dir) / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1])
    )
    return checkpoints[-1] if checkpoints else None


def _evaluate(model, loader, accelerator, label_pairs: list[tuple[int, int]]) -> dict:
    model.eval()
    all_logits, all_labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            all_logits.append(logits.float().cpu())
            all_labels.append(labels.cpu())
    model.train()
    return classification_metrics(torch.cat(all_logits), torch.cat(all_labels), label_pairs=label_pairs)


def train(config: TrainingConfig) -> dict:
    """Train, validate every epoch, checkpoint, and save the final model and processor to `config.output_dir`.
    Resumes from the newest checkpoint in `output_dir/checkpoints` when there is one. Returns the last metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    train_split, validation_split = load_splits(config)
    processor = SelfyVideoProcessor(
        num_frames=config.num_frames,
        crop_size=config.crop_size,
        size={"shortest_edge": config.resize_shortest_edge},
    )
    model_config = SelfyConfig.from_preset(
        config.model_preset,
        num_frames=config.num_frames,
        num_labels=len(train_split.label_names),
        id2label=train_split.id2label,
        label2id={name: i for i, name in train_split.id2label.items()},
        **config.config_overrides,
    )
    label_pairs = declared_label_pairs(config, train_split.label_names)
    model = SelfyForVideoClassification(model_config)
    if config.imagenet_backbone:
        from .conversion import load_imagenet_backbone

        load_imagenet_backbone(model, config.imagenet_backbone)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    train_set = VideoClassificationDataset(train_split, processor, training=True, seed=config.seed)
    validation_set = VideoClassificationDataset(validation_split, processor, training=False)
    sampler = EpochShuffleSampler(len(train_set), config.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(config.seed),  # keeps loader seeding off the global RNG
        collate_fn=collate_videos,
        num_workers=config.num_workers,
        drop_last=True,
    )
    validation_loader = DataLoader(
        validation_set,
        batch_size=config.batch_size,
        collate_fn=collate_videos,
        generator=torch.Generator().manual_seed(config.seed),
        num_workers=config.num_workers,
    )
    steps_per_epoch = (
        len(train_loader) // (config.gradient_accumulation_steps * accelerator.num_processes) or 1
    )
    # Once prepared, Accelerate steps the scheduler `num_processes` times per optimizer step (it assumes schedules
    # counted in single-process steps): size the schedule in those units, so it spans the same epochs.
    optimizer, scheduler = build_optimizer_and_scheduler(
        model, config, steps_per_epoch * accelerator.num_processes, accelerator.num_processes
    )
    model, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, scheduler
    )
    start_epoch, start_batch, global_step = 0, 0, 0
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = json.loads((checkpoint / "progress.json").read_text())
        start_epoch, start_batch, global_step = progress["epoch"], progress["batch"], progress["global_step"]
        accelerator.print(f"resuming from {checkpoint} (epoch {start_epoch}, batch {start_batch})")
    writer, log_file = None, None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(output_dir / "tensorboard"))
        log_file = open(output_dir / "log.jsonl", "a")  # noqa: SIM115
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
    metrics: dict = {}
    stop = False
    for epoch in range(start_epoch, config.epochs):
        train_set.set_epoch(epoch)
        # Accelerate's loaders pass the epoch on to the sampler; set it on the skipping loader of a resumed epoch too.
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, start_batch) if start_batch else train_loader
        loader.set_epoch(epoch)
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not accelerator.is_main_process,
            initial=start_batch,
            total=len(train_loader),
        )
        model.train()
        started = time.perf_counter()
        for batch_index, batch in enumerate(bar, start=start_batch):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if writer is not None:
                    writer.add_scalar("train/loss", loss.item(), global_step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
                    log_file.write(
                        json.dumps(
                            {
                                "step": global_step,
                                "epoch": epoch,
                                "loss": loss.item(),
                                "lr": scheduler.get_last_lr()[0],
                            }
                        )
                        + "\n"
                    )
                if config.checkpoint_every_steps and global_step % config.checkpoint_every_steps == 0:
                    meta = {"epoch": epoch, "batch": batch_index + 1, "global_step": global_step}
                    _atomic_save_state(
                        accelerator,
                        output_dir / "checkpoints" / f"step-{global_step}",
                        meta,
                        config.keep_checkpoints,
                    )
                if config.max_steps and global_step >= config.max_steps:
                    stop = True
                    break
        start_batch = 0
        if stop:
            break
        metrics = _evaluate(model, validation_loader, accelerator, label_pairs)
        metrics.update(epoch=epoch + 1, epoch_seconds=time.perf_counter() - started)
        accelerator.print(
            f"epoch {epoch + 1}: "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        )
        if writer is not None:
            for key in ("top1", "top5", "mean_class_accuracy", "pair_accuracy"):
                if key in metrics:
                    writer.add_scalar(f"validation/{key}", metrics[key], global_step)
            log_file.write(json.dumps({"step": global_step, "validation": metrics}) + "\n")
            log_file.flush()
        meta = {"epoch": epoch + 1, "batch": 0, "global_step": global_step}
        _atomic_save_state(
            accelerator, output_dir / "checkpoints" / f"step-{global_step}", meta, config.keep_checkpoints
        )
    if accelerator.is_main_process:
        writer.close()
        log_file.close()
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        plot_training_curves(output_dir / "log.jsonl", output_dir / "training_curves.png")
        if config.final_evaluation and metrics:
            _final_evaluation(config, output_dir, accelerator.device)
        if metrics:  # a model card with the last validation results makes the output folder shareable as is
            from .hub import render_run_card

            render_run_card(output_dir)
    accelerator.wait_for_everyone()
    return metrics


def _final_evaluation(config: TrainingConfig, output_dir: Path, device: torch.device) -> None:
    """Evaluate the saved model as `selfy-evaluate` would, so that the run's card carries these results."""
    from .evaluation import run_evaluation

    source = config.dataset or str(DEFAULT_MOTION_DIR)
    if Path(source).is_file():
        source = str(_validation_list_file(Path(source), config))
    run_evaluation(
        [str(output_dir)],
        dataset=source,
        split=config.validation_split,
        views=["1x1", "2x1"],
        robustness=["occlusion", "motion_blur"],
        output_dir=output_dir / "evaluation",
        model_names=[output_dir.name],
        batch_size=config.batch_size,
        device=str(device),
    )


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Loss, learning rate and validation accuracy against steps, from a run's `log.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "validation" in r]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("top1", "top5", "mean_class_accuracy", "pair_accuracy"):
        if not evaluations or key not in evaluations[0]["validation"]:
            continue
        axes[2].plot(
            [r["step"] for r in evaluations],
            [r["validation"][key] for r in evaluations],
            marker="o",
            label=key,
        )
    axes[2].set(title="validation", xlabel="step", ylim=(0, 1.02))
    if evaluations:
        axes[2].legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """Command-line options, one per `TrainingConfig` field."""
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(
        description="Train SELFYNet (default: the tiny preset on the synthetic motion dataset)."
    )
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name == "config_overrides":
            parser.add_argument(
                flag,
                nargs="*",
                default=[],
                metavar="KEY=JSON",
                help="SelfyConfig overrides, e.g. selfy_temporal_offsets=[1]",
            )
        elif name == "lr_steps":
            parser.add_argument(flag, nargs="+", type=int, default=list(value))
        else:
            kind = (
                type(value)
                if value is not None
                else (float if name in ("learning_rate", "weight_decay") else str)
            )
            parser.add_argument(flag, type=int if kind is int else kind, default=value)
    args = vars(parser.parse_args(argv))
    args["config_overrides"] = {
        k: json.loads(v) for k, v in (item.split("=", 1) for item in args["config_overrides"])
    }
    args["lr_steps"] = tuple(args["lr_steps"])
    if args["max_steps"] is not None:
        args["max_steps"] = int(args["max_steps"])
    return TrainingConfig(**args)


def main(argv: list[str] | None = None) -> None:
    """`selfy-train` / `python scripts/train.py`."""
    metrics = train(parse_args(argv))
    print(json.dumps(metrics, indent=2))


__all__ = [
    "EpochShuffleSampler",
    "TrainingConfig",
    "build_optimizer_and_scheduler",
    "declared_label_pairs",
    "enable_activation_checkpointing",
    "latest_checkpoint",
    "load_splits",
    "main",
    "parameter_groups",
    "plot_training_curves",
    "train",
]
