import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_modeling import _randomise_batch_norms

from selfy_hf import SelfyConfig, SelfyForVideoClassification, native_extraction
from selfy_hf.modeling_selfy import SelfyBlock, StssExtractor
from selfy_hf.native_extraction import ExtractionKernel, extraction_kernel, supports_geometry
from selfy_hf.stss import l2_normalize, stss_reference

OFFICIAL = (9, (4, 16, 64, 64))


def _avx512_cpu() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _kernel_or_skip(window: int, channels: tuple[int, ...], hidden: int | None = None) -> ExtractionKernel:
    kernel = extraction_kernel(window, channels, hidden)
    if kernel is None:
        pytest.skip(
            "the native extraction kernel cannot be built here (needs a C compiler, OpenMP and AVX-512)"
        )
    return kernel


def _randomised_extractor(window: int, channels: tuple[int, ...]) -> StssExtractor:
    torch.manual_seed(0)
    config = SelfyConfig.from_preset(
        "selfynet-tsm-r18", selfy_window_size=window, selfy_extraction_channels=list(channels)
    )
    extractor = StssExtractor(config)
    _randomise_batch_norms(extractor)
    return extractor.eval()


def _official_features(extractor: StssExtractor, similarity: torch.Tensor) -> torch.Tensor:
    """The official Conv3d + BN3d + ReLU stack in float64 over each position's (L, U, V) volume."""
    official = copy.deepcopy(extractor).double()
    batch, frames, height, width, offsets, window = similarity.shape[:6]
    volumes = similarity.double().reshape(-1, 1, offsets, window, window)
    for layer in official.layers:
        volumes = F.relu(layer.bn(layer.conv(volumes)))
    return volumes.reshape(batch, frames, height, width, -1, offsets).transpose(-1, -2)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's calls: `"windows"` (`__call__`) or `"features"` (`from_features`)."""
    calls = []
    for name, kind in [("__call__", "windows"), ("from_features", "features")]:
        original = getattr(ExtractionKernel, name)

        def counted(self, *args, original=original, kind=kind, **kwargs):
            calls.append(kind)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ExtractionKernel, name, counted)
    return calls


def test_kernel_builds_on_an_avx512_cpu_with_a_compiler():
    """Where the kernel's requirements are met it must build: a compile error must not pass as a skip."""
    if not (_avx512_cpu() and shutil.which("cc")):
        pytest.skip("no AVX-512 CPU or no C compiler")
    assert extraction_kernel(*OFFICIAL) is not None


@pytest.mark.parametrize(
    "window, channels, shape",
    [
        (9, (4, 16, 64, 64), (1, 2, 3, 5, 5)),  # official; 150 windows: a partial last tile of 16
        (5, (4, 16, 32, 32), (2, 2, 3, 3, 1)),  # the tiny presets' geometry
        (
            7,
            (2, 32, 16, 48),
            (1, 1, 2, 2, 3),
        ),  # every register blocking (4, 2 and 1 vectors), fewer windows than a tile
    ],
)
def test_kernel_is_the_official_extraction(window, channels, shape, kernel_calls):
    """The fused kernel, through the eval-mode extractor, computes the official conv stack (BN with running statistics
    far from the identity), at 1 and 2 threads alike."""
    _kernel_or_skip(window, channels)
    extractor = _randomised_extractor(window, channels)
    similarity = torch.rand(*shape, window, window) * 2 - 1
    expected = _official_features(extractor, similarity)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            outputs = []
            for count in (1, 2):
                torch.set_num_threads(count)
                outputs.append(extractor(similarity))
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls == ["windows", "windows"]
    torch.testing.assert_close(outputs[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[0], outputs[1])


def test_model_inference_is_the_same_with_and_without_the_kernel(monkeypatch, kernel_calls):
    _kernel_or_skip(5, (4, 16, 32, 32))
    torch.manual_seed(0)
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny", num_labels=5)).eval()
    pixel_values = torch.randn(2, 8, 3, 48, 48)
    with torch.no_grad():
        fused = model(pixel_values).logits
        assert kernel_calls == ["features"]
        monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "0")
        unfused = model(pixel_values).logits
    assert kernel_calls == ["features"]
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_kernel_runs_only_in_eager_fp32_inference(kernel_calls):
    """Training, autograd, float64, autocast and graph capture keep the PyTorch ops (the kernel has no backward and
    computes in fp32)."""
    _kernel_or_skip(*OFFICIAL)
    extractor = _randomised_extractor(*OFFICIAL)
    similarity = torch.rand(1, 1, 2, 2, 5, 9, 9)
    extractor(similarity)  # autograd on
    with torch.no_grad():
        extractor.double()(similarity.double())
        extractor.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            extractor(similarity)
        extractor.train()(similarity)
    extractor.eval()
    torch.jit.trace(extractor, (similarity,), check_trace=False)
    assert kernel_calls == []


