import pytest
import torch

import selfy_hf.stss as stss_module
from selfy_hf.stss import l2_normalize, stss, stss_reference

FAST_METHODS = ["all_pairs", "row_bands", "auto"]
CASES = [
    ((2, 4, 8, 7, 9), [-1, 0, 1], 5),
    ((1, 3, 4, 5, 5), [2, -3], 3),  # offsets reaching beyond the clip
    ((1, 8, 6, 6, 6), [-3, -2, -1, 0, 1, 2, 3], 9),  # window larger than the map
    ((1, 2, 3, 4, 6), [0], 1),
    ((1, 4, 5, 3, 8), [1], 7),
]


@pytest.mark.parametrize(("shape", "offsets", "window"), CASES)
@pytest.mark.parametrize("method", FAST_METHODS)
def test_fast_paths_match_the_reference_in_values_and_gradients(shape, offsets, window, method):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    reference = stss_reference(x, offsets, window)
    fast = stss(x, offsets, window, method=method)
    assert fast.shape == (*shape[:2], *shape[3:], len(offsets), window, window)
    torch.testing.assert_close(fast, reference)
    upstream = torch.randn_like(reference)
    (grad_fast,) = torch.autograd.grad(fast, x, upstream)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(grad_fast, grad_reference)


def test_reference_gradient_is_exact():
    x = torch.randn(1, 3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: stss_reference(t, [-1, 0, 2], 3), (x,))


def test_hand_computed_example_and_zero_padding():
    # Two frames of a 1-channel 1x3 map: frame 0 = [1, 2, 3], frame 1 = [4, 5, 6].
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 2, 1, 1, 3)
    out = stss(x, [0, 1], 3)  # (1, 2, 1, 3, L=2, U=3, V=3)
    # Query (t=0, x=1) = 2 against frame 1 at x = 0, 1, 2 in the middle row: 2*4, 2*5, 2*6.
    assert out[0, 0, 0, 1, 1, 1].tolist() == [8.0, 10.0, 12.0]
    # Rows above and below the 1-row map, the left neighbour of x=0, and frame 2 (beyond the clip) are zero.
    assert out[0, 0, 0, 1, :, 0].abs().sum() == 0 and out[0, 0, 0, 1, :, 2].abs().sum() == 0
    assert out[0, 0, 0, 0, 0, 1, 0] == 0
    assert out[0, 1, :, :, 1].abs().sum() == 0
    # Self-similarity at zero displacement is the squared value.
    assert out[0, 1, 0, 2, 0, 1, 1] == 36.0


def test_cosine_similarity_at_zero_displacement_is_one():
    x = l2_normalize(torch.randn(2, 3, 16, 5, 5), dim=2)
    out = stss(x, [0], 3)
    torch.testing.assert_close(out[..., 0, 1, 1], torch.ones(2, 3, 5, 5), rtol=1e-5, atol=1e-5)


def test_l2_normalize_is_the_official_formula():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    normalised = l2_normalize(x, dim=1, eps=1e-6)
    torch.testing.assert_close(normalised[0], torch.tensor([3.0, 4.0]) / (25.0 + 1e-6) ** 0.5)
    assert torch.equal(normalised[1], torch.zeros(2))


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    x = l2_normalize(torch.randn(1, 4, 32, 6, 6), dim=2)
    expected = stss_reference(x, [-1, 0, 1], 5)
    for method in ("all_pairs", "row_bands"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stss(x, [-1, 0, 1], 5, method=method)
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    x = l2_normalize(torch.randn(2, 4, 32, 14, 14), dim=2)
    expected = stss_reference(x, [-2, -1, 0, 1, 2], 9)
    for method in ("all_pairs", "row_bands"):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = stss(x.cuda(), [-2, -1, 0, 1, 2], 9, method=method)
        torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=3e-2)


def test_auto_never_uses_all_pairs_on_large_maps(monkeypatch):
    # All-pairs products grow as (H*W)^2: large maps must go through the row bands.
    def refuse(*args):
        raise AssertionError("all-pairs used on a large map")

    monkeypatch.setitem(stss_module.STSS_METHODS, "all_pairs", refuse)
    x = torch.randn(1, 2, 4, 40, 40)
    torch.testing.assert_close(stss(x, [0, 1], 3), stss_reference(x, [0, 1], 3))
    small = torch.randn(1, 2, 4, 8, 8)
    with pytest.raises(AssertionError, match="all-pairs"):
        stss(small, [0], 3)


@pytest.mark.parametrize(
    ("shape", "offsets", "window", "message"),
    [((2, 3, 4, 5), [0], 3, "shape"), ((1, 2, 3, 4, 4), [0], 4, "odd"), ((1, 2, 3, 4, 4), [], 3, "empty")],
)
def test_bad_arguments(shape, offsets, window, message):
    with pytest.raises(ValueError, match=message):
        stss(torch.randn(shape), offsets, window)
    with pytest.raises(ValueError, match="Unknown stss method"):
        stss(torch.randn(1, 2, 3, 4, 4), [0], 3, method="cuda_kernel")


def test_compiles_with_torch_compile():
    x = torch.randn(1, 3, 8, 6, 6)
    compiled = torch.compile(lambda t: stss(t, [-1, 0, 1], 3), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), stss_reference(x, [-1, 0, 1], 3))
