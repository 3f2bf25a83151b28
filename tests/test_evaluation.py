import json
from types import SimpleNamespace

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyVideoProcessor
from selfy_hf.data import VideoSplit
from selfy_hf.evaluation import (
    corrupt_centre_frame,
    corrupt_frames,
    evaluate_model,
    format_views,
    main,
    motion_blur_kernel,
    parse_views,
    plot_confusion_matrix,
    plot_robustness,
    robustness_curves,
)
from selfy_hf.metrics import classification_metrics, pair_accuracy
from selfy_hf.video_processing_selfy import IMAGENET_MEAN, IMAGENET_STD

SIZE = 32
BRIGHTNESS_STEP = 40


def tiny_processor() -> SelfyVideoProcessor:
    return SelfyVideoProcessor(num_frames=8, crop_size=SIZE, size={"shortest_edge": SIZE})


def random_videos(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12, SIZE, SIZE + 8, 3), dtype=np.uint8) for _ in range(count)]


def constant_video(label: int) -> np.ndarray:
    """Every pixel of every frame is `BRIGHTNESS_STEP * label`: the label can be read back from any frame."""
    return np.full((10, SIZE, SIZE, 3), BRIGHTNESS_STEP * label, dtype=np.uint8)


class BrightnessModel(nn.Module):
    """A stand-in classifier with known logits: it reads the label encoded in the brightness of one frame and
    returns the row `logits_by_label[label]` (the label of an unreadable brightness is clamped)."""

    def __init__(self, logits_by_label: torch.Tensor, frame: str = "first"):
        super().__init__()
        self.config = SimpleNamespace(num_labels=logits_by_label.shape[1])
        self.logits_by_label = logits_by_label
        self.frame = frame
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        index = 0 if self.frame == "first" else pixel_values.shape[-4] // 2
        red = pixel_values[..., index, 0, :, :].mean(dim=(-2, -1))
        raw = (red * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        labels = (raw / BRIGHTNESS_STEP).round().long().clamp(0, self.logits_by_label.shape[0] - 1)
        logits = self.logits_by_label[labels]
        return SimpleNamespace(logits=logits.flatten(1, -2).mean(dim=1) if logits.dim() == 3 else logits)


def test_parse_views():
    assert parse_views("2x3") == (2, 3) and parse_views((1, 1)) == (1, 1) and format_views("2X1") == "2x1"
    for bad in ("2x2", "0x1", "3", "axb"):
        with pytest.raises(ValueError, match="views"):
            parse_views(bad)


@pytest.mark.parametrize("shape", [(2, 8, 3, SIZE, SIZE), (2, 6, 8, 3, SIZE, SIZE)])
@pytest.mark.parametrize("kind", ["occlusion", "motion_blur"])
def test_corruption_touches_only_the_centre_frame(shape, kind):
    pixel_values = torch.randn(shape)
    corrupted = corrupt_centre_frame(pixel_values, kind, 0.6)
    changed = (corrupted != pixel_values).flatten(-3).any(-1)  # (..., T)
    assert corrupted.shape == pixel_values.shape
    assert changed[..., 4].all() and not changed[..., :4].any() and not changed[..., 5:].any()
    assert torch.equal(corrupt_centre_frame(pixel_values, kind, 0.0), pixel_values)


@pytest.mark.parametrize("kind", ["occlusion", "motion_blur"])
def test_corruption_grows_with_severity(kind):
    frames = torch.randn(4, 3, 64, 64)
    distances = [
        (corrupt_frames(frames, kind, s) - frames).norm().item() for s in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert distances[0] == 0.0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_occlusion_is_a_centred_mean_coloured_box_of_the_given_area():
    frames = torch.ones(1, 3, 40, 60)
    occluded = corrupt_frames(frames, "occlusion", 0.25)
    hole = occluded[0, 0] == 0
    assert hole.sum().item() == 20 * 30  # a quarter of the area, the frame's aspect ratio
    rows, cols = hole.nonzero().T
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (10, 29, 15, 44)
    assert torch.equal(corrupt_frames(frames, "occlusion", 1.0), torch.zeros_like(frames))


def test_motion_blur_kernel_and_normalisation_commute():
    kernel = motion_blur_kernel(7)
    assert kernel.sum().item() == pytest.approx(1.0)
    assert torch.equal(kernel[3], torch.full((7,), 1 / 7)) and kernel.count_nonzero() == 7
    assert motion_blur_kernel(7, angle=90)[:, 3].count_nonzero() == 7
    assert torch.equal(motion_blur_kernel(1), torch.ones(1, 1))
    # Blurring normalised frames equals normalising blurred raw frames: the documented equivalence.
    raw = torch.rand(2, 3, 32, 32) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    blurred_normalised = corrupt_frames((raw - mean) / std, "motion_blur", 0.8)
    normalised_blurred = (corrupt_frames(raw, "motion_blur", 0.8) - mean) / std
    torch.testing.assert_close(blurred_normalised, normalised_blurred, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="odd"):
        motion_blur_kernel(4)


def test_corruption_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        corrupt_frames(torch.zeros(1, 3, 8, 8), "fog", 0.5)
    with pytest.raises(ValueError, match="severity"):
        corrupt_frames(torch.zeros(1, 3, 8, 8), "occlusion", 1.5)
    with pytest.raises(ValueError, match="pixel_values"):
        corrupt_centre_frame(torch.zeros(3, 8, 8), "occlusion", 0.5)


def test_metrics_from_known_logits():
    # Six classes; the true class ranks 1st for labels 0-2, 3rd for label 3, 6th (last) for labels 4 and 5.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [1.0, 9, 2, 3, 4, 5],
            [1.0, 2, 9, 3, 4, 5],
            [9.0, 8, 2, 7, 4, 5],
            [1.0, 2, 3, 4, 0, 5],
            [1.0, 2, 3, 4, 5, 0],
        ]
    )
    labels = [0, 1, 2, 3, 4, 5, 0, 0]
    dataset = VideoSplit([constant_video(label) for label in labels], labels, [f"c{i}" for i in range(6)])
    results = evaluate_model(BrightnessModel(logits), dataset, tiny_processor(), batch_size=3, progress=False)
    assert results["top1"] == pytest.approx(5 / 8)
    assert results["top5"] == pytest.approx(6 / 8)
    assert results["mean_class_accuracy"] == pytest.approx(3 / 6)
    assert results["num_samples"] == 8 and results["views"] == "1x1"
    matrix = torch.tensor(results["confusion_matrix"])
    assert matrix[0, 0] == 3 and matrix[3, 0] == 1 and matrix[4, 5] == 1 and matrix.sum() == 8


