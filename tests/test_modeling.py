import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForVideoClassification

from selfy_hf import (
    SelfyConfig,
    SelfyForVideoClassification,
    SelfyModel,
    modeling_selfy,
    native_extraction,
    native_winograd,
)
from selfy_hf import stss as stss_module
from selfy_hf.flops import count_complexity
from selfy_hf.modeling_selfy import StssExtractor, StssIntegrator, _SmallMapConv2d, temporal_shift
from selfy_hf.native_winograd import WinogradKernel
from selfy_hf.training import enable_activation_checkpointing

TINY = {"num_labels": 5}


def tiny_model(**overrides) -> SelfyForVideoClassification:
    torch.manual_seed(0)
    return SelfyForVideoClassification(
        SelfyConfig.from_preset("selfynet-tiny", **{**TINY, **overrides})
    ).eval()


def clip(batch=2, frames=8, size=48, views=None, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, frames, 3, size, size) if views is None else (batch, views, frames, 3, size, size)
    return torch.randn(shape, generator=generator)


def naive_temporal_shift(x, num_frames, shift_div):
    clips = x.reshape(-1, num_frames, *x.shape[1:])
    out = torch.zeros_like(clips)
    fold = x.shape[1] // shift_div
    for t in range(num_frames):
        if t + 1 < num_frames:
            out[:, t, :fold] = clips[:, t + 1, :fold]
        if t > 0:
            out[:, t, fold : 2 * fold] = clips[:, t - 1, fold : 2 * fold]
        out[:, t, 2 * fold :] = clips[:, t, 2 * fold :]
    return out.reshape(x.shape)


@pytest.mark.parametrize(("channels", "shift_div"), [(64, 8), (20, 8), (16, 4)])
def test_temporal_shift_matches_a_loop(channels, shift_div):
    x = torch.randn(2 * 4, channels, 3, 5)
    torch.testing.assert_close(
        temporal_shift(x, 4, shift_div), naive_temporal_shift(x, 4, shift_div), rtol=0, atol=0
    )


def test_temporal_shift_keeps_channels_last_inputs_channels_last():
    x = torch.randn(2 * 4, 24, 5, 6).contiguous(memory_format=torch.channels_last)
    shifted = temporal_shift(x, 4, 8)
    assert shifted.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(shifted, naive_temporal_shift(x, 4, 8), rtol=0, atol=0)


def test_logits_shape_loss_and_hidden_states():
    model = tiny_model()
    labels = torch.tensor([0, 4])
    out = model(clip(), labels=labels, output_hidden_states=True)
    assert out.logits.shape == (2, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    # stem, 4 stages, and the input of the SELFY block after layer2
    assert len(out.hidden_states) == 6
    assert out.hidden_states[0].shape[:2] == (2, 8)
    base = model.selfy(clip(), return_dict=True)
    assert base.pooler_output.shape == (2, 8, 128)
    assert base.last_hidden_state.shape[:3] == (2, 8, 128)


def test_views_are_averaged_inside_the_model():
    model = tiny_model()
    videos = clip(views=3)
    with torch.no_grad():
        together = model(videos).logits
        separately = torch.stack([model(videos[:, v]).logits for v in range(3)]).mean(0)
    torch.testing.assert_close(together, separately, rtol=1e-5, atol=1e-5)


def test_logits_are_the_average_of_per_frame_classifications():
    model = tiny_model()
    with torch.no_grad():
        features = model.selfy(clip()).pooler_output
        expected = model.classifier(features).mean(dim=1)
        torch.testing.assert_close(model(clip()).logits, expected)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 4, 3, 48, 48), "num_frames=8"), ((2, 8, 1, 48, 48), "num_channels=3"), ((8, 3, 48, 48), "shape")],
)
def test_wrong_input_shapes_raise_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(torch.randn(shape))


def test_tsn_frames_are_independent_and_tsm_mixes_them():
    x = clip(batch=1)
    changed = x.clone()
    changed[:, 0] += 1.0
    for module, mixes in (("none", False), ("tsm", True)):
        model = SelfyModel(SelfyConfig.from_preset("tsm-tiny", temporal_module=module)).eval()
        for norm in model.modules():  # zero-init residual BNs would silence every shifted branch
            if getattr(norm, "zero_init", False):
                torch.nn.init.ones_(norm.weight)
        with torch.no_grad():
            before, after = model(x).pooler_output, model(changed).pooler_output
        other_frames_changed = not torch.equal(before[:, 1:], after[:, 1:])
        assert other_frames_changed == mixes, module


def test_selfy_block_starts_as_identity_and_is_residual():
    config = SelfyConfig.from_preset("selfynet-tiny")
    block = SelfyModel(config).selfy_blocks["layer2"].eval()
    x = torch.rand(16, 32, 12, 12)  # non-negative, as after a ReLU
    torch.testing.assert_close(block(x), x)
    assert torch.count_nonzero(block.integrator.project.bn.weight) == 0