def test_kernel_build_is_reused_across_processes(tmp_path, monkeypatch):
    """A second build of the same geometry for the same CPU and compiler loads the cached library, compiling
    nothing; another geometry gets its own."""
    _kernel_or_skip(5, (4, 16, 32, 32), 32)
    first = native_extraction._build(5, (4, 16, 32, 32), 32, tmp_path, "cc")
    monkeypatch.setattr(
        native_extraction.subprocess, "run", lambda *args, **kwargs: pytest.fail("recompiled")
    )
    assert native_extraction._build(5, (4, 16, 32, 32), 32, tmp_path, "cc") == first
    assert sorted(path.name for path in tmp_path.iterdir()) == [first.name]  # no scratch files left
    monkeypatch.undo()
    assert native_extraction._build(5, (4, 16, 32, 32), None, tmp_path, "cc") != first


def test_without_a_compiler_the_pytorch_ops_run(tmp_path, monkeypatch, kernel_calls):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SELFY_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert extraction_kernel(*OFFICIAL) is None
    extractor = _randomised_extractor(*OFFICIAL)
    similarity = torch.rand(1, 1, 2, 3, 5, 9, 9)
    with torch.no_grad():
        features = extractor(similarity)
    assert kernel_calls == []
    torch.testing.assert_close(
        features.double(), _official_features(extractor, similarity), rtol=1e-5, atol=1e-5
    )


def test_kernel_is_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "0")
    assert extraction_kernel(*OFFICIAL) is None


def test_geometries_the_kernel_does_not_cover():
    assert supports_geometry(*OFFICIAL)
    assert not supports_geometry(9, (4, 8, 64, 64))  # output widths in whole 16-float vectors
    assert not supports_geometry(9, (4, 16, 64))  # four layers
    assert not supports_geometry(41, (4, 16, 64, 64))  # a tile's intermediates over 1 MB
    assert extraction_kernel(9, (4, 8, 64, 64)) is None


def test_kernel_rejects_windows_of_another_shape_or_dtype():
    kernel = _kernel_or_skip(*OFFICIAL)
    with pytest.raises(ValueError, match=r"\(N, 81\) fp32 CPU windows"):
        kernel(torch.zeros(3, 49), [])
    with pytest.raises(ValueError, match=r"\(N, 81\) fp32 CPU windows"):
        kernel(torch.zeros(3, 81, dtype=torch.float64), [])
    with pytest.raises(ValueError, match="built without the similarities"):
        kernel.from_features(torch.zeros(2, 3, 3, 128), 2, [0], [], 1e-6)


def test_kernel_checks_the_weights_it_reads():
    """The C code reads as many values as the geometry says: weights of another size or dtype are refused."""
    kernel = _kernel_or_skip(*OFFICIAL)
    extractor = _randomised_extractor(*OFFICIAL)
    weights = [
        kernel.pack(*layer._folded(layer.conv.weight.squeeze(2)), index == 0)
        for index, layer in enumerate(extractor.layers)
    ]
    windows = torch.rand(20, 81)
    assert kernel(windows, weights).shape == (20, 64)
    for broken, message in [
        (
            [weights[0], weights[1], weights[2], (weights[3][0][:-1], weights[3][1])],
            "layer 3: expected 36864",
        ),
        ([(weights[0][0].double(), weights[0][1]), *weights[1:]], "layer 0: expected 36 contiguous fp32"),
        ([weights[0], (weights[1][0].transpose(0, 1), weights[1][1]), *weights[2:]], "layer 1"),
        ([weights[0], (weights[1][0], weights[1][1][:8]), *weights[2:]], "layer 1: expected 16"),
    ]:
        with pytest.raises(ValueError, match=message):
            kernel(windows, broken)


