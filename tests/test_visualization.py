"""STSS visualisation: soft-argmax displacements (values and sign convention), capturing a block's STSS, figures."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyVideoProcessor
from selfy_hf.modeling_selfy import StssExtractor
from selfy_hf.stss import l2_normalize, stss
from selfy_hf.video_processing_selfy import IMAGENET_MEAN, IMAGENET_STD
from selfy_hf.visualization import (
    StssCapture,
    capture_stss,
    default_query,
    main,
    parse_query,
    render_stss,
    selfy_block_names,
    stss_displacements,
)

OFFSETS = [-2, -1, 0, 1, 2]
WINDOW = 5


def translating(canvas: torch.Tensor, frames: int, size: int, step: tuple[int, int]) -> torch.Tensor:
    """`(T, C, size, size)` views of `canvas` `(C, H, W)` whose content moves by `step` = (dx, dy) per frame:
    frame t at (y, x) shows the canvas at (y0 - dy * t + y, x0 - dx * t + x), no wrap-around."""
    dx, dy = step
    y0 = max(0, dy * (frames - 1))
    x0 = max(0, dx * (frames - 1))
    views = [
        canvas[:, y0 - dy * t : y0 - dy * t + size, x0 - dx * t : x0 - dx * t + size] for t in range(frames)
    ]
    return torch.stack(views)


@pytest.mark.parametrize("step", [(1, 0), (0, 1), (-1, 1)])
def test_displacements_recover_translation(step):
    frames, size, channels = 8, 12, 16
    torch.manual_seed(0)
    canvas = torch.randn(channels, size + 2 * frames, size + 2 * frames)
    features = translating(canvas, frames, size, step)[None]  # (1, T, C, H, W)
    similarities = stss(l2_normalize(features, dim=2), OFFSETS, WINDOW)
    out = stss_displacements(similarities, temporal_offsets=OFFSETS)
    assert out.shape == (frames, len(OFFSETS), size, size, 2)
    dx, dy = step
    radius = WINDOW // 2
    for index, offset in enumerate(OFFSETS):
        expected = torch.tensor([dx * offset, dy * offset], dtype=torch.float32)
        for t in range(frames):
            field = out[t, index]
            if not 0 <= t + offset < frames:
                assert torch.isnan(field).all()
                continue
            if expected.abs().max() > radius:
                continue
            # Where the matching position lies on the map, the soft-argmax lands on it: (dx, dy) = step * l.
            ys = [y for y in range(size) if 0 <= y + dy * offset < size]
            xs = [x for x in range(size) if 0 <= x + dx * offset < size]
            inside = field[ys][:, xs].reshape(-1, 2)
            torch.testing.assert_close(inside, expected.expand_as(inside), atol=1e-3, rtol=0)


def test_rightward_motion_gives_positive_x_for_forward_offsets():
    """The sign convention, spelled out: content moving right gives +x for l > 0, -x for l < 0, and dy = 0."""
    frames, size = 8, 12
    torch.manual_seed(1)
    canvas = torch.randn(8, size, size + frames)
    features = translating(canvas, frames, size, (1, 0))[None]
    out = stss_displacements(stss(l2_normalize(features, dim=2), OFFSETS, WINDOW))
    centre = out[4, :, 4:8, 4:8]  # (L, 4, 4, 2)
    assert (centre[OFFSETS.index(1), ..., 0] > 0.99).all()
    assert (centre[OFFSETS.index(2), ..., 0] > 1.99).all()
    assert (centre[OFFSETS.index(-1), ..., 0] < -0.99).all()
    assert centre[..., 1].abs().max() < 1e-3


def test_matches_the_models_soft_argmax_extraction():
    """The same numbers as the model's own soft-argmax features (eq. 2), which are ordered (u, v) = (dy, dx)."""
    config = SelfyConfig.from_preset("selfynet-tiny", selfy_extraction="soft_argmax")
    extractor = StssExtractor(config)
    torch.manual_seed(2)
    similarities = torch.rand(1, 4, 6, 7, len(OFFSETS), config.selfy_window_size, config.selfy_window_size)
    model_features = extractor(similarities)[0]  # (T, H, W, L, 2)
    ours = stss_displacements(
        similarities, temperature=config.selfy_softargmax_temperature
    )  # (T, L, H, W, 2)
    torch.testing.assert_close(ours.permute(0, 2, 3, 1, 4).flip(-1), model_features, atol=1e-5, rtol=1e-5)


