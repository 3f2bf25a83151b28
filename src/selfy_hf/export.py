"""
ONNX export of SELFY video classifiers: `pixel_values` `(batch, T, 3, H, W)` in, `logits` `(batch, num_labels)` out,
with a dynamic batch and the frame count and image size fixed at export time.

T is fixed because the temporal shift and the STSS offsets are defined over exactly `config.num_frames` frames; H and
W are fixed because the SELFY block's transposed-conv upsampling and the STSS neighbour indices depend on the map
size. The label names travel in the file's metadata (`id2label`, JSON), next to `num_frames` and `image_size`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .modeling_selfy import SelfyForVideoClassification

DEFAULT_OPSET = 18
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# The example batch of the export: not 1, which torch.export would specialise as a constant.
_EXAMPLE_BATCH = 2


class _LogitsOnly(nn.Module):
    """The classifier as a plain `pixel_values -> logits` function, the signature the ONNX graph exposes."""

    def __init__(self, model: SelfyForVideoClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=False)[0]


def _check_exportable(model: nn.Module, num_frames: int | None) -> int:
    if not isinstance(model, SelfyForVideoClassification):
        raise TypeError(f"model must be a SelfyForVideoClassification, got {type(model).__name__}")
    config_frames = model.config.num_frames
    if num_frames is not None and num_frames != config_frames:
        raise ValueError(
            f"num_frames={num_frames} differs from the model's config.num_frames={config_frames}: the temporal shift "
            "and the STSS are built for the config's frame count"
        )
    if next(model.parameters()).device.type == "meta":
        raise ValueError(
            "model has no weights (built on the meta device); load or initialise it before exporting"
        )
    return config_frames


def _export_graph(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool) -> None:
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated and that the (static) frame-count check becomes constant.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes={INPUT_NAME: {0: batch}},
                verbose=False,
            )
        else:
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )


def _write_metadata(path: Path, model: SelfyForVideoClassification, image_size: int) -> None:
    import onnx

    proto = onnx.load(str(path))
    config = model.config
    metadata = {
        "model_type": config.model_type,
        "num_frames": str(config.num_frames),
        "image_size": str(image_size),
        "id2label": json.dumps({str(k): v for k, v in config.id2label.items()}),
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def export_onnx(
    model: SelfyForVideoClassification,
    path: str | os.PathLike,
    num_frames: int | None = None,
    image_size: int = 224,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> Path:
    """
    Export `model` to an ONNX file at `path` taking `pixel_values` `(batch, num_frames, 3, image_size, image_size)`
    (any batch) and returning `logits` `(batch, num_labels)` of the eval-mode model.

    Args:
        model: the classifier; its train/eval state is restored afterwards.
        path: output `.onnx` file (parent folders are created).
        num_frames: must equal `model.config.num_frames` when given (the default).
        image_size: the fixed height and width of the exported graph.
        opset: ONNX opset version.
        dynamo: `True` (default) uses the `torch.export`-based exporter, `False` the legacy TorchScript tracer;
            both give the same graph semantics and onnxruntime speed.

    Returns the path. Multi-view input `(batch, views, T, 3, H, W)` is not part of the graph: run the views as a
    batch and average their logits.
    """
    frames = _check_exportable(model, num_frames)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parameter = next(model.parameters())
    example = torch.randn(
        _EXAMPLE_BATCH, frames, model.config.num_channels, image_size, image_size, device=parameter.device
    )
    training_flags = {module: module.training for module in model.modules()}
    wrapper = _LogitsOnly(model).eval()
    try:
        _export_graph(wrapper, example, path, opset, dynamo)
    finally:
        # The legacy exporter restores the wrapper's (train) mode recursively: put every module back as it was.
        for module, training in training_flags.items():
            module.training = training
    _write_metadata(path, model, image_size)
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata written by [`export_onnx`]: `num_frames`, `image_size` (ints), `id2label` (int -> str)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    metadata: dict = dict(props)
    for key in ("num_frames", "image_size"):
        if key in props:
            metadata[key] = int(props[key])
    if "id2label" in props:
        metadata["id2label"] = {int(k): v for k, v in json.loads(props["id2label"]).items()}
    return metadata


def onnx_session(path: str | os.PathLike, num_threads: int | None = None):
    """An onnxruntime CPU `InferenceSession` for an exported file, with `num_threads` intra-op threads (default:
    onnxruntime's choice, all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_parity(
    model: SelfyForVideoClassification,
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> dict[int, float]:
    """
    Run the exported file and the eval-mode model on the same random clips, one per batch size, and return the
    relative error `max|onnx - torch| / max|torch|` of the logits for each batch size.
    """
    metadata = read_onnx_metadata(path)
    session = onnx_session(path)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    errors = {}
    try:
        for batch in batch_sizes:
            shape = (batch, metadata["num_frames"], model.config.num_channels, *[metadata["image_size"]] * 2)
            pixel_values = torch.randn(shape, generator=generator)
            expected = model(pixel_values.to(device)).logits.float().cpu()
            actual = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.numpy()})[0])
            errors[batch] = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    finally:
        model.train(was_training)
    return errors


__all__ = ["DEFAULT_OPSET", "export_onnx", "onnx_parity", "onnx_session", "read_onnx_metadata"]