def test_kernel_rejects_features_of_another_shape():
    kernel = _kernel_or_skip(*OFFICIAL, 128)
    with pytest.raises(ValueError, match="128 channels and whole clips of 4 frames"):
        kernel.from_features(torch.zeros(6, 3, 3, 128), 4, [0], [], 1e-6)
    with pytest.raises(ValueError, match="128 channels"):
        kernel.from_features(torch.zeros(4, 3, 3, 64), 4, [0], [], 1e-6)
    with pytest.raises(ValueError, match=r"\(B\*T, H, W, C\) fp32 CPU features"):
        kernel.from_features(torch.zeros(4, 9, 128), 4, [0], [], 1e-6)
    with pytest.raises(ValueError, match="four layers"):
        kernel.from_features(torch.zeros(4, 3, 3, 128), 4, [0], [], 1e-6)


def _randomised_block(**overrides) -> SelfyBlock:
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tsm-r18", **overrides)
    block = SelfyBlock(config, 16)
    _randomise_batch_norms(block)
    return block.eval()


@pytest.mark.parametrize(
    "overrides, clips, size",
    [
        ({}, 2, 28),  # official R18 block; tiles cross frames and clips
        (
            {"num_frames": 3, "selfy_temporal_offsets": [-2, 0, 1, 2]},
            3,
            13,
        ),  # neighbours beyond the clip, an odd map
        ({"selfy_window_size": 5, "selfy_hidden_size": 32, "selfy_similarity": "dot"}, 1, 10),
        (
            {
                "selfy_downsample": False,
                "selfy_hidden_size": 16,
                "num_frames": 3,
                "selfy_temporal_offsets": [1],
            },
            2,
            3,
        ),
    ],
)
def test_fused_similarities_are_the_official_stss_and_extraction(overrides, clips, size, kernel_calls):
    """Inference of the block through the kernel's `from_features` (the similarities computed inside it) gives the
    features of the official STSS (`stss_reference`, float64) through the official Conv3d stack, and the block's
    output with the kernels off."""
    block = _randomised_block(**overrides)
    config, extractor = block.transform.correlation, block.extractor
    _kernel_or_skip(
        config.window,
        tuple(layer.conv.out_channels for layer in extractor.layers),
        extractor.correlation_channels,
    )
    x = torch.randn(clips * config.num_frames, 16, size, size)
    with torch.no_grad():
        fused = block._fused_features(x)
        out = block(x)
        assert kernel_calls == ["features", "features"]
        projected = block.transform.downsample(x).double()
        clips_of = projected.unflatten(0, (clips, config.num_frames))
        if config.normalize:
            clips_of = l2_normalize(clips_of, dim=2, eps=config.eps)
        similarity = stss_reference(clips_of, config.temporal_offsets, config.window)
        expected = _official_features(block.extractor, similarity)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SELFY_HF_NATIVE_KERNELS", "0")
            unfused = block(x)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, unfused, rtol=1e-5, atol=1e-5)


def test_hooks_on_the_transform_see_the_similarities(kernel_calls):
    """The fused path would bypass the transform: while a hook watches it (as the STSS visualisation does), the
    block computes the similarities, and only the extraction runs in the kernel."""
    _kernel_or_skip(*OFFICIAL, 128)
    block = _randomised_block()
    seen = []
    handle = block.transform.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(8, 16, 28, 28)
    with torch.no_grad():
        watched = block(x)
        handle.remove()
        fused = block(x)
    assert seen == [(1, 8, 14, 14, 5, 9, 9)]
    assert kernel_calls == ["windows", "features"]
    torch.testing.assert_close(watched, fused, rtol=1e-5, atol=1e-5)