def test_pair_accuracy_asks_only_which_of_the_two_partners_wins():
    # Pairs (0, 1) and (2, 3); class 4 has no partner and is left out.
    logits = torch.tensor(
        [
            [5.0, 1, 9, 0, 0],  # label 0 beats its partner 1 (class 2 winning overall does not matter)
            [5.0, 1, 0, 0, 0],  # label 1 loses to 0
            [0.0, 0, 2, 2, 0],  # label 2 ties with 3: half a hit
            [0.0, 0, 1, 3, 0],  # label 3 beats 2
            [9.0, 0, 0, 0, 0],  # label 4: not in a pair
        ]
    )
    labels = torch.tensor([0, 1, 2, 3, 4])
    assert pair_accuracy(logits, labels, [(0, 1), (2, 3)]) == pytest.approx(2.5 / 4)
    assert classification_metrics(logits, labels, label_pairs=[(0, 1)])["pair_accuracy"] == pytest.approx(
        1 / 2
    )
    assert "pair_accuracy" not in classification_metrics(logits, labels)
    assert np.isnan(pair_accuracy(logits, torch.tensor([4]), [(0, 1)]))


def test_views_are_averaged_by_the_model():
    torch.manual_seed(0)
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny", num_labels=4)).eval()
    processor = tiny_processor()
    videos = random_videos(4)
    dataset = VideoSplit(videos, [0, 1, 2, 3], ["a", "b", "c", "d"])
    pixel_values = processor(videos, num_clips=2, num_crops=3)["pixel_values"]
    assert pixel_values.shape == (4, 6, 8, 3, SIZE, SIZE)
    with torch.no_grad():
        per_view = torch.stack([model(pixel_values=pixel_values[:, v]).logits for v in range(6)], dim=1)
    expected_predictions = per_view.mean(dim=1).argmax(dim=1)
    results = evaluate_model(model, dataset, processor, views="2x3", batch_size=3, progress=False)
    predictions = torch.tensor(results["confusion_matrix"]).argmax(dim=1)  # one video per true class
    assert torch.equal(predictions, expected_predictions)
    assert results["views"] == "2x3" and results["num_samples"] == 4
    with pytest.raises(ValueError, match="classes"):
        evaluate_model(model, VideoSplit(videos[:1], [7]), processor, progress=False)


