import pytest
from transformers import AutoConfig

from selfy_hf import PRESETS, SelfyConfig


def test_defaults_are_the_papers_selfynet_tsm_r50():
    config = SelfyConfig()
    assert config.model_type == "selfy"
    assert (config.layer_type, config.depths) == ("bottleneck", [3, 4, 6, 3])
    assert config.hidden_sizes == [256, 512, 1024, 2048]
    assert config.temporal_module == "tsm" and config.num_frames == 8 and config.classifier_dropout == 0.5
    assert config.selfy_stages == [2]
    assert (len(config.selfy_temporal_offsets), config.selfy_window_size) == (5, 9)
    assert config.selfy_extraction_channels == [4, 16, 64, 64]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name, tmp_path):
    config = SelfyConfig.from_preset(name, num_labels=7)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, SelfyConfig)
    assert reloaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}


def test_presets_match_the_paper():
    r18 = SelfyConfig.from_preset("selfynet-tsm-r18")
    assert (r18.backbone_depth, r18.temporal_module, r18.selfy_temporal_offsets) == (
        18,
        "tsm",
        [-2, -1, 0, 1, 2],
    )
    assert SelfyConfig.from_preset("tsm-r50").selfy_stages == []
    assert SelfyConfig.from_preset("selfynet-tsn-r50").temporal_module == "none"
    sixteen = SelfyConfig.from_preset("selfynet-tsm-r50-16f")
    assert (sixteen.num_frames, len(sixteen.selfy_temporal_offsets)) == (16, 9)


def test_preset_overrides_and_unknown_preset():
    config = SelfyConfig.from_preset("selfynet-tsm-r18", selfy_temporal_offsets=[1], num_labels=3)
    assert config.selfy_temporal_offsets == [1] and config.num_labels == 3
    with pytest.raises(ValueError, match="Unknown preset"):
        SelfyConfig.from_preset("resnet-9000")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone_depth": 42}, "backbone_depth"),
        ({"backbone_depth": 50, "depths": [2, 2, 2, 2]}, "custom layout"),
        ({"backbone_depth": None}, "give layer_type and depths"),
        ({"temporal_module": "tsn"}, "temporal_module"),
        ({"selfy_window_size": 8}, "odd"),
        ({"selfy_window_size": 1}, "odd"),
        ({"selfy_temporal_offsets": [1, 1]}, "distinct"),
        ({"selfy_temporal_offsets": []}, "distinct"),
        ({"selfy_temporal_offsets": [-8, 0]}, "beyond a clip"),
        ({"selfy_extraction": "argmax"}, "selfy_extraction"),
        ({"selfy_integration": "attention"}, "selfy_integration"),
        ({"selfy_extraction_channels": [4, 16, 64]}, "selfy_extraction_channels"),
        ({"selfy_stages": [5]}, "selfy_stages"),
        ({"selfy_stages": [2, 2]}, "selfy_stages"),
        ({"selfy_similarity": "euclidean"}, "selfy_similarity"),
        ({"classifier_dropout": 1.0}, "classifier_dropout"),
        ({"shift_div": 128}, "shifts no channel"),
        ({"num_frames": 0}, "num_frames"),
    ],
)
def test_invalid_combinations_fail_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelfyConfig(**kwargs)


def test_baseline_ignores_selfy_block_fields():
    # Without SELFY blocks the block settings cannot matter, so they are not validated.
    config = SelfyConfig(selfy_stages=[], selfy_window_size=8)
    assert config.selfy_stages == []


def test_soft_argmax_extraction_gives_two_channels():
    assert SelfyConfig(selfy_extraction="soft_argmax").extraction_output_channels == 2
    assert SelfyConfig(selfy_extraction="mlp").extraction_output_channels == 64
