import subprocess
import sys
import warnings

import pytest
import torch

import selfy_hf.stss as stss_module
from selfy_hf.benchmarking import (
    StssBenchmarkCase,
    _cpu_peak_memory_mib,
    benchmark_stss,
    format_stss_table,
    stss_einsum_official_style,
)
from selfy_hf.stss import ALL_PAIRS_MAX_POSITIONS, l2_normalize, select_stss_method, stss, stss_reference

FAST_METHODS = ["all_pairs", "tiles", "auto"]
# (B, T, C, H, W), offsets, window
CASES = [
    ((2, 4, 8, 7, 9), [-1, 0, 1], 5),  # non-square
    ((1, 3, 4, 5, 5), [2, -3], 3),  # asymmetric, one offset beyond the clip
    (
        (1, 2, 3, 6, 6),
        [-3, -2, -1, 0, 1, 2, 3],
        9,
    ),  # T smaller than the offset range, window larger than the map
    ((1, 4, 5, 3, 8), [1], 9),
    ((2, 3, 3, 4, 6), [0], 3),
    ((1, 3, 4, 17, 10), [-2, -1, 0, 1, 2], 9),  # several tiles, padded to whole tiles
    ((1, 2, 2, 9, 16), [-1, 2], 5),
    ((1, 1, 3, 4, 4), [1], 3),  # no offset reaches a frame: all zeros
]


@pytest.mark.parametrize(("shape", "offsets", "window"), CASES)
@pytest.mark.parametrize("method", FAST_METHODS)
def test_fast_paths_match_the_reference_in_values_and_gradients(shape, offsets, window, method):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    reference = stss_reference(x, offsets, window)
    fast = stss(x, offsets, window, method=method)
    assert fast.shape == (*shape[:2], *shape[3:], len(offsets), window, window)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(reference)
    (grad_fast,) = torch.autograd.grad(fast, x, upstream)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(grad_fast, grad_reference)
    with torch.no_grad():  # the inference path (no autograd.Function)
        torch.testing.assert_close(stss(x, offsets, window, method=method), reference)


def test_all_pairs_whole_batch_products_match_the_per_clip_ones(monkeypatch):
    # CPU runs the all-pairs products clip by clip; other devices run them on the whole batch at once.
    x = torch.randn(3, 4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    offsets = [-2, 0, 1]
    reference = stss_reference(x, offsets, 5)
    upstream = torch.randn_like(reference)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    monkeypatch.setattr(stss_module, "_samples", lambda tensor: [tensor])
    fast = stss(x, offsets, 5, method="all_pairs")
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(torch.autograd.grad(fast, x, upstream)[0], grad_reference)


@pytest.mark.parametrize("method", ["reference", "all_pairs", "tiles"])
def test_gradients_are_exact(method):
    x = torch.randn(1, 3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    # Full Jacobians for the reference; random projections for the fast paths (their full Jacobian takes one
    # backward per output element, and they are compared with the reference's gradients above).
    fast_mode = method != "reference"
    assert torch.autograd.gradcheck(
        lambda t: stss(t, [-1, 0, 2], 3, method=method), (x,), fast_mode=fast_mode
    )


def _outside_clip_or_map(frames, height, width, offsets, window):
    """(T, H, W, L, U, V) bool: the neighbour lies outside the clip or the map."""
    radius = window // 2
    t = torch.arange(frames).view(-1, 1, 1, 1, 1, 1)
    y = torch.arange(height).view(1, -1, 1, 1, 1, 1)
    x = torch.arange(width).view(1, 1, -1, 1, 1, 1)
    other = t + torch.tensor(offsets).view(1, 1, 1, -1, 1, 1)
    row = y + torch.arange(window).view(1, 1, 1, 1, -1, 1) - radius
    col = x + torch.arange(window).view(1, 1, 1, 1, 1, -1) - radius
    inside = (other >= 0) & (other < frames) & (row >= 0) & (row < height) & (col >= 0) & (col < width)
    return ~inside


@pytest.mark.parametrize("method", ["reference", *FAST_METHODS])
def test_neighbours_outside_the_clip_or_the_map_are_exactly_zero(method):
    offsets, window = [-2, 0, 1], 5
    x = torch.rand(2, 3, 4, 6, 9) + 0.5  # every similarity inside is positive
    out = stss(x, offsets, window, method=method)
    outside = _outside_clip_or_map(3, 6, 9, offsets, window).expand_as(out)
    assert torch.all(out[outside] == 0)
    assert torch.all(out[~outside] > 0)


@pytest.mark.parametrize("method", ["reference", *FAST_METHODS])
def test_hand_computed_example(method):
    # Two frames of a 1-channel 2x3 map: frame 0 = [[1, 2, 3], [4, 5, 6]], frame 1 = 10 x frame 0.
    frame = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = torch.stack([frame, 10 * frame]).reshape(1, 2, 1, 2, 3)
    out = stss(x, [0, 1], 3, method=method)  # (1, 2, 2, 3, L=2, U=3, V=3)
    # Query (t=0, y=0, x=1) = 2 against frame 1: u is the row displacement, v the column one; row -1 is off the map.
    expected = torch.tensor([[0.0, 0.0, 0.0], [20.0, 40.0, 60.0], [80.0, 100.0, 120.0]])
    torch.testing.assert_close(out[0, 0, 0, 1, 1], expected)
    # Query (t=1, y=1, x=2) = 60 against its own frame: [[20, 30, 0], [50, 60, 0], [0, 0, 0]] x 60.
    expected = 60.0 * torch.tensor([[20.0, 30.0, 0.0], [50.0, 60.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out[0, 1, 1, 2, 0], expected)
    assert torch.all(out[0, 1, :, :, 1] == 0)  # frame 2 is beyond the clip


def test_cosine_similarity_at_zero_displacement_is_one():
    x = l2_normalize(torch.randn(2, 3, 16, 5, 5), dim=2)
    out = stss(x, [0], 3)
    torch.testing.assert_close(out[..., 0, 1, 1], torch.ones(2, 3, 5, 5), rtol=1e-5, atol=1e-5)


def test_l2_normalize_is_the_official_formula():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-4, 0.0]])
    normalised = l2_normalize(x, dim=1, eps=1e-6)
    official = x / (x.pow(2).sum(dim=1, keepdim=True) + 1e-6) ** 0.5  # eps inside the root
    torch.testing.assert_close(normalised, official)
    assert torch.equal(normalised[1], torch.zeros(2))  # an all-zero vector stays zero
    assert normalised[2, 0] < 0.1  # not max(norm, eps): a tiny vector is not blown up to unit length
    y = torch.randn(2, 5, 3)
    torch.testing.assert_close(l2_normalize(y, dim=1).pow(2).sum(1), torch.ones(2, 3), rtol=1e-4, atol=1e-4)


def test_official_style_einsum_path_matches():
    x = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64)
    for offsets, window in [([-2, -1, 0, 1, 2], 9), ([1], 3), ([-3, 0, 3], 5), ([2, -1], 7)]:
        torch.testing.assert_close(
            stss_einsum_official_style(x, offsets, window), stss_reference(x, offsets, window)
        )


