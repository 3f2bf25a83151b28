import shutil

import pytest
import torch
import torch.nn.functional as F
from test_modeling import _randomise_batch_norms
from test_native_extraction import _avx512_cpu

from selfy_hf import SelfyConfig, modeling_selfy
from selfy_hf.modeling_selfy import SelfyBlock
from selfy_hf.native_winograd import WinogradKernel, supports_channels, winograd_kernel


def _kernel_or_skip() -> WinogradKernel:
    kernel = winograd_kernel()
    if kernel is None:
        pytest.skip("the Winograd conv kernel cannot be built here (needs a C compiler, OpenMP and AVX-512)")
    return kernel


@pytest.fixture
def winograd_calls(monkeypatch) -> list[int]:
    """The `stacks` of each kernel call."""
    calls = []
    original = WinogradKernel.__call__

    def counted(self, maps, weights, stacks=1, **kwargs):
        calls.append(stacks)
        return original(self, maps, weights, stacks=stacks, **kwargs)

    monkeypatch.setattr(WinogradKernel, "__call__", counted)
    return calls


def test_kernel_builds_on_an_avx512_cpu_with_a_compiler():
    """Where it can be built it must be: a compile error is not a skip."""
    if not (_avx512_cpu() and shutil.which("cc")):
        pytest.skip("needs AVX-512 and a C compiler")
    assert winograd_kernel() is not None


# (maps, stacks, C_in, C_out, height, width, ReLU): the integration's grouped layers and fusing conv over 14x14 maps;
# 2 and 1 vectors of output channels; odd, non-square and 1x1 maps; fewer blocks than one unit of work.
SHAPES = [
    (2, 5, 64, 64, 14, 14, True),
    (2, 1, 320, 64, 14, 14, True),
    (3, 2, 16, 32, 7, 7, False),
    (1, 3, 32, 48, 5, 8, True),
    (4, 1, 16, 16, 1, 1, True),
    (1, 1, 16, 16, 2, 3, False),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("maps", "stacks", "cin", "cout", "height", "width", "relu"), SHAPES)
def test_kernel_is_the_grouped_conv(maps, stacks, cin, cout, height, width, relu, threads):
    """Each stack of channels convolved (3x3, padding 1) with the same weights, + bias (+ ReLU), against float64."""
    kernel = _kernel_or_skip()
    torch.manual_seed(0)
    x = torch.randn(maps, stacks * cin, height, width).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5, torch.randn(cout)
    out = kernel(x, kernel.weights(weight, bias), stacks=stacks, relu=relu, threads=threads)
    expected = F.conv2d(
        x.double(),
        weight.double().repeat(stacks, 1, 1, 1),
        bias.double().repeat(stacks),
        padding=1,
        groups=stacks,
    )
    expected = F.relu(expected) if relu else expected
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * scale)


def test_nan_passes_through_the_relu():
    kernel = _kernel_or_skip()
    x = torch.randn(2, 16, 6, 6)
    x[1, 3, 2, 4] = float("nan")
    weight, bias = torch.randn(16, 16, 3, 3), torch.randn(16)
    out = kernel(x.contiguous(memory_format=torch.channels_last), kernel.weights(weight, bias))
    expected = F.relu(F.conv2d(x, weight, bias, padding=1))
    assert expected.isnan().any() and not out[expected.isnan()].isfinite().any()
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5)


def test_weights_are_the_winograd_transform():
    """G g G^T of each 3x3 kernel, laid out [position][input channel][output channel]."""
    weight = torch.randn(32, 16, 3, 3, dtype=torch.float64)
    transformed, bias = WinogradKernel.weights(weight, torch.zeros(32))
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    expected = torch.einsum("pa,oiab,qb->pqio", g, weight, g).reshape(16, 16, 32).float()
    torch.testing.assert_close(transformed, expected, rtol=0, atol=0)
    assert transformed.dtype == bias.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\)"):
        WinogradKernel.weights(torch.randn(32, 16, 5, 5), torch.zeros(32))


def test_kernel_checks_what_it_reads():
    """The C code reads as many values as the shapes say: anything else is refused before it runs."""
    kernel = _kernel_or_skip()
    weights = kernel.weights(torch.randn(32, 16, 3, 3), torch.randn(32))
    maps = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    for bad in [maps.contiguous(), maps.double(), maps[:, :16], maps.flatten(2)]:
        with pytest.raises(ValueError, match="channels-last fp32 CPU"):
            kernel(bad, weights, stacks=2)
    transformed, bias = weights
    bad_weights = [
        (transformed[:, :8].contiguous(), bias),
        (transformed, bias[:16]),
        (transformed.double(), bias),
    ]
    for bad in bad_weights:
        with pytest.raises(ValueError, match="transformed weights"):
            kernel(maps, bad, stacks=2)
    assert kernel(maps, weights, stacks=2).shape == (2, 64, 6, 6)


def test_channels_the_kernel_takes():
    assert supports_channels(64, 64) and supports_channels(320, 16)
    assert not supports_channels(64, 24) and not supports_channels(4, 16) and not supports_channels(0, 16)


def test_kernel_is_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "0")
    assert winograd_kernel() is None


def test_without_a_compiler_onednn_runs(tmp_path, monkeypatch, winograd_calls):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert winograd_kernel() is None
    block = _randomised_block()
    with torch.no_grad():
        block(torch.randn(8, 16, 28, 28))
    assert winograd_calls == []


def _randomised_block() -> SelfyBlock:
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tsm-r18", num_frames=8)
    block = SelfyBlock(config, 16)
    _randomise_batch_norms(block)
    return block.eval()


def test_block_inference_is_the_same_with_and_without_the_kernel(monkeypatch, winograd_calls):
    """The integration's three per-offset convs (5 stacks) and the fusing conv run in the kernel, as oneDNN runs
    them; after the weights change in place (as `.data` writes do) the kernel's transformed weights are rebuilt."""
    _kernel_or_skip()
    block = _randomised_block()
    x = torch.randn(8, 16, 28, 28)
    for _ in range(2):
        with torch.no_grad():
            out = block(x)
        torch.testing.assert_close(out, _without_kernel(block, x, monkeypatch), rtol=1e-5, atol=1e-5)
        block.integrator.fuse.conv.weight.data.mul_(-0.5)
        block.integrator.layers[1].bn.running_var.data.mul_(3.0)
    assert winograd_calls == [5, 5, 5, 1] * 2


def _without_kernel(block: SelfyBlock, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(modeling_selfy, "winograd_kernel", lambda: None)
        return block(x)


def test_kernel_runs_only_in_fp32_inference(winograd_calls):
    """Training and bf16 autocast keep their own convs."""
    _kernel_or_skip()
    block = _randomised_block()
    x = torch.randn(8, 16, 28, 28)
    block.train()(x).sum().backward()
    block.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    assert winograd_calls == []
