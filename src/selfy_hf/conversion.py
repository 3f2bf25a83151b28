"""
Weight conversion.

- Official checkpoints: the `{'state_dict': ...}` files written by the authors' SELFY `main.py` (a `DataParallel(TSN)`
  with keys `module.base_model.*` and a Conv1d `module.new_fc`), and the same layout from the mit-han-lab TSM repo
  (shifted convs wrapped as `conv1.net`, a Linear `new_fc`), become a [`SelfyForVideoClassification`] saved with
  `save_pretrained`.
- ImageNet initialisation: the ResNet weights of torchvision, timm or transformers (`ResNetModel`) load into the
  SELFYNet backbone; the SELFY blocks and the classifier keep their initialisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .configuration_selfy import RESNET_LAYOUTS, SelfyConfig
from .modeling_selfy import SelfyForVideoClassification, SelfyModel, SelfyPreTrainedModel
from .video_processing_selfy import SelfyVideoProcessor

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

OFFICIAL_ARCHS: dict[str, int] = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}

# The SELFY block that the official `ops/resnet_TSM.py` hardcodes after `layer2`. Only the number of temporal offsets
# is read from the checkpoint (the fusing conv's input channels), in case it was trained with another window.
OFFICIAL_SELFY_BLOCK: dict = {
    "selfy_stages": [2],
    "selfy_hidden_size": 128,
    "selfy_downsample": True,
    "selfy_window_size": 9,
    "selfy_similarity": "cosine",
    "selfy_similarity_eps": 1e-6,
    "selfy_extraction": "conv",
    "selfy_extraction_channels": [4, 16, 64, 64],
    "selfy_integration": "conv",
    "selfy_integration_channels": [64, 64, 64, 64],
}


def _conv_bn_names(official: str, ours: str) -> dict[str, str]:
    """An official nn.Sequential(conv, BN, ...) at `official` is our SelfyConvNormAct (`conv`, `bn`) at `ours`."""
    return {f"{official}.0": f"{ours}.conv", f"{official}.1": f"{ours}.bn"}


# Official module names inside `base_model.selfy` -> ours inside `selfy.selfy_blocks.layer2`. `conv3_fuse` starts
# with an einops Rearrange, so its conv and BN are at indices 1 and 2.
_SELFY_BLOCK_MODULES: dict[str, str] = {
    **_conv_bn_names("stss_transformation.downsample", "transform.downsample"),
    **{
        k: v
        for i in range(4)
        for k, v in _conv_bn_names(f"stss_extraction.conv{i}", f"extractor.layers.{i}").items()
    },
    **{
        k: v
        for i in range(3)
        for k, v in _conv_bn_names(f"stss_integration.conv{i}", f"integrator.layers.{i}").items()
    },
    "stss_integration.conv3_fuse.1": "integrator.fuse.conv",
    "stss_integration.conv3_fuse.2": "integrator.fuse.bn",
    **_conv_bn_names("stss_integration.upsample", "integrator.project"),
}
_OFFICIAL_SELFY = "base_model.selfy."
_OUR_SELFY = "selfy.selfy_blocks.layer2."
# `new_fc` when TSN's dropout > 0; otherwise the base model's own last layer (`fc1` in SELFY, `fc` in TSM) is the head.
_OFFICIAL_CLASSIFIERS = ("new_fc", "base_model.fc1", "base_model.fc")
_OFFICIAL_BACKBONE = re.compile(r"base_model\.(conv1|bn1|layer[1-4]\.\d+\.(?:conv\d|bn\d|downsample\.[01]))")
_TSM_SHIFTED_CONV = re.compile(r"(base_model\.layer[1-4]\.\d+\.conv1)\.net")
_OFFICIAL_INTEGRATION_CHANNELS = OFFICIAL_SELFY_BLOCK["selfy_integration_channels"][2]


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """
    Read the tensors of a checkpoint file: `.safetensors`, or a torch pickle (`.pth`, `.pt`, `.pth.tar`, `.bin`)
    loaded with `weights_only=True`, so no code in the file runs. Training checkpoints that wrap the weights as
    `{'state_dict': ...}` or `{'model': ...}` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"could not read {str(path)!r} with torch.load(weights_only=True): {error}. Only checkpoints made of "
            "tensors and plain Python values load safely; re-save the state dict alone if you trust the file."
        ) from error
    return unwrap_state_dict(checkpoint, name=str(path))