def test_initialisation_follows_the_official_code():
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tsm-r18", num_labels=10))
    backbone = model.selfy
    assert torch.count_nonzero(backbone.layer1[0].bn2.weight) == 0
    assert torch.all(backbone.layer1[0].bn1.weight == 1)
    assert torch.count_nonzero(backbone.selfy_blocks["layer2"].integrator.project.bn.weight) == 0
    assert torch.count_nonzero(model.classifier.bias) == 0
    weight = backbone.layer3[0].conv1.weight  # Kaiming normal, fan_out = 256 * 3 * 3
    assert weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    """Running statistics and affine parameters far from the identity, so that folding them is put to the test."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            for tensor, low, high in [
                (norm.running_mean, -0.5, 0.5),
                (norm.running_var, 0.5, 2.0),
                (norm.weight.data, 0.5, 1.5),
                (norm.bias.data, -0.5, 0.5),
            ]:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("window", [9, 5])
def test_conv_extraction_is_the_official_conv3d_stack(training, window):
    """The planar fast paths (2D convs over the folded L axis, BN folded into the convs at inference, the last conv as
    a matrix product, in training the first layer through its dense operator with moment-based BN statistics and
    the stride-2 convs' row-by-row input gradients) compute the official stack: Conv3d (1, 3, 3) + BN3d + ReLU over
    each position's (L, U, V) volume. In float64, so that any difference is in the formulation."""
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tsm-r18", selfy_window_size=window)
    extractor = StssExtractor(config).double()
    _randomise_batch_norms(extractor)
    official = copy.deepcopy(extractor).train(training)
    extractor.train(training)
    offsets = len(config.selfy_temporal_offsets)
    similarity = torch.randn(2, 3, 4, 5, offsets, window, window, dtype=torch.float64, requires_grad=True)

    features = extractor(similarity)
    volumes = similarity.reshape(-1, 1, offsets, window, window)
    for layer in official.layers:
        volumes = F.relu(layer.bn(layer.conv(volumes)))
    expected = volumes.reshape(2, 3, 4, 5, -1, offsets).transpose(-1, -2)  # (B, T, H, W, L, C_F)

    torch.testing.assert_close(features, expected)
    if training:
        weights = torch.randn_like(expected)
        ours = torch.autograd.grad((features * weights).sum(), [similarity, *extractor.parameters()])
        theirs = torch.autograd.grad((expected * weights).sum(), [similarity, *official.parameters()])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
        for a, b in zip(extractor.buffers(), official.buffers()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [14, 13])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_projection_added_in_place_is_the_official_upsampling(size, momentum):
    """In training, the integration's upsampling projection (strided 1x1x1 ConvTranspose3d + BN with batch
    statistics), added to the block's input at the even positions with the BN's shift everywhere, gives the
    official ops' output, gradients and running statistics over two steps (float64; even and odd map sizes)."""
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tsm-r18")
    ours = StssIntegrator(config, 8).double().train()
    ours.project.bn.momentum = momentum
    _randomise_batch_norms(ours)
    official = copy.deepcopy(ours)
    frames, half = 2, (size + 1) // 2
    for _ in range(2):
        features = torch.randn(3, 64, frames, half, half, dtype=torch.float64, requires_grad=True)
        residual = torch.randn(3 * frames, 8, size, size, dtype=torch.float64, requires_grad=True)
        out = ours._add_upsampled_projection(features.transpose(1, 2).flatten(0, 1), residual)
        projected = official.project(features, output_size=(frames, size, size))
        expected = F.relu(residual + projected.transpose(1, 2).reshape(residual.shape))
        torch.testing.assert_close(out, expected)
        upstream = torch.randn_like(out)
        inputs = [features, residual, *ours.project.parameters()]
        theirs = [features, residual, *official.project.parameters()]
        for a, b in zip(
            torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, theirs, upstream)
        ):
            torch.testing.assert_close(a, b)
    for a, b in zip(ours.project.buffers(), official.project.buffers()):
        torch.testing.assert_close(a, b)


def test_training_integrator_takes_the_in_place_projection(monkeypatch):
    calls = _count_inference_fast_paths(monkeypatch)
    model = tiny_model(selfy_downsample=True).train()
    model(clip(size=64), labels=torch.tensor([1, 2])).loss.backward()
    assert calls["projection"] == 1


def _count_inference_fast_paths(monkeypatch) -> dict[str, int]:
    calls = {"onednn": 0, "grouped": 0, "winograd": 0, "projection": 0}
    for cls, name, key in [
        (modeling_selfy.SelfyConvNormAct, "forward_planar_onednn", "onednn"),
        (modeling_selfy.SelfyConvNormAct, "forward_grouped_inference", "grouped"),
        (WinogradKernel, "__call__", "winograd"),
        (modeling_selfy.StssIntegrator, "_add_upsampled_projection", "projection"),
    ]:
        original = getattr(cls, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    return calls


def _r18_with_random_statistics(**overrides) -> SelfyForVideoClassification:
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tsm-r18", num_labels=5, **overrides)
    model = SelfyForVideoClassification(config).eval()
    _randomise_batch_norms(model)
    return model


# SELFY block maps of 14x14 and 13x13 (odd: 7x7 after its stride 2)
@pytest.mark.parametrize("size", [112, 100])
@pytest.mark.parametrize("native", [True, False])
def test_inference_fast_paths_compute_the_official_ops(size, native, monkeypatch):
    """Under `torch.no_grad` an eval-mode model folds BNs into convs, runs the similarities and the extraction in
    the native kernel (`native`) or the extraction through oneDNN's fused ops in its blocked layout, the
    integration as channels-last grouped convs (in the native Winograd kernel with `native`), and adds the upsampling projection to the input in place. The
    logits must be those of the official ops, computed in float64 with autograd on (which turns every
    inference-only path off)."""
    if native and native_extraction.extraction_kernel(9, (4, 16, 64, 64), 128) is None:
        pytest.skip("the native extraction kernel cannot be built here")
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "1" if native else "0")
    calls = _count_inference_fast_paths(monkeypatch)
    model = _r18_with_random_statistics()
    pixel_values = clip(size=size)
    with torch.no_grad():
        logits = model(pixel_values).logits
    onednn = torch.backends.mkldnn.is_available()
    extraction = 0 if native or not onednn else 4
    grouped = 4 if onednn else 0
    winograd = grouped if native and native_winograd.winograd_kernel() is not None else 0
    assert calls == {"onednn": extraction, "grouped": grouped, "winograd": winograd, "projection": 1}
    expected = copy.deepcopy(model).double()(pixel_values.double()).logits
    assert calls["projection"] == 1, "autograd on must turn the inference-only paths off"
    torch.testing.assert_close(logits.double(), expected.detach(), rtol=1e-4, atol=1e-5)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _onednn_conv(maps: torch.Tensor, out_channels: int) -> torch.Tensor:
    """A oneDNN conv + bias + ReLU of oneDNN maps, its output in the layout oneDNN picks."""
    weight = torch.randn(out_channels, maps.shape[1], 3, 3)
    return torch.ops.mkldnn._convolution_pointwise(
        maps, weight, torch.rand(out_channels), (1, 1), (2, 2), (1, 1), 1, "relu", [], ""
    )


