"""Tests of weight conversion: official SELFY / TSM checkpoints, and ImageNet ResNets (torchvision, timm,
transformers) into the SELFYNet backbone. Every source checkpoint is made here, with random weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyModel, SelfyVideoProcessor
from selfy_hf.conversion import (
    convert_official_checkpoint,
    load_id2label,
    load_imagenet_backbone,
    official_config,
)

REPO = Path(__file__).resolve().parents[1]
FRAMES = 4

# The official names, written out independently of the library's mapping: our module -> theirs.
OFFICIAL_SELFY_MODULES = {
    "transform.downsample.conv": "stss_transformation.downsample.0",
    "transform.downsample.bn": "stss_transformation.downsample.1",
    "extractor.layers.0.conv": "stss_extraction.conv0.0",
    "extractor.layers.0.bn": "stss_extraction.conv0.1",
    "extractor.layers.1.conv": "stss_extraction.conv1.0",
    "extractor.layers.1.bn": "stss_extraction.conv1.1",
    "extractor.layers.2.conv": "stss_extraction.conv2.0",
    "extractor.layers.2.bn": "stss_extraction.conv2.1",
    "extractor.layers.3.conv": "stss_extraction.conv3.0",
    "extractor.layers.3.bn": "stss_extraction.conv3.1",
    "integrator.layers.0.conv": "stss_integration.conv0.0",
    "integrator.layers.0.bn": "stss_integration.conv0.1",
    "integrator.layers.1.conv": "stss_integration.conv1.0",
    "integrator.layers.1.bn": "stss_integration.conv1.1",
    "integrator.layers.2.conv": "stss_integration.conv2.0",
    "integrator.layers.2.bn": "stss_integration.conv2.1",
    "integrator.fuse.conv": "stss_integration.conv3_fuse.1",
    "integrator.fuse.bn": "stss_integration.conv3_fuse.2",
    "integrator.project.conv": "stss_integration.upsample.0",
    "integrator.project.bn": "stss_integration.upsample.1",
}


def official_name(key: str, tsm_repo: bool = False) -> str:
    """The key an official checkpoint (`DataParallel(TSN)`) uses for one of our parameters."""
    module, _, tensor = key.rpartition(".")
    if module == "classifier":
        return f"module.new_fc.{tensor}"
    if module.startswith("selfy.selfy_blocks.layer2."):
        return f"module.base_model.selfy.{OFFICIAL_SELFY_MODULES[module[len('selfy.selfy_blocks.layer2.') :]]}.{tensor}"
    module = "module.base_model." + module[len("selfy.") :]
    if tsm_repo and module.endswith(".conv1") and ".layer" in module:
        module += ".net"  # mit-han-lab TSM wraps the shifted conv
    return f"{module}.{tensor}"


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics everywhere (zero-initialised BNs included), so no tensor is trivially 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):  # BN scale
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() > 1:
                tensor.copy_(
                    torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
                )
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def official_checkpoint(
    model: SelfyForVideoClassification, tsm_repo: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict the official `main.py` would save for `model`'s weights (SELFY: a Conv1d head)."""
    state_dict = {}
    for key, tensor in model.state_dict().items():
        if key == "classifier.weight" and not tsm_repo:
            tensor = tensor[..., None]
        state_dict[official_name(key, tsm_repo)] = tensor.clone()
    return state_dict


@pytest.fixture(scope="module")
def selfy_r18() -> SelfyForVideoClassification:
    return randomise_(SelfyForVideoClassification(official_config("resnet18", FRAMES, num_labels=7)))


@pytest.fixture(scope="module")
def tsm_r18() -> SelfyForVideoClassification:
    return randomise_(
        SelfyForVideoClassification(official_config("resnet18", FRAMES, 5, selfy=False)), seed=1
    )


def clips(batch: int = 2, size: int = 64, frames: int = FRAMES) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(3))


