"""Fine-tuning a saved SELFY checkpoint on a new label set with `transformers.Trainer`, with the same optimizer and
schedule as the Accelerate script (`selfy_hf.training.build_optimizer_and_scheduler`)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import VideoClassificationDataset, VideoSplit, collate_videos
from .metrics import classification_metrics
from .modeling_selfy import SelfyForVideoClassification
from .training import TrainingConfig, build_optimizer_and_scheduler, enable_activation_checkpointing
from .video_processing_selfy import SelfyVideoProcessor


def compute_metrics(eval_prediction) -> dict:
    """`Trainer`'s `compute_metrics`: top-1/top-5 and mean class accuracy, computed here (no Hub download)."""
    logits = eval_prediction.predictions
    if isinstance(logits, (tuple, list)):  # logits first, then hidden states when the model returns them
        logits = logits[0]
    return classification_metrics(torch.as_tensor(logits), torch.as_tensor(eval_prediction.label_ids))


class _DatasetEpochCallback(TrainerCallback):
    """Passes the epoch to the training set, so that its augmentation differs from epoch to epoch."""

    def __init__(self, dataset: VideoClassificationDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def make_trainer(
    checkpoint: str | os.PathLike,
    train_split: VideoSplit,
    eval_split: VideoSplit | None = None,
    output_dir: str | os.PathLike = "outputs/selfy-finetuned",
    config: TrainingConfig | None = None,
    processor: SelfyVideoProcessor | None = None,
    **training_arguments,
) -> Trainer:
    """
    A `Trainer` that fine-tunes the `save_pretrained` checkpoint `checkpoint` on the classes of `train_split`.

    The model is loaded with a new classifier sized for `train_split.label_names` (`ignore_mismatched_sizes`; the
    backbone and SELFY weights are kept), the processor is the checkpoint's unless given, and the optimizer and
    schedule are the recipe of `config` (a [`TrainingConfig`]; default: the `scratch` recipe; its `recipe`,
    `learning_rate`, `weight_decay`, `warmup_epochs`, `lr_steps`, `epochs`, `batch_size`,
    `gradient_accumulation_steps`, `max_grad_norm`, `max_steps`, `mixed_precision`, `num_workers` and `seed` are
    used). Videos are decoded and augmented per item by the processor, validated once per epoch when `eval_split`
    is given, and `compute_metrics` reports `top1`, `top5` and `mean_class_accuracy`. Extra keyword arguments go to
    `TrainingArguments` (e.g. `use_cpu=True`, `report_to=["tensorboard"]`, `logging_steps=10`).

    Call `trainer.train()`, then `trainer.save_model()` to write the model and its processor to `output_dir`.
    """
    config = config or TrainingConfig()
    label_names = list(train_split.label_names)
    if processor is None:
        processor = SelfyVideoProcessor.from_pretrained(checkpoint)
    model = SelfyForVideoClassification.from_pretrained(
        checkpoint,
        # `id2label` sets `num_labels` (passing both warns that the checkpoint's `id2label` has another length)
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    train_set = VideoClassificationDataset(train_split, processor, training=True, seed=config.seed)
    eval_set = VideoClassificationDataset(eval_split, processor, training=False) if eval_split else None
    options = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "max_grad_norm": config.max_grad_norm,
        "bf16": config.mixed_precision == "bf16",
        "fp16": config.mixed_precision == "fp16",
        "dataloader_num_workers": config.num_workers,
        "seed": config.seed,
        "eval_strategy": "epoch" if eval_set is not None else "no",
        "save_strategy": "epoch",
        "save_total_limit": config.keep_checkpoints,
        "logging_steps": 10,
        "remove_unused_columns": False,  # the collator needs `pixel_values` and `labels` as the dataset gives them
        **training_arguments,
    }
    args = TrainingArguments(**options)
    # Optimizer steps per epoch as `Trainer` counts them (it steps the scheduler once per optimizer step).
    batches = math.ceil(len(train_set) / (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    schedule = replace(
        config,
        batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # a `max_steps` run is scheduled over the epochs it touches
        epochs=math.ceil(args.max_steps / steps_per_epoch)
        if args.max_steps > 0
        else math.ceil(args.num_train_epochs),
    )
    optimizer, scheduler = build_optimizer_and_scheduler(model, schedule, steps_per_epoch, args.world_size)
    return Trainer(
        model=model,
        args=args,
        data_collator=collate_videos,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        compute_metrics=compute_metrics,
        optimizers=(optimizer, scheduler),
        callbacks=[_DatasetEpochCallback(train_set)],
    )


__all__ = ["compute_metrics", "make_trainer"]