def unwrap_state_dict(checkpoint: Mapping, name: str = "checkpoint") -> StateDict:
    """The tensors of `checkpoint`, unwrapping `{'state_dict': ...}` / `{'model': ...}` training checkpoints."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"{name} must be a mapping of parameter names to tensors, got {type(checkpoint).__name__}"
        )
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"{name} holds values that are not tensors under {not_tensors[:5]}: not a state dict")
    return dict(checkpoint)


def _strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Drop `prefix` (e.g. DataParallel's `module.`) when every key has it."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def load_id2label(
    labels: Mapping | Sequence[str] | str | os.PathLike, num_labels: int | None = None
) -> dict[int, str]:
    """
    Class names as `{index: name}` from a mapping (`{index: name}` or `{name: index}`, keys or values may be numeric
    strings as in JSON), a list of names, or a JSON file holding either. Checks that the indices are
    `0..num_labels-1`.
    """
    if isinstance(labels, (str, os.PathLike)):
        with open(labels, encoding="utf-8") as file:
            labels = json.load(file)
    if isinstance(labels, Mapping):
        items = list(labels.items())
        if (
            items
            and all(_is_index(value) for _, value in items)
            and not all(_is_index(key) for key, _ in items)
        ):
            items = [(value, key) for key, value in items]  # {name: index}
        if not all(_is_index(key) for key, _ in items):
            raise ValueError("id2label must map class indices to names (or names to indices)")
        id2label = {int(key): str(value) for key, value in items}
    elif isinstance(labels, Sequence):
        id2label = {index: str(name) for index, name in enumerate(labels)}
    else:
        raise TypeError(
            f"id2label must be a mapping, a list or a JSON file path, got {type(labels).__name__}"
        )
    expected = num_labels if num_labels is not None else len(id2label)
    if sorted(id2label) != list(range(expected)):
        raise ValueError(
            f"id2label must name every class 0..{expected - 1} exactly once, got {len(id2label)} entries "
            f"with indices {sorted(id2label)[:10]}{'...' if len(id2label) > 10 else ''}"
        )
    return id2label


def _is_index(value) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


def _label_fields(num_labels: int, id2label: Mapping | Sequence[str] | str | os.PathLike | None) -> dict:
    """Config fields for the labels: the given names, or transformers' generic `LABEL_i`."""
    if id2label is None:
        return {"num_labels": num_labels}
    names = load_id2label(id2label, num_labels)
    return {"id2label": names, "label2id": {name: index for index, name in names.items()}}


# ----------------------------------------------------------------------------------------------------------------
# ResNet layouts (for error messages that say what a checkpoint is)
# ----------------------------------------------------------------------------------------------------------------