@pytest.mark.parametrize("method", ["all_pairs", "tiles"])
def test_bf16_autocast_on_cpu_is_close_to_fp32(method):
    x = l2_normalize(torch.randn(1, 4, 32, 9, 10), dim=2).requires_grad_()
    expected = stss_reference(x, [-1, 0, 1], 5)
    upstream = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stss(x, [-1, 0, 1], 5, method=method)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)
    (grad,) = torch.autograd.grad(out, x, upstream.bfloat16())
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["all_pairs", "tiles", "auto"])
def test_cuda_matches_the_cpu_reference(dtype, method):
    x = l2_normalize(torch.randn(2, 4, 32, 14, 15), dim=2).requires_grad_()
    expected = stss_reference(x, [-2, -1, 0, 1, 2], 9)
    upstream = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    x_cuda = x.detach().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = stss(x_cuda, [-2, -1, 0, 1, 2], 9, method=method)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=tolerance)
    (grad,) = torch.autograd.grad(out, x_cuda, upstream.cuda().to(out.dtype))
    torch.testing.assert_close(
        grad.cpu(), expected_grad, rtol=0, atol=1e-3 if dtype == torch.float32 else 0.3
    )


def test_auto_uses_all_pairs_on_small_maps_and_tiles_on_large_ones(monkeypatch):
    side = int(ALL_PAIRS_MAX_POSITIONS**0.5)
    assert select_stss_method(14, 14) == "all_pairs"
    assert select_stss_method(side, side) == "all_pairs"
    assert select_stss_method(side + 1, side + 1) == "tiles"
    assert select_stss_method(56, 56) == "tiles"

    def refuse(*args):
        raise AssertionError("all-pairs used on a large map")

    monkeypatch.setitem(stss_module._METHODS, "all_pairs", refuse)
    x = torch.randn(1, 2, 4, 40, 40)
    torch.testing.assert_close(stss(x, [0, 1], 3), stss_reference(x, [0, 1], 3))


