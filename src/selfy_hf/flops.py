"""Multiply-accumulates and parameters of SELFY models, counted as the paper counts "FLOPs"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modeling_selfy import StssCorrelation


@dataclass
class ComplexityReport:
    """What one forward pass costs: multiply-accumulates (the paper's "FLOPs") and parameters."""

    macs: int
    params: int
    input_shape: tuple[int, ...]

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6

    def __str__(self) -> str:
        return f"{self.gmacs:.2f} GMACs, {self.mparams:.2f} M params for input {self.input_shape}"


def count_complexity(
    model: nn.Module, num_frames: int | None = None, image_size: int = 224, batch_size: int = 1
) -> ComplexityReport:
    """
    Count the multiply-accumulates of one eval-mode forward pass on `(batch, T, 3, image_size, image_size)` with
    `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products, as the paper and the authors'
    code count them: ResNet-50 is 4.1 G a 224px frame), and the parameters. The input is made on the model's device,
    so a model built under `torch.device("meta")` is counted without computing anything.

    The STSS correlation is counted as its own L*U*V*C multiply-accumulates per position, whichever path computed it
    (the fast path may use an all-pairs matrix product that does more work, or element-wise ops that the counter
    does not see).
    """
    config = model.config
    num_frames = num_frames or config.num_frames
    device = next(model.parameters()).device
    pixel_values = torch.zeros(
        batch_size, num_frames, config.num_channels, image_size, image_size, device=device
    )
    correlations = [m for m in model.modules() if isinstance(m, StssCorrelation)]
    correlation_macs = 0

    def add_correlation_macs(module: StssCorrelation, inputs: tuple[torch.Tensor]) -> None:
        nonlocal correlation_macs
        correlation_macs += module.macs(inputs[0].shape)

    hooks = [m.register_forward_pre_hook(add_correlation_macs) for m in correlations]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixel_values)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    counted_in_correlations = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".correlation")
    )
    macs = (counter.get_total_flops() - counted_in_correlations) // 2 + correlation_macs
    params = sum(p.numel() for p in model.parameters())
    return ComplexityReport(macs=macs, params=params, input_shape=tuple(pixel_values.shape))


__all__ = ["ComplexityReport", "count_complexity"]