def _resnet_layout(keys) -> tuple[str, list[int]] | None:
    """(layer_type, depths) of torchvision-named ResNet keys, or None if they have no residual stages."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in keys:
        match = re.match(r"(?:.*\.)?layer([1-4])\.(\d+)\.(conv\d)", key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            bottleneck = bottleneck or match.group(3) == "conv3"
    if not blocks:
        return None
    return ("bottleneck" if bottleneck else "basic"), [len(blocks.get(stage, ())) for stage in range(1, 5)]


def _describe_layout(layout: tuple[str, list[int]] | None) -> str:
    if layout is None:
        return "no ResNet stages"
    for depth, known in RESNET_LAYOUTS.items():
        if (known[0], list(known[1])) == (layout[0], layout[1]):
            return f"ResNet-{depth} ({layout[0]} blocks, depths {layout[1]})"
    return f"a ResNet of {layout[0]} blocks with depths {layout[1]}"


def _key_problems(
    missing: list[str], unexpected: list[str], mismatched: list[str], limit: int | None = None
) -> list[str]:
    """Message lines listing missing / unexpected keys and shape mismatches (all of them unless `limit`)."""

    def listed(title: str, items: list[str]) -> list[str]:
        shown = items if limit is None else items[:limit]
        more = [f"  ... and {len(items) - len(shown)} more"] if len(shown) < len(items) else []
        return [f"{title} ({len(items)}):", *(f"  {item}" for item in shown), *more] if items else []

    return (
        listed("missing keys (the model needs them, the checkpoint lacks them)", missing)
        + listed("unexpected keys (in the checkpoint, not in the model)", unexpected)
        + listed("shape mismatches (checkpoint vs model)", mismatched)
    )


# ----------------------------------------------------------------------------------------------------------------
# Official SELFY / TSM checkpoints
# ----------------------------------------------------------------------------------------------------------------


def official_key_to_selfy(key: str) -> str | None:
    """Our parameter name for an official checkpoint key (without DataParallel's `module.`), or None if the key
    belongs to nothing of our model."""
    module, _, tensor_name = key.rpartition(".")
    shifted = _TSM_SHIFTED_CONV.fullmatch(module)
    module = shifted[1] if shifted else module
    if module in _OFFICIAL_CLASSIFIERS:
        return f"classifier.{tensor_name}"
    backbone = _OFFICIAL_BACKBONE.fullmatch(module)
    if backbone:
        return f"selfy.{backbone[1]}.{tensor_name}"
    if module.startswith(_OFFICIAL_SELFY):
        ours = _SELFY_BLOCK_MODULES.get(module[len(_OFFICIAL_SELFY) :])
        return f"{_OUR_SELFY}{ours}.{tensor_name}" if ours else None
    return None


def selfy_key_to_official(key: str, shifted_convs: bool = False) -> str:
    """The official checkpoint key (without `module.`) of one of our parameter names; `shifted_convs` for the
    mit-han-lab TSM layout, whose shifted convs are `conv1.net`."""
    module, _, tensor_name = key.rpartition(".")
    if module == "classifier":
        return f"new_fc.{tensor_name}"
    if module.startswith(_OUR_SELFY):
        official = {ours: theirs for theirs, ours in _SELFY_BLOCK_MODULES.items()}[module[len(_OUR_SELFY) :]]
        return f"{_OFFICIAL_SELFY}{official}.{tensor_name}"
    module = "base_model." + module.removeprefix("selfy.")
    if shifted_convs and re.fullmatch(r"base_model\.layer[1-4]\.\d+\.conv1", module):
        module += ".net"
    return f"{module}.{tensor_name}"


def _is_mit_tsm_layout(state_dict: StateDict) -> bool:
    """mit-han-lab TSM checkpoints wrap shifted convs (`conv1.net`) and classify with a Linear (2D weight); the
    SELFY repo shifts inside the block and classifies with a Conv1d (3D weight)."""
    if any(_TSM_SHIFTED_CONV.match(key) for key in state_dict):
        return True
    heads = [state_dict[f"{name}.weight"] for name in _OFFICIAL_CLASSIFIERS if f"{name}.weight" in state_dict]
    return bool(heads) and heads[0].dim() == 2


def _official_temporal_module(state_dict: StateDict, mit_layout: bool) -> str:
    """`tsm` or `none`: SELFY-repo ResNets always shift; mit-han-lab ones shift where `conv1` is wrapped."""
    if not mit_layout:
        return "tsm"
    blocks = {m[1] for key in state_dict if (m := re.match(r"base_model\.(layer[1-4]\.\d+)\.conv1\.", key))}
    shifted = {
        m[1] for key in state_dict if (m := re.match(r"base_model\.(layer[1-4]\.\d+)\.conv1\.net\.", key))
    }
    if shifted and shifted != blocks:
        raise ValueError(
            f"the checkpoint shifts only {len(shifted)} of its {len(blocks)} residual blocks (TSM's every-other-block "
            "placement, used for ResNet-101); SELFYNet shifts every block, so this checkpoint cannot be converted"
        )
    return "tsm" if shifted else "none"


def _official_temporal_offsets(state_dict: StateDict) -> list[int]:
    """The SELFY block's temporal offsets: L = input channels of the fusing conv / per-offset channels."""
    fuse = state_dict.get(f"{_OFFICIAL_SELFY}stss_integration.conv3_fuse.1.weight")
    if fuse is None:
        return [-2, -1, 0, 1, 2]  # the official default; the missing key is reported when loading
    num_offsets, remainder = divmod(fuse.shape[1], _OFFICIAL_INTEGRATION_CHANNELS)
    if remainder or num_offsets % 2 == 0:
        raise ValueError(
            f"the SELFY fusing conv takes {fuse.shape[1]} channels, not an odd multiple of "
            f"{_OFFICIAL_INTEGRATION_CHANNELS}: not an official SELFY block"
        )
    return list(range(-(num_offsets // 2), num_offsets // 2 + 1))


def _official_num_labels(state_dict: StateDict) -> int:
    for name in _OFFICIAL_CLASSIFIERS:
        if f"{name}.weight" in state_dict:
            return state_dict[f"{name}.weight"].shape[0]
    raise ValueError(
        f"the checkpoint has no classifier ({', '.join(_OFFICIAL_CLASSIFIERS)}); pass num_labels"
    )


def official_config(
    arch: str,
    num_frames: int,
    num_labels: int,
    selfy: bool = True,
    temporal_module: str = "tsm",
    temporal_offsets: Sequence[int] = (-2, -1, 0, 1, 2),
    shift_div: int = 8,
    id2label: Mapping | Sequence[str] | str | os.PathLike | None = None,
) -> SelfyConfig:
    """
    The [`SelfyConfig`] of an official model: `arch` one of `resnet18/34/50/101`, with the official SELFY block after
    `layer2` (`selfy=False`: the TSM baseline), TSM shifts of `1 / shift_div` of the channels each way.
    """
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"arch must be one of {sorted(OFFICIAL_ARCHS)}, got {arch!r}")
    block = (
        {**OFFICIAL_SELFY_BLOCK, "selfy_temporal_offsets": list(temporal_offsets)}
        if selfy
        else {"selfy_stages": []}
    )
    return SelfyConfig(
        backbone_depth=OFFICIAL_ARCHS[arch],
        num_frames=num_frames,
        temporal_module=temporal_module,
        shift_div=shift_div,
        classifier_dropout=0.5,  # the official default --dropout
        **block,
        **_label_fields(num_labels, id2label),
    )


def load_official_state_dict(
    model: SelfyForVideoClassification, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """
    Load an official SELFY / TSM state dict (DataParallel's `module.` optional) into `model`. Refuses, listing every
    problem, if any key is missing, unexpected, or of another shape; BN `num_batches_tracked` counters are optional.
    """
    state_dict = _strip_prefix(dict(state_dict), "module.")
    mit_layout = _is_mit_tsm_layout(state_dict)
    expected = model.state_dict()
    converted: StateDict = {}
    origin: dict[str, str] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        ours = official_key_to_selfy(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if ours == "classifier.weight" and tensor.dim() == 3 and tensor.shape[-1] == 1:
            tensor = tensor[..., 0]  # the official head is a kernel-1 Conv1d
        converted[ours], origin[ours] = tensor, key
    missing = [
        selfy_key_to_official(key, mit_layout)
        for key in expected
        if key not in converted and not key.endswith("num_batches_tracked")
    ]
    mismatched = [
        f"{origin[key]}: {tuple(state_dict[origin[key]].shape)} vs {key}: {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if tensor.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "\n".join(
                [
                    f"The checkpoint does not match a {_describe_config(model.config)}:",
                    *_key_problems(missing, unexpected, mismatched),
                    *_official_hints(state_dict, model.config),
                ]
            )
        )
    counters = {key: value for key, value in expected.items() if key.endswith("num_batches_tracked")}
    model.load_state_dict({**counters, **converted})


def _describe_config(config: SelfyConfig) -> str:
    layout = _describe_layout((config.layer_type, config.depths))
    block = "with a SELFY block" if config.selfy_stages else "without SELFY block"
    return f"{config.temporal_module.upper()} {layout} {block}, {config.num_labels} classes"


def _official_hints(state_dict: StateDict, config: SelfyConfig) -> list[str]:
    hints = []
    has_block = any(key.startswith(_OFFICIAL_SELFY) for key in state_dict)
    if config.selfy_stages and not has_block:
        hints.append(
            "The checkpoint has no SELFY block: is it a TSM baseline? Then pass --no-selfy (selfy=False)."
        )
    if not config.selfy_stages and has_block:
        hints.append("The checkpoint has a SELFY block: drop --no-selfy (selfy=True).")
    layout = _resnet_layout(key for key in state_dict if key.startswith("base_model.layer"))
    if layout is not None and layout != (config.layer_type, config.depths):
        hints.append(f"Its backbone is a {_describe_layout(layout)}: check --arch.")
    return hints


def convert_official_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str,
    num_frames: int,
    num_labels: int | None = None,
    id2label: Mapping | Sequence[str] | str | os.PathLike | None = None,
    selfy: bool = True,
    shift_div: int = 8,
    output_dir: str | os.PathLike | None = None,
) -> SelfyForVideoClassification:
    """
    Convert a checkpoint of the official SELFY code (`main.py`'s `{'state_dict': DataParallel(TSN).state_dict()}`)
    or of the mit-han-lab TSM code (same layout, `conv1.net` shifted convs, Linear head) into a
    [`SelfyForVideoClassification`] in eval mode, and save it with `save_pretrained` to `output_dir` if given,
    together with a [`SelfyVideoProcessor`] of the official test preprocessing (SELFY: resize to 240x320, centre
    crop 224; TSM: shorter side 256, centre crop 224).

    Args:
        checkpoint: a checkpoint file (read with `torch.load(weights_only=True)`, or safetensors) or its dict.
        arch: the backbone, `resnet18`, `resnet34`, `resnet50` or `resnet101`.
        num_frames: frames per clip (the official `--num_segments`).
        num_labels: number of classes; read from the checkpoint's classifier when omitted.
        id2label: class names (a `{index: name}` / `{name: index}` mapping, a list, or a JSON file of either);
            generic `LABEL_i` names when omitted.
        selfy: whether the checkpoint has the SELFY block (`False`: the TSM baseline).
        shift_div: TSM shifts `channels // shift_div` channels each way (8 in both official repos).
        output_dir: where to save the converted model and processor.
    """
    name = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        state_dict = load_state_dict_file(checkpoint)
    else:
        state_dict = unwrap_state_dict(checkpoint)
    state_dict = _strip_prefix(state_dict, "module.")
    mit_layout = _is_mit_tsm_layout(state_dict)
    if num_labels is None:
        num_labels = (
            len(load_id2label(id2label)) if id2label is not None else _official_num_labels(state_dict)
        )
    config = official_config(
        arch,
        num_frames,
        num_labels,
        selfy=selfy,
        temporal_module=_official_temporal_module(state_dict, mit_layout),
        temporal_offsets=_official_temporal_offsets(state_dict) if selfy else (),
        shift_div=shift_div,
        id2label=id2label,
    )
    model = SelfyForVideoClassification(config)
    load_official_state_dict(model, state_dict)
    model.eval()
    logger.info(
        "Converted %s (%s layout): %s", name, "TSM" if mit_layout else "SELFY", _describe_config(config)
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        official_video_processor(num_frames, mit_layout).save_pretrained(output_dir)
    return model


def official_video_processor(num_frames: int, tsm_repo: bool = False) -> SelfyVideoProcessor:
    """The official single-view test preprocessing: SELFY resizes frames to 240x320, mit-han-lab TSM resizes the
    shorter side to 256; both take the 224 centre crop and normalise with the ImageNet statistics."""
    size = {"shortest_edge": 256} if tsm_repo else {"height": 240, "width": 320}
    return SelfyVideoProcessor(num_frames=num_frames, size=size, crop_size=224)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet backbones (torchvision, timm, transformers)
# ----------------------------------------------------------------------------------------------------------------

_IMAGENET_HEADS = ("fc.",)


@dataclass
class BackboneLoadReport:
    """What [`load_imagenet_backbone`] did: our tensors it `loaded`, the source's tensors it `skipped` (the ImageNet
    classifier), and our tensors that keep their `initialised` values (SELFY blocks, video classifier)."""

    source: str
    source_format: str
    loaded: list[str]
    skipped: list[str]
    initialised: list[str]

    def summary(self) -> str:
        """One paragraph for logs."""
        groups = sorted({_module_group(key) for key in self.initialised})
        return (
            f"Loaded {len(self.loaded)} backbone tensors from {self.source} ({self.source_format} ResNet); "
            f"skipped {len(self.skipped)} source tensors ({', '.join(self.skipped) or 'none'}); "
            f"{len(self.initialised)} tensors keep their initialisation ({', '.join(groups) or 'none'})."
        )


def _module_group(key: str) -> str:
    match = re.match(r"(.*selfy_blocks\.layer\d)\.", key)
    return match[1] if match else key.split(".")[0]


def _transformers_key_to_torchvision(key: str) -> str:
    """The torchvision name of a transformers `ResNetModel` / `ResNetForImageClassification` key (stage i, block j,
    conv k -> `layer{i+1}.{j}.conv{k+1}`); keys no rule knows are kept, to be refused with the others."""
    key = key.removeprefix("resnet.")
    stem = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", key)
    if stem:
        return f"{'conv1' if stem[1] == 'convolution' else 'bn1'}.{stem[2]}"
    block = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
    shortcut = re.fullmatch(block + r"shortcut\.(convolution|normalization)\.(\w+)", key)
    if shortcut:
        index = 0 if shortcut[3] == "convolution" else 1
        return f"layer{int(shortcut[1]) + 1}.{shortcut[2]}.downsample.{index}.{shortcut[4]}"
    layer = re.fullmatch(block + r"layer\.(\d+)\.(convolution|normalization)\.(\w+)", key)
    if layer:
        kind = "conv" if layer[4] == "convolution" else "bn"
        return f"layer{int(layer[1]) + 1}.{layer[2]}.{kind}{int(layer[3]) + 1}.{layer[5]}"
    head = re.fullmatch(r"classifier\.\d+\.(\w+)", key)
    return f"fc.{head[1]}" if head else key


def _check_transformers_resnet_config(config: Mapping, source: str) -> None:
    """Refuse the transformers ResNet variants whose layers compute something else than torchvision's ResNet."""
    differences = [
        (
            config.get("downsample_in_bottleneck", False),
            "strides in the first 1x1 conv of its bottlenecks (v1)",
        ),
        (config.get("downsample_in_first_stage", False), "downsamples in its first stage"),
        (config.get("hidden_act", "relu") != "relu", f"uses the activation {config.get('hidden_act')!r}"),
    ]
    for differs, what in differences:
        if differs:
            raise ValueError(f"{source} {what}; SELFYNet's backbone is a torchvision (v1.5) ResNet with ReLU")


def _read_directory(directory: Path) -> tuple[StateDict, dict]:
    """The weights (`*.safetensors`, else `pytorch_model.bin`) and `config.json` of a saved model directory."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{str(directory)!r} holds no *.safetensors or pytorch_model.bin weights")
    state_dict: StateDict = {}
    for file in files:
        state_dict.update(load_state_dict_file(file))
    return state_dict, config


def _download_from_hub(repo_id: str) -> Path:
    """The local snapshot of a Hub repo's weights and config (from the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except (OSError, EntryNotFoundError, HFValidationError) as error:
        raise ValueError(
            f"backbone source {repo_id!r} is neither a file, a directory, nor a Hugging Face Hub repo available "
            f"here ({type(error).__name__}: {error})"
        ) from error
    return directory


def read_imagenet_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
) -> tuple[StateDict, str]:
    """
    The weights of an ImageNet ResNet with torchvision names, and the source's format (`torchvision` for torchvision
    and timm, which share the names, or `transformers`). `source`: a module, a state dict, a checkpoint file
    (`.pth`, `.pt`, `.bin`, `.safetensors`), a `save_pretrained` directory, or a Hub repo id such as
    `timm/resnet50.a1_in1k` or `microsoft/resnet-50` (resolved by huggingface_hub, from its cache when offline).
    """
    config: dict = {}
    if isinstance(source, nn.Module):
        state_dict = dict(source.state_dict())
    elif isinstance(source, Mapping):
        state_dict = unwrap_state_dict(source, name="backbone source")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            state_dict = load_state_dict_file(path)
        else:
            state_dict, config = _read_directory(path if path.is_dir() else _download_from_hub(str(source)))
    else:
        raise TypeError(
            f"backbone source must be a path, a Hub repo id, a state dict or a module, got {type(source).__name__}"
        )
    state_dict = _strip_prefix(state_dict, "module.")
    if config.get("model_type") == "resnet" or any("embedder.embedder." in key for key in state_dict):
        _check_transformers_resnet_config(config, str(source))
        return {
            _transformers_key_to_torchvision(key): value for key, value in state_dict.items()
        }, "transformers"
    return state_dict, "torchvision"


def load_imagenet_backbone(
    model: SelfyPreTrainedModel, source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module
) -> BackboneLoadReport:
    """
    Initialise the ResNet of a SELFYNet ([`SelfyModel`] or [`SelfyForVideoClassification`]) from ImageNet weights:
    torchvision (`resnet50(weights=...)` state dicts, `.pth`), timm (`timm/resnet50.a1_in1k`, or its safetensors) or
    transformers (`microsoft/resnet-50`, a `ResNetModel` directory); see [`read_imagenet_checkpoint`]. The ImageNet
    classifier is skipped; the SELFY blocks and the video classifier keep their initialisation. Refuses, naming both
    ResNets, when the source does not have the model's depth and widths, and any source tensor it would not use.
    """
    if not isinstance(model, SelfyPreTrainedModel):
        raise TypeError(
            f"model must be a SelfyModel or SelfyForVideoClassification, got {type(model).__name__}"
        )
    backbone: SelfyModel = model.base_model
    prefix = "" if backbone is model else f"{model.base_model_prefix}."
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__}"
    state_dict, source_format = read_imagenet_checkpoint(source)
    skipped = sorted(key for key in state_dict if key.startswith(_IMAGENET_HEADS))
    weights = {key: value for key, value in state_dict.items() if key not in skipped}
    target = {
        key: value for key, value in backbone.state_dict().items() if not key.startswith("selfy_blocks.")
    }
    _check_backbone_compatible(weights, target, backbone.config, name)
    backbone.load_state_dict(weights, strict=False)
    loaded = [prefix + key for key in weights]
    loaded_set = set(loaded)
    report = BackboneLoadReport(
        source=name,
        source_format=source_format,
        loaded=loaded,
        skipped=skipped,
        initialised=[key for key in model.state_dict() if key not in loaded_set],
    )
    logger.info(report.summary())
    return report


def _check_backbone_compatible(
    weights: StateDict, target: StateDict, config: SelfyConfig, source: str
) -> None:
    missing = [key for key in target if key not in weights and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in weights if key not in target]
    mismatched = [
        f"{key}: {tuple(value.shape)} vs {tuple(target[key].shape)}"
        for key, value in weights.items()
        if key in target and value.shape != target[key].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    source_layout = _resnet_layout(weights)
    model_layout = (config.layer_type, config.depths)
    if source_layout != model_layout:
        headline = (
            f"Cannot initialise the backbone from {source}: it is {_describe_layout(source_layout)}, but the model's "
            f"backbone is {_describe_layout(model_layout)}. Use ImageNet weights of the same depth (or a preset "
            f"of the checkpoint's depth)."
        )
    else:
        headline = (
            f"Cannot initialise the backbone from {source}: its tensors do not match the model's ResNet."
        )
    raise ValueError("\n".join([headline, *_key_problems(missing, unexpected, mismatched, limit=10)]))


def convert_imagenet_backbone(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
    preset: str = "selfynet-tsm-r50",
    num_frames: int = 8,
    num_labels: int | None = None,
    id2label: Mapping | Sequence[str] | str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> tuple[SelfyForVideoClassification, BackboneLoadReport]:
    """
    A SELFYNet of `preset` ready for fine-tuning: the backbone from ImageNet weights ([`load_imagenet_backbone`]),
    the SELFY blocks and the classifier freshly initialised. Saved with a default [`SelfyVideoProcessor`] to
    `output_dir` if given. Give `num_labels` or `id2label`.
    """
    if num_labels is None and id2label is None:
        raise ValueError("give num_labels or id2label: the classifier's size")
    if num_labels is None:
        num_labels = len(load_id2label(id2label))
    config = SelfyConfig.from_preset(preset, num_frames=num_frames, **_label_fields(num_labels, id2label))
    model = SelfyForVideoClassification(config)
    report = load_imagenet_backbone(model, source)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        SelfyVideoProcessor(num_frames=num_frames).save_pretrained(output_dir)
    return model, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of `selfy-convert` (`scripts/convert_official_checkpoint.py`)."""
    parser = argparse.ArgumentParser(
        prog="selfy-convert",
        description="Convert an official SELFY (or mit-han-lab TSM) checkpoint into a `save_pretrained` directory.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="official checkpoint ({'state_dict': ...}, .pth/.tar)"
    )
    parser.add_argument(
        "--output", required=True, help="directory to write the converted model and processor to"
    )
    parser.add_argument(
        "--arch", required=True, choices=sorted(OFFICIAL_ARCHS), help="backbone of the checkpoint"
    )
    parser.add_argument(
        "--num-frames", type=int, required=True, help="frames per clip (official --num_segments)"
    )
    parser.add_argument(
        "--num-labels", type=int, help="classes (default: read from the checkpoint's classifier)"
    )
    parser.add_argument("--id2label", help="JSON file: {index: name}, {name: index} or a list of class names")
    parser.add_argument(
        "--no-selfy", action="store_true", help="the checkpoint is the TSM baseline (no SELFY block)"
    )
    parser.add_argument("--shift-div", type=int, default=8, help="TSM shifts channels // shift_div each way")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """`selfy-convert` / `python scripts/convert_official_checkpoint.py`: convert the checkpoint named on the
    command line and save the model and its video processor."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_official_checkpoint(
        args.checkpoint,
        arch=args.arch,
        num_frames=args.num_frames,
        num_labels=args.num_labels,
        id2label=args.id2label,
        selfy=not args.no_selfy,
        shift_div=args.shift_div,
        output_dir=args.output,
    )
    print(f"Saved the converted model and its video processor to {args.output}")


__all__ = [
    "OFFICIAL_ARCHS",
    "OFFICIAL_SELFY_BLOCK",
    "BackboneLoadReport",
    "convert_imagenet_backbone",
    "convert_official_checkpoint",
    "load_id2label",
    "load_imagenet_backbone",
    "load_official_state_dict",
    "load_state_dict_file",
    "main",
    "official_config",
    "official_key_to_selfy",
    "official_video_processor",
    "parse_args",
    "read_imagenet_checkpoint",
    "selfy_key_to_official",
    "unwrap_state_dict",
]