# Runs the script given as argv[1] with the rest of argv, then asks for a repo the cache lacks; HF_HUB_OFFLINE is
# in the environment before huggingface_hub is imported.
OFFLINE_HUB_PROGRAM = """
import os, runpy, sys
assert os.environ["HF_HUB_OFFLINE"] == "1"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
from selfy_hf.conversion import read_imagenet_checkpoint
try:
    read_imagenet_checkpoint("timm/not-cached")
except ValueError as error:
    print("refused:", error)
"""


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_official_config_is_the_papers_block():
    config = official_config("resnet50", 8, 174)
    assert (config.backbone_depth, config.temporal_module, config.shift_div) == (50, "tsm", 8)
    assert config.selfy_stages == [2] and config.selfy_temporal_offsets == [-2, -1, 0, 1, 2]
    assert (config.selfy_hidden_size, config.selfy_window_size, config.selfy_downsample) == (128, 9, True)
    assert config.selfy_extraction_channels == [4, 16, 64, 64]
    assert config.selfy_integration_channels == [64, 64, 64, 64]
    assert official_config("resnet101", 8, 174, selfy=False).selfy_stages == []
    with pytest.raises(ValueError, match="arch must be one of"):
        official_config("resnet152", 8, 174)


def test_every_official_tensor_lands_in_place(tmp_path, selfy_r18):
    checkpoint = official_checkpoint(selfy_r18)
    path = tmp_path / "selfy.pth.tar"
    torch.save({"epoch": 3, "arch": "SELFY", "state_dict": checkpoint, "best_prec1": 12.5}, path)
    model = convert_official_checkpoint(path, arch="resnet18", num_frames=FRAMES)
    converted = model.state_dict()
    assert converted.keys() == selfy_r18.state_dict().keys()
    for key, tensor in selfy_r18.state_dict().items():
        assert torch.equal(converted[key], tensor), key
    # A few spot checks against the official names themselves.
    block = "selfy.selfy_blocks.layer2."
    spots = {
        "module.base_model.selfy.stss_integration.conv3_fuse.1.weight": block + "integrator.fuse.conv.weight",
        "module.base_model.selfy.stss_integration.upsample.0.weight": block
        + "integrator.project.conv.weight",
        "module.base_model.selfy.stss_integration.upsample.1.running_var": block
        + "integrator.project.bn.running_var",
        "module.base_model.selfy.stss_extraction.conv3.1.bias": block + "extractor.layers.3.bn.bias",
        "module.base_model.selfy.stss_transformation.downsample.0.weight": block
        + "transform.downsample.conv.weight",
        "module.base_model.layer3.0.downsample.1.running_mean": "selfy.layer3.0.downsample.1.running_mean",
        "module.base_model.conv1.weight": "selfy.conv1.weight",
    }
    for theirs, ours in spots.items():
        assert torch.equal(converted[ours], checkpoint[theirs]), theirs
    assert torch.equal(converted["classifier.weight"], checkpoint["module.new_fc.weight"][..., 0])
    assert model.config.num_labels == 7 and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(clips()).logits, selfy_r18(clips()).logits, rtol=0, atol=0)


def test_counters_are_optional_and_module_prefix_too(selfy_r18):
    checkpoint = {
        key.removeprefix("module."): value
        for key, value in official_checkpoint(selfy_r18).items()
        if not key.endswith("num_batches_tracked")
    }
    model = convert_official_checkpoint(checkpoint, arch="resnet18", num_frames=FRAMES, num_labels=7)
    assert torch.equal(model.selfy.layer4[1].conv2.weight, selfy_r18.selfy.layer4[1].conv2.weight)