def test_robustness_curves_corrupt_what_the_model_sees():
    labels = [0, 1, 2, 3]
    dataset = VideoSplit([constant_video(label) for label in labels], labels, ["a", "b", "c", "d"])
    model = BrightnessModel(torch.eye(4), frame="centre")
    curves = robustness_curves(model, dataset, tiny_processor(), severities=[0.0, 0.5, 1.0], progress=False)
    assert [p["severity"] for p in curves["occlusion"]] == [0.0, 0.5, 1.0]
    assert curves["occlusion"][0]["top1"] == 1.0
    # A fully occluded centre frame has the ImageNet mean colour, brightness ~124: read as label 3.
    assert curves["occlusion"][-1]["top1"] == 0.25
    # Blurring a constant frame (with replicated borders) changes nothing.
    assert [p["top1"] for p in curves["motion_blur"]] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="severities"):
        robustness_curves(model, dataset, tiny_processor(), severities=[0.0, 2.0], progress=False)


def test_plots_are_written(tmp_path, monkeypatch):
    lines_per_panel = []
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        lines_per_panel.append(
            [len(axis.get_lines()) for axis in figure.axes if axis.get_label() != "<colorbar>"]
        )
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    path = plot_confusion_matrix([[3, 1], [0, 4]], ["moving_left", "moving_right"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = {"occlusion": [{"severity": 0.0, "top1": 0.9}, {"severity": 1.0, "top1": 0.5}]}
    curve["motion_blur"] = curve["occlusion"]
    path = plot_robustness({"TSM": curve, "SELFY {-3..3}": curve, "SELFY {1}": curve}, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines_per_panel[-1] == [3, 3]  # one panel per corruption, one line per model
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix([[1, 0], [0, 1]], ["a"], tmp_path / "bad.png")


def write_frame_folder_dataset(root, videos_per_class: int = 1) -> None:
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        for index in range(videos_per_class):
            folder = root / "validation" / name / f"video{index}"
            folder.mkdir(parents=True)
            for frame in range(1, 10):
                pixels = rng.integers(0, 256, (SIZE, SIZE + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{frame:05d}.png")


def test_command_line_evaluation_of_two_models(tmp_path, capsys):
    write_frame_folder_dataset(tmp_path / "data")
    model_dirs = []
    for seed, preset in enumerate(("selfynet-tiny", "tsm-tiny")):
        torch.manual_seed(seed)
        config = SelfyConfig.from_preset(preset, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
        SelfyForVideoClassification(config).save_pretrained(tmp_path / preset)
        tiny_processor().save_pretrained(tmp_path / preset)
        model_dirs.append(str(tmp_path / preset))
    out = tmp_path / "eval"
    main(
        ["--model", *model_dirs, "--dataset", str(tmp_path / "data"), "--views", "1x1", "2x3"]
        + ["--robustness", "occlusion", "motion_blur", "--severities", "0", "0.5", "1"]
        + ["--output-dir", str(out), "--num-workers", "0", "--batch-size", "4", "--no-progress"]
    )
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["selfynet-tiny", "tsm-tiny"] and report["num_videos"] == 3
    entry = report["models"]["selfynet-tiny"]
    assert set(entry["views"]) == {"1x1", "2x3"}
    assert entry["views"]["2x3"]["gmacs_all_views"] == pytest.approx(6 * entry["gmacs_per_view"], rel=1e-3)
    assert entry["robustness"]["occlusion"][0]["top1"] == entry["views"]["1x1"]["top1"]
    assert (out / "robustness.png").exists() and (out / "confusion_matrix_tsm-tiny_2x3.png").exists()
    assert "selfynet-tiny [2x3]: top-1" in capsys.readouterr().out