def test_displacements_reject_bad_input():
    with pytest.raises(ValueError, match="odd square window"):
        stss_displacements(torch.zeros(2, 3, 3, 5, 4, 4))
    with pytest.raises(ValueError, match="one clip"):
        stss_displacements(torch.zeros(2, 2, 3, 3, 5, 3, 3))
    with pytest.raises(ValueError, match="temperature"):
        stss_displacements(torch.zeros(2, 3, 3, 5, 3, 3), temperature=0)
    with pytest.raises(ValueError, match="temporal offsets"):
        stss_displacements(torch.zeros(2, 3, 3, 5, 3, 3), temporal_offsets=[0, 1])


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """`(T, 3, H, W)` in [0, 1] to ImageNet-normalised `(1, T, 3, H, W)`."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((frames - mean) / std)[None]


def moving_texture(frames: int = 8, size: int = 64, pixels_per_frame: int = 8, seed: int = 0) -> torch.Tensor:
    """A blocky colour texture moving right by `pixels_per_frame` image pixels per frame, `(T, 3, size, size)`."""
    generator = torch.Generator().manual_seed(seed)
    width = size + pixels_per_frame * frames
    canvas = torch.rand(1, 3, size // 4, width // 4, generator=generator)
    canvas = torch.nn.functional.interpolate(canvas, scale_factor=4, mode="nearest")[0]
    return translating(canvas, frames, size, (pixels_per_frame, 0))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tiny", num_frames=8, num_labels=4)
    return SelfyForVideoClassification(config).eval()


def test_capture_takes_the_blocks_stss_and_recovers_motion():
    """Through a real (random, TSN) tiny model: the hook returns what the block's transform computes from the block's
    input, and a texture moving one feature pixel (8 image pixels) per frame shows up as dx = l feature pixels."""
    torch.manual_seed(0)
    config = SelfyConfig.from_preset("selfynet-tiny", num_frames=8, num_labels=4, temporal_module="none")
    model = SelfyForVideoClassification(config).train()
    pixel_values = normalise(moving_texture(size=128))
    capture = capture_stss(model, pixel_values, block="layer2")
    assert model.training and not model.selfy.selfy_blocks["layer2"].transform._forward_hooks
    assert capture.block_name == "layer2" and capture.temporal_offsets == tuple(config.selfy_temporal_offsets)
    assert capture.similarities.shape == (8, 16, 16, 5, 5, 5) and capture.stride == (8.0, 8.0)

    model.eval()
    with torch.no_grad():
        hidden = model.selfy(pixel_values, output_hidden_states=True).hidden_states
        block_input = hidden[2].reshape(
            -1, *hidden[2].shape[-3:]
        )  # stem, layer1, layer2 before its SELFY block
        direct = model.selfy.selfy_blocks["layer2"].transform(block_input)[0]
    torch.testing.assert_close(capture.similarities, direct)

    field = capture.displacements()  # feature pixels
    for index, offset in enumerate(capture.temporal_offsets):
        interior = field[4, index, 3:13, 3:13]
        assert ((interior[..., 0] - offset).abs() < 0.25).float().mean() > 0.7, offset
        assert interior[..., 0].median().sub(offset).abs() < 0.1
    in_pixels = capture.displacements(in_pixels=True)
    torch.testing.assert_close(in_pixels, field * 8, equal_nan=True)

    t, y, x = default_query(capture, in_pixels)
    assert t == 4 and 2 <= y < 14 and 2 <= x < 14
    # The default query, off the border band, moves as everything does: 8 pixels per frame to the right, at every
    # offset (velocity = displacement / l).
    velocity = in_pixels[4, [0, 1, 3, 4], y, x] / torch.tensor([-2.0, -1, 1, 2]).view(-1, 1)
    torch.testing.assert_close(velocity, torch.tensor([[8.0, 0.0]]).expand(4, 2), atol=1.0, rtol=0)


def test_render_writes_png_and_gif(tiny_model, tmp_path):
    pixel_values = normalise(moving_texture(size=64))
    rendering = render_stss(
        tiny_model, pixel_values, output=tmp_path / "stss.png", gif=tmp_path / "anim" / "stss.gif"
    )
    png, gif = tmp_path / "stss.png", tmp_path / "anim" / "stss.gif"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 8
    assert rendering.displacements.shape == (8, 5, 8, 8, 2)
    assert rendering.query[0] == 4 and rendering.capture.feature_size == (8, 8)
    # (b) one heat map per offset with a shared colour scale; (c) one arrow field per offset, over frame t.
    axes = rendering.figure.axes
    heat_maps = [axis.images[0] for axis in axes if axis.get_title().startswith("similarity")]
    assert len(heat_maps) == 5 and len({image.get_clim() for image in heat_maps}) == 1
    assert sum(bool(axis.collections) for axis in axes if axis.get_title().startswith("soft-argmax")) == 5

    query = (1, 1, 6)
    chosen = render_stss(tiny_model, pixel_values[0], query=query, block=0)
    assert chosen.query == query
    assert "t=1, y=1, x=6" in chosen.figure._suptitle.get_text()
    # Offsets reaching before frame 0 are marked, not drawn.
    assert "outside the clip" in chosen.figure.axes[0].get_title()


def test_default_query_prefers_motion_all_offsets_agree_on():
    """A position whose offsets agree on a steady 1 px/frame beats one with a larger but inconsistent displacement;
    the border band is skipped; a static clip gives the centre."""
    offsets = (-2, -1, 0, 1, 2)
    capture = StssCapture(torch.zeros(8, 9, 9, 5, 5, 5), offsets, "layer2", (9, 9))
    field = torch.zeros(8, 5, 9, 9, 2)
    assert default_query(capture, field) == (4, 4, 4)
    field[4, :, 3, 5, 0] = torch.tensor([-2.0, -1, 0, 1, 2])  # steady, rightwards
    field[4, :, 6, 2, 1] = torch.tensor([0.0, 0, 0, 2, 0])  # one stray match
    field[4, :, 0, 0, 0] = torch.tensor([-9.0, -9, 0, 9, 9])  # on the border band
    assert default_query(capture, field) == (4, 3, 5)


def test_bad_query_block_and_input_raise(tiny_model):
    pixel_values = normalise(moving_texture(size=64))
    assert selfy_block_names(tiny_model) == ["layer2"]
    for query in [(8, 0, 0), (0, 8, 0), (0, 0, -1), (0, 0), "abc"]:
        with pytest.raises(ValueError, match="query"):
            render_stss(tiny_model, pixel_values, query=query)
    with pytest.raises(ValueError, match="out of range"):
        capture_stss(tiny_model, pixel_values, block=1)
    with pytest.raises(ValueError, match="block must be an index or a name"):
        capture_stss(tiny_model, pixel_values, block=None)
    with pytest.raises(ValueError, match="no SELFY block named 'layer3'"):
        capture_stss(tiny_model, pixel_values, block="layer3")
    with pytest.raises(ValueError, match="one clip"):
        capture_stss(tiny_model, pixel_values.expand(2, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="frames"):
        capture_stss(tiny_model, pixel_values[:, :4])
    with pytest.raises(ValueError, match="gif offset"):
        render_stss(tiny_model, pixel_values, gif="unused.gif", gif_offset=3)
    baseline = SelfyForVideoClassification(SelfyConfig.from_preset("tsm-tiny", num_frames=8, num_labels=4))
    with pytest.raises(ValueError, match="no SELFY blocks"):
        capture_stss(baseline, pixel_values)
    with pytest.raises(ValueError, match="not a SELFY model"):
        capture_stss(torch.nn.Linear(2, 2), pixel_values)


def test_command_line(tiny_model, tmp_path, capsys):
    model_dir, video_dir = tmp_path / "model", tmp_path / "frames"
    tiny_model.save_pretrained(model_dir)
    SelfyVideoProcessor(num_frames=8, crop_size=64, size={"shortest_edge": 64}).save_pretrained(model_dir)
    video_dir.mkdir()
    frames = moving_texture(frames=12, size=64, pixels_per_frame=4)
    for index, frame in enumerate(frames):
        array = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(video_dir / f"img_{index + 1:05d}.png")
    output, gif = tmp_path / "out" / "stss.png", tmp_path / "out" / "stss.gif"
    rendering = main(
        ["--model", str(model_dir), "--video", str(video_dir), "--query", "3, 2,5", "--block", "layer2"]
        + ["--output", str(output), "--gif", str(gif), "--gif-offset", "-1"]
    )
    assert rendering.query == (3, 2, 5) and output.stat().st_size > 0 and gif.stat().st_size > 0
    assert "query t=3, y=2, x=5" in capsys.readouterr().out
    assert parse_query("1,2,3") == (1, 2, 3)
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--video", str(video_dir), "--query", "1,2"])