@needs_onednn
@pytest.mark.parametrize("conv", [True, False])
def test_onednn_rows_read_the_maps_in_place_in_their_layout(conv, monkeypatch):
    monkeypatch.setattr(modeling_selfy, "_ONEDNN_BLOCKS", {})
    torch.manual_seed(0)
    maps = torch.randn(7, 16, 5, 5).to_mkldnn()
    if conv:  # the extraction's third conv: 16 -> 64 channels, 5x5 -> 3x3, blocked by oneDNN
        maps = _onednn_conv(maps, 64)
    for _ in range(2):  # found, then cached
        rows, block = modeling_selfy._onednn_rows(maps)
        assert rows.data_ptr() == torch.ops.mkldnn.data_ptr(maps)
        assert torch.equal(rows, modeling_selfy._channel_blocked(maps.to_dense(), block).flatten(1))
    assert list(modeling_selfy._ONEDNN_BLOCKS.values()) == [block]
    assert block > 1 if conv else block == 1  # a plain `to_mkldnn` tensor is NCHW


@needs_onednn
def test_onednn_rows_refuse_padded_blocks_and_wait_out_uniform_maps(monkeypatch):
    monkeypatch.setattr(modeling_selfy, "_ONEDNN_BLOCKS", {})
    maps = torch.rand(7, 16, 5, 5).to_mkldnn()
    padded = _onednn_conv(maps, 4)  # 4 channels in oneDNN's 8- or 16-channel blocks
    assert torch.ops.mkldnn._nbytes(padded) > padded.numel() * 4
    assert modeling_selfy._onednn_rows(padded) is None
    rows, _ = modeling_selfy._onednn_rows(torch.zeros(7, 64, 3, 3).to_mkldnn())
    assert torch.equal(rows, torch.zeros(7, 576))
    assert modeling_selfy._ONEDNN_BLOCKS == {}  # every order matches zeros: nothing learnt


@needs_onednn
def test_extraction_inference_without_in_place_rows_reads_the_dense_maps(monkeypatch):
    """Where the last conv's input is in no layout `_onednn_rows` knows, it reads `to_dense`: the same features."""
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "0")  # the oneDNN path, not the native kernel
    extractor = StssExtractor(SelfyConfig.from_preset("selfynet-tsm-r18")).eval()
    _randomise_batch_norms(extractor)
    similarity = torch.randn(1, 2, 3, 3, 5, 9, 9)
    found, original = [], modeling_selfy._onednn_rows
    monkeypatch.setattr(
        modeling_selfy, "_onednn_rows", lambda maps: found.append(original(maps)) or found[-1]
    )
    with torch.no_grad():
        in_place = extractor(similarity)
        assert len(found) == 1 and found[0] is not None
        monkeypatch.setattr(modeling_selfy, "_onednn_rows", lambda maps: None)
        dense = extractor(similarity)
    torch.testing.assert_close(in_place, dense)


def test_inference_weights_are_kept_until_their_sources_change_even_through_data(monkeypatch):
    """Folded inference weights are built once and reused; changing any conv weight or BN tensor in place, even
    through `.data` (which version counters miss), rebuilds exactly that layer's."""
    builds = []
    original = modeling_selfy.SelfyConvNormAct._prepared

    def counted(self, key, build):
        return original(self, key, lambda: builds.append(self) or build())

    monkeypatch.setattr(modeling_selfy.SelfyConvNormAct, "_prepared", counted)
    model = _r18_with_random_statistics()
    pixel_values = clip(size=64)
    with torch.no_grad():
        model(pixel_values)
        built = len(builds)
        model(pixel_values)
    assert built == (10 if torch.backends.mkldnn.is_available() else 1) and len(builds) == built
    block = model.selfy.selfy_blocks["layer2"]
    changed = [
        (block.transform.downsample.conv.weight, 1.5),
        (block.extractor.layers[0].bn.running_var, 2.0),
        (block.extractor.layers[3].conv.weight, -1.0),
        (block.integrator.layers[1].bn.bias, 0.5),
        (block.integrator.project.bn.weight, 3.0),
    ]
    for tensor, factor in changed:
        tensor.data.mul_(factor)
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert len(builds) == built + (len(changed) if torch.backends.mkldnn.is_available() else 1)
    expected = model(pixel_values).logits  # autograd on: the official ops, nothing cached
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-4, atol=1e-5)


def test_training_after_inference_mode_uses_no_inference_tensors(monkeypatch):
    """Index tensors cached during a `torch.inference_mode` call (as evaluation loops run) are normal tensors: the
    next training step saves them for backward, which autograd refuses for inference tensors."""
    monkeypatch.setattr(stss_module, "_INDEX_CACHE", {})
    model = tiny_model()
    pixel_values = clip(size=32)
    with torch.inference_mode():
        model.eval()(pixel_values)
    model.train()(pixel_values, labels=torch.tensor([1, 3])).loss.backward()
    assert all(p.grad is not None for p in model.selfy.selfy_blocks["layer2"].parameters())


