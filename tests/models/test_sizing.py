"""Parameter counts on the meta device and width matching (bmojo.models.sizing)."""

import pytest

from bmojo import LanguageModel, ModelConfig
from bmojo.demo import DemoSettings
from bmojo.models.sizing import matched_model, param_count


def test_param_count_equals_the_built_model():
    config = ModelConfig.preset("bmojo", **DemoSettings().base_model, vocab_size=256)
    assert param_count(config) == LanguageModel(config).num_params()


@pytest.mark.parametrize("arch", ["transformer", "swa", "mamba2", "hybrid", "bmojo-f"])
def test_matched_width_is_the_closest_parameter_count(arch):
    base = DemoSettings().base_model
    target = param_count(ModelConfig.preset("bmojo", **base, vocab_size=256))
    chosen = matched_model(arch, base, target, 256)
    gap = abs(param_count(ModelConfig.preset(arch, **chosen, vocab_size=256)) - target)
    for d_model in range(base["n_heads"] * 2, 4 * base["d_model"] + 1, base["n_heads"] * 2):
        try:
            other = ModelConfig.preset(arch, **{**base, "d_model": d_model}, vocab_size=256)
        except ValueError:
            continue
        assert gap <= abs(param_count(other) - target)
    assert gap / target < 0.2  # widths come in steps that keep heads and SSM heads whole
