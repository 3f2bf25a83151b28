import contextlib
import copy
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_modeling import _randomise_batch_norms

from selfy_hf import SelfyConfig, SelfyForVideoClassification
from selfy_hf.modeling_selfy import StssExtractor
from selfy_hf.native_training import (
    TrainingKernels,
    first_layer,
    first_two_layers,
    row_batch_norm,
    row_width,
    stride_two_conv,
    supports_first_layer,
    supports_first_two_layers,
    supports_rows,
    supports_stride_two_conv,
    training_kernels,
)


def _kernels_or_skip() -> TrainingKernels:
    kernels = training_kernels()
    if kernels is None:
        pytest.skip("the native training kernels cannot be built here (needs a C compiler with OpenMP)")
    return kernels


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _assert_close_to_exact(
    name: str, ours: torch.Tensor, exact: torch.Tensor, tolerance: float = 1e-6
) -> None:
    """Within `tolerance` of the float64 values' scale (at least 1: statistics of centred rows are ~0)."""
    error = (ours.double() - exact).abs().max().item()
    assert error <= tolerance * max(exact.abs().max().item(), 1.0), f"{name}: off by {error:.2e}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the C functions the training kernels run."""
    calls = []
    original = TrainingKernels.call

    def counted(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(TrainingKernels, "call", counted)
    return calls


def test_kernels_build_where_there_is_a_c_compiler():
    """The kernels are portable C: where a compiler exists they must build (a compile error is not a skip)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    assert training_kernels() is not None


@pytest.mark.parametrize(
    "rows, channels, centred, activation, offset",
    [
        (1001, 4, False, True, 5.0),  # blocks of 16 values (4 rows) and a row left over
        (333, 16, True, True, 0.0),
        (2000, 64, False, False, 100.0),  # a mean of ~30 standard deviations: the two-pass statistics
        (999, 64, True, True, 0.0),
        (10, 32, False, True, 1.0),  # fewer blocks than threads
    ],
)
def test_row_batch_norm_is_batch_norm_and_relu(rows, channels, centred, activation, offset):
    """Output, batch mean and variance and the three gradients of float64 batch norm (+ ReLU) to ~1e-6, at 1 and 2
    threads. The upstream gradient is zero where the float64 pre-activation is within 1e-4 of zero: there the ReLU's
    decision is rounding, in any float32 implementation."""
    kernels = _kernels_or_skip()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, channels, generator=generator) * 3 + offset
    if centred:
        x -= x.mean(0)
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    exact_inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    pre_activation = F.batch_norm(exact_inputs[0], None, None, *exact_inputs[1:], True, 0.0, 1e-5)
    upstream = torch.randn(rows, channels, generator=generator) * (pre_activation.detach().abs() > 1e-4)
    exact_out = F.relu(pre_activation) if activation else pre_activation
    exact = [
        exact_out,
        x.double().mean(0),
        x.double().var(0, correction=0),
        *torch.autograd.grad(exact_out, exact_inputs, upstream.double()),
    ]
    for threads in (1, 2):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with _threads(threads):
            out, mean, var = row_batch_norm(*inputs, 1e-5, activation, centred, kernels)
            grads = torch.autograd.grad(out, inputs, upstream)
        for name, ours, reference in zip(
            ["out", "mean", "var", "x", "weight", "bias"], [out, mean, var, *grads], exact
        ):
            _assert_close_to_exact(f"{name} at {threads} threads", ours, reference)


def test_row_batch_norm_passes_nan_on_as_pytorch():
    """A NaN in a channel makes that channel's output NaN, as PyTorch's batch norm and ReLU do (not zeros)."""
    kernels = _kernels_or_skip()
    x = torch.randn(64, 16)
    x[3, 5] = float("nan")
    weight, bias = torch.ones(16), torch.zeros(16)
    out = row_batch_norm(x, weight, bias, 1e-5, True, False, kernels)[0]
    expected = F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))
    assert out[:, 5].isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())


@pytest.mark.parametrize(
    "count, side, channels, activation",
    [(1000, 9, 4, True), (37, 5, 16, True), (17, 3, 4, False), (5, 9, 8, True)],  # partial tiles of 16 maps
)
def test_first_layer_is_conv_batch_norm_and_relu(count, side, channels, activation):
    """The 1 -> C 3x3 conv + BN (batch statistics) + ReLU: channels-last output, the conv output's batch mean and
    variance and the gradients of the maps, conv weight, BN weight and bias, all to ~1e-6 of float64, at 1 and 2
    threads."""
    kernels = _kernels_or_skip()
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(count, 1, side, side, generator=generator) * 2 - 0.7
    weight = torch.randn(channels, 1, 3, 3, generator=generator)
    gamma = torch.rand(channels, generator=generator) + 0.5
    beta = torch.randn(channels, generator=generator)
    exact_inputs = [t.double().requires_grad_() for t in (maps, weight, gamma, beta)]
    conv = F.conv2d(exact_inputs[0], exact_inputs[1], padding=1)
    pre_activation = F.batch_norm(conv, None, None, *exact_inputs[2:], True, 0.0, 1e-5)
    upstream = torch.randn(pre_activation.shape, generator=generator) * (pre_activation.detach().abs() > 1e-4)
    exact_out = F.relu(pre_activation) if activation else pre_activation
    exact = [
        exact_out,
        conv.detach().mean((0, 2, 3)),
        conv.detach().var((0, 2, 3), correction=0),
        *torch.autograd.grad(exact_out, exact_inputs, upstream.double()),
    ]
    for threads in (1, 2):
        inputs = [t.clone().requires_grad_() for t in (maps, weight, gamma, beta)]
        with _threads(threads):
            out, mean, var = first_layer(*inputs, 1e-5, activation, kernels)
            grads = torch.autograd.grad(out, inputs, upstream)
        assert out.is_contiguous(memory_format=torch.channels_last)
        names = ["out", "mean", "var", "maps", "weight", "gamma", "beta"]
        for name, ours, reference in zip(names, [out, mean, var, *grads], exact):
            _assert_close_to_exact(f"{name} at {threads} threads", ours, reference)


@pytest.mark.parametrize(
    "count, side, first_channels, activations",
    [
        (1000, 9, 4, (True, True)),
        (37, 5, 4, (True, False)),
        (17, 9, 8, (True, True)),
        (5, 3, 4, (False, True)),
    ],
)
def test_first_two_layers_are_the_two_convs_batch_norms_and_relus(count, side, first_channels, activations):
    """The first layer, then the 3x3 stride-2 conv to 16 channels + BN + ReLU, as one function: channels-last output,
    both conv outputs' batch statistics and the gradients of the maps and of all six parameters, to ~1e-6 of float64,
    at 1 and 2 threads (partial tiles of maps; 9x9, 5x5 and 3x3 maps; either ReLU off)."""
    kernels = _kernels_or_skip()
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(count, 1, side, side, generator=generator) * 2 - 0.7
    first = [
        torch.randn(first_channels, 1, 3, 3, generator=generator),
        torch.rand(first_channels, generator=generator) + 0.5,
        torch.randn(first_channels, generator=generator),
    ]
    second = [
        torch.randn(16, first_channels, 3, 3, generator=generator) * 0.3,
        torch.rand(16, generator=generator) + 0.5,
        torch.randn(16, generator=generator),
    ]
    exact_inputs = [t.double().requires_grad_() for t in (maps, *first, *second)]
    convs = [F.conv2d(exact_inputs[0], exact_inputs[1], padding=1)]
    hidden = F.batch_norm(convs[0], None, None, *exact_inputs[2:4], True, 0.0, 1e-5)
    hidden = F.relu(hidden) if activations[0] else hidden
    convs.append(F.conv2d(hidden, exact_inputs[4], stride=2, padding=1))
    pre_activation = F.batch_norm(convs[1], None, None, *exact_inputs[5:], True, 0.0, 1e-5)
    upstream = torch.randn(pre_activation.shape, generator=generator) * (pre_activation.detach().abs() > 1e-4)
    exact_out = F.relu(pre_activation) if activations[1] else pre_activation
    statistics = [f(conv.detach()) for conv in convs for f in (lambda c: c.mean((0, 2, 3)), _biased_var)]
    exact = [exact_out, *statistics, *torch.autograd.grad(exact_out, exact_inputs, upstream.double())]
    for threads in (1, 2):
        inputs = [t.clone().requires_grad_() for t in (maps, *first, *second)]
        with _threads(threads):
            out, *ours = first_two_layers(
                inputs[0], inputs[1:4], inputs[4:], (1e-5, 1e-5), activations, kernels
            )
            grads = torch.autograd.grad(out, inputs, upstream)
        assert out.is_contiguous(memory_format=torch.channels_last)
        names = [
            "out",
            "mean 1",
            "var 1",
            "mean 2",
            "var 2",
            "maps",
            "w1",
            "gamma 1",
            "beta 1",
            "w2",
            "gamma 2",
        ]
        for name, mine, reference in zip([*names, "beta 2"], [out, *ours, *grads], exact):
            _assert_close_to_exact(f"{name} at {threads} threads", mine, reference)


def _biased_var(conv: torch.Tensor) -> torch.Tensor:
    return conv.var((0, 2, 3), correction=0)


def test_first_layer_without_the_maps_gradient():
    """Maps that need no gradient (the first layer's input is a leaf): the parameters' gradients alone, the same."""
    kernels = _kernels_or_skip()
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(40, 1, 9, 9, generator=generator)
    parameters = [
        torch.randn(4, 1, 3, 3, generator=generator).requires_grad_(),
        (torch.rand(4, generator=generator) + 0.5).requires_grad_(),
        torch.randn(4, generator=generator).requires_grad_(),
    ]
    upstream = torch.randn(40, 4, 9, 9, generator=generator)
    alone = torch.autograd.grad(first_layer(maps, *parameters, 1e-5, True, kernels)[0], parameters, upstream)
    maps.requires_grad_()
    both = torch.autograd.grad(first_layer(maps, *parameters, 1e-5, True, kernels)[0], parameters, upstream)
    for a, b in zip(alone, both):
        torch.testing.assert_close(a, b)


def test_what_the_kernels_take():
    assert [row_width(c) for c in (1, 4, 16, 32, 64, 256)] == [16, 16, 16, 32, 64, 256]
    assert row_width(24) is None and row_width(512) is None
    assert supports_rows(torch.zeros(8, 64))
    assert not supports_rows(torch.zeros(8, 64, dtype=torch.float64))
    assert not supports_rows(torch.zeros(64, 8).t())  # not contiguous
    assert not supports_rows(torch.zeros(8, 24))
    maps, weight = torch.zeros(2, 1, 9, 9), torch.zeros(4, 1, 3, 3)
    assert supports_first_layer(maps, weight, 1, 1)
    assert not supports_first_layer(maps, weight, 2, 1)
    assert not supports_first_layer(torch.zeros(2, 1, 11, 11), weight, 1, 1)
    assert not supports_first_layer(torch.zeros(2, 2, 9, 9), torch.zeros(4, 2, 3, 3), 1, 1)
    assert not supports_first_layer(maps, torch.zeros(32, 1, 3, 3), 1, 1)
    assert not supports_first_layer(maps.double(), weight.double(), 1, 1)
    second = torch.zeros(16, 4, 3, 3)
    assert supports_first_two_layers(maps, weight, second, (1, 2), (1, 1))
    assert not supports_first_two_layers(maps, weight, second, (1, 1), (1, 1))
    assert not supports_first_two_layers(maps, weight, torch.zeros(32, 4, 3, 3), (1, 2), (1, 1))
    assert not supports_first_two_layers(maps, weight, torch.zeros(16, 8, 3, 3), (1, 2), (1, 1))


def test_kernels_reject_what_they_do_not_take():
    """Inputs the C code would read out of bounds raise a ValueError instead."""
    kernels = _kernels_or_skip()
    ones = torch.ones(4)
    with pytest.raises(ValueError, match="rows"):
        row_batch_norm(torch.zeros(8, 24), torch.ones(24), torch.zeros(24), 1e-5, True, False, kernels)
    with pytest.raises(ValueError, match="per channel"):
        row_batch_norm(torch.zeros(8, 16), torch.ones(15), torch.zeros(16), 1e-5, True, False, kernels)
    maps, weight = torch.zeros(2, 1, 9, 9), torch.zeros(4, 1, 3, 3)
    with pytest.raises(ValueError, match="maps"):
        first_layer(torch.zeros(2, 1, 11, 11), weight, ones, ones, 1e-5, True, kernels)
    with pytest.raises(ValueError, match="per channel"):
        first_layer(maps, weight, torch.ones(3), ones, 1e-5, True, kernels)
    second = (torch.zeros(16, 4, 3, 3), torch.ones(16), torch.zeros(16))
    with pytest.raises(ValueError, match="maps"):
        first_two_layers(
            maps,
            (weight, ones, ones),
            (torch.zeros(8, 4, 3, 3), *second[1:]),
            (1e-5,) * 2,
            (True,) * 2,
            kernels,
        )
    with pytest.raises(ValueError, match="per channel"):
        first_two_layers(
            maps,
            (weight, ones, ones),
            (second[0], torch.ones(8), second[2]),
            (1e-5,) * 2,
            (True,) * 2,
            kernels,
        )


# the third layer's conv, forward and both gradients
STRIDE_TWO = {"s2_forward": 1, "s2_input_gradient": 1, "s2_weight_gradient": 1}


@pytest.mark.parametrize(
    "count, in_channels, side, out_channels",
    [
        (37, 16, 5, 64),  # the R18 extraction's third layer; blocks of windows left over
        (5, 16, 3, 32),  # fewer windows than a register block; two vectors of outputs
        (13, 32, 4, 16),  # an even side; one vector of outputs
        (7, 16, 9, 48),  # three vectors of outputs, more taps inside the map
        (3, 16, 1, 16),  # a 1x1 map: the centre tap alone
    ],
)
def test_stride_two_conv_is_the_conv(count, in_channels, side, out_channels):
    """Output, input, weight and bias gradients of the 3x3 stride-2 conv against float64, at 1 and 2 threads."""
    kernels = _kernels_or_skip()
    torch.manual_seed(0)
    x = torch.randn(count, in_channels, side, side).contiguous(memory_format=torch.channels_last)
    weight, bias = (
        torch.randn(out_channels, in_channels, 3, 3) / (3 * in_channels**0.5),
        torch.randn(out_channels),
    )
    inputs = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = F.conv2d(*inputs, stride=2, padding=1)
    upstream = torch.randn_like(expected)
    exact = [expected, *torch.autograd.grad(expected, inputs, upstream)]
    for threads in (1, 2):
        ours = [t.detach().requires_grad_() for t in (x, weight, bias)]
        with _threads(threads):
            out = stride_two_conv(*ours, 2, 1, kernels)
            grads = torch.autograd.grad(out, ours, upstream.float())
        assert out.is_contiguous(memory_format=torch.channels_last)
        for name, mine, reference in zip(["output", "input", "weight", "bias"], [out, *grads], exact):
            _assert_close_to_exact(f"{name} at {threads} threads", mine, reference.detach(), 2e-6)


def test_stride_two_conv_takes_and_rejects():
    kernels = _kernels_or_skip()
    maps, weight = (
        torch.zeros(2, 16, 5, 5).contiguous(memory_format=torch.channels_last),
        torch.zeros(64, 16, 3, 3),
    )
    assert supports_stride_two_conv(maps, weight, 2, 1)
    assert not supports_stride_two_conv(maps, weight, 1, 1)
    assert not supports_stride_two_conv(maps.contiguous(), weight, 2, 1)  # NCHW
    assert not supports_stride_two_conv(maps.double(), weight.double(), 2, 1)
    assert not supports_stride_two_conv(torch.zeros(2, 8, 5, 5), torch.zeros(64, 8, 3, 3), 2, 1)
    assert not supports_stride_two_conv(maps, torch.zeros(24, 16, 3, 3), 2, 1)
    assert not supports_stride_two_conv(maps, torch.zeros(64, 16, 5, 5), 2, 1)
    with pytest.raises(ValueError, match="stride 2, padding 1"):
        stride_two_conv(maps, weight, None, 2, 0, kernels)
    with pytest.raises(ValueError, match="per channel"):
        stride_two_conv(maps, weight, torch.zeros(16), 2, 1, kernels)


def _official_training_step(
    extractor: StssExtractor, similarity: torch.Tensor, upstream: torch.Tensor
) -> list:
    """Features, gradients (similarities, then parameters) and buffers of the official Conv3d + BN3d + ReLU stack
    in float64 after one training step."""
    official = copy.deepcopy(extractor).double()
    similarity = similarity.double().requires_grad_()
    batch, frames, height, width, offsets, window = similarity.shape[:6]
    volumes = similarity.reshape(-1, 1, offsets, window, window)
    for layer in official.layers:
        volumes = F.relu(layer.bn(layer.conv(volumes)))
    features = volumes.reshape(batch, frames, height, width, -1, offsets).transpose(-1, -2)
    grads = torch.autograd.grad(features, [similarity, *official.parameters()], upstream.double())
    return [features, *grads, *official.buffers()]


@pytest.mark.parametrize(
    "window, channels, calls",
    [
        # the first two layers whole, then the two later layers' rows batch norms
        (
            9,
            (4, 16, 64, 64),
            {"pair_forward": 1, "pair_backward": 2, "row_affine": 3, "row_affine_gradient": 2, **STRIDE_TWO},
        ),
        (
            5,
            (4, 16, 64, 64),
            {"pair_forward": 1, "pair_backward": 2, "row_affine": 3, "row_affine_gradient": 2, **STRIDE_TWO},
        ),
        # a second layer of 32 channels: the first layer alone, then three rows batch norms (the third layer's 32
        # input channels take PyTorch's conv)
        (
            9,
            (8, 32, 64, 64),
            {"first_forward": 1, "first_backward": 1, "row_affine": 3, "row_affine_gradient": 3},
        ),
    ],
)
def test_extractor_training_step_runs_the_kernels_as_accurately_as_pytorch(
    window, channels, calls, monkeypatch, kernel_calls
):
    """A float32 training step of the conv extraction runs its first layers, its third layer's stride-2 conv and its
    rows batch norms in the kernels, and its features, gradients and running statistics are as close to the official float64 stack as the PyTorch
    ops' (kernels off)."""
    _kernels_or_skip()
    torch.manual_seed(0)
    config = SelfyConfig.from_preset(
        "selfynet-tsm-r18", selfy_window_size=window, selfy_extraction_channels=list(channels)
    )
    extractor = StssExtractor(config)
    _randomise_batch_norms(extractor)
    extractor.train()
    similarity = torch.rand(2, 2, 3, 5, 5, window, window) * 2 - 1
    upstream = torch.randn(2, 2, 3, 5, 5, channels[-1])
    exact = _official_training_step(extractor, similarity, upstream)

    def step(enabled: str) -> list:
        monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", enabled)
        model, inputs = copy.deepcopy(extractor), similarity.clone().requires_grad_()
        features = model(inputs)
        grads = torch.autograd.grad(features, [inputs, *model.parameters()], upstream)
        return [features, *grads, *model.buffers()]

    ours = step("1")
    assert {name: kernel_calls.count(name) for name in calls} == calls
    kernel_calls.clear()
    pytorch = step("0")
    assert kernel_calls == []
    for index, (mine, theirs, reference) in enumerate(zip(ours, pytorch, exact)):
        if not reference.is_floating_point():  # num_batches_tracked
            assert torch.equal(mine, reference) and torch.equal(theirs, reference)
            continue
        error, pytorch_error = (
            (t.double() - reference).abs().max() / reference.abs().max() for t in (mine, theirs)
        )
        assert error <= max(2 * pytorch_error, 1e-6), (
            f"tensor {index}: {error:.1e} vs PyTorch's {pytorch_error:.1e}"
        )


def test_extractor_training_under_cpu_autocast_runs_the_first_two_layers_in_fp32(monkeypatch, kernel_calls):
    """Under bf16 autocast the first two layers run in fp32 (as `forward_planar` runs them there) in the kernels,
    and the step matches the kernels-off one to bf16 precision."""
    _kernels_or_skip()
    torch.manual_seed(0)
    extractor = StssExtractor(SelfyConfig.from_preset("selfynet-tsm-r18")).train()
    similarity = torch.rand(1, 2, 3, 3, 5, 9, 9) * 2 - 1
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", enabled)
        model, inputs = copy.deepcopy(extractor), similarity.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model(inputs)
        results.append(
            [features.float(), *torch.autograd.grad(features.float().sum(), [inputs, *model.parameters()])]
        )
    assert kernel_calls.count("pair_forward") == 1 and kernel_calls.count("pair_backward") == 2
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_model_training_step_is_the_same_with_and_without_the_kernels(monkeypatch, kernel_calls):
    _kernels_or_skip()
    torch.manual_seed(0)
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny", num_labels=5)).train()
    model.dropout.p = 0.0
    pixel_values, labels = torch.randn(2, 8, 3, 48, 48), torch.tensor([1, 3])
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", enabled)
        copy_ = copy.deepcopy(model)
        loss = copy_(pixel_values, labels=labels).loss
        loss.backward()
        results.append([loss, *(p.grad for p in copy_.parameters())])
        assert bool(kernel_calls) == (enabled == "1")
        kernel_calls.clear()
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_without_a_compiler_training_runs_the_pytorch_ops(tmp_path, monkeypatch, kernel_calls):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SELFY_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert training_kernels() is None
    extractor = StssExtractor(SelfyConfig.from_preset("selfynet-tsm-r18")).train()
    similarity = torch.rand(1, 1, 2, 3, 5, 9, 9, requires_grad=True)
    extractor(similarity).sum().backward()
    assert kernel_calls == [] and torch.isfinite(similarity.grad).all()


def test_kernels_are_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "0")
    assert training_kernels() is None