def test_a_model_with_kept_inference_weights_pickles_and_copies_without_them():
    model = _r18_with_random_statistics()
    pixel_values = clip(size=64)
    with torch.no_grad():
        logits = model(pixel_values).logits
    kept = model.selfy.selfy_blocks["layer2"].integrator.fuse._inference_weights
    assert len(kept) == (1 if torch.backends.mkldnn.is_available() else 0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert len(twin.selfy.selfy_blocks["layer2"].integrator.fuse._inference_weights) == 0
        with torch.no_grad():
            torch.testing.assert_close(twin(pixel_values).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize(("integration", "grouped_convs"), [("mlp", 4), ("fc", 1)])
def test_inference_fast_paths_of_the_other_integrations(integration, grouped_convs, monkeypatch):
    """The channels-last grouped integration with 1x1 layers (MLP) and with the fusing layer alone (FC)."""
    calls = _count_inference_fast_paths(monkeypatch)
    model = _r18_with_random_statistics(selfy_integration=integration)
    pixel_values = clip(size=64)
    with torch.no_grad():
        logits = model(pixel_values).logits
    if torch.backends.mkldnn.is_available():
        assert calls["grouped"] == grouped_convs
    expected = copy.deepcopy(model).double()(pixel_values.double()).logits
    torch.testing.assert_close(logits.double(), expected.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="needs oneDNN with bf16",
)
def test_bf16_autocast_inference_runs_the_fused_ops_in_bf16(monkeypatch):
    calls = _count_inference_fast_paths(monkeypatch)
    model = _r18_with_random_statistics()
    pixel_values = clip(size=112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            logits = model(pixel_values).logits
        assert calls["onednn"] == calls["grouped"] == 4
        expected = model(pixel_values).logits  # autograd on: autocast's own convs and BNs
    assert calls["onednn"] == calls["grouped"] == 4
    assert logits.dtype == expected.dtype
    torch.testing.assert_close(logits.float(), expected.detach().float(), rtol=5e-2, atol=5e-2)


def test_flops_of_a_cpu_model_count_the_official_ops():
    """The inference-only paths stay out of `FlopCounterMode`, which would not count oneDNN's fused ops."""
    config = SelfyConfig.from_preset("selfynet-tsm-r18", num_labels=5)
    on_cpu = count_complexity(SelfyForVideoClassification(config), image_size=112)
    with torch.device("meta"):
        on_meta = count_complexity(SelfyForVideoClassification(config), image_size=112)
    assert on_cpu.gmacs == on_meta.gmacs


@pytest.mark.parametrize("extraction", ["conv", "mlp", "soft_argmax"])
@pytest.mark.parametrize("integration", ["conv", "mlp", "fc"])
def test_every_extraction_and_integration_trains(extraction, integration):
    model = tiny_model(selfy_extraction=extraction, selfy_integration=integration).train()
    out = model(clip(size=32), labels=torch.tensor([1, 2]))
    out.loss.backward()
    block = model.selfy.selfy_blocks["layer2"]
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("size", [64, 60, 120])
def test_official_downsample_upsample_restores_even_and_odd_sizes(size):
    model = tiny_model(selfy_downsample=True)
    assert model(clip(batch=1, size=size)).logits.shape == (1, 5)


@pytest.mark.parametrize("offsets", [[0], [1], [-1, 0, 1], [-3, -2, -1, 0, 1, 2, 3], [2, -5]])
def test_any_temporal_offsets(offsets):
    model = tiny_model(selfy_temporal_offsets=offsets, selfy_window_size=5)
    assert model(clip(batch=1, size=32)).logits.shape == (1, 5)


def test_several_selfy_blocks():
    model = tiny_model(selfy_stages=[1, 3])
    assert sorted(model.selfy.selfy_blocks) == ["layer1", "layer3"]
    out = model(clip(batch=1, size=32), output_hidden_states=True)
    assert len(out.hidden_states) == 7


def test_gradient_checkpointing_matches_a_plain_step_including_batchnorm_statistics():
    plain = tiny_model().train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    labels = torch.tensor([0, 3])
    block_runs = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        block_runs[name] = 0
        first_block = next(m for m in model.modules() if type(m).__name__ == "SelfyBasicBlock")
        forward = first_block.forward

        def counted(x, name=name, forward=forward):  # forward hooks do not fire in checkpoint recomputation
            block_runs[name] += 1
            return forward(x)

        first_block.forward = counted
        torch.manual_seed(7)
        model(clip(), labels=labels).loss.backward()
    assert block_runs == {
        "plain": 1,
        "checkpointed": 2,
    }  # checkpointing is on: the block ran again in backward
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bf16_autocast_on_cpu_runs():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(clip()).logits
    assert torch.isfinite(logits.float()).all()


def test_fp32_training_gradients_match_float64():
    """A float32 training step gives the gradients of a float64 one to ~1e-5 of each tensor's scale: no fast path
    trades accuracy (CPU channels-last batch norm, tried for the extraction, was off by up to 9e-2 here)."""
    model = tiny_model().train()
    model.selfy.selfy_blocks["layer2"].integrator.project.bn.weight.data.fill_(
        1.0
    )  # the block's output counts
    model.dropout.p = 0.0
    reference = copy.deepcopy(model).double()
    pixel_values, labels = clip(size=32), torch.tensor([1, 3])
    model(pixel_values, labels=labels).loss.backward()
    reference(pixel_values.double(), labels=labels).loss.backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        error = (ours.grad.double() - theirs.grad).abs().max() / theirs.grad.abs().max().clamp_min(1e-12)
        assert error < 1e-3, f"{name}: relative error {error:.1e}"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_training_linear_through_onednn_matches_f_linear():
    """The extraction's last layer trains through oneDNN's matrix product in eager fp32 and through `F.linear`
    under autocast; both give `F.linear`'s output and gradients."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(72, 300, generator=generator).t().requires_grad_()  # a non-contiguous view
    weight = torch.randn(16, 72, generator=generator, requires_grad=True)
    upstream = torch.randn(300, 16, generator=generator)
    ours = modeling_selfy._linear(x, weight, None)
    assert type(ours.grad_fn).__name__ == "_OneDnnLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(modeling_selfy._linear(x, weight, None).grad_fn).__name__ != "_OneDnnLinearBackward"
    theirs = F.linear(x, weight)
    for a, b in zip(
        (ours, *torch.autograd.grad(ours, [x, weight], upstream)),
        (theirs, *torch.autograd.grad(theirs, [x, weight], upstream)),
    ):
        torch.testing.assert_close(a, b)


def test_cpu_autocast_training_runs_the_first_three_extraction_convs_in_fp32():
    """Under CPU autocast with autograd on, the first extraction conv (small matrix products) and the stride-2 ones
    (their low-precision backward is the slower one there) opt out to fp32; the last follows autocast, and a
    training step gives finite gradients."""
    model = tiny_model().train()
    layers = model.selfy.selfy_blocks["layer2"].extractor.layers
    maps = torch.rand(10, 1, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = []
        for layer in layers:
            maps = layer.forward_planar(maps)
            dtypes.append(maps.dtype)
        loss = model(clip(size=32), labels=torch.tensor([1, 3])).loss
    assert [conv.stride[-1] for conv in (layer.conv for layer in layers)] == [1, 2, 2, 1]
    assert dtypes == [torch.float32, torch.float32, torch.float32, torch.bfloat16]
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rows_batch_norm_is_pytorch_batch_norm(momentum):
    """The extraction's channels-last batch norm: output, gradients and running statistics (also the cumulative
    average of `momentum=None`) of PyTorch's, over two training steps, in float64."""
    generator = torch.Generator().manual_seed(0)
    ours, theirs = (torch.nn.BatchNorm1d(6, momentum=momentum).double() for _ in range(2))
    for step in range(2):
        rows = (torch.randn(50, 6, generator=generator, dtype=torch.float64) * 3 + step).requires_grad_()
        upstream = torch.randn(50, 6, generator=generator, dtype=torch.float64)
        results = []
        for norm, function in [
            (ours, lambda x: modeling_selfy._rows_batch_norm(x, ours, activation=False)),
            (theirs, theirs),
        ]:
            out = function(rows)
            results.append((out, *torch.autograd.grad(out, [rows, norm.weight, norm.bias], upstream)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
        for a, b in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [112, 57])
def test_stem_max_pool_gives_pytorch_maxima_and_gradients_bit_for_bit(size):
    """The stem pools NCHW maps channels-last (eager CPU): the same maxima, and the gradient at the same positions
    where a window holds several equal maxima (the ReLU's zeros), NCHW in and out; graphs keep PyTorch's op."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, size, size, generator=generator).relu().requires_grad_()
    out_size = (size - 1) // 2 + 1
    upstream = torch.randn(3, 16, out_size, out_size, generator=generator)
    pool = modeling_selfy.SelfyMaxPool2d()
    ours, theirs = pool(x), F.max_pool2d(x, 3, 2, 1)
    assert type(ours.grad_fn).__name__ == "_ChannelsLastMaxPoolBackward"
    assert ours.is_contiguous() and torch.equal(ours, theirs)
    grads = [torch.autograd.grad(out, x, upstream)[0] for out in (ours, theirs)]
    assert grads[0].is_contiguous() and torch.equal(*grads)
    exported = torch.export.export(pool, (x.detach(),))
    assert "aten.max_pool2d" in str(exported.graph) and "PythonOp" not in str(exported.graph)
    assert torch.equal(exported.module()(x.detach()), theirs.detach())


@pytest.mark.parametrize("size, channels", [(9, (4, 16)), (5, (16, 64)), (6, (3, 5))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_map_conv_input_gradient_matches_autograd(size, channels, channels_last, dtype):
    """The stride-2 extraction convs with their input gradient computed row by row give PyTorch's values and
    gradients, in the input's memory layout."""
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, channels[0], size, size, generator=generator).to(dtype, memory_format=memory_format)
    weight = torch.randn(channels[1], channels[0], 3, 3, generator=generator).to(dtype)
    x.requires_grad_(), weight.requires_grad_()
    out_size = (size - 1) // 2 + 1
    upstream = torch.randn(6, channels[1], out_size, out_size, generator=generator).to(dtype)
    results = []
    for function in (
        lambda x, weight, stride, padding: _SmallMapConv2d.apply(x, weight, None, stride, padding),
        lambda x, weight, stride, padding: F.conv2d(x, weight, None, 2, 1),
    ):
        out = function(x, weight, 2, 1)
        results.append((out, *torch.autograd.grad(out, [x, weight], upstream)))
    assert results[0][1].is_contiguous(memory_format=memory_format)
    tolerance = {"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **tolerance)


@pytest.mark.parametrize(
    "channels_last, stride, padding", [(False, 1, 1), (True, 1, 1), (True, 2, 1), (False, 2, 0), (True, 1, 2)]
)
def test_conv_operator_gathered_from_the_weight_is_the_conv_and_sends_gradients_back(
    channels_last, stride, padding
):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    in_shape = torch.Size((3, 5, 5))
    operator = modeling_selfy._conv_operator(weight, in_shape, stride, padding, channels_last, channels_last)
    maps = torch.randn(4, *in_shape, dtype=torch.float64, generator=generator)
    flat = modeling_selfy._flat_maps
    expected = flat(F.conv2d(maps, weight, None, stride, padding), channels_last)
    torch.testing.assert_close(flat(maps, channels_last) @ operator, expected)
    upstream = torch.randn(operator.shape, dtype=torch.float64, generator=generator)
    # the definition: the conv of each unit map, differentiated by autograd
    basis = modeling_selfy._unflat_maps(torch.eye(75, dtype=torch.float64), (75, *in_shape), channels_last)
    defined = flat(F.conv2d(basis, weight, None, stride, padding), channels_last)
    expected_grad = torch.autograd.grad(defined, weight, upstream)[0]
    torch.testing.assert_close(torch.autograd.grad(operator, weight, upstream)[0], expected_grad)
    layout = (in_shape, stride, padding, channels_last, channels_last, weight.device)
    index = modeling_selfy._operator_index(weight.shape, *layout)[0]
    torch.testing.assert_close(modeling_selfy._weight_entries_grad(upstream, index, weight), expected_grad)


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(9, 3, 1, 1), (9, 3, 2, 1), (6, 3, 2, 1), (5, 3, 2, 0), (7, 1, 2, 0), (5, 3, 1, 2)],
)
def test_input_gradient_by_rows_is_conv_input_gradient(size, kernel, stride, padding):
    """The row-by-row input gradient equals PyTorch's conv input gradient in float64, where kernel rows share input
    rows (stride 1), skip some (stride 2) or reach none (a 1x1 kernel at stride 2 leaves odd rows at zero)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, size, size, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 3, kernel, kernel, generator=generator, dtype=torch.float64)
    out = F.conv2d(x, weight, None, stride, padding)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    expected = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]
    ours = modeling_selfy._input_gradient_by_rows(grad, weight, x.shape[1:], stride, padding)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, expected)


def _assert_planar_training_matches_official(
    layer: torch.nn.Module, inputs: list[torch.Tensor], method: str = "forward_planar"
) -> None:
    """One training step per input through `layer.forward_planar` (or `method`) against the official Conv3d + BN3d
    (+ ReLU) on a copy: channels-last output, output and gradients (input, conv weight, BN affine), then the running
    statistics."""
    official = copy.deepcopy(layer).train()
    layer.train()
    for x in inputs:
        x = x.requires_grad_()
        out = getattr(layer, method)(x)
        expected = official.bn(official.conv(x.unsqueeze(2))).squeeze(2)
        expected = F.relu(expected) if layer.activation else expected
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected)
        upstream = torch.randn_like(out)
        ours = torch.autograd.grad(out, [x, *layer.parameters()], upstream)
        theirs = torch.autograd.grad(expected, [x, *official.parameters()], upstream)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    for a, b in zip(layer.buffers(), official.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size, stride, padding", [(9, 1, 1), (7, 2, 1), (5, 1, 0)])
@pytest.mark.parametrize("activation", [True, False])
def test_dense_conv_batch_norm_is_conv_batch_norm_relu(size, stride, padding, activation):
    """The first extraction layer's conv + BN (batch statistics) + ReLU through the dense operator, with the BN's
    statistics and every gradient computed from input moments, gives PyTorch's conv, batch norm and ReLU: output,
    statistics, gradients (input, weight, BN affine) in float64, with the running statistics over two steps."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(
        modeling_selfy._conv1x3x3(1, 4, stride, padding), 4, activation=activation
    ).double()
    _randomise_batch_norms(layer)
    inputs = [torch.randn(40, 1, size, size, dtype=torch.float64) * 0.3 + 0.5 + step for step in range(2)]
    _assert_planar_training_matches_official(layer, inputs)