def test_tiles_path_runs_on_the_meta_device_so_large_models_can_be_counted():
    """Issue #2: the tiles path asked for the autocast dtype of the meta device, which has no autocast, so
    `count_complexity` failed for a model on `torch.device("meta")` whose SELFY maps are large (tiles)."""
    from selfy_hf import SelfyConfig, SelfyForVideoClassification
    from selfy_hf.flops import count_complexity

    x = torch.empty(1, 2, 4, 30, 30, device="meta")
    for method in ("tiles", "auto"):
        out = stss(x, [-1, 0, 1], 5, method=method)
        assert out.is_meta and out.shape == (1, 2, 30, 30, 3, 5, 5) and out.dtype == torch.float32
    # selfynet-tiny's block sees a map of image_size / 8: 24 x 24 at 192 px, which takes the tiles path
    assert select_stss_method(24, 24) == "tiles"
    with torch.device("meta"):
        on_meta = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny"))
    on_cpu = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny"))
    assert count_complexity(on_meta, image_size=192).macs == count_complexity(on_cpu, image_size=192).macs


@pytest.mark.parametrize(
    ("x", "offsets", "window", "error", "message"),
    [
        (torch.randn(2, 3, 4, 5), [0], 3, ValueError, "shape"),
        (torch.randn(1, 2, 3, 4, 4), [0], 4, ValueError, "odd"),
        (torch.randn(1, 2, 3, 4, 4), [], 3, ValueError, "empty"),
        (torch.randn(1, 2, 3, 4, 4), [1, 1], 3, ValueError, "distinct"),
        (torch.randn(1, 2, 3, 4, 4), [0.5], 3, TypeError, "ints"),
        (torch.ones(1, 2, 3, 4, 4, dtype=torch.long), [0], 3, TypeError, "floating"),
    ],
)
def test_bad_arguments(x, offsets, window, error, message):
    with pytest.raises(error, match=message):
        stss(x, offsets, window)


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown stss method"):
        stss(torch.randn(1, 2, 3, 4, 4), [0], 3, method="cuda_kernel")


@pytest.mark.parametrize("method", ["all_pairs", "tiles"])
def test_compiles_with_torch_compile_forward_and_backward(method):
    stss_module._INDEX_CACHE.clear()
    x = torch.randn(1, 3, 8, 10, 9, requires_grad=True)
    compiled = torch.compile(
        lambda t: stss(t, [-1, 0, 2], 5, method=method), backend="aot_eager", fullgraph=True
    )
    out = compiled(x)
    expected = stss_reference(x, [-1, 0, 2], 5)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0]
    )
    assert all(type(t) is torch.Tensor for tensors in stss_module._INDEX_CACHE.values() for t in tensors)


class _StssModule(torch.nn.Module):
    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stss(l2_normalize(x, dim=2), [-1, 0, 2], 5, method=self.method)


@pytest.mark.parametrize("dynamo", [True, False])
@pytest.mark.parametrize("method", ["all_pairs", "tiles"])
def test_onnx_export_matches_pytorch(tmp_path, method, dynamo):
    onnxruntime = pytest.importorskip("onnxruntime")
    stss_module._INDEX_CACHE.clear()
    model, x = _StssModule(method), torch.randn(2, 3, 8, 10, 9)
    path = tmp_path / "stss.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), dynamo=True).save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)
    assert all(type(t) is torch.Tensor for tensors in stss_module._INDEX_CACHE.values() for t in tensors)


def test_benchmark_rows_and_table():
    case = StssBenchmarkCase(
        "tiny", batch=1, frames=3, channels=8, height=6, width=5, temporal_offsets=(-1, 0, 1)
    )
    rows = benchmark_stss([case], repeats=2, warmup=1, num_threads=1, measure_memory=False)
    assert [row["variant"] for row in rows] == ["auto", "all_pairs", "tiles", "reference", "einsum"]
    for row in rows:
        assert row["runs"] >= 2 and row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert row["max_abs_diff"] < 1e-5
    table = format_stss_table(rows)
    assert table.count("\n") == 1 + len(rows) and "| tiny | einsum |" in table and "1.00x (1.00x)" in table


PEAK_SCRIPT = """
import torch
from selfy_hf.benchmarking import _peak_rss_mib
print(_peak_rss_mib(lambda: torch.ones(10 * 2**20).sum()))  # 40 MiB, freed before returning
"""


def test_peak_memory_measurement_sees_a_large_temporary():
    # A fresh process: in a test worker, memory freed by earlier tests may be reused without growing the RSS.
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    assert 30 < float(result.stdout.strip().splitlines()[-1]) < 200


def test_peak_memory_in_a_fresh_process():
    case = StssBenchmarkCase(
        "tiny", batch=1, frames=2, channels=4, height=5, width=5, temporal_offsets=(0, 1)
    )
    assert 0 <= _cpu_peak_memory_mib(case, "reference", True, torch.float32, num_threads=1, seed=0) < 100
