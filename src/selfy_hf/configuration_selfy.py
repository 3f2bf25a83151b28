"""Configuration of SELFY video action-recognition models (TSN/TSM ResNets with SELFY blocks)."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

RESNET_LAYOUTS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}
BOTTLENECK_EXPANSION = 4
TEMPORAL_MODULES = ("tsm", "none")
EXTRACTIONS = ("conv", "mlp", "soft_argmax")
INTEGRATIONS = ("conv", "mlp", "fc")
SIMILARITIES = ("cosine", "dot")

_SELFY_R50_BLOCK = {"selfy_stages": [2], "selfy_temporal_offsets": [-2, -1, 0, 1, 2]}
_TINY_BACKBONE = {
    "backbone_depth": None,
    "layer_type": "basic",
    "depths": [1, 1, 1, 1],
    "embedding_size": 16,
    "hidden_sizes": [16, 32, 64, 128],
    "selfy_hidden_size": 32,
    "selfy_downsample": False,
    "selfy_window_size": 5,
    "selfy_extraction_channels": [4, 16, 32, 32],
    "selfy_integration_channels": [32, 32, 32, 32],
}

# Models of the paper (Table 1, Table 4) and small CPU-sized variants of the same design.
PRESETS: dict[str, dict[str, Any]] = {
    "selfynet-tsm-r50": {"backbone_depth": 50, "temporal_module": "tsm", **_SELFY_R50_BLOCK},
    "selfynet-tsm-r50-16f": {
        "backbone_depth": 50,
        "temporal_module": "tsm",
        "num_frames": 16,
        "selfy_stages": [2],
        "selfy_temporal_offsets": [-4, -3, -2, -1, 0, 1, 2, 3, 4],
    },
    "selfynet-tsm-r18": {"backbone_depth": 18, "temporal_module": "tsm", **_SELFY_R50_BLOCK},
    "selfynet-tsn-r50": {"backbone_depth": 50, "temporal_module": "none", **_SELFY_R50_BLOCK},
    "selfynet-tsn-r18": {"backbone_depth": 18, "temporal_module": "none", **_SELFY_R50_BLOCK},
    "tsm-r50": {"backbone_depth": 50, "temporal_module": "tsm", "selfy_stages": []},
    "tsm-r18": {"backbone_depth": 18, "temporal_module": "tsm", "selfy_stages": []},
    "tsn-r50": {"backbone_depth": 50, "temporal_module": "none", "selfy_stages": []},
    "tsn-r18": {"backbone_depth": 18, "temporal_module": "none", "selfy_stages": []},
    "selfynet-tiny": {**_TINY_BACKBONE, "temporal_module": "tsm", **_SELFY_R50_BLOCK},
    "tsm-tiny": {**_TINY_BACKBONE, "temporal_module": "tsm", "selfy_stages": []},
    "tsn-tiny": {**_TINY_BACKBONE, "temporal_module": "none", "selfy_stages": []},
}


class SelfyConfig(PreTrainedConfig):
    r"""
    Configuration of a SELFYNet: a TSN or TSM ResNet that sees a clip as `num_frames` images, with SELFY blocks
    (spatio-temporal self-similarity, Kwon et al., ICCV 2021) inserted after chosen stages. Without SELFY blocks
    (`selfy_stages=[]`) it is the plain TSN/TSM baseline. Use [`SelfyConfig.from_preset`] for the paper's models.

    Args:
        backbone_depth (`int` or `None`, *optional*, defaults to 50):
            ResNet depth, one of 18, 34, 50, 101. Fills `layer_type` and `depths` when those are not given; `None`
            for a custom layout given by `layer_type`, `depths`, `embedding_size` and `hidden_sizes`.
        layer_type (`str`, *optional*):
            `"basic"` (two 3x3 convs) or `"bottleneck"` (1x1-3x3-1x1, expansion 4).
        depths (`list[int]`, *optional*):
            Number of residual blocks in each of the four stages (torchvision's `layer1..layer4`).
        embedding_size (`int`, *optional*, defaults to 64):
            Channels of the 7x7 stem convolution.
        hidden_sizes (`list[int]`, *optional*):
            Output channels of each stage; defaults to 64, 128, 256, 512 times the block expansion.
        num_channels (`int`, *optional*, defaults to 3):
            Input image channels.
        num_frames (`int`, *optional*, defaults to 8):
            Frames T per clip (TSN segments). TSM and SELFY mix information across exactly these frames.
        temporal_module (`str`, *optional*, defaults to `"tsm"`):
            `"tsm"`: a residual temporal shift (zero padded) before the first conv of every residual block, as the
            official TSM/SELFY code; `"none"`: TSN, frames are processed independently.
        shift_div (`int`, *optional*, defaults to 8):
            TSM shifts `channels // shift_div` channels one frame back and as many one frame forward.
        classifier_dropout (`float`, *optional*, defaults to 0.5):
            Dropout before the per-frame classifier.
        selfy_stages (`list[int]`, *optional*, defaults to `[2]`):
            Stages (1-4, torchvision numbering) after which a SELFY block is inserted. The paper's default, "after
            the third stage res3", is the output of torchvision's `layer2`, i.e. `[2]`. Empty: the TSN/TSM baseline.
        selfy_hidden_size (`int`, *optional*, defaults to 128):
            Channels of the features whose self-similarity is computed (after the block's first conv).
        selfy_downsample (`bool`, *optional*, defaults to `True`):
            Official: a 3x3 stride-2 conv + BN + ReLU before the STSS and a strided transposed 1x1x1 conv after the
            integration. `False` keeps the resolution (a 1x1 conv + BN + ReLU in, a 1x1x1 conv out): use it for small
            inputs, whose stage-2 maps would shrink below the spatial window.
        selfy_temporal_offsets (`list[int]`, *optional*, defaults to `[-2, -1, 0, 1, 2]`):
            Temporal offsets l of the STSS (L = their count). Paper Table 4a: `[0]`, `[1]`, `[-1, 0, 1]`,
            `[-2..2]`, `[-3..3]`. Offsets beyond the clip give zero similarity, as in the official code.
        selfy_window_size (`int`, *optional*, defaults to 9):
            Spatial window U = V (odd) of the STSS.
        selfy_similarity (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"`: features are L2-normalised as the official code (x / sqrt(|x|^2 + eps)); `"dot"`: raw
            dot products.
        selfy_similarity_eps (`float`, *optional*, defaults to 1e-6):
            The eps of the cosine normalisation.
        selfy_extraction (`str`, *optional*, defaults to `"conv"`):
            Feature extraction from each (U, V) similarity map: `"conv"` (four 1x3x3 convs over (L, U, V), the
            official design), `"mlp"` (four FC layers over the flattened U*V similarities, paper eq. 3-4) or
            `"soft_argmax"` (a displacement (u, v) per offset, paper eq. 2).
        selfy_extraction_channels (`list[int]`, *optional*, defaults to `[4, 16, 64, 64]`):
            Output channels of the four extraction layers (conv and mlp); the last one is C_F.
        selfy_softargmax_temperature (`float`, *optional*, defaults to 0.01):
            Temperature tau of the soft-argmax (paper eq. 2).
        selfy_integration (`str`, *optional*, defaults to `"conv"`):
            Feature integration: `"conv"` (three 1x3x3 convs over (T, X, Y) per offset, then a 1x3x3 conv fusing the
            L offsets, official), `"mlp"` (the same layers as 1x1x1, i.e. FC) or `"fc"` (only the fusing FC layer).
            Every variant ends with the projection back to the input channels (and resolution) and a BN that
            starts at zero, so the block starts as an identity.
        selfy_integration_channels (`list[int]`, *optional*, defaults to `[64, 64, 64, 64]`):
            Output channels of the three per-offset layers and of the fusing layer.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Unused by the ResNet (which uses Kaiming init as the official code); kept for transformers utilities.

    Example:

    ```python
    >>> from selfy_hf import SelfyConfig, SelfyForVideoClassification
    >>> config = SelfyConfig.from_preset("selfynet-tsm-r18", num_labels=174)
    >>> model = SelfyForVideoClassification(config)
    >>> config.selfy_temporal_offsets
    [-2, -1, 0, 1, 2]
    ```
    """

    model_type = "selfy"

    def __init__(
        self,
        backbone_depth: int | None = 50,
        layer_type: str | None = None,
        depths: list[int] | None = None,
        embedding_size: int = 64,
        hidden_sizes: list[int] | None = None,
        num_channels: int = 3,
        num_frames: int = 8,
        temporal_module: str = "tsm",
        shift_div: int = 8,
        classifier_dropout: float = 0.5,
        selfy_stages: list[int] | None = None,
        selfy_hidden_size: int = 128,
        selfy_downsample: bool = True,
        selfy_temporal_offsets: list[int] | None = None,
        selfy_window_size: int = 9,
        selfy_similarity: str = "cosine",
        selfy_similarity_eps: float = 1e-6,
        selfy_extraction: str = "conv",
        selfy_extraction_channels: list[int] | None = None,
        selfy_softargmax_temperature: float = 0.01,
        selfy_integration: str = "conv",
        selfy_integration_channels: list[int] | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if backbone_depth is not None:
            if backbone_depth not in RESNET_LAYOUTS:
                raise ValueError(
                    f"backbone_depth must be one of {sorted(RESNET_LAYOUTS)} or None, got {backbone_depth}"
                )
            default_type, default_depths = RESNET_LAYOUTS[backbone_depth]
            layer_type = layer_type or default_type
            depths = list(depths) if depths is not None else list(default_depths)
            if (layer_type, depths) != (default_type, default_depths):
                raise ValueError(
                    f"backbone_depth={backbone_depth} means layer_type={default_type!r}, depths={default_depths}; "
                    f"got layer_type={layer_type!r}, depths={depths}. Pass backbone_depth=None for a custom layout."
                )
        elif layer_type is None or depths is None:
            raise ValueError("With backbone_depth=None, give layer_type and depths explicitly.")
        expansion = BOTTLENECK_EXPANSION if layer_type == "bottleneck" else 1
        self.backbone_depth = backbone_depth
        self.layer_type = layer_type
        self.depths = list(depths)
        self.embedding_size = embedding_size
        self.hidden_sizes = (
            list(hidden_sizes) if hidden_sizes is not None else [w * expansion for w in (64, 128, 256, 512)]
        )
        self.num_channels = num_channels
        self.num_frames = num_frames
        self.temporal_module = temporal_module
        self.shift_div = shift_div
        self.classifier_dropout = classifier_dropout
        self.selfy_stages = list(selfy_stages) if selfy_stages is not None else [2]
        self.selfy_hidden_size = selfy_hidden_size
        self.selfy_downsample = selfy_downsample
        self.selfy_temporal_offsets = (
            list(selfy_temporal_offsets) if selfy_temporal_offsets is not None else [-2, -1, 0, 1, 2]
        )
        self.selfy_window_size = selfy_window_size
        self.selfy_similarity = selfy_similarity
        self.selfy_similarity_eps = selfy_similarity_eps
        self.selfy_extraction = selfy_extraction
        self.selfy_extraction_channels = (
            list(selfy_extraction_channels) if selfy_extraction_channels is not None else [4, 16, 64, 64]
        )
        self.selfy_softargmax_temperature = selfy_softargmax_temperature
        self.selfy_integration = selfy_integration
        self.selfy_integration_channels = (
            list(selfy_integration_channels) if selfy_integration_channels is not None else [64, 64, 64, 64]
        )
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate_selfy()

    @property
    def block_expansion(self) -> int:
        """Channel expansion of the residual blocks (4 for bottlenecks, 1 for basic blocks)."""
        return BOTTLENECK_EXPANSION if self.layer_type == "bottleneck" else 1

    @property
    def extraction_output_channels(self) -> int:
        """C_F: channels the extraction produces per (position, offset)."""
        return 2 if self.selfy_extraction == "soft_argmax" else self.selfy_extraction_channels[-1]

    def validate_selfy(self) -> None:
        """Raise a `ValueError` for any invalid combination, so no shape error surfaces later in `forward`."""
        checks = [
            (
                self.layer_type in ("basic", "bottleneck"),
                f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}",
            ),
            (
                len(self.depths) == 4 and all(d >= 1 for d in self.depths),
                f"depths must be 4 positive ints, got {self.depths}",
            ),
            (len(self.hidden_sizes) == 4, f"hidden_sizes must have 4 entries, got {self.hidden_sizes}"),
            (
                all(h % self.block_expansion == 0 for h in self.hidden_sizes),
                f"hidden_sizes {self.hidden_sizes} must be multiples of the bottleneck expansion {self.block_expansion}",
            ),
            (self.num_frames >= 1, f"num_frames must be >= 1, got {self.num_frames}"),
            (
                self.temporal_module in TEMPORAL_MODULES,
                f"temporal_module must be one of {TEMPORAL_MODULES}, got {self.temporal_module!r}",
            ),
            (self.shift_div >= 2, f"shift_div must be >= 2, got {self.shift_div}"),
            (
                0.0 <= self.classifier_dropout < 1.0,
                f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}",
            ),
            (
                all(s in (1, 2, 3, 4) for s in self.selfy_stages)
                and len(set(self.selfy_stages)) == len(self.selfy_stages),
                f"selfy_stages must be distinct stages among 1-4, got {self.selfy_stages}",
            ),
        ]
        if self.temporal_module == "tsm":
            narrowest = min([self.embedding_size, *[h // self.block_expansion for h in self.hidden_sizes]])
            checks.append(
                (
                    narrowest // self.shift_div >= 1,
                    f"shift_div={self.shift_div} shifts no channel of a {narrowest}-channel block",
                )
            )
        if self.selfy_stages:
            checks += self._selfy_block_checks()
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid SelfyConfig: {message}")

    def _selfy_block_checks(self) -> list[tuple[bool, str]]:
        offsets, window = self.selfy_temporal_offsets, self.selfy_window_size
        extraction_channels = self.selfy_extraction_channels
        return [
            (
                len(offsets) >= 1
                and len(set(offsets)) == len(offsets)
                and all(isinstance(o, int) for o in offsets),
                f"selfy_temporal_offsets must be distinct ints, got {offsets}",
            ),
            (
                max((abs(o) for o in offsets), default=0) < self.num_frames,
                f"selfy_temporal_offsets {offsets} reach beyond a clip of num_frames={self.num_frames}",
            ),
            (window >= 3 and window % 2 == 1, f"selfy_window_size must be an odd int >= 3, got {window}"),
            (
                self.selfy_similarity in SIMILARITIES,
                f"selfy_similarity must be one of {SIMILARITIES}, got {self.selfy_similarity!r}",
            ),
            (
                self.selfy_extraction in EXTRACTIONS,
                f"selfy_extraction must be one of {EXTRACTIONS}, got {self.selfy_extraction!r}",
            ),
            (
                self.selfy_integration in INTEGRATIONS,
                f"selfy_integration must be one of {INTEGRATIONS}, got {self.selfy_integration!r}",
            ),
            (
                len(extraction_channels) == 4 and all(c >= 1 for c in extraction_channels),
                f"selfy_extraction_channels must be 4 positive ints, got {extraction_channels}",
            ),
            (
                len(self.selfy_integration_channels) == 4
                and all(c >= 1 for c in self.selfy_integration_channels),
                f"selfy_integration_channels must be 4 positive ints, got {self.selfy_integration_channels}",
            ),
            (self.selfy_softargmax_temperature > 0, "selfy_softargmax_temperature must be > 0"),
            (self.selfy_hidden_size >= 1, f"selfy_hidden_size must be >= 1, got {self.selfy_hidden_size}"),
        ]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SelfyConfig:
        """
        Build the configuration of a named model: `selfynet-tsm-r50` (paper Table 1, 8 frames, (L, U, V) = (5, 9, 9)),
        `selfynet-tsm-r50-16f` (16 frames, (9, 9, 9)), `selfynet-tsm-r18` (the ablation default of Table 4),
        `selfynet-tsn-r50`, `selfynet-tsn-r18`, the baselines `tsm-r50`, `tsm-r18`, `tsn-r50`, `tsn-r18`, and the
        CPU-sized `selfynet-tiny`, `tsm-tiny`, `tsn-tiny`. Keyword arguments override preset fields.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {**copy.deepcopy(PRESETS[name]), **overrides}
        return cls(**fields)


__all__ = ["SelfyConfig", "PRESETS"]
