import json
import socket
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
import huggingface_hub.constants  # noqa: E402  (a dependency of transformers)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bmojo import PRESETS, LanguageModel, ModelCache, ModelConfig  # noqa: E402
from bmojo.hf import BMojoConfig, BMojoForCausalLM  # noqa: E402

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, window=4, chunk_size=4, eidetic_per_chunk=2,
            eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0, max_seq_len=8)


def tiny_model(name: str, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset(name, **{**TINY, **overrides})).eval()


def tokens(batch=2, length=20, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture
def offline(monkeypatch):
    """The Hub offline (as with ``HF_HUB_OFFLINE=1``) and no network at all: any connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_auto_classes_resolve_bmojo(tmp_path, offline):
    assert isinstance(AutoConfig.for_model("bmojo"), BMojoConfig)
    model = tiny_model("bmojo")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(config, BMojoConfig)
    assert config.to_model_config() == model.config
    assert isinstance(AutoModelForCausalLM.from_config(config), BMojoForCausalLM)


def test_config_fields_aliases_and_validation():
    config = BMojoConfig(arch="transformer", hidden_size=48, n_heads=4, tie_word_embeddings=False)
    assert config.d_model == config.hidden_size == 48
    assert config.num_hidden_layers == config.n_layers == ModelConfig().n_layers
    assert config.tie_embeddings is False and config.tie_word_embeddings is False
    assert config.layer_pattern == "A"  # filled in by ModelConfig, as in a preset
    model_config = ModelConfig.preset("hybrid", **TINY)
    assert BMojoConfig.from_model_config(model_config).to_model_config() == model_config
    with pytest.raises(ValueError, match="n_heads"):
        BMojoConfig(d_model=32, n_heads=5)


@pytest.mark.parametrize("name", list(PRESETS))
def test_language_model_checkpoint_loads_in_transformers(name, tmp_path, offline):
    model = tiny_model(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded, BMojoForCausalLM)
    assert loaded.language_model.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()  # same parameter names, no prefix
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_checkpoint_loads_in_bmojo(name, tmp_path):
    torch.manual_seed(0)
    model = BMojoForCausalLM(BMojoConfig(arch=name, **TINY)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bmojo" and config["architectures"] == ["BMojoForCausalLM"]
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.config == model.language_model.config
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_are_preserved_both_ways(tie, tmp_path, offline):
    model = tiny_model("bmojo", tie_embeddings=tie)
    model.save_pretrained(tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", local_files_only=True)
    hf.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = LanguageModel.from_pretrained(tmp_path / "hf")
    for head, embed in [(hf.lm_head.weight, hf.embed.weight), (again.lm_head.weight, again.embed.weight),
                        (ours.lm_head.weight, ours.embed.weight)]:
        assert shares_storage(head, embed) is tie
        assert torch.equal(head, embed) is tie
        assert torch.equal(head, model.lm_head.weight)
    # the language model behind the wrapper is tied (or not) too
    assert (hf.language_model.lm_head.weight is hf.language_model.embed.weight) is tie


def test_mismatching_checkpoint_is_refused(tmp_path, offline):
    tiny_model("transformer").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="norm.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)


@pytest.mark.parametrize("name", ["bmojo", "transformer", "hybrid"])
def test_generate_decodes_through_the_fixed_size_cache(name):
    model = BMojoForCausalLM.from_language_model(tiny_model(name))
    prompt, new = tokens(length=13), 9
    expected = model.language_model.generate(prompt, new, temperature=0)
    calls = []
    forward = model.language_model.forward

    def spy(x, cache=None):
        calls.append((tuple(x.shape), cache, None if cache is None else cache.position))
        return forward(x, cache)

    with mock.patch.object(model.language_model, "forward", spy):
        out = model.generate(prompt, max_new_tokens=new, do_sample=False)
    assert torch.equal(out, expected)
    # one prefill of the whole prompt into a fresh ModelCache, then one token per step through the same cache
    cache = calls[0][1]
    assert isinstance(cache, ModelCache)
    assert calls[0] == ((2, 13), cache, 0)
    assert calls[1:] == [((2, 1), cache, 13 + i) for i in range(new - 1)]


def test_sampling_and_unsupported_generation_modes():
    model = BMojoForCausalLM.from_language_model(tiny_model("bmojo"))
    prompt = tokens(length=6)
    torch.manual_seed(3)
    first = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=4)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=4), first)
    assert torch.equal(first[:, :6], prompt) and first.shape == (2, 11)
    with pytest.raises(ValueError, match="only supports"):
        model.generate(prompt, max_new_tokens=2, num_beams=2)
    padding = torch.ones_like(prompt)
    padding[0, 0] = 0
    with pytest.raises(ValueError, match="padded inputs are not supported"):
        model.generate(prompt, attention_mask=padding, max_new_tokens=2)


def test_forward_loss_and_aux_loss():
    model = BMojoForCausalLM.from_language_model(tiny_model("bmojo"))
    x = tokens()
    labels = x.clone()
    labels[:, :5] = -100
    out = model(x, labels=labels)
    reference = model.language_model(x)
    expected = torch.nn.functional.cross_entropy(reference.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(out.aux_loss, reference.aux_loss) and out.aux_loss.item() > 0
    assert out.cache is None
    assert isinstance(model(x, use_cache=True).cache, ModelCache)
    with pytest.raises(TypeError, match="ModelCache"):
        model(x, cache=transformers.DynamicCache(config=model.config))


def test_tokenizer_and_generate_end_to_end(tmp_path, offline):
    tokenizers = pytest.importorskip("tokenizers")
    model = tiny_model("bmojo")
    model.save_pretrained(tmp_path)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, TINY["vocab_size"])}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = tokenizers.decoders.WordPiece()  # joins the words with spaces
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "unk_token": "[UNK]"}))

    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    inputs = tok(["w5 w9 w12 w3 w7", "w1 w2 w3 w4 w5"], return_tensors="pt")
    assert inputs.input_ids.tolist()[0] == [5, 9, 12, 3, 7]
    out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, model.generate(inputs.input_ids, 6, temperature=0))
    text = tok.batch_decode(out)
    assert text[0].startswith("w5 w9 w12 w3 w7 ") and len(text[0].split()) == 11