def test_missing_unexpected_and_mismatched_keys_are_listed(selfy_r18):
    checkpoint = official_checkpoint(selfy_r18)
    del checkpoint["module.base_model.layer3.1.bn2.running_var"]
    del checkpoint["module.base_model.selfy.stss_integration.conv3_fuse.2.weight"]
    checkpoint["module.base_model.selfy.stss_integration.conv4.0.weight"] = torch.zeros(1)
    checkpoint["module.base_model.layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(ValueError) as error:
        convert_official_checkpoint({"state_dict": checkpoint}, arch="resnet18", num_frames=FRAMES)
    message = str(error.value)
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message
    assert (
        "module.base_model.layer3.1.bn2.running_var" not in message
    )  # reported without DataParallel's prefix
    for key in (
        "base_model.layer3.1.bn2.running_var",
        "base_model.selfy.stss_integration.conv3_fuse.2.weight",
        "base_model.selfy.stss_integration.conv4.0.weight",
        "base_model.layer2.0.conv1.weight: (128, 64, 1, 1) vs selfy.layer2.0.conv1.weight: (128, 64, 3, 3)",
    ):
        assert key in message


def test_wrong_arch_and_selfy_flag_are_explained(selfy_r18, tsm_r18):
    with pytest.raises(ValueError, match=r"ResNet-18 \(basic blocks, depths \[2, 2, 2, 2\]\): check --arch"):
        convert_official_checkpoint(official_checkpoint(selfy_r18), arch="resnet34", num_frames=FRAMES)
    with pytest.raises(ValueError, match="drop --no-selfy") as error:
        convert_official_checkpoint(official_checkpoint(selfy_r18), "resnet18", FRAMES, selfy=False)
    assert "base_model.selfy.stss_extraction.conv0.0.weight" in str(error.value)
    with pytest.raises(ValueError, match="pass --no-selfy") as error:
        convert_official_checkpoint(official_checkpoint(tsm_r18), arch="resnet18", num_frames=FRAMES)
    assert "base_model.selfy.stss_integration.upsample.1.weight" in str(error.value)
    with pytest.raises(ValueError, match=r"new_fc.weight: \(7, 512, 1\) vs classifier.weight: \(9, 512\)"):
        convert_official_checkpoint(official_checkpoint(selfy_r18), "resnet18", FRAMES, num_labels=9)


def test_pickled_objects_are_refused(tmp_path, tsm_r18):
    import argparse

    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": official_checkpoint(tsm_r18), "args": argparse.Namespace(lr=0.01)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        convert_official_checkpoint(path, arch="resnet18", num_frames=FRAMES, selfy=False)


def test_tsm_repo_layout(tsm_r18):
    model = convert_official_checkpoint(
        official_checkpoint(tsm_r18, tsm_repo=True), "resnet18", FRAMES, selfy=False
    )
    assert model.config.temporal_module == "tsm"
    with torch.no_grad():
        torch.testing.assert_close(model(clips()).logits, tsm_r18(clips()).logits, rtol=0, atol=0)
    # Without wrapped convs it is their TSN baseline: no shift.
    unshifted = {
        key.replace(".conv1.net.", ".conv1."): value
        for key, value in official_checkpoint(tsm_r18, True).items()
    }
    tsn = convert_official_checkpoint(unshifted, "resnet18", FRAMES, selfy=False)
    assert tsn.config.temporal_module == "none"
    # TSM's every-other-block placement (ResNet-101) cannot be expressed.
    partial = dict(unshifted)
    for key in [k for k in unshifted if ".layer1.0.conv1." in k]:
        partial[key.replace(".conv1.", ".conv1.net.")] = partial.pop(key)
    with pytest.raises(ValueError, match="shifts only 1 of its 8 residual blocks"):
        convert_official_checkpoint(partial, "resnet18", FRAMES, selfy=False)


def test_script_end_to_end(tmp_path, selfy_r18):
    from transformers import AutoModelForVideoClassification, AutoVideoProcessor

    checkpoint = tmp_path / "SELFY_something_RGB_model_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": official_checkpoint(selfy_r18)}, checkpoint)
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({f"class {i}": str(i) for i in range(7)}))
    output = tmp_path / "converted"
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--arch", "resnet18"]
    load_script("convert_official_checkpoint").main(
        [*argv, "--num-frames", str(FRAMES), "--id2label", str(names)]
    )
    assert {"config.json", "model.safetensors", "modeling_selfy.py", "stss.py"} <= {
        p.name for p in output.iterdir()
    }
    model = AutoModelForVideoClassification.from_pretrained(output).eval()
    assert model.config.id2label[3] == "class 3" and model.config.label2id["class 6"] == 6
    with torch.no_grad():
        torch.testing.assert_close(model(clips()).logits, selfy_r18(clips()).logits, rtol=0, atol=0)
    processor = AutoVideoProcessor.from_pretrained(output)
    assert isinstance(processor, SelfyVideoProcessor)
    assert (processor.size, processor.crop_size, processor.num_frames) == (
        {"height": 240, "width": 320},
        224,
        FRAMES,
    )