@pytest.mark.parametrize("size, channels", [(9, (4, 16)), (5, (16, 64)), (6, (3, 5))])
def test_centred_conv_batch_norm_is_conv_batch_norm_relu(size, channels):
    """The stride-2 extraction layers in training over channels-last maps: the conv subtracts the batch mean it
    computes from the input, the rows batch norm skips its own; output, gradients (input, weight, BN affine) and
    running statistics over two steps are PyTorch's conv + batch norm + ReLU in float64."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(
        modeling_selfy._conv1x3x3(*channels, stride=2), channels[1]
    ).double()
    _randomise_batch_norms(layer)
    inputs = [torch.rand(30, channels[0], size, size, dtype=torch.float64) + step for step in range(2)]
    _assert_planar_training_matches_official(
        layer, [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    )


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels, size, padding", [((64, 64), 3, 1), ((320, 64), 3, 1), ((6, 5), 1, 0)])
def test_centred_channels_last_conv_is_conv_batch_norm_relu(channels, size, padding, momentum):
    """The integration's layers in CPU training (`forward_centred`: the 2D conv over channels-last maps subtracts
    its output's batch mean, PyTorch's channels-last batch norm follows): output, gradients (input, weight, BN
    affine) and running statistics over two steps are PyTorch's Conv3d + BatchNorm3d + ReLU in float64."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(
        modeling_selfy._conv1x3x3(*channels, padding=padding, size=size), channels[1]
    ).double()
    layer.bn.momentum = momentum
    _randomise_batch_norms(layer)
    inputs = [torch.rand(12, channels[0], 7, 7, dtype=torch.float64) + step for step in range(2)]
    _assert_planar_training_matches_official(
        layer, [x.contiguous(memory_format=torch.channels_last) for x in inputs], "forward_centred"
    )


