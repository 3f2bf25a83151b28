"""SELFYNet: TSN/TSM ResNets with SELFY (spatio-temporal self-similarity) blocks, as transformers models."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutputWithNoAttention

from .configuration_selfy import SelfyConfig
from .native_extraction import ExtractionKernel, extraction_kernel
from .native_training import (
    first_layer,
    first_two_layers,
    row_batch_norm,
    stride_two_conv,
    supports_first_layer,
    supports_first_two_layers,
    supports_rows,
    supports_stride_two_conv,
    training_kernels,
)
from .native_winograd import WinogradKernel, supports_channels, winograd_kernel
from .stss import _cached, building_graph, l2_normalize, stss

_BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def temporal_shift(x: torch.Tensor, num_frames: int, shift_div: int) -> torch.Tensor:
    """
    TSM's zero-padded shift of `(B*T, C, H, W)` features: the first `C // shift_div` channels of frame t take frame
    t+1's values, the next as many take frame t-1's, the rest stay (as the official `tsm(x, T, 'zero')`).
    """
    batch_frames, channels, height, width = x.shape
    fold = channels // shift_div
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        clips = x.reshape(-1, num_frames, channels, height, width)
        return _shift_channels(clips, fold, channel_dim=2).reshape(x.shape)
    # Channels-last: shift in the (B, T, H, W, C) view that is contiguous in memory and hand back a channels-last
    # tensor; the NCHW path would copy to and from the contiguous layout around every block (~4x slower).
    clips = x.permute(0, 2, 3, 1).reshape(-1, num_frames, height, width, channels)
    shifted = _shift_channels(clips, fold, channel_dim=4)
    return shifted.reshape(batch_frames, height, width, channels).permute(0, 3, 1, 2)


def _shift_channels(clips: torch.Tensor, fold: int, channel_dim: int) -> torch.Tensor:
    """Channels [0, fold) from frame t+1, [fold, 2 fold) from frame t-1, zeros beyond the clip; frames on dim 1."""
    first, second, rest = clips.split([fold, fold, clips.shape[channel_dim] - 2 * fold], dim=channel_dim)
    after = [0, 0] * (clips.dim() - 2)  # F.pad lists dims last first: frames (dim 1) come last
    from_next = F.pad(first[:, 1:], after + [0, 1])
    from_previous = F.pad(second[:, :-1], after + [1, 0])
    return torch.cat((from_next, from_previous, rest), dim=channel_dim)


def _zero_init_norm(num_features: int, norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """A BatchNorm whose scale starts at zero, so the residual branch it ends starts as nothing."""
    module = norm(num_features)
    module.zero_init = True
    return module


class SelfyBasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with TSM's residual shift before the first conv."""

    expansion = 1

    def __init__(self, config: SelfyConfig, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.num_frames = config.num_frames
        self.shift_div = config.shift_div if config.temporal_module == "tsm" else 0
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = _zero_init_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = temporal_shift(x, self.num_frames, self.shift_div) if self.shift_div else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SelfyBottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv) with TSM's residual shift before the first conv."""

    expansion = 4

    def __init__(self, config: SelfyConfig, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        width = out_channels // self.expansion
        self.num_frames = config.num_frames
        self.shift_div = config.shift_div if config.temporal_module == "tsm" else 0
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = _zero_init_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = temporal_shift(x, self.num_frames, self.shift_div) if self.shift_div else x
        out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """torchvision's projection shortcut (`downsample.0` conv, `downsample.1` BN) where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pooling of NCHW maps computed channels-last, forward and backward, NCHW in and out: PyTorch's NCHW CPU
    kernels run scalar, the channels-last ones vectorised over the channels (the stem's 3x3 pool of 32 frames of
    64x112x112: 83 ms forward and 142 ms with the backward on an AMD EPYC, against 18 and 46 ms here, conversions
    included); the backward scatters into NCHW directly. The same maxima and the same gradient, bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
        arguments = ([kernel_size] * 2, [stride] * 2, [padding] * 2, [1, 1], False)  # dilation 1, floor sizes
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *arguments
        )
        ctx.save_for_backward(indices)
        ctx.input_shape = x.shape
        return out.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # Each window's gradient goes to its maximum's position (`indices` count within each map, whatever the
        # layout), added in window order as PyTorch's kernels do: a scatter into the NCHW gradient, 27 vs 122 ms for
        # the stem of 32 frames, where the channels-last kernel's output needs a slow conversion back to NCHW.
        (indices,) = ctx.saved_tensors
        batch, channels, height, width = ctx.input_shape
        grad_x = grad.new_zeros(batch * channels, height * width)
        grad_x.scatter_add_(
            1, indices.contiguous().view(batch * channels, -1), grad.reshape(batch * channels, -1)
        )
        return grad_x.view(ctx.input_shape), None, None, None


class SelfyMaxPool2d(nn.MaxPool2d):
    """The stem's max pool (torchvision's `maxpool`, no parameters); eager CPU runs NCHW maps through
    `_ChannelsLastMaxPool`, which takes a fifth of an eager ResNet-18's inference time otherwise."""

    def __init__(self):
        super().__init__(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and _eager(x):
            return _ChannelsLastMaxPool.apply(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)


class _KeptWeights(dict):
    """A module's kept inference weights (`SelfyConvNormAct._prepared`): neither copied nor pickled with it, they
    are rebuilt on demand."""

    def __deepcopy__(self, memo: dict) -> _KeptWeights:
        return _KeptWeights()

    def __reduce__(self) -> tuple:
        return _KeptWeights, ()


class SelfyConvNormAct(nn.Module):
    """A convolution, its BatchNorm and (optionally) a ReLU; `conv` and `bn` keep the state-dict names short."""

    def __init__(self, conv: nn.Module, num_features: int, activation: bool = True, zero_init: bool = False):
        super().__init__()
        self.conv = conv
        norm = nn.BatchNorm3d if conv.weight.dim() == 5 else nn.BatchNorm2d
        self.bn = _zero_init_norm(num_features, norm) if zero_init else norm(num_features)
        self.activation = activation
        self._inference_weights = _KeptWeights()

    def forward(self, x: torch.Tensor, **conv_kwargs) -> torch.Tensor:
        if (
            not conv_kwargs
            and not isinstance(self.conv, nn.ConvTranspose3d)
            and self.folds_norm()
            and (dtype := _onednn_dtype(x)) is not None
        ):
            # oneDNN runs the transform's 3x3 stride-2 conv 1.8x faster channels-last, conversion included.
            memory_format = torch.channels_last if x.dim() == 4 else torch.contiguous_format
            weight, bias = self._prepared(
                ("conv", dtype, memory_format),
                lambda: self._folded_as(self.conv.weight, dtype, memory_format=memory_format),
            )
            x = x.contiguous(memory_format=memory_format).to(dtype)
            return self._onednn(x, weight, bias, self.conv.stride, self.conv.padding)
        x = self.bn(self.conv(x, **conv_kwargs))
        return self._activate(x)

    def folds_norm(self) -> bool:
        """Inference: the BN is a per-channel affine map, folded into the conv (exact up to rounding)."""
        return not self.bn.training and self.bn.running_var is not None and self.conv.bias is None

    def uses_batch_statistics(self) -> bool:
        """Whether the BN normalises with the batch's statistics (training, or no running statistics kept) after a
        conv without bias: what `forward_centred` computes."""
        return (self.bn.training or self.bn.running_var is None) and self.conv.bias is None

    def _folded(self, weight: torch.Tensor, channel_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`weight` (output channels on `channel_dim`) and a bias that give conv + BN as one conv."""
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        scale_shape = [1] * weight.dim()
        scale_shape[channel_dim] = -1
        return weight * scale.view(scale_shape), self.bn.bias - self.bn.running_mean * scale

    def _folded_as(
        self, weight: torch.Tensor, dtype: torch.dtype, channel_dim: int = 0, **layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_folded` in `dtype`, the weight made contiguous with the `layout` keywords of `contiguous`."""
        weight, bias = self._folded(weight, channel_dim)
        return weight.to(dtype).contiguous(**layout), bias.to(dtype)

    def _prepared(
        self, key: tuple, build: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """The inference weights `build()` derives from the conv weight and the BN (folded, laid out for oneDNN),
        kept between calls for as long as those hold the values they were built from. The check compares the
        values themselves: an in-place change through `.data` leaves version counters as they were. Rebuilding them
        each call took ~2 ms of small ops per SELFY block call (28.2 -> 26.0 ms for the R18 block at batch 1)."""
        sources = [self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var]
        key = (*key, self.bn.eps, *((t.dtype, t.device) for t in sources))
        if (cached := self._inference_weights.get(key)) is not None:
            snapshot, weights = cached
            if all(_same_values(now, then) for now, then in zip(sources, snapshot)):
                return weights
        weights = build()
        if len(self._inference_weights) >= 4:
            self._inference_weights.clear()
        self._inference_weights[key] = ([t.detach().clone() for t in sources], weights)
        return weights

    def _onednn(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stride: tuple,
        padding: tuple,
        groups: int = 1,
    ) -> torch.Tensor:
        # oneDNN's conv + bias + ReLU in one primitive (what inductor lowers to): the BN and ReLU cost no extra
        # pass over the output. `x` may be a oneDNN (`to_mkldnn`) tensor; the output then is one too. The weights
        # take the dtype of `x`: fp32, or bf16 under autocast.
        dilation = (1,) * len(stride)
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            weight.to(x.dtype),
            bias.to(x.dtype),
            padding,
            stride,
            dilation,
            groups,
            self._onednn_activation,
            [],
            "",
        )

    def forward_planar(self, x: torch.Tensor) -> torch.Tensor:
        """
        Apply a (1, k, k) Conv3d to `(N*L, C, U, V)` as the equivalent Conv2d: the kernel never mixes L, and a 2D conv
        over the folded batch runs several times faster on CPU than the 5D one over tiny (L, U, V) volumes.
        """
        conv = self.conv
        if (
            (conv.stride[-1] > 1 or x.shape[1] == 1)
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
        ):
            # CPU autocast: oneDNN's low-precision backward of the stride-2 convs over these 9x9 and 5x5 maps runs
            # ~2x slower than fp32 on an AMD EPYC (the extraction's training step under bf16 autocast: 277 -> 221 ms
            # per 4 clips) and no faster in a whole bf16 training step on an Intel Xeon with AMX (1145 vs 1150 ms per
            # 4 clips, SELFYNet-TSM-R18); the first conv's matrix products are small.
            with torch.autocast("cpu", enabled=False):
                return self.forward_planar(x.float())
        weight, bias = conv.weight.squeeze(2), None
        fold_norm = self.folds_norm()
        if fold_norm:
            # No pass over the (N*L, C, U, V) maps (10-20x the backbone's activations in number) is spent on the BN.
            weight, bias = self._folded(weight)
        if self._covers_map(x):
            # A kernel covering the whole map is one matrix product, which BLAS runs ~1.7x faster than conv2d here
            if not x.is_contiguous():  # channels-last: flatten in (U, V, C) order, as the memory lies
                x, weight = x.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
            x = _linear(x.flatten(1), weight.flatten(1), bias)[..., None, None]
        elif bias is None and (dense := _small_map_conv(x, conv)) is not None:
            if dense:
                return self._dense_conv_batch_norm(x, weight)
            if _is_channels_last(x) and x.dtype in (torch.float32, torch.float64):
                return self._centred_conv_batch_norm(x, weight)
            x = _SmallMapConv2d.apply(x, weight, None, conv.stride[1], conv.padding[1])
        else:
            x = F.conv2d(x, weight, bias, conv.stride[1:], conv.padding[1:])
        if fold_norm:
            return self._activate(x)
        return self._normalize_planar(x)

    def _dense_conv_batch_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Training: conv + BN (batch statistics) + activation, with the running statistics updated as the BN would;
        channels-last out. fp32 3x3 convs through the native kernel (`native_training.first_layer`: forward + backward
        of the R18 layer 15 -> 8 ms per clip), else through `_DenseConvBatchNorm`."""
        norm, conv = self.bn, self.conv
        stride, padding = conv.stride[-1], conv.padding[-1]
        if supports_first_layer(x, weight, stride, padding) and (kernels := training_kernels()) is not None:
            out, mean, var = first_layer(
                x, weight, norm.weight, norm.bias, norm.eps, self.activation, kernels
            )
        else:
            out, mean, var = _DenseConvBatchNorm.apply(
                x, weight, norm.weight, norm.bias, stride, padding, norm.eps, self.activation
            )
        _record_batch_statistics(norm, mean, var, out.numel() // out.shape[1])
        return out

    def _centred_conv_batch_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Training over channels-last maps: the BN's batch mean of the conv output is the weight applied to the mean
        input patch, known before the conv, so the conv subtracts it as its bias and the rows batch norm skips its
        pass for the mean and the one subtracting it (two of its passes over the 4 -> 16 and 16 -> 64 convs' 12-18
        million outputs per 4 clips). fp32/fp64 only: a bias rounded to half precision would leave the output's mean
        off zero. Channels-last out."""
        conv = _SmallMapConv2d.apply
        stride, padding = self.conv.stride[-1], self.conv.padding[-1]
        if (
            supports_stride_two_conv(x, weight, stride, padding)
            and (kernels := training_kernels()) is not None
        ):
            conv = functools.partial(stride_two_conv, kernels=kernels)
        centred, mean = self._centred_conv(x, weight, conv)
        return self._normalize_planar(centred, mean)

    def _centred_conv(
        self, x: torch.Tensor, weight: torch.Tensor, conv: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`conv(x, weight, bias, stride, padding)` with minus its output's batch mean as the bias, that mean computed
        from the input (`_conv_output_mean`); the centred output and the mean. No gradient flows through the mean:
        a batch norm's output does not depend on a shift of its input."""
        stride, padding = self.conv.stride[-1], self.conv.padding[-1]
        mean = _conv_output_mean(x.detach(), weight.detach(), stride, padding)
        return conv(x, weight, -mean, stride, padding), mean

    def forward_centred(self, x: torch.Tensor) -> torch.Tensor:
        """Training (BN on batch statistics) of the (1, k, k) conv over channels-last `(N, C, X, Y)` maps as the 2D
        conv, its BN the channels-last one of PyTorch; channels-last out. That BN sums sequentially and forms its
        backward from moments, which lose accuracy on values far from zero (conv weight gradient off by 1.2e-4 in
        float32 for outputs hundreds of standard deviations from zero, NCHW's 8e-6): the conv subtracts its output's
        batch mean as its bias (`_centred_conv`; 3e-6 then), and the running statistics are recorded with it added
        back."""
        centred, mean = self._centred_conv(x, self.conv.weight.squeeze(2), F.conv2d)
        norm = self.bn
        out, centred_mean, invstd = torch.ops.aten.native_batch_norm(
            centred, norm.weight, norm.bias, None, None, True, 0.0, norm.eps
        )
        var = invstd.detach().pow(-2) - norm.eps
        _record_batch_statistics(norm, mean + centred_mean.detach(), var, out.numel() // out.shape[1])
        return self._activate(out)

    def forward_grouped_inference(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Eval-mode CPU inference of a (1, k, k) Conv3d applied alike to `groups` stacks of channels of the
        channels-last `(N, groups * C_in, X, Y)` maps, its BN folded; channels-last out. fp32 3x3 convs run in the
        native Winograd kernel (`native_winograd`: the integration's convs over 14x14 maps ~1.6x faster than
        oneDNN), the others as one grouped oneDNN conv + bias + ReLU."""
        if (kernel := self._winograd_kernel(x)) is not None:
            weights = self._prepared(
                ("winograd",), lambda: kernel.weights(*self._folded(self.conv.weight.squeeze(2)))
            )
            x = x.contiguous(memory_format=torch.channels_last)
            return kernel(x, weights, stacks=groups, relu=self.activation)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            weight, bias = self._folded_as(self.conv.weight.squeeze(2), x.dtype)
            weight = weight.repeat(groups, 1, 1, 1).contiguous(memory_format=torch.channels_last)
            return weight, bias.repeat(groups)

        weight, bias = self._prepared(("grouped", x.dtype, groups), build)
        conv = self.conv
        return self._onednn(x, weight, bias, conv.stride[1:], conv.padding[1:], groups)

    def _winograd_kernel(self, x: torch.Tensor) -> WinogradKernel | None:
        """The Winograd kernel where it computes this conv over `x`: fp32 on CPU, 3x3, stride 1, padding 1, channels in
        whole vectors."""
        conv = self.conv
        if not (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and conv.kernel_size[1:] == (3, 3)
            and conv.stride[1:] == (1, 1)
            and conv.padding[1:] == (1, 1)
            and conv.dilation[1:] == (1, 1)
            and conv.groups == 1
            and supports_channels(conv.in_channels, conv.out_channels)
        ):
            return None
        return winograd_kernel()

    def forward_planar_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_planar` for eval-mode CPU inference through oneDNN (fp32, or bf16 under autocast); `x` dense or a
        oneDNN tensor."""
        weight = self.conv.weight.squeeze(2)
        if not x.is_mkldnn and _small_maps(x, most_channels=1):
            return self._onednn_dense_operator(x)
        if not self._covers_map(x):
            weight, bias = self._prepared(("planar", x.dtype), lambda: self._folded_as(weight, x.dtype))
            return self._onednn(x, weight, bias, self.conv.stride[1:], self.conv.padding[1:])
        # oneDNN's matrix product runs ~2.5x faster than the BLAS one behind `F.linear` on this AMD CPU. A kernel
        # covering the map reads all of it, in any order: oneDNN maps are read in place, in their blocked order.
        if x.is_mkldnn and (layout := _onednn_rows(x)) is not None:
            rows, block = layout
        else:
            rows, block = (x.to_dense() if x.is_mkldnn else x).flatten(1), 1
        weight, bias = self._prepared(
            ("rows", rows.dtype, block),
            lambda: self._folded_as(_channel_blocked(weight, block).flatten(1), rows.dtype),
        )
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, self._onednn_activation, [], "")
        return out[..., None, None]

    def _onednn_dense_operator(self, x: torch.Tensor) -> torch.Tensor:
        """The conv (its BN folded) over dense single-channel maps as oneDNN's matrix product + bias + ReLU with its
        dense operator; NCHW out. For the first extraction conv, 1 -> 4 channels over 9x9 maps: oneDNN
        runs it as a conv with 16-channel blocked output, several times the work (the extraction's inference, fp32:
        51 -> 43 ms per 4 clips on an Intel Xeon). The product runs on oneDNN tensors: its output is then a oneDNN
        tensor in the plain NCHW layout the next conv reads fastest, with no copy of the 4x larger output into one."""
        stride, padding = self.conv.stride[-1], self.conv.padding[-1]
        out_shape = _conv_output_shape(x.shape, self.conv.weight.shape, stride, padding)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            weight, bias = self._folded_as(self.conv.weight.squeeze(2), x.dtype)
            operator = _conv_operator(weight, x.shape[1:], stride, padding, False, False)
            bias = bias.repeat_interleave(out_shape[2] * out_shape[3])
            return operator.t().contiguous().to_mkldnn(), bias.to_mkldnn()

        operator, bias = self._prepared(("dense", x.dtype, x.shape[1:]), build)
        out = torch._C._nn.mkldnn_linear(x.reshape(x.shape[0], -1).to_mkldnn(), operator, bias)
        out = torch.ops.aten._mkldnn_reshape(out, list(out_shape))
        return out.relu_() if self.activation else out

    def _covers_map(self, x: torch.Tensor) -> bool:
        return self.conv.weight.shape[-2:] == x.shape[-2:] and not any(self.conv.padding)

    def _normalize_planar(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """BN with batch statistics (and ReLU) over `(N, C, U, V)` maps. Batch norm over NCHW maps of a few values runs
        several times slower than over rows of channels (on CUDA 12-50x: its NCHW kernels spread the work over the
        channels alone), so channels-last maps, 1x1 maps, and on CUDA all maps are normalised as their `(N*U*V, C)`
        rows, by `_rows_batch_norm` (PyTorch's CPU channels-last batch norm loses accuracy on these maps). `mean`:
        the batch mean already subtracted from channels-last CPU maps (`_centred_conv_batch_norm`)."""
        batch, channels, height, width = x.shape
        if height * width > 1 and x.is_contiguous():
            if not x.is_cuda:
                return self._activate(self.bn(x.unsqueeze(2))).squeeze(2)
            x = _ChannelsLast.apply(x)
        rows = _rows_batch_norm(x.permute(0, 2, 3, 1).reshape(-1, channels), self.bn, self.activation, mean)
        return rows.view(batch, height, width, channels).permute(0, 3, 1, 2)

    @property
    def _onednn_activation(self) -> str:
        """The post-op name of oneDNN's fused conv/linear."""
        return "relu" if self.activation else "none"

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the BN's own output, not on a view of it: on a view, autograd copies the whole tensor back into
        # its base in backward.
        return F.relu(x, inplace=True) if self.activation else x


def _libc_memcmp() -> Callable[[int, int, int], int] | None:
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, TypeError, AttributeError):  # no C library symbols in the process (Windows)
        return None
    memcmp.argtypes, memcmp.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return memcmp


_MEMCMP = _libc_memcmp()


def _same_values(now: torch.Tensor, then: torch.Tensor) -> bool:
    """Whether `now` still holds the values of its snapshot `then`: the C library's `memcmp` where both are dense
    CPU tensors of one dtype, shape and layout (4-5x faster than `torch.equal` over the SELFY block's weights,
    0.3-0.5 ms a call; equal bytes are equal values, and a changed sign of zero only rebuilds), `torch.equal`
    elsewhere."""
    if (
        _MEMCMP is None
        or now.device.type != "cpu"
        or then.device.type != "cpu"
        or (now.dtype, now.shape, now.stride()) != (then.dtype, then.shape, then.stride())
        or not _dense(now)
    ):
        return torch.equal(now, then)
    return now.numel() == 0 or _MEMCMP(now.data_ptr(), then.data_ptr(), now.nbytes) == 0


def _dense(x: torch.Tensor) -> bool:
    """Whether `x`'s elements fill `x.nbytes` from its data pointer: contiguous in a memory format."""
    formats = {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(x.dim(), [])
    return any(x.is_contiguous(memory_format=f) for f in [torch.contiguous_format, *formats])


def _eager(x: torch.Tensor) -> bool:
    """Whether a formulation other than the official ops may run: not while tracing, compiling or exporting (ONNX
    and graphs get the official ops) and not under a dispatch mode such as `FlopCounterMode` (which counts them)."""
    return not building_graph() and _current_dispatch_mode() is None and x.device.type != "meta"


def _eager_inference(x: torch.Tensor) -> bool:
    """`_eager`, with autograd off: the inference-only formulations have no backward."""
    return not torch.is_grad_enabled() and _eager(x)


def _onednn_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype in which eager CPU inference may call oneDNN's fused ops: fp32, or bf16 under bf16 autocast (as
    autocast would run the convs); None where they may not run."""
    if not (_eager_inference(x) and _onednn_available(x)):
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    dtype = torch.get_autocast_dtype("cpu")
    bf16_ok = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype if bf16_ok and x.dtype in (torch.float32, dtype) else None


_ONEDNN_BLOCKS_SIZE = 32
_ONEDNN_BLOCKS: dict[tuple, int | None] = {}


def _onednn_rows(maps: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The memory of oneDNN `(N, C, H, W)` maps as `(N, C*H*W)` rows, read in place, and its channel block `b`: the
    layout nChw{b}c (1: NCHW, C: NHWC), the order of `_channel_blocked`. None where the layout is none of these.
    oneDNN's convs write channel-blocked maps; `to_dense` after the extraction's third conv costs as much as the
    576 -> 64 product reading its output (8 of ~100 ms of the block's inference per 4 clips, Intel Xeon). Which
    layout oneDNN chose for a shape is found once, by comparing its memory with `to_dense`."""
    nbytes = torch.ops.mkldnn._nbytes(maps)
    if nbytes != maps.numel() * maps.element_size():  # padded blocks
        return None
    memory = (ctypes.c_char * nbytes).from_address(torch.ops.mkldnn.data_ptr(maps))
    memory.owner = maps  # the rows keep the buffer, and so the maps, alive
    rows = torch.frombuffer(memory, dtype=maps.dtype).view(maps.shape[0], -1)
    # what oneDNN's choice of layout may depend on
    key = (tuple(maps.shape), maps.dtype, torch.get_num_threads())
    if key not in _ONEDNN_BLOCKS:
        dense, channels = maps.to_dense(), maps.shape[1]

        def matches_on(count: int, blocks: list[int]) -> list[int]:
            return [
                b for b in blocks if torch.equal(_channel_blocked(dense[:count], b).flatten(1), rows[:count])
            ]

        # a few maps rule out the other layouts, all of them confirm the one left
        matches = matches_on(
            len(rows), matches_on(8, [b for b in range(1, channels + 1) if channels % b == 0])
        )
        if len(matches) > 1:  # maps too uniform to tell (all zeros): no answer yet
            return rows, matches[0]
        if len(_ONEDNN_BLOCKS) >= _ONEDNN_BLOCKS_SIZE:
            _ONEDNN_BLOCKS.pop(next(iter(_ONEDNN_BLOCKS)))
        _ONEDNN_BLOCKS[key] = matches[0] if matches else None
    block = _ONEDNN_BLOCKS[key]
    return None if block is None else (rows, block)


def _channel_blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """`(N, C, H, W)` as `(N, C // block, H, W, block)`: channels in blocks of `block`, each block position-major."""
    return x.unflatten(1, (-1, block)).permute(0, 1, 3, 4, 2)


def _onednn_available(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.backends.mkldnn.is_available()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`; in eager fp32 CPU training through oneDNN's matrix product (2.5x MKL's on this AMD CPU, where MKL
    runs its AVX2 path)."""
    fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if bias is None and fp32 and torch.is_grad_enabled() and _onednn_available(x) and _eager(x):
        return _OneDnnLinear.apply(x, weight)
    return F.linear(x, weight, bias)


class _OneDnnLinear(torch.autograd.Function):
    """`x @ weight.T` through oneDNN, forward and input gradient (the weight gradient, a product over the 10^5
    rows, stays with `torch.mm`: oneDNN would need both operands transposed in memory first)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t().mm(x)
        return grad_x, grad_weight


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through oneDNN's matrix product for contiguous fp32 CPU tensors (2.5x MKL's on an
    AMD EPYC, on par on an Intel Xeon), `F.linear` otherwise."""
    if x.dtype == weight.dtype == torch.float32 and _onednn_available(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _conv1x3x3(
    in_channels: int, out_channels: int, stride: int = 1, padding: int = 1, size: int = 3
) -> nn.Conv3d:
    return nn.Conv3d(
        in_channels,
        out_channels,
        (1, size, size),
        stride=(1, stride, stride),
        padding=(0, padding, padding),
        bias=False,
    )


class StssCorrelation(nn.Module):
    """Cosine (or dot-product) similarity of every position with its (L, U, V) space-time neighbourhood (eq. 1);
    `(B*T, C, H, W)` features in, `(B, T, H, W, L, U, V)` similarities out, zero beyond the clip or the map."""

    def __init__(self, config: SelfyConfig):
        super().__init__()
        self.num_frames = config.num_frames
        self.temporal_offsets = list(config.selfy_temporal_offsets)
        self.window = config.selfy_window_size
        self.normalize = config.selfy_similarity == "cosine"
        self.eps = config.selfy_similarity_eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.reshape(-1, self.num_frames, *features.shape[1:])
        if self.normalize:
            features = l2_normalize(features, dim=2, eps=self.eps)
        return stss(features, self.temporal_offsets, self.window)

    def macs(self, feature_shape: torch.Size) -> int:
        """Multiply-accumulates of the correlation for `(B*T, C, H, W)` features, whatever path computes it."""
        frames, channels, height, width = feature_shape
        return frames * height * width * len(self.temporal_offsets) * self.window**2 * channels


class StssTransform(nn.Module):
    """
    Self-similarity transformation (paper 3.1): project the features (official: a 3x3 stride-2 conv + BN + ReLU)
    and correlate them over the (L, U, V) neighbourhood. Returns `(B, T, H, W, L, U, V)`.
    """

    def __init__(self, config: SelfyConfig, in_channels: int):
        super().__init__()
        hidden = config.selfy_hidden_size
        if config.selfy_downsample:
            conv = nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=False)
        else:
            conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.downsample = SelfyConvNormAct(conv, hidden)
        self.correlation = StssCorrelation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.correlation(self.downsample(x))


class _SmallMapConv2d(torch.autograd.Function):
    """`F.conv2d(x, weight, stride=stride, padding=padding)` over maps so small that oneDNN's input gradient crawls
    (the extraction's stride-2 convs over 9x9 and 5x5 maps; alone, the 4 -> 16 conv's took 53 ms per 4 clips on an
    Intel Xeon for 0.45 GMAC). The input gradient is computed row by row instead (`_input_gradient_by_rows`); the
    weight gradient stays PyTorch's. The gradients keep the layout of `x`; `bias` is a constant (no gradient)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_gradient_by_rows(grad, weight, x.shape[1:], stride, padding)
            if not _is_channels_last(x):
                grad_x = grad_x.contiguous()
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                [stride] * 2,
                [padding] * 2,
                [1, 1],
                False,
                [0, 0],
                1,
                [False, True, False],
            )[1]
        return grad_x, grad_weight, None, None, None


def _input_gradient_by_rows(
    grad: torch.Tensor, weight: torch.Tensor, in_shape: torch.Size, stride: int, padding: int
) -> torch.Tensor:
    """The input gradient of a conv over small `(C, H, W)` maps from its channels-last output gradient, row by row:
    kernel row `ky` takes gradient row `i` to input row `stride * i - padding + ky` through one `(W_out * C_out,
    W * C)` matrix. The gradient rows reaching one input row are adjacent in memory, so each input row is one
    matrix product of those rows laid end to end with the matching kernel rows' matrices stacked, and the input
    rows sharing a pattern are one batched product over strided views (no im2col, no copies, none of the rows of
    zeros a stride-2 conv's whole-map dense operator multiplies: the 4 -> 16 conv takes 1.2 GMAC instead of 4.1).
    Half precision sums in fp32. Channels-last out."""
    batch, (channels, height, width) = grad.shape[0], in_shape
    compute = torch.promote_types(grad.dtype, torch.float32)
    out_height = grad.shape[2]
    grad_rows = _flat_maps(grad, channels_last=True).to(compute).contiguous().view(batch, out_height, -1)
    row_width = grad_rows.shape[-1]
    out = grad_rows.new_empty(batch, height, width * channels)
    reached: set[int] = set()
    for row, grad_row, count, operator in _input_row_operators(weight.to(compute), in_shape, stride, padding):
        links = operator.shape[0] // row_width
        target = out[:, row : row + stride * (count - 1) + 1 : stride].transpose(0, 1)
        source = grad_rows.as_strided(
            (count, batch, links * row_width),
            (row_width, out_height * row_width, 1),
            grad_rows.storage_offset() + grad_row * row_width,
        )
        target.baddbmm_(source, operator.expand(count, -1, -1), beta=0)
        reached |= set(range(row, row + stride * count, stride))
    for index in set(range(height)) - reached:  # rows no kernel row reaches (a 1x1 kernel at stride 2)
        out[:, index].zero_()
    return _unflat_maps(out.view(batch, -1), (batch, *in_shape), channels_last=True).to(grad.dtype)


def _input_row_operators(
    weight: torch.Tensor, in_shape: torch.Size, stride: int, padding: int
) -> list[tuple[int, int, int, torch.Tensor]]:
    """The input rows in runs `(first input row, first gradient row, count, operator)`: a run's rows are `stride`
    apart, each reached by the same kernel rows from gradient rows one further on, and `operator` stacks those
    kernel rows' `(W_out * C_out, W * C)` matrices (slices of the conv's dense operator) in gradient-row order. All
    the operators come from one gather of the weight's entries (`_weight_entries`)."""
    key = ("input rows", tuple(weight.shape), tuple(in_shape), stride, padding, weight.device)
    runs, index = _cached(
        key, lambda: _input_row_layout(weight.shape, in_shape, stride, padding, weight.device)
    )
    stacked = _weight_entries(weight, index)
    return [
        (row, grad_row, count, stacked[start:stop]) for row, grad_row, count, start, stop in runs.tolist()
    ]


def _input_row_layout(
    weight_shape: torch.Size, in_shape: torch.Size, stride: int, padding: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_input_row_operators`' runs `(row, gradient row, count, first and last + 1 operator row)` and the index
    (`_weight_entries`) of their operators stacked."""
    channels, height, width = in_shape
    kernel = weight_shape[-2]
    out_height = _conv_output_shape((1, *in_shape), weight_shape, stride, padding)[2]
    dense = _operator_index(weight_shape, in_shape, stride, padding, True, True, device)[0]
    dense = dense.view(height, width * channels, out_height, -1)
    # (kernel rows, the run's next row) -> [first row, first gradient row, count]
    runs: dict[tuple, list[int]] = {}
    for row in range(height):
        links = [i for i in range(out_height) if 0 <= row + padding - stride * i < kernel]
        if links:
            kernel_rows = tuple(row + padding - stride * i for i in links)
            run = runs.pop((kernel_rows, row), None) or [row, links[0], 0]
            run[2] += 1
            runs[kernel_rows, row + stride] = run
    operators, bounds, start = [], [], 0
    for (kernel_rows, _), (row, grad_row, count) in runs.items():
        operators += [dense[row, :, grad_row + k, :].t() for k in range(len(kernel_rows))]
        stop = start + len(kernel_rows) * operators[-1].shape[0]
        bounds.append([row, grad_row, count, start, stop])
        start = stop
    return torch.tensor(bounds), torch.cat(operators)


class _DenseConvBatchNorm(torch.autograd.Function):
    """Training-mode conv + BN (batch statistics) + optional ReLU of the first extraction layer (single-channel
    maps of at most 9x9), as matrix products with the conv's dense operator `D` and no pass over the output but the
    one that writes it. The conv output `z = X @ D` is never formed: its per-channel mean and variance follow from
    the input's column means and covariance `S` (the law of total variance over the output positions, no
    cancellation), so the forward is oneDNN's matrix product + bias + ReLU with the BN folded into `D`; the backward
    gets every sum it needs over `z` from `X^T @ grad` and `S` (81 x 324 and 81 x 81 matrices). Forward + backward of
    the layer: ~75 -> ~42 ms per 4 clips (Intel Xeon; before, with its conversion to channels-last). Returns the
    channels-last output and the batch mean and (biased) variance."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, stride: int, padding: int, eps: float, activation: bool):
        rows = x.reshape(x.shape[0], -1).contiguous()
        operator = _conv_operator(weight, x.shape[1:], stride, padding, False, True)
        out_shape = _conv_output_shape(x.shape, weight.shape, stride, padding)
        positions = out_shape[2] * out_shape[3]
        input_mean = rows.sum(0) / rows.shape[0]
        centered = rows - input_mean
        covariance = centered.t().mm(centered) / rows.shape[0]
        column_mean = input_mean @ operator  # per output column (position, channel)
        mean = _per_channel(column_mean, positions) / positions
        deviation = column_mean - mean.repeat(positions)
        column_var = ((covariance @ operator) * operator).sum(0)
        var = _per_channel(column_var + deviation.square(), positions) / positions
        invstd = torch.rsqrt(var + eps)
        scale = gamma * invstd
        shift = beta - mean * scale
        folded = (operator * scale.repeat(positions)).t().contiguous()
        post_op = "relu" if activation else "none"
        if _onednn_available(rows) and rows.dtype == torch.float32:
            out = torch.ops.mkldnn._linear_pointwise(rows, folded, shift.repeat(positions), post_op, [], "")
        else:
            out = torch.addmm(shift.repeat(positions), rows, folded.t())
            out = out.relu_() if activation else out
        ctx.save_for_backward(
            x, weight, operator, centered, input_mean, covariance, deviation, invstd, scale, out
        )
        ctx.conv = (stride, padding)
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, var)
        return _unflat_maps(out, out_shape, channels_last=True), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight, operator, centered, input_mean, covariance, deviation, invstd, scale, out = (
            ctx.saved_tensors
        )
        stride, padding = ctx.conv
        count, positions = out.shape[0], deviation.shape[0] // scale.shape[0]
        grad = _flat_maps(grad.contiguous(memory_format=torch.channels_last), channels_last=True)
        if ctx.activation:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        column_grad = grad.sum(0)
        centered_input_grad = centered.t().mm(grad)  # X_c^T @ grad
        # sum(grad * (z - mean)) per channel: sum(grad * x_hat) / invstd
        grad_gamma = (
            _per_channel((centered_input_grad * operator).sum(0) + deviation * column_grad, positions)
            * invstd
        )
        grad_beta = _per_channel(column_grad, positions)
        # BN backward: grad_z = scale * grad + alpha + beta_z * (z - mean), per channel
        total = count * positions
        alpha = (-scale * grad_beta / total).repeat(positions)
        beta_z = (-scale * grad_gamma * invstd / total).repeat(positions)
        scale_j = scale.repeat(positions)
        # grad_x = grad_z @ D^T, with z - mean = X_c @ D + deviation
        grad_x = _onednn_linear(grad, operator * scale_j, (alpha + deviation * beta_z) @ operator.t())
        grad_x.addmm_(centered, (operator * beta_z) @ operator.t())
        # The operator is made of the weight's entries: X^T @ grad_z goes back to each entry it was gathered from.
        operator_grad = (centered_input_grad + torch.outer(input_mean, column_grad)) * scale_j
        operator_grad += count * torch.outer(input_mean, alpha)
        operator_grad += count * (covariance @ operator + torch.outer(input_mean, deviation)) * beta_z
        index = _operator_index(weight.shape, x.shape[1:], stride, padding, False, True, weight.device)[0]
        grad_weight = _weight_entries_grad(operator_grad, index, weight)
        return grad_x.view(x.shape), grad_weight, grad_gamma, grad_beta, None, None, None, None


def _conv_output_mean(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """The per-channel mean of `F.conv2d(x, weight, None, stride, padding)` over its batch and positions, from one
    pass over the (smaller) input: every output position applies the weight to its input patch, so the mean is the
    weight applied to the patches' mean, and that comes from the input summed over the batch (as flat rows: over
    the batch dim of channels-last maps, `sum` runs ~15x slower). In `x`'s dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    channels_last = _is_channels_last(x)
    sums = _flat_maps(x, channels_last).sum(0, dtype=compute)
    sums = _unflat_maps(sums[None], (1, *x.shape[1:]), channels_last)[0]
    rows, cols = (
        _kernel_hits(size, kernel, stride, padding, compute, x.device)
        for size, kernel in zip(x.shape[2:], weight.shape[-2:])
    )
    # Summed over the output positions, the input under kernel offset (i, j) is the input at the rows kernel row i
    # reads and the columns kernel column j reads: one small product per side instead of unfolding the patches.
    patch_sums = torch.einsum("iy,cyx,jx->cij", rows, sums, cols)
    _, _, out_height, out_width = _conv_output_shape(x.shape, weight.shape, stride, padding)
    count = x.shape[0] * out_height * out_width
    return (weight.flatten(1).to(compute) @ patch_sums.flatten() / count).to(x.dtype)


def _kernel_hits(
    size: int, kernel: int, stride: int, padding: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`(kernel, size)`, 1 where some output position reads input index `y` at kernel index `i`, else 0."""

    def build() -> tuple[torch.Tensor]:
        outputs = _conv_output_size(size, kernel, stride, padding)
        read = torch.arange(kernel, device=device)[:, None] + stride * torch.arange(outputs, device=device)
        hits = torch.zeros(kernel, size + 2 * padding, dtype=dtype, device=device)
        return (hits.scatter_(1, read, 1.0)[:, padding : padding + size].contiguous(),)

    return _cached(("kernel_hits", size, kernel, stride, padding, dtype, device), build)[0]


def _per_channel(columns: torch.Tensor, positions: int) -> torch.Tensor:
    """Sum `(positions * C,)` values laid out position-major (channels-last) per channel."""
    return columns.view(positions, -1).sum(0)


def _small_map_conv(x: torch.Tensor, conv: nn.Conv3d) -> bool | None:
    """How the (1, k, k) `conv` over `(N, C, H, W)` maps `x` trains through matrix products: True for one-channel
    fp32/fp64 maps (`_DenseConvBatchNorm`, conv and BN together through the dense operator, whose statistics come
    from input moments that half precision would not hold), False for up to 16 channels (`_SmallMapConv2d`, the
    input gradient row by row: the 4 -> 16 and 16 -> 64 convs, whose oneDNN input gradients take 28 and 42 ms per 4
    clips on an Intel Xeon against 19 and 33), None where neither may run: beyond `_small_maps`, and outside eager
    CPU autograd in the dtype of `x` (not under autocast, which `forward_planar` turns off for these convs)."""
    if not _small_maps(x, most_channels=16) or conv.weight.dtype != x.dtype:
        return None
    if not (torch.is_grad_enabled() and _onednn_available(x) and _eager(x)) or torch.is_autocast_enabled(
        "cpu"
    ):
        return None
    return _small_maps(x, most_channels=1) and x.dtype in (torch.float32, torch.float64)


def _small_maps(x: torch.Tensor, most_channels: int) -> bool:
    """Whether `(N, C, H, W)` maps are small enough for a conv over them to run through matrix products of its
    dense operator (or of its rows): at most 9x9 (beyond, the extra multiply-adds outgrow what they save) and
    `most_channels`."""
    return x.shape[1] <= most_channels and x.shape[-2] * x.shape[-1] <= 81


def _conv_output_shape(
    shape: torch.Size, weight_shape: torch.Size, stride: int, padding: int
) -> tuple[int, ...]:
    batch, _, height, width = shape
    kernel = weight_shape[-1]
    return (batch, weight_shape[0], *(_conv_output_size(n, kernel, stride, padding) for n in (height, width)))


def _conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _flat_maps(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`(N, C, H, W)` as `(N, C*H*W)` rows, in `(H, W, C)` order if `channels_last`, `(C, H, W)` order otherwise."""
    return (x.permute(0, 2, 3, 1) if channels_last else x).reshape(x.shape[0], -1)


def _unflat_maps(rows: torch.Tensor, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """The inverse of `_flat_maps`: a view of `rows` as `(N, C, H, W)` maps of that memory layout."""
    batch, channels, height, width = shape
    if channels_last:
        return rows.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return rows.view(shape)


def _conv_operator(
    weight: torch.Tensor,
    in_shape: torch.Size,
    stride: int,
    padding: int,
    in_channels_last: bool,
    out_channels_last: bool,
) -> torch.Tensor:
    """The conv over `(C, H, W)` maps as the `(C*H*W, C_out*H_out*W_out)` matrix taking `_flat_maps` rows (in the
    given orders) to the output's: the conv of each unit input map, as one gather of the weight's entries."""
    layout = (in_shape, stride, padding, in_channels_last, out_channels_last, weight.device)
    return _weight_entries(weight, _operator_index(weight.shape, *layout)[0])


def _weight_entries(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of `weight` at `index` into its flattened values; index `weight.numel()` gives zero."""
    return torch.cat([weight.reshape(-1), weight.new_zeros(1)])[index]


def _weight_entries_grad(grad: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of `weight` from the gradient of `_weight_entries(weight, index)`."""
    sums = grad.new_zeros(weight.numel() + 1).index_add_(0, index.reshape(-1), grad.reshape(-1))
    return sums[:-1].view(weight.shape)


def _operator_index(
    weight_shape: torch.Size,
    in_shape: torch.Size,
    stride: int,
    padding: int,
    in_channels_last: bool,
    out_channels_last: bool,
    device: torch.device,
) -> tuple[torch.Tensor]:
    """Where `_conv_operator`'s entries come from in the flattened weight (`_weight_entries`). Every entry of a
    conv's operator is one weight or zero (an input position meets an output position through at most one kernel
    tap), so the operator built from the weights numbered 1, 2, ... (exact in float64) names them; built once per
    geometry, then a gather replaces the conv of the unit maps (several small ops, ~0.2-0.6 ms per call, in each
    training step of the extraction's first three layers)."""

    def build() -> tuple[torch.Tensor]:
        numel, size = weight_shape.numel(), in_shape.numel()
        numbered = torch.arange(1, numel + 1, dtype=torch.float64, device=device).view(weight_shape)
        basis = torch.eye(size, dtype=torch.float64, device=device)
        basis = _unflat_maps(basis, (size, *in_shape), in_channels_last)
        entries = _flat_maps(F.conv2d(basis, numbered, None, stride, padding), out_channels_last).long()
        return (torch.where(entries > 0, entries - 1, numel).contiguous(),)

    key = ("conv operator", tuple(weight_shape), tuple(in_shape), stride, padding, in_channels_last)
    return _cached((*key, out_channels_last, device), build)


class _ChannelsLast(torch.autograd.Function):
    """`x.contiguous(memory_format=torch.channels_last)` whose backward hands a contiguous gradient to the layers
    before, which run contiguous: CPU kernels given a gradient and an input of different layouts run several times
    slower (10x for the first extraction conv's backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _RowsBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over the rows of `(M, C)`: returns the output and the batch mean and (biased)
    variance. Two-pass statistics (mean, then the centred squares) with PyTorch's pairwise column sums, in at least
    fp32, so its output is as accurate as NCHW batch norm's where PyTorch's channels-last kernel's one-pass variance
    is not; given `mean`, the rows are already centred by it (the first pass is skipped, the gradients are the
    same). The forward processes rows of fewer than 64 channels as rows of 64 values (`_wide_rows`): PyTorch's
    elementwise and column-sum kernels run 2-3x faster over 64 columns than over 4 or 16."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, mean: torch.Tensor | None
    ):
        compute = torch.promote_types(x.dtype, torch.float32)
        rows = x.shape[0]
        centered, repeats = _wide_rows(x.to(compute))
        if mean is None:
            mean = _fold(centered.sum(0), repeats).div_(rows)
            centered = centered - _tile(mean, repeats)
        else:
            mean = mean.to(compute, copy=True)
        var = _fold(centered.square().sum(0), repeats).div_(rows)
        invstd = (var + eps).rsqrt_()
        scale = weight.to(compute) * invstd
        # Written into an `(M, C)` tensor, not returned as a view of the wide one: the ReLU after runs in place.
        out = centered.new_empty(x.shape)
        torch.addcmul(
            _tile(bias.to(compute), repeats), centered, _tile(scale, repeats), out=out.view_as(centered)
        )
        out = out.to(x.dtype)
        ctx.save_for_backward(centered, invstd, weight.to(compute))
        ctx.dtypes, ctx.eps = (x.dtype, weight.dtype, bias.dtype), eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean: None, _grad_var: None):
        # PyTorch's batch norm backward over the `(M, C)` rows: the sums of `grad` and `grad * centered` in one
        # pass, the input gradient in a second (five passes of ours before; the block's training step 3% faster).
        # Handed the centred rows, a zero mean and our inverse standard deviation, its input gradient is as
        # accurate as PyTorch's NCHW backward's; its weight and bias gradients, plain sequential sums over the
        # rows, carry ~5e-6 relative error in float32 (NCHW's: ~1e-7), under the ~1e-5 of the conv weight
        # gradients PyTorch computes for the same layer.
        centered, invstd, weight = ctx.saved_tensors
        centered = centered.view(grad.shape)
        grads = torch.ops.aten.native_batch_norm_backward(
            grad.to(centered.dtype).contiguous(),
            centered,
            weight,
            None,
            None,
            torch.zeros_like(invstd),
            invstd,
            True,
            ctx.eps,
            list(ctx.needs_input_grad[:3]),
        )
        # To the dtypes of x, weight and bias; None where no gradient was asked for.
        return *(g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None


def _wide_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Contiguous `(M, C)` rows as `(M * C / width, width)` with `width` 64 where `C` divides it (and the element
    count), else as they are; and how many times each channel repeats across a wide row."""
    channels = x.shape[1]
    width = 64 if 64 % channels == 0 and x.numel() % 64 == 0 else channels
    return x.view(-1, width), width // channels


def _tile(vector: torch.Tensor, repeats: int) -> torch.Tensor:
    """A per-channel vector laid across a wide row."""
    return vector.repeat(repeats)


def _fold(vector: torch.Tensor, repeats: int) -> torch.Tensor:
    """Per-column sums of wide rows, summed per channel."""
    return vector.view(repeats, -1).sum(0)


def _rows_batch_norm(
    rows: torch.Tensor,
    norm: nn.modules.batchnorm._BatchNorm,
    activation: bool,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """`norm` (an affine BatchNorm using batch statistics) over the rows of `(M, C)`, then a ReLU if `activation`,
    with its running statistics updated as PyTorch's batch norm does in training. On CPU through the native training
    kernels (`native_training`: fp32, eager; 2 passes over the rows forward and 2 backward where PyTorch's ops take
    ~9) or else `_RowsBatchNorm` (`mean`: the batch mean already subtracted from the rows, CPU only); elsewhere
    through `F.batch_norm` over the rows, which CUDA runs accurately (Welford) and 12-50x faster than over NCHW maps
    of a few values (H100, forward + backward)."""
    if rows.device.type != "cpu":
        factor = _running_statistics_factor(norm)
        running = (norm.running_mean, norm.running_var) if factor is not None else (None, None)
        out = F.batch_norm(rows, *running, norm.weight, norm.bias, True, factor or 0.0, norm.eps)
        return F.relu(out, inplace=True) if activation else out
    if supports_rows(rows) and _eager(rows) and (kernels := training_kernels()) is not None:
        out, batch_mean, var = row_batch_norm(
            rows, norm.weight, norm.bias, norm.eps, activation, mean is not None, kernels
        )
        _record_batch_statistics(norm, batch_mean if mean is None else mean + batch_mean, var, rows.shape[0])
        return out
    out, mean, var = _RowsBatchNorm.apply(rows, norm.weight, norm.bias, norm.eps, mean)
    _record_batch_statistics(norm, mean, var, rows.shape[0])
    return F.relu(out, inplace=True) if activation else out


def _running_statistics_factor(norm: nn.modules.batchnorm._BatchNorm) -> float | None:
    """Count a training batch in `norm`'s running statistics and return the factor to blend them with, as PyTorch's
    batch norm does (`momentum`, or the cumulative average for `momentum=None`); None where it keeps none."""
    if not (norm.training and norm.track_running_stats):
        return None
    norm.num_batches_tracked.add_(1)
    return 1.0 / norm.num_batches_tracked.item() if norm.momentum is None else norm.momentum


@torch.no_grad()
def _record_batch_statistics(
    norm: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """Blend a training batch's mean and biased variance over `count` values into `norm`'s running (unbiased)
    statistics as PyTorch's batch norm does; nothing where it keeps none."""
    if (factor := _running_statistics_factor(norm)) is None:
        return
    norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
    norm.running_var.lerp_((var * count / max(count - 1, 1)).to(norm.running_var.dtype), factor)


class StssExtractor(nn.Module):
    """
    Feature extraction (paper 3.2.1): turns each (U, V) similarity map into C_F features, per offset l, giving
    `(B, T, H, W, L, C_F)` for the integration (the order the maps were computed in; no transpose). `conv`: four
    1x3x3 convs with the official strides (the last one's kernel covers what is left of the window, 3x3 for U = 9);
    `mlp`: four FC layers over the U*V values (eq. 3-4); `soft_argmax`: the expected displacement (u, v) under
    softmax(S / tau) (eq. 2).
    """

    def __init__(self, config: SelfyConfig):
        super().__init__()
        self.method = config.selfy_extraction
        self.window = config.selfy_window_size
        self.correlation_channels = config.selfy_hidden_size
        self.temperature = config.selfy_softargmax_temperature
        channels = config.selfy_extraction_channels
        if self.method == "conv":
            size = self.window
            layers = []
            for index, (c_in, c_out) in enumerate(zip([1, *channels[:-1]], channels)):
                if index < 3:
                    stride = 1 if index == 0 else 2
                    layers.append(SelfyConvNormAct(_conv1x3x3(c_in, c_out, stride), c_out))
                    size = _conv_output_size(size, 3, stride, padding=1)
                else:
                    layers.append(SelfyConvNormAct(_conv1x3x3(c_in, c_out, padding=0, size=size), c_out))
            self.layers = nn.ModuleList(layers)
        elif self.method == "mlp":
            sizes = [self.window * self.window, *channels]
            self.layers = nn.ModuleList(nn.Linear(c_in, c_out) for c_in, c_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        batch, frames, height, width, offsets = similarity.shape[:5]
        maps = similarity.reshape(-1, 1, self.window, self.window)
        if self.method == "conv":
            features = self._conv_features(maps).flatten(1)
        elif self.method == "mlp":
            features = maps.flatten(1)
            for layer in self.layers:
                features = F.relu(layer(features), inplace=True)
        else:
            features = self._soft_argmax(maps.flatten(1))
        return features.reshape(batch, frames, height, width, offsets, -1)

    def _conv_features(self, maps: torch.Tensor) -> torch.Tensor:
        if (kernel := self._native_kernel(maps)) is not None:
            return kernel(maps.reshape(maps.shape[0], -1), self._native_weights(kernel))[..., None, None]
        if all(layer.folds_norm() for layer in self.layers) and (dtype := _onednn_dtype(maps)) is not None:
            return self._onednn_features(maps.to(dtype))
        layers = self.layers
        if (first_two := self._native_first_two_layers(maps)) is not None:
            maps, layers = first_two, self.layers[2:]
        for layer in layers:
            maps = layer.forward_planar(maps)
            if layer is self.layers[0] and self.training and not _is_channels_last(maps):
                # Training: the later layers run channels-last, where their BN works on rows of channels and their
                # conv gradients are faster; the first layer's 1-channel input gains nothing from it.
                maps = _ChannelsLast.apply(maps)
        return maps

    def _native_first_two_layers(self, maps: torch.Tensor) -> torch.Tensor | None:
        """Training (batch statistics) on CPU: the first two layers through the native kernels
        (`native_training.first_two_layers`) in fp32, as `forward_planar` runs them under CPU autocast too, their BNs'
        running statistics updated as theirs would be; None where they may not run."""
        first, second = self.layers[0], self.layers[1]
        if not (first.uses_batch_statistics() and second.uses_batch_statistics()) or not _eager(maps):
            return None
        if maps.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            maps = maps.float()
        weights = (first.conv.weight.squeeze(2), second.conv.weight.squeeze(2))
        geometry = [(layer.conv.stride[-1], layer.conv.padding[-1]) for layer in (first, second)]
        if not supports_first_two_layers(maps, *weights, *zip(*geometry)):
            return None
        if (kernels := training_kernels()) is None:
            return None
        with torch.autocast("cpu", enabled=False):
            out, *statistics = first_two_layers(
                maps,
                (weights[0], first.bn.weight, first.bn.bias),
                (weights[1], second.bn.weight, second.bn.bias),
                (first.bn.eps, second.bn.eps),
                (first.activation, second.activation),
                kernels,
            )
        for layer, (mean, var), size in zip((first, second), (statistics[:2], statistics[2:]), (maps, out)):
            _record_batch_statistics(layer.bn, mean, var, size.shape[0] * size.shape[2] * size.shape[3])
        return out

    def _native_kernel(self, x: torch.Tensor) -> ExtractionKernel | None:
        """The fused C kernel of the conv extraction (`native_extraction`) where it may run on `x`: eval mode (every BN
        folded), eager fp32 CPU inference outside autocast; None elsewhere."""
        fp32_cpu = (
            x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        )
        if not (fp32_cpu and _eager_inference(x) and all(layer.folds_norm() for layer in self.layers)):
            return None
        widths = tuple(layer.conv.out_channels for layer in self.layers)
        return extraction_kernel(self.window, widths, self.correlation_channels)

    def _native_weights(self, kernel: ExtractionKernel) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # One pass through all four convs per tile of windows: oneDNN's separate convs write and re-read ~45 MB of
        # intermediates per R18 clip (the extraction 11-13 -> 6.5 ms per clip on an Intel Xeon, 2 cores).
        return [
            layer._prepared(
                ("native",),
                lambda layer=layer, first=index == 0: kernel.pack(
                    *layer._folded(layer.conv.weight.squeeze(2)), first
                ),
            )
            for index, layer in enumerate(self.layers)
        ]

    def _onednn_features(self, maps: torch.Tensor) -> torch.Tensor:
        # oneDNN computes in its channel-blocked layout; keeping the maps in it between the layers saves the reorders
        # to and from NCHW that would otherwise cost as much as the tiny convs themselves.
        for layer in self.layers:
            if not (maps.is_mkldnn or _small_maps(maps, most_channels=1)):
                maps = maps.to_mkldnn()
            maps = layer.forward_planar_onednn(maps)
        return maps.to_dense() if maps.is_mkldnn else maps

    def _soft_argmax(self, scores: torch.Tensor) -> torch.Tensor:
        radius = self.window // 2
        steps = torch.arange(-radius, radius + 1, device=scores.device, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1).reshape(-1, 2)
        # The softmax of similarities / 0.01 overflows half precision: compute it in fp32.
        weights = torch.softmax(scores.float() / self.temperature, dim=-1)
        return (weights @ grid).to(scores.dtype)


class StssIntegrator(nn.Module):
    """
    Feature integration (paper 3.2.2): layers over (T, X, Y) per offset, one layer fusing the L offsets, and the
    projection back to the block's input channels (official: a strided 1x1x1 ConvTranspose3d undoing the
    transform's stride-2 conv) with a zero-initialised BN, so the block starts as an identity.
    """

    def __init__(self, config: SelfyConfig, out_channels: int):
        super().__init__()
        channels = config.selfy_integration_channels
        in_channels = config.extraction_output_channels
        method = config.selfy_integration
        size, padding = (3, 1) if method == "conv" else (1, 0)
        if method == "fc":
            self.layers = nn.ModuleList()
        else:
            widths = [in_channels, *channels[:3]]
            self.layers = nn.ModuleList(
                SelfyConvNormAct(_conv1x3x3(c_in, c_out, padding=padding, size=size), c_out)
                for c_in, c_out in zip(widths[:-1], widths[1:])
            )
            in_channels = channels[2]
        fuse = _conv1x3x3(
            in_channels * len(config.selfy_temporal_offsets), channels[3], padding=padding, size=size
        )
        self.fuse = SelfyConvNormAct(fuse, channels[3])
        self.upsample = config.selfy_downsample
        if self.upsample:
            project = nn.ConvTranspose3d(channels[3], out_channels, 1, stride=(1, 2, 2), bias=False)
        else:
            project = nn.Conv3d(channels[3], out_channels, 1, bias=False)
        self.project = SelfyConvNormAct(project, out_channels, activation=False, zero_init=True)

    def forward(self, features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`(B, T, X, Y, L, C_F)` features and the block's `(B*T, C, H, W)` input in, ReLU(input + projection) out."""
        if (dtype := self._channels_last_dtype(features)) is not None:
            return self._forward_channels_last(features.to(dtype), residual)
        if self._trains_channels_last(features):
            return self._train_channels_last(features, residual)
        batch, frames, height, width = features.shape[:4]
        features = features.permute(0, 4, 5, 1, 2, 3).flatten(0, 1)  # (B*L, C_F, T, X, Y)
        for layer in self.layers:
            features = layer(features)
        features = self.fuse(features.reshape(batch, -1, frames, height, width))
        if self.upsample and self._adds_projection_in_place(features):
            return self._add_upsampled_projection(features.transpose(1, 2).flatten(0, 1), residual)
        if self.upsample:
            # Official output_padding=1 doubles even sizes; output_size also restores odd ones.
            out = self.project(features, output_size=(frames, *residual.shape[-2:]))
        else:
            out = self.project(features)
        return F.relu(residual + out.transpose(1, 2).reshape(residual.shape))

    def _channels_last_dtype(self, features: torch.Tensor) -> torch.dtype | None:
        """The dtype of the channels-last inference path (`_onednn_dtype`), None where it may not run."""
        if self.upsample and all(layer.folds_norm() for layer in [*self.layers, self.fuse, self.project]):
            return _onednn_dtype(features)
        return None

    def _forward_channels_last(self, features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # CPU inference: the `(B, T, X, Y, L, C_F)` features are already the channels-last `(B*T, L*C_F, X, Y)` maps
        # the fusing conv reads, and the per-offset layers are one grouped conv over them: no transposes, and
        # oneDNN's channels-last convs run these 64-channel 14x14 maps ~2x faster than the 5D ones.
        batch, frames, height, width, offsets, channels = features.shape
        maps = features.reshape(batch * frames, height, width, offsets * channels).permute(0, 3, 1, 2)
        for layer in self.layers:
            maps = layer.forward_grouped_inference(maps, groups=offsets)
        return self._add_upsampled_projection(self.fuse.forward_grouped_inference(maps, groups=1), residual)

    def _trains_channels_last(self, features: torch.Tensor) -> bool:
        """Whether `_train_channels_last` may run: eager CPU autograd in fp32/fp64 (not under autocast), every BN on
        batch statistics, the projection upsampling."""
        return (
            self.upsample
            and features.device.type == "cpu"
            and features.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
            and all(layer.uses_batch_statistics() for layer in [*self.layers, self.fuse, self.project])
            and _eager(features)
        )

    def _train_channels_last(self, features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # CPU training: oneDNN trains these 64-channel 14x14 convs ~15% faster channels-last (forward and both
        # gradients; the R18 block's training step at 4 clips 581 -> 556 ms, at 1 clip the same). The per-offset
        # layers run over the offsets' maps as one batch, `(B*L*T, C_F, X, Y)` in `(B, L, T, X, Y, C_F)` memory
        # order; the fusing conv reads `(B*T, L*C_F, X, Y)` in `(B, T, X, Y, L, C_F)` order. Each order is one copy
        # of the features, as many as the NCDHW 5D convs took.
        batch, frames, height, width, offsets, _ = features.shape
        maps = features.permute(0, 4, 1, 2, 3, 5).reshape(-1, height, width, features.shape[-1])
        maps = maps.permute(0, 3, 1, 2)
        for layer in self.layers:
            maps = layer.forward_centred(maps)
        maps = maps.permute(0, 2, 3, 1).unflatten(0, (batch, offsets, frames)).permute(0, 2, 3, 4, 1, 5)
        maps = maps.reshape(batch * frames, height, width, -1).permute(0, 3, 1, 2)
        return self._add_upsampled_projection(self.fuse.forward_centred(maps), residual)

    def _adds_projection_in_place(self, features: torch.Tensor) -> bool:
        """Whether `_add_upsampled_projection` may run: eager, and in inference with the BN folded or with the BN's
        batch statistics (training)."""
        return _eager_inference(features) if self.project.folds_norm() else _eager(features)

    def _add_upsampled_projection(self, features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # The strided 1x1x1 transposed conv writes only the even positions of its output, so its BN maps the
        # others to one value per channel: add the projection to the input at the even positions and that value
        # everywhere, with no full-size upsampled tensor, conv or BN pass (training: 30 -> ~10 ms per 4 clips with
        # the backward). `features`: `(B*T, C, X, Y)`, any memory layout.
        weight, shift = self.project.conv.weight.flatten(1), None
        if self.project.folds_norm():
            weight, shift = self.project._prepared(
                ("projection", features.dtype),
                lambda: self.project._folded_as(weight, features.dtype, channel_dim=1),
            )
        projected = torch.matmul(features.permute(0, 2, 3, 1), weight.to(features.dtype))
        if shift is None:
            scale, shift = self._projection_batch_norm(projected, residual.shape)
            projected = projected * scale.to(projected.dtype)
        out = residual + shift[:, None, None].to(residual.dtype)
        even = out[..., ::2, ::2]
        even += projected.permute(0, 3, 1, 2)
        return out.relu_()

    def _projection_batch_norm(
        self, projected: torch.Tensor, out_shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and shift of the projection's BN with batch statistics over the whole `out_shape` output, of which
        the `(B*T, X, Y, C)` `projected` values are the even positions and zeros the rest; the running statistics
        updated as the BN would."""
        norm = self.project.bn
        rows = projected.reshape(-1, projected.shape[-1])
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        count = out_shape[0] * out_shape[2] * out_shape[3]
        mean = rows.sum(0) / count
        # Two-pass variance: the centred squares of the even positions and the zeros elsewhere.
        var = ((rows - mean).square().sum(0) + (count - rows.shape[0]) * mean.square()) / count
        _record_batch_statistics(norm, mean, var, count)
        scale = norm.weight * torch.rsqrt(var + norm.eps)
        return scale, norm.bias - mean * scale


class SelfyBlock(nn.Module):
    """SELFY block: STSS transformation, feature extraction and integration, added to its input as a residual."""

    def __init__(self, config: SelfyConfig, channels: int):
        super().__init__()
        self.transform = StssTransform(config, channels)
        self.extractor = StssExtractor(config)
        self.integrator = StssIntegrator(config, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (features := self._fused_features(x)) is None:
            features = self.extractor(self.transform(x))
        return self.integrator(features, residual=x)

    def _fused_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """Eval-mode CPU inference by the native kernel from the projected features to the extracted ones: the
        similarities are computed tile by tile inside it and never stored (the all-pairs products and the gathered
        windows: ~6 MB and ~2 ms per R18 clip). None where it does not run, and while hooks watch the transform, its
        correlation or the extractor (the STSS visualisation reads the similarities), which it would bypass."""
        transform, extractor = self.transform, self.extractor
        if extractor.method != "conv" or any(
            _hooked(m) for m in (transform, transform.correlation, extractor)
        ):
            return None
        if (kernel := extractor._native_kernel(x)) is None or kernel.hidden is None:
            return None
        correlation = transform.correlation
        features = kernel.from_features(
            transform.downsample(x).permute(0, 2, 3, 1),
            correlation.num_frames,
            correlation.temporal_offsets,
            extractor._native_weights(kernel),
            eps=correlation.eps if correlation.normalize else None,
        )
        return features.unflatten(0, (-1, correlation.num_frames))


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) would see the module's call."""
    hooks = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


@contextlib.contextmanager
def _preserved_batch_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of `module` on exit: the recomputation of a checkpointed block
    runs BN in training mode again and would otherwise update its running averages twice."""
    saved = [
        (buffer, buffer.clone())
        for norm in module.modules()
        if isinstance(norm, _BATCH_NORMS) and norm.track_running_stats
        for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient checkpointing whose recomputation does not update BatchNorm running statistics a second time."""

    def contexts():
        return contextlib.nullcontext(), _preserved_batch_norm_statistics(block)

    return checkpoint(block, x, use_reentrant=False, context_fn=contexts)


class SelfyPreTrainedModel(PreTrainedModel):
    config_class = SelfyConfig
    base_model_prefix = "selfy"
    main_input_name = "pixel_values"
    input_modalities = ("video",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SelfyBasicBlock", "SelfyBottleneck", "SelfyBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """As the official code: Kaiming fan-out convs, BN 1/0 (0 for the last BN of each residual branch and of
        the SELFY block), Xavier linear layers with zero bias."""
        if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, _BATCH_NORMS):
            init.constant_(module.weight, 0.0 if getattr(module, "zero_init", False) else 1.0)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)


class SelfyModel(SelfyPreTrainedModel):
    """
    The SELFYNet backbone: a ResNet (torchvision parameter names `conv1`, `bn1`, `layer1..4`, so ImageNet weights load
    by name) run on the frames of each clip, with TSM shifts and SELFY blocks (`selfy_blocks.layer{i}`) after the
    stages listed in `config.selfy_stages`.
    """

    def __init__(self, config: SelfyConfig):
        super().__init__(config)
        block_class = SelfyBottleneck if config.layer_type == "bottleneck" else SelfyBasicBlock
        self.conv1 = nn.Conv2d(config.num_channels, config.embedding_size, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.embedding_size)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SelfyMaxPool2d()
        in_channels = config.embedding_size
        for stage, (depth, out_channels) in enumerate(zip(config.depths, config.hidden_sizes), start=1):
            stride = 1 if stage == 1 else 2
            blocks = [block_class(config, in_channels, out_channels, stride)]
            blocks += [block_class(config, out_channels, out_channels) for _ in range(depth - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            in_channels = out_channels
        self.selfy_blocks = nn.ModuleDict(
            {
                f"layer{stage}": SelfyBlock(config, config.hidden_sizes[stage - 1])
                for stage in sorted(config.selfy_stages)
            }
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, frames, channels, height, width)` or
            `(batch, views, frames, channels, height, width)`): normalised frames, e.g. from [`SelfyVideoProcessor`];
            `views` are clips x crops of the same video.

        Returns `last_hidden_state` `(*lead, frames, C, h, w)`, `pooler_output` `(*lead, frames, C)` (spatially
        averaged per frame) and, with `output_hidden_states`, the stem and every stage (and SELFY block) output,
        where `lead` is `(batch,)` or `(batch, views)`.

        Example:

        ```python
        >>> import torch
        >>> from selfy_hf import SelfyConfig, SelfyModel
        >>> model = SelfyModel(SelfyConfig.from_preset("selfynet-tiny")).eval()
        >>> outputs = model(torch.randn(2, 8, 3, 64, 64))
        >>> tuple(outputs.pooler_output.shape)
        (2, 8, 128)
        ```
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        lead = self._check_pixel_values(pixel_values)
        x = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        hidden_states = [x] if output_hidden_states else None
        for stage in range(1, 5):
            for block in getattr(self, f"layer{stage}"):
                x = self._run(block, x)
            if f"layer{stage}" in self.selfy_blocks:
                if output_hidden_states:
                    hidden_states.append(x)
                x = self._run(self.selfy_blocks[f"layer{stage}"], x)
            if output_hidden_states:
                hidden_states.append(x)
        pooled = x.mean(dim=(-2, -1))
        unfold = lambda t: t.reshape(*lead, self.config.num_frames, *t.shape[1:])  # noqa: E731
        last_hidden_state, pooled = unfold(x), unfold(pooled)
        all_hidden = tuple(unfold(h) for h in hidden_states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, all_hidden) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_hidden
        )

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return _checkpointed(block, x)
        return block(x)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> tuple[int, ...]:
        """Validate `(B, T, C, H, W)` / `(B, V, T, C, H, W)` input and return its leading dims `(B,)` / `(B, V)`."""
        config = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (5, 6):
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            )
            raise ValueError(
                f"pixel_values must be a tensor of shape (batch, frames, channels, height, width) or "
                f"(batch, views, frames, channels, height, width); got {shape}"
            )
        frames, channels = pixel_values.shape[-4:-2]
        if frames != config.num_frames or channels != config.num_channels:
            raise ValueError(
                f"pixel_values has {frames} frames of {channels} channels (shape {tuple(pixel_values.shape)}), "
                f"but this model takes clips of num_frames={config.num_frames} frames with "
                f"num_channels={config.num_channels}: sample {config.num_frames} frames per clip"
            )
        return tuple(pixel_values.shape[:-4])


class SelfyForVideoClassification(SelfyPreTrainedModel):
    """SELFYNet with the TSN head: dropout and a linear classifier on every frame, logits averaged over the frames
    (the official 'avg' consensus) and over the views (clips x crops) of each video."""

    def __init__(self, config: SelfyConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.selfy = SelfyModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, frames, channels, height, width)` or
            `(batch, views, frames, channels, height, width)`): normalised frames; views (clips x crops) are averaged.
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
            Class indices in `[0, config.num_labels)`; the loss follows `config.problem_type` (cross-entropy for
            single-label classification).

        Example:

        ```python
        >>> import torch
        >>> from selfy_hf import SelfyConfig, SelfyForVideoClassification
        >>> config = SelfyConfig.from_preset("selfynet-tiny", num_labels=4)
        >>> model = SelfyForVideoClassification(config).eval()
        >>> outputs = model(torch.randn(2, 8, 3, 64, 64), labels=torch.tensor([0, 3]))
        >>> tuple(outputs.logits.shape), outputs.loss.dim()
        ((2, 4), 0)
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.selfy(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        frame_logits = self.classifier(self.dropout(outputs.pooler_output))
        logits = frame_logits.flatten(1, -2).mean(dim=1)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states
        )


__all__ = [
    "SelfyPreTrainedModel",
    "SelfyModel",
    "SelfyForVideoClassification",
    "SelfyBlock",
    "SelfyMaxPool2d",
    "StssCorrelation",
    "StssTransform",
    "StssExtractor",
    "StssIntegrator",
    "SelfyBasicBlock",
    "SelfyBottleneck",
    "temporal_shift",
]