def test_selfy_convert_command(tmp_path, tsm_r18, capsys):
    from importlib.metadata import entry_points

    from selfy_hf.conversion import main

    (command,) = entry_points(group="console_scripts", name="selfy-convert")
    assert command.load() is main
    assert load_script("convert_official_checkpoint").main is main  # the script only wraps the command
    checkpoint = tmp_path / "TSM_something_RGB_resnet18.pth"
    torch.save({"state_dict": official_checkpoint(tsm_r18, tsm_repo=True)}, checkpoint)
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c", "d", "e"]))
    output = tmp_path / "tsm"
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), "--arch", "resnet18"]
    argv += ["--num-frames", str(FRAMES), "--num-labels", "5", "--no-selfy", "--shift-div", "8"]
    main([*argv, "--id2label", str(tmp_path / "labels.json")])
    assert f"Saved the converted model and its video processor to {output}" in capsys.readouterr().out
    model = SelfyForVideoClassification.from_pretrained(output).eval()
    assert model.config.temporal_module == "tsm" and model.config.selfy_stages == []
    assert model.config.id2label[4] == "e"
    with torch.no_grad():
        torch.testing.assert_close(model(clips()).logits, tsm_r18(clips()).logits, rtol=0, atol=0)
    assert SelfyVideoProcessor.from_pretrained(output).size == {"shortest_edge": 256}  # the TSM repo's resize
    for wrong in (argv[:4], [*argv[:5], "resnet152", *argv[6:]]):  # no --arch; an arch it does not know
        with pytest.raises(SystemExit):
            main(wrong)


def test_load_id2label_forms(tmp_path):
    assert load_id2label(["a", "b"]) == {0: "a", 1: "b"}
    assert load_id2label({"1": "b", "0": "a"}) == {0: "a", 1: "b"}
    assert load_id2label({"a": 0, "b": "1"}) == {0: "a", 1: "b"}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(["x", "y", "z"]))
    assert load_id2label(path, num_labels=3)[2] == "z"
    with pytest.raises(ValueError, match="every class 0..3"):
        load_id2label(path, num_labels=4)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet backbones
# ----------------------------------------------------------------------------------------------------------------


def plain_resnet18() -> SelfyModel:
    """Our backbone with nothing else: no temporal shift, no SELFY block."""
    return SelfyModel(SelfyConfig.from_preset("tsn-r18", num_frames=2)).eval()


def assert_stages_equal(ours: SelfyModel, reference_stages: list[torch.Tensor], frames: torch.Tensor) -> None:
    """Our stem and stage outputs (`hidden_states`) equal the reference ones, frame by frame."""
    with torch.no_grad():
        hidden = ours(frames, output_hidden_states=True).hidden_states
    assert len(hidden) == len(reference_stages) == 5
    for index, (mine, reference) in enumerate(zip(hidden, reference_stages)):
        torch.testing.assert_close(mine.flatten(0, 1), reference, rtol=1e-5, atol=1e-5, msg=f"stage {index}")