def test_centred_channels_last_conv_float32_is_as_accurate_as_pytorch_nchw():
    """In float32, with conv outputs hundreds of standard deviations from zero, the centred layer's output and
    gradients stay within ~3.5e-6 of float64 (PyTorch's NCHW conv + batch norm: ~1e-6, its conv weight gradient
    8e-6; its channels-last batch norm without the centring: output 2e-5, conv weight gradient 1.2e-4). No ReLU:
    its mask flips at pre-activations within rounding of zero in either implementation."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(modeling_selfy._conv1x3x3(64, 64), 64, activation=False).train()
    with torch.no_grad():
        layer.conv.weight.abs_()  # positive weights over positive inputs: a mean of many standard deviations
    x64 = torch.rand(40, 64, 14, 14, dtype=torch.float64) * 0.005 + 1
    upstream = torch.randn(40, 64, 14, 14, dtype=torch.float64)

    def run(module, x, centred):
        x = x.detach().requires_grad_()
        out = module.forward_centred(x) if centred else module.bn(module.conv(x.unsqueeze(2))).squeeze(2)
        return [out, *torch.autograd.grad(out, [x, *module.parameters()], upstream.to(x.dtype))]

    reference = run(copy.deepcopy(layer).double(), x64, centred=False)
    ours = run(copy.deepcopy(layer), x64.float().contiguous(memory_format=torch.channels_last), centred=True)
    pytorch = run(copy.deepcopy(layer), x64.float(), centred=False)

    def errors(results):
        return [
            ((t.double() - exact).abs().max() / exact.abs().max()).item()
            for t, exact in zip(results, reference)
        ]

    for ours_error, pytorch_error in zip(errors(ours), errors(pytorch)):
        assert ours_error <= max(4 * pytorch_error, 5e-6)


def test_training_integrator_channels_last_is_the_official_ncdhw_ops():
    """CPU training of the integration channels-last (`_train_channels_last`: the per-offset layers over every
    offset's maps as one batch, the fusing conv over the offsets' channels, each through `forward_centred`) gives
    the output, gradients and running statistics of the official 5D ops (float64, two steps)."""
    torch.manual_seed(0)
    ours = StssIntegrator(SelfyConfig.from_preset("selfynet-tsm-r18"), 8).double().train()
    _randomise_batch_norms(ours)
    official = copy.deepcopy(ours)
    official._trains_channels_last = lambda features: False
    for _ in range(2):
        features = torch.randn(2, 4, 7, 7, 5, 64, dtype=torch.float64, requires_grad=True)
        residual = torch.randn(8, 8, 14, 14, dtype=torch.float64, requires_grad=True)
        assert ours._trains_channels_last(features)
        out, expected = ours(features, residual), official(features, residual)
        torch.testing.assert_close(out, expected)
        upstream = torch.randn_like(out)
        for a, b in zip(
            torch.autograd.grad(out, [features, residual, *ours.parameters()], upstream),
            torch.autograd.grad(expected, [features, residual, *official.parameters()], upstream),
        ):
            torch.testing.assert_close(a, b)
    for a, b in zip(ours.buffers(), official.buffers()):
        torch.testing.assert_close(a, b)


def test_integrator_trains_channels_last_only_on_batch_statistics_in_fp32_or_fp64():
    integrator = StssIntegrator(SelfyConfig.from_preset("selfynet-tsm-r18"), 8)
    features = torch.randn(1, 2, 7, 7, 5, 64)
    assert integrator.train()._trains_channels_last(features)
    assert integrator._trains_channels_last(features.double())
    assert not integrator._trains_channels_last(features.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not integrator._trains_channels_last(features)
    assert not integrator.eval()._trains_channels_last(features)  # running statistics: the official ops


@pytest.mark.parametrize("stride, padding", [(2, 1), (1, 1), (2, 0), (1, 2)])
def test_conv_output_mean_is_the_mean_of_the_conv_output(stride, padding):
    x = torch.randn(7, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    expected = F.conv2d(x, weight, None, stride, padding).mean((0, 2, 3))
    torch.testing.assert_close(modeling_selfy._conv_output_mean(x, weight, stride, padding), expected)


def test_centred_conv_batch_norm_float32_is_as_accurate_as_pytorch():
    """In float32, over post-ReLU maps whose conv outputs sit far from zero, the mean computed from the input and
    subtracted by the conv leaves the layer's output, input gradient and conv weight gradient as close to float64
    as PyTorch's conv + batch norm, and the BN's weight and bias gradients (PyTorch's rows backward sums them
    sequentially) within the error of PyTorch's own least accurate gradient of the layer (no ReLU: its mask flips
    at pre-activations within rounding of zero in either implementation)."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(modeling_selfy._conv1x3x3(16, 64, stride=2), 64, activation=False)
    with torch.no_grad():
        layer.conv.weight.abs_()  # positive weights over positive inputs: a mean of many standard deviations
    layer.train()
    x64 = (torch.rand(2000, 16, 5, 5, dtype=torch.float64) * 0.1 + 1).contiguous(
        memory_format=torch.channels_last
    )
    x64.requires_grad_()
    upstream = torch.randn(2000, 64, 3, 3, dtype=torch.float64)

    def run(module, x, planar):
        out = module.forward_planar(x) if planar else module.bn(module.conv(x.unsqueeze(2))).squeeze(2)
        return [out, *torch.autograd.grad(out, [x, *module.parameters()], upstream.to(x.dtype))]

    reference = run(copy.deepcopy(layer).double(), x64, planar=False)
    x32 = x64.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
    ours, pytorch = run(copy.deepcopy(layer), x32, True), run(copy.deepcopy(layer), x32, False)

    def errors(results):
        return [
            ((t.double() - exact).abs().max() / exact.abs().max()).item()
            for t, exact in zip(results, reference)
        ]

    ours, pytorch = errors(ours), errors(pytorch)
    for error, pytorch_error in zip(ours[:3], pytorch[:3]):  # output, input and conv weight gradients
        assert error <= max(2 * pytorch_error, 1e-6)
    assert max(ours[3:]) <= max(pytorch)  # BN weight and bias gradients


