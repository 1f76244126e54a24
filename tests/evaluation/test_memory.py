import pytest
import torch

from bmojo import LanguageModel, ModelConfig
from bmojo.data.synthetic import MQARConfig, generate
from bmojo.evaluation.memory import inspect_memory, plot_memory, token_roles
from bmojo.ops.eidetic import eidetic_memory_sequential, select_per_chunk

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, window=4, fading_span=4, chunk_size=4,
             eidetic_per_chunk=2, eidetic_capacity=6, d_state=8, ssm_headdim=16, mlp_ratio=0)


def example():
    return generate(MQARConfig(vocab_size=64, seq_len=40, num_kv_pairs=4, power_a=1.0), 1, seed=3)


def test_roles_follow_the_task_layout():
    ex = example()
    roles = token_roles(ex)
    assert roles[:8] == ["key", "value"] * 4
    labelled = (ex.labels[0] >= 0).nonzero().flatten().tolist()
    assert [roles[p] for p in labelled] == ["query"] * 4
    assert roles.count("other") == 40 - 12


def test_memory_is_what_the_selection_rule_keeps():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.preset("bmojo", **MODEL))
    for block in model.blocks:  # a non-trivial predictor, so scores differ from ||x||²
        torch.nn.init.normal_(block.mixer.predictor[0].weight, std=0.2)
    inspection = inspect_memory(model, example())
    assert inspection.layers == [0, 1]
    for scores, held in zip(inspection.scores, inspection.memory, strict=True):
        sel_pos, sel_score = select_per_chunk(torch.tensor([scores]), 4, 2)
        mem_pos, _ = eidetic_memory_sequential(sel_pos, sel_score, 6, "score")
        assert sorted(p for p, _ in held) == sorted(mem_pos[0, -1].tolist())
        for pos, score in held:
            assert score == pytest.approx(scores[pos], rel=1e-4, abs=1e-6)
    text = inspection.format()
    assert "layer 0: 6 slots filled" in text and "layer 1:" in text


def test_heat_map_and_errors(tmp_path):
    model = LanguageModel(ModelConfig.preset("bmojo", **MODEL))
    plot_memory(inspect_memory(model, example()), tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no eidetic memory"):
        inspect_memory(LanguageModel(ModelConfig.preset("swa", **MODEL)), example())
    two = generate(MQARConfig(vocab_size=64, seq_len=40, num_kv_pairs=4), 2, seed=0)
    with pytest.raises(ValueError, match="one example at a time"):
        inspect_memory(model, two)