def torchvision_stages(net: torchvision.models.ResNet, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        stages = [x]
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            stages.append(x := stage(x))
    return stages


def test_torchvision_file_loads_and_matches_stage_outputs(tmp_path):
    net = randomise_(torchvision.models.resnet18(weights=None), seed=4)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    ours = plain_resnet18()
    report = load_imagenet_backbone(ours, path)
    assert report.source_format == "torchvision" and report.skipped == ["fc.bias", "fc.weight"]
    assert report.initialised == [] and len(report.loaded) == len(net.state_dict()) - 2
    frames = clips(batch=1, size=64, frames=2)
    assert_stages_equal(ours, torchvision_stages(net, frames.flatten(0, 1)), frames)


def test_only_backbone_loads_into_selfynet():
    net = randomise_(torchvision.models.resnet18(weights=None), seed=5)
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tsm-r18", num_labels=3))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = load_imagenet_backbone(
        model, {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    )
    after = model.state_dict()
    for key in report.initialised:
        assert torch.equal(after[key], before[key]), key
    for key in report.loaded:
        assert torch.equal(after[key], net.state_dict()[key.removeprefix("selfy.")]), key
    assert {key.split(".")[0] for key in report.initialised} == {"selfy", "classifier"}
    assert all(".selfy_blocks.layer2." in key for key in report.initialised if key.startswith("selfy."))
    assert "selfy.selfy_blocks.layer2" in report.summary() and "fc.weight" in report.summary()


def test_incompatible_depth_is_refused():
    net = torchvision.models.resnet18(weights=None)
    model = SelfyModel(SelfyConfig.from_preset("tsn-r50"))
    with pytest.raises(
        ValueError, match=r"it is ResNet-18 \(basic blocks.*backbone is ResNet-50 \(bottleneck"
    ):
        load_imagenet_backbone(model, net)
    extra = dict(net.state_dict()) | {"layer1.0.se.fc1.weight": torch.zeros(4, 64, 1, 1)}
    with pytest.raises(ValueError, match=r"unexpected keys \(in the checkpoint, not in the model\) \(1\):"):
        load_imagenet_backbone(plain_resnet18(), extra)
    with pytest.raises(TypeError, match="SelfyModel or SelfyForVideoClassification"):
        load_imagenet_backbone(net, net.state_dict())


def test_timm_safetensors_file_and_offline_hub_cache(tmp_path):
    timm = pytest.importorskip("timm")
    net = randomise_(timm.create_model("resnet18", pretrained=False), seed=6)
    path = tmp_path / "model.safetensors"
    save_file(net.state_dict(), str(path))
    ours = plain_resnet18()
    load_imagenet_backbone(ours, path)
    frames = clips(batch=1, size=64, frames=2)
    with torch.no_grad():
        reference = net.forward_features(frames.flatten(0, 1))
        torch.testing.assert_close(
            ours(frames).last_hidden_state.flatten(0, 1), reference, rtol=1e-5, atol=1e-5
        )

    # The same file as the Hub cache snapshot of `timm/resnet18.test`, converted offline by the script.
    cache = tmp_path / "hub"
    snapshot = cache / "models--timm--resnet18.test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--timm--resnet18.test" / "refs").mkdir()
    (cache / "models--timm--resnet18.test" / "refs" / "main").write_text("0" * 40)
    (snapshot / "model.safetensors").write_bytes(path.read_bytes())
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000}))
    output = tmp_path / "selfynet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    script = str(REPO / "scripts" / "convert_imagenet_backbone.py")
    argv = ["--source", "timm/resnet18.test", "--preset", "selfynet-tsm-r18", "--num-labels", "3"]
    argv += ["--num-frames", str(FRAMES), "--output", str(output)]
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_HUB_PROGRAM, script, *argv], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Loaded 120 backbone tensors from timm/resnet18.test (torchvision ResNet)" in done.stdout
    assert (
        "refused: backbone source 'timm/not-cached' is neither a file, a directory, nor a Hugging Face Hub"
        in (done.stdout)
    )
    converted = SelfyForVideoClassification.from_pretrained(output)
    for key, tensor in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(converted.selfy.state_dict()[key], tensor), key
    assert SelfyVideoProcessor.from_pretrained(output).num_frames == FRAMES


def test_transformers_resnet_directory(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    resnet18 = {
        "layer_type": "basic",
        "depths": [2, 2, 2, 2],
        "hidden_sizes": [64, 128, 256, 512],
        "embedding_size": 64,
    }
    config = ResNetConfig(**resnet18)
    net = randomise_(ResNetModel(config), seed=7)
    net.save_pretrained(tmp_path / "resnet")
    ours = plain_resnet18()
    report = load_imagenet_backbone(ours, tmp_path / "resnet")
    assert report.source_format == "transformers" and report.skipped == []
    frames = clips(batch=1, size=64, frames=2)
    with torch.no_grad():
        reference = net(frames.flatten(0, 1), output_hidden_states=True).hidden_states
    assert_stages_equal(ours, list(reference), frames)

    classifier = ResNetForImageClassification(ResNetConfig(**resnet18, num_labels=10))
    report = load_imagenet_backbone(plain_resnet18(), classifier.state_dict())
    assert report.skipped == ["fc.bias", "fc.weight"]

    (tmp_path / "resnet" / "config.json").write_text(
        json.dumps(config.to_dict() | {"downsample_in_bottleneck": True})
    )
    with pytest.raises(ValueError, match=r"strides in the first 1x1 conv"):
        load_imagenet_backbone(plain_resnet18(), tmp_path / "resnet")
