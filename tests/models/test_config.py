import dataclasses
import json

import pytest

from bmojo import PRESETS, LanguageModel, ModelConfig

REQUIRED_FIELDS = (
    "vocab_size d_model n_layers n_heads n_kv_heads window fading_span chunk_size eidetic_per_chunk "
    "eidetic_capacity eidetic_policy selection innovation_threshold eidetic_rope d_state ssm_headdim "
    "expand d_conv mlp_ratio layer_pattern tie_embeddings"
).split()


def test_has_every_design_knob():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(REQUIRED_FIELDS) <= names


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_json_round_trip(name):
    cfg = ModelConfig.preset(name, d_model=96, n_heads=3, window=8, innovation_threshold=0.5)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.arch == name


def test_presets_set_layer_patterns():
    assert ModelConfig.preset("transformer").layer_pattern == "A"
    assert ModelConfig.preset("swa").layer_pattern == "W"
    assert ModelConfig.preset("mamba2").layer_pattern == "S"
    assert set(ModelConfig.preset("hybrid").layer_pattern) == {"S", "W"}
    assert ModelConfig.preset("bmojo-f").layer_pattern == "F"
    assert ModelConfig.preset("bmojo").layer_pattern == "B"


def test_defaults_follow_design_notation():
    cfg = ModelConfig(window=32)
    assert cfg.fading_span == 32 and cfg.chunk_size == 32  # F = W and C = W by default
    assert cfg.n_kv_heads == cfg.n_heads


def test_storage_is_off_by_default_and_blocks_follow_the_chunk():
    cfg = ModelConfig(window=32, chunk_size=16)
    assert cfg.storage_blocks == 0 and cfg.storage_budget_bytes == 0 and cfg.storage_overflow == "error"
    assert cfg.storage_block_size == 16


def test_layer_pattern_repeats_to_depth():
    cfg = ModelConfig.preset("hybrid", layer_pattern="SWB", n_layers=7)
    assert cfg.layer_kinds == list("SWBSWBS")
    model = LanguageModel(ModelConfig.preset("hybrid", layer_pattern="FA", n_layers=3, d_model=32, n_heads=2,
                                             ssm_headdim=16, d_state=8))
    assert [b.kind for b in model.blocks] == ["F", "A", "F"]


def test_unused_fields_are_ignored():
    # a Transformer has no window, a Mamba-2 no heads: nonsense there is not an error
    ModelConfig.preset("transformer", window=0, fading_span=-3, eidetic_capacity=5)
    ModelConfig.preset("mamba2", n_heads=7)


@pytest.mark.parametrize(
    "preset, overrides, field",
    [
        ("bmojo", {"n_heads": 5}, "n_heads"),  # 256 % 5 != 0
        ("swa", {"n_kv_heads": 3}, "n_kv_heads"),
        ("swa", {"window": 0}, "window"),
        ("bmojo", {"window": -1}, "window"),
        ("bmojo", {"fading_span": -1}, "fading_span"),
        ("bmojo", {"eidetic_per_chunk": 4, "eidetic_capacity": 10}, "eidetic_capacity"),
        ("bmojo", {"eidetic_per_chunk": 100, "chunk_size": 8}, "eidetic_per_chunk"),
        ("bmojo", {"eidetic_policy": "lru"}, "eidetic_policy"),
        ("bmojo", {"selection": "best"}, "selection"),
        ("bmojo", {"eidetic_rope": "relative"}, "eidetic_rope"),
        ("mamba2", {"ssm_headdim": 48}, "ssm_headdim"),  # 512 % 48 != 0
        ("hybrid", {"layer_pattern": "SX"}, "layer_pattern"),
        ("hybrid", {"layer_pattern": ""}, "layer_pattern"),
        ("bmojo", {"vocab_size": 0}, "vocab_size"),
        ("bmojo", {"mlp_ratio": -1.0}, "mlp_ratio"),
        ("mamba2", {"d_state": 0}, "d_state"),
        ("bmojo", {"innovation_threshold": "high"}, "innovation_threshold"),
        ("bmojo", {"mlp_ratio": "2"}, "mlp_ratio"),
        ("bmojo", {"storage_blocks": -1}, "storage_blocks"),
        ("bmojo", {"storage_block_size": 0}, "storage_block_size"),
        ("bmojo", {"storage_budget_bytes": -1}, "storage_budget_bytes"),
        ("bmojo", {"storage_overflow": "drop"}, "storage_overflow"),
        ("bmojo-f", {"qkv_conv": -1}, "qkv_conv"),
        ("bmojo", {"qkv_conv": True}, "qkv_conv"),
    ],
)
def test_invalid_values_name_the_field(preset, overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset(preset, **overrides)
    value = overrides[field]
    with pytest.raises(ValueError, match=repr(value).replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.preset(preset, **overrides)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="unknown preset 'gpt'"):
        ModelConfig.preset("gpt")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"d_model": 64, "colour": "red"})


def test_config_json_carries_the_hugging_face_keys():
    cfg = ModelConfig.preset("bmojo", d_model=64)
    data = json.loads(cfg.to_json())
    assert data["model_type"] == "bmojo" and data["architectures"] == ["BMojoForCausalLM"]
    written_by_transformers = {**data, "transformers_version": "5.24.0", "dtype": "float32"}
    assert ModelConfig.from_json(json.dumps(written_by_transformers)) == cfg
    assert ModelConfig.from_json(json.dumps(cfg.to_dict())) == cfg  # older checkpoints: no Hugging Face keys
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['colour'\]"):
        ModelConfig.from_json(json.dumps({**written_by_transformers, "colour": "red"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_json(json.dumps({**data, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict(data)  # the dictionary form holds model fields only