def test_bfloat16_first_extraction_layer_trains_through_the_input_gradient_path_alone():
    """A bf16 model's first extraction layer keeps PyTorch's batch norm (moment-based statistics need fp32) and
    still gives PyTorch's conv + BN + ReLU."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(modeling_selfy._conv1x3x3(1, 4), 4).to(torch.bfloat16).train()
    assert modeling_selfy._small_map_conv(torch.zeros(2, 1, 9, 9, dtype=torch.bfloat16), layer.conv) is False
    official = copy.deepcopy(layer)
    x = torch.rand(20, 1, 9, 9).to(torch.bfloat16).requires_grad_()
    out = layer.forward_planar(x)
    expected = F.relu(official.bn(official.conv(x.unsqueeze(2))).squeeze(2))
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=5e-2)
    upstream = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, [x, *layer.parameters()], upstream),
        torch.autograd.grad(expected, [x, *official.parameters()], upstream),
    ):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=1e-1)


def test_dense_conv_batch_norm_float32_is_as_accurate_as_pytorch():
    """In float32, on similarity-like maps (values near 1, a small spread: the BN's mean is ~70 standard deviations
    from zero), the moment-based statistics and gradients stay as close to float64 as PyTorch's conv + batch norm.
    Without the ReLU: its mask flips wherever a pre-activation within rounding of zero does, in either
    implementation, which says nothing of the formulation."""
    torch.manual_seed(0)
    layer = modeling_selfy.SelfyConvNormAct(modeling_selfy._conv1x3x3(1, 4), 4, activation=False).train()
    x64 = (1 - torch.rand(3000, 1, 9, 9, dtype=torch.float64) * 0.05).requires_grad_()
    upstream = torch.randn(3000, 4, 9, 9, dtype=torch.float64)

    def run(module, x, planar):
        out = module.forward_planar(x) if planar else module.bn(module.conv(x.unsqueeze(2))).squeeze(2)
        return [out, *torch.autograd.grad(out, [x, *module.parameters()], upstream.to(x.dtype))]

    reference = run(copy.deepcopy(layer).double(), x64, planar=False)
    x32 = x64.detach().float().requires_grad_()
    ours, pytorch = run(copy.deepcopy(layer), x32, True), run(copy.deepcopy(layer), x32, False)
    for mine, theirs, exact in zip(ours, pytorch, reference):
        error, pytorch_error = ((t.double() - exact).abs().max() / exact.abs().max() for t in (mine, theirs))
        assert error <= max(2 * pytorch_error, 1e-6)


def test_rows_batch_norm_over_wide_rows_matches_batch_norm():
    """`_RowsBatchNorm` over rows of 4 or 16 channels (processed as rows of 64) and of 24 (as they are) gives
    PyTorch's batch norm: output, statistics and gradients."""
    generator = torch.Generator().manual_seed(0)
    for rows, channels in [(48, 4), (20, 16), (30, 24), (7, 4)]:
        x = (torch.randn(rows, channels, generator=generator, dtype=torch.float64) * 3 + 1).requires_grad_()
        weight = torch.rand(channels, generator=generator, dtype=torch.float64).requires_grad_()
        bias = torch.randn(channels, generator=generator, dtype=torch.float64).requires_grad_()
        upstream = torch.randn(rows, channels, generator=generator, dtype=torch.float64)
        out, mean, var = modeling_selfy._RowsBatchNorm.apply(x, weight, bias, 1e-5, None)
        theirs = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
        torch.testing.assert_close(out, theirs)
        torch.testing.assert_close(mean, x.mean(0))
        torch.testing.assert_close(var, x.var(0, correction=0))
        ours_grads = torch.autograd.grad(out, [x, weight, bias], upstream)
        for ours, reference in zip(ours_grads, torch.autograd.grad(theirs, [x, weight, bias], upstream)):
            torch.testing.assert_close(ours, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_cpu(dtype):
    model = tiny_model()
    with torch.no_grad():
        expected = model(clip()).logits
        with torch.autocast("cuda", dtype=dtype):
            logits = model.cuda()(clip().cuda()).logits
    torch.testing.assert_close(logits.float().cpu(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_matches_cpu(monkeypatch):
    """Training mode on CUDA (batch statistics, the extraction's layout switches) gives the CPU's loss, gradients
    and running statistics: fp32 without TF32 and no dropout, so that only summation order differs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_model(classifier_dropout=0.0).train()
        _randomise_batch_norms(model)
        model.to(device)
        loss = model(clip().to(device), labels=torch.tensor([1, 3], device=device)).loss
        loss.backward()
        results.append(
            {"loss": loss.detach()}
            | {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            | {name: b for name, b in model.named_buffers() if b.is_floating_point()}
        )
    cpu, cuda = results
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(
            cuda[name].cpu(), cpu[name], rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def _meta_model(preset: str, **overrides) -> SelfyForVideoClassification:
    with torch.device("meta"):
        return SelfyForVideoClassification(SelfyConfig.from_preset(preset, num_labels=174, **overrides))


@pytest.mark.parametrize(
    ("preset", "gmacs"),
    [("tsm-r18", 14.51), ("selfynet-tsm-r18", 16.98), ("tsm-r50", 32.70), ("selfynet-tsm-r50", 35.91)],
)
def test_macs_match_the_authors_code_at_8x224(preset, gmacs):
    report = count_complexity(_meta_model(preset))
    assert report.gmacs == pytest.approx(gmacs, rel=0.01)


def test_table_4a_offsets_step_by_about_half_a_gmac():
    counts = [
        count_complexity(_meta_model("selfynet-tsm-r18", selfy_temporal_offsets=list(range(-d, d + 1)))).gmacs
        for d in (0, 1, 2, 3)
    ]
    steps = [(b - a) / 2 for a, b in zip(counts, counts[1:])]
    assert all(0.4 < step < 0.55 for step in steps), steps
    one = count_complexity(_meta_model("selfynet-tsm-r18", selfy_temporal_offsets=[1])).gmacs
    assert one == pytest.approx(counts[0])


def test_save_and_load_with_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "model.safetensors",
        "config.json",
        "modeling_selfy.py",
        "configuration_selfy.py",
        "stss.py",
    } <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForVideoClassification"] == "modeling_selfy.SelfyForVideoClassification"
    reloaded = AutoModelForVideoClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, SelfyForVideoClassification)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(clip()).logits, model(clip()).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SelfyModel)


def test_new_label_set_with_ignore_mismatched_sizes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = SelfyForVideoClassification.from_pretrained(
        tmp_path,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
        ignore_mismatched_sizes=True,
    )
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "c"


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys
    # A fresh environment without selfy_hf: drop every sys.path entry that could provide it.
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "selfy_hf"))]
    assert importlib.util.find_spec("selfy_hf") is None
    import torch
    from transformers import AutoModelForVideoClassification
    model = AutoModelForVideoClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    torch.save(logits, sys.argv[3])
    """
)


def test_saved_directory_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    torch.save(clip(), tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_CODE_SCRIPT,
            str(model_dir),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(clip()).logits)
