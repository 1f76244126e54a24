"""Test-time ablations (bmojo.evaluation.ablation.with_settings)."""

import pytest
import torch

from bmojo import LanguageModel, ModelConfig
from bmojo.evaluation.ablation import with_settings


def trained_like(selection="topk"):
    torch.manual_seed(0)
    config = ModelConfig.preset("bmojo", vocab_size=48, d_model=32, n_layers=2, n_heads=2, window=4, fading_span=4,
                                chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=8, d_state=8, ssm_headdim=16,
                                mlp_ratio=0.0, selection=selection)
    model = LanguageModel(config).eval()
    with torch.no_grad():  # a non-zero innovation predictor, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_same_settings_same_model():
    model = trained_like()
    tokens = torch.randint(0, 48, (2, 40))
    torch.testing.assert_close(logits(with_settings(model, eidetic_capacity=8), tokens), logits(model, tokens),
                               rtol=0, atol=0)


def test_no_memory_is_the_bmojo_f_layer_with_the_same_weights():
    model = trained_like()
    tokens = torch.randint(0, 48, (2, 40))
    without_memory = with_settings(model, eidetic_capacity=0)
    assert not any("predictor" in name for name in without_memory.state_dict())
    as_f_layers = with_settings(model, layer_pattern="F")
    torch.testing.assert_close(logits(without_memory, tokens), logits(as_f_layers, tokens), rtol=0, atol=0)
    assert not torch.allclose(logits(without_memory, tokens), logits(model, tokens))  # the memory mattered


def test_other_selections_and_capacities_change_what_is_kept():
    model = trained_like()
    tokens = torch.randint(0, 48, (2, 40))
    for settings in ({"selection": "recent"}, {"selection": "random"}, {"eidetic_capacity": 16}):
        ablated = with_settings(model, **settings)
        assert ablated.config.eidetic_capacity == settings.get("eidetic_capacity", 8)
        assert not torch.allclose(logits(ablated, tokens), logits(model, tokens)), settings


def test_settings_that_need_new_weights_are_refused():
    with pytest.raises(ValueError, match="needs weights the trained model does not have"):
        with_settings(trained_like(selection="random"), selection="topk")  # no trained predictor
    with pytest.raises(ValueError, match="needs weights"):
        with_settings(trained_like(), d_model=64)
    with pytest.raises(ValueError, match="eidetic_capacity"):
        with_settings(trained_like(), eidetic_capacity=3)  # validated like any config
