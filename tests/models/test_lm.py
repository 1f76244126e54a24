import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from bmojo import PRESETS, LanguageModel, ModelConfig

# Small memories so that L = 48 runs several times past W + F + M (4 + 3 + 4).
TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=4, fading_span=3,
            chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0,
            max_seq_len=8)
L = 48


def tiny_model(name: str, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset(name, **{**TINY, **overrides})).eval()


def tokens(batch=2, length=L, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(PRESETS))
def test_causality(name):
    model = tiny_model(name)
    x = tokens()
    with torch.no_grad():
        base = model(x).logits
        for i in (0, 5, 17, 30):
            changed = x.clone()
            changed[:, i + 1:] = torch.randint(0, TINY["vocab_size"], changed[:, i + 1:].shape)
            out = model(changed).logits
            torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[:, i + 1:], base[:, i + 1:])


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("prefix", [1, 6, 13, 20])
def test_prefill_then_decode_equals_full_forward(name, prefix):
    model = tiny_model(name)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(x.shape[0])
        logits = [model(x[:, :prefix], cache).logits]
        for t in range(prefix, L):
            logits.append(model(x[:, t:t + 1], cache).logits)
    assert cache.position == L
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("name", "overrides"), [(name, {}) for name in PRESETS] + [("bmojo", {"qkv_conv": 4})],
                         ids=[*PRESETS, "bmojo+qkv_conv"])
@pytest.mark.parametrize("ends", [(13, 14, 30, L), (1, 4, 9, 21, 45), (24, L)])
def test_chunked_prefill_equals_full_forward(name, overrides, ends):
    """A prompt fed in pieces (each continuing the cache in parallel) gives the full forward's
    logits, and decoding after it continues them (DESIGN.md §8.3)."""
    model = tiny_model(name, **overrides)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(x.shape[0])
        logits, start = [], 0
        for end in ends:
            logits.append(model(x[:, start:end], cache).logits)
            assert cache.position == end
            start = end
        logits += [model(x[:, t:t + 1], cache).logits for t in range(start, L)]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", [dict(eidetic_policy="fifo"), dict(selection="random"),
                                     dict(selection="recent"), dict(eidetic_rope="absolute"),
                                     dict(eidetic_rope="window_edge"), dict(innovation_threshold=1.0),
                                     dict(qk_norm=True, tie_fading_proj=False, innovation_rank=4),
                                     dict(ssm_residual=False), dict(chunk_size=6, eidetic_per_chunk=3,
                                                                    eidetic_capacity=6),
                                     dict(qkv_conv=4), dict(qkv_conv=4, storage_blocks=1),
                                     dict(qkv_conv=4, storage_blocks=1, storage_source="evicted")])
def test_bmojo_variants_decode_equals_full_forward(variant):
    model = tiny_model("bmojo", **variant)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(x.shape[0])
        first = model(x[:, :11], cache).logits
        rest = model(x[:, 11:], cache).logits  # a multi-token continuation of a used cache
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-4, rtol=0)


def test_bmojo_without_fading_or_memory_is_swa():
    swa = tiny_model("swa")
    bmojo = tiny_model("bmojo", fading_span=0, eidetic_capacity=0, ssm_residual=False)
    missing, unexpected = bmojo.load_state_dict(swa.state_dict(), strict=False)
    assert not unexpected and missing and all(".mixer.ssm." in k for k in missing)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(bmojo(x).logits, swa(x).logits, atol=1e-5, rtol=0)
        # with the SSM in the residual (the default) B'MOJO is SWA plus a Mamba-2 branch:
        # silencing that branch's output projection gives SWA back
        bmojo_res = tiny_model("bmojo", fading_span=0, eidetic_capacity=0)
        bmojo_res.load_state_dict(swa.state_dict(), strict=False)
        for block in bmojo_res.blocks:
            block.mixer.ssm.out_proj.weight.zero_()
        torch.testing.assert_close(bmojo_res(x).logits, swa(x).logits, atol=1e-5, rtol=0)


def test_swa_with_window_covering_the_sequence_is_transformer():
    transformer = tiny_model("transformer")
    swa = tiny_model("swa", window=L)
    swa.load_state_dict(transformer.state_dict(), strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(swa(x).logits, transformer(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [
    torch.tensor([[0, 1, 37]]),  # == vocab_size
    torch.tensor([[0, -1, 2]]),
    torch.tensor([[0.0, 1.0]]),  # float
    torch.tensor([0, 1, 2]),  # 1-D
    torch.zeros(1, 0, dtype=torch.long),
])
def test_bad_token_ids_raise_clear_errors(bad):
    model = tiny_model("bmojo")
    with pytest.raises(ValueError, match="token"):
        model(bad)


def test_cache_batch_mismatch():
    model = tiny_model("swa")
    with pytest.raises(ValueError, match="cache holds 3 sequences"):
        model(tokens(batch=2), model.new_cache(3))


@pytest.mark.parametrize("name", list(PRESETS))
def test_bf16_autocast_training_step_is_finite_and_learns(name):
    model = tiny_model(name).train()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-2)
    x = tokens(length=33)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda v: v == v and abs(v) < 1e4, losses))
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "embed.weight" in changed


def test_aux_loss_only_for_innovation_selection():
    x = tokens()
    assert tiny_model("bmojo")(x).aux_loss.item() > 0
    assert tiny_model("bmojo", selection="random")(x).aux_loss.item() == 0
    for name in ("transformer", "swa", "mamba2", "hybrid", "bmojo-f"):
        assert tiny_model(name)(x).aux_loss.item() == 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    model = tiny_model(name)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["arch"] == name
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert loaded.lm_head.weight is loaded.embed.weight  # tied embeddings stay tied
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_compiles_with_no_graph_break(name):
    """Under ``torch.compile`` every architecture traces whole (attention blocks, SSD, eidetic
    selection, and the token range check, an assertion in the graph)."""
    torch.compiler.reset()
    explained = torch._dynamo.explain(tiny_model(name))(tokens())
    torch.compiler.reset()
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]


def test_compiled_model_rejects_token_ids_out_of_range():
    model = tiny_model("bmojo")
    torch.compiler.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(tokens())
    for wrong in (TINY["vocab_size"], -1):
        bad = tokens()
        bad[1, 3] = wrong
        with pytest.raises(RuntimeError, match=rf"token ids must be in \[0, {TINY['vocab_size']}\)"):
            compiled(bad)
    torch.compiler.reset()


@pytest.mark.parametrize("name", ["bmojo", "mamba2"])
def test_compiled_model_gives_the_eager_logits_and_gradients(name, assert_compiles_to_eager):
    """With the PyTorch ops, whose hand-written backwards (attention blocks, chunk scan,
    convolution) are all in the compiled graph."""
    assert_compiles_to_eager(tiny_model(name).train(), tokens())


def test_checkpoint_loads_with_other_kernels(tmp_path):
    """The kernels are chosen at load (``None``: as saved): the same weights and logits whichever
    computes them (here the Triton kernels in the interpreter and PyTorch's ops)."""
    pytest.importorskip("triton")
    model = tiny_model("bmojo", attention_kernel="triton", ssd_kernel="triton")
    model.save_pretrained(tmp_path)
    assert LanguageModel.from_pretrained(tmp_path).config == model.config
    loaded = LanguageModel.from_pretrained(tmp_path, ssd_kernel="torch", attention_kernel="torch")
    assert loaded.config == dataclasses.replace(model.config, attention_kernel="torch", ssd_kernel="torch")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ssd_kernel='cuda' is invalid"):
        LanguageModel.from_pretrained(tmp_path, ssd_kernel="cuda")


def test_checkpoint_errors(tmp_path):
    model = tiny_model("bmojo")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        LanguageModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        LanguageModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = 64
    config["ssm_headdim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        LanguageModel.from_pretrained(tmp_path)


def test_generate_prefills_once_and_matches_greedy_recomputation():
    model = tiny_model("bmojo")
    prompt = tokens(length=10)
    calls = []
    original_forward = model.forward

    def counting_forward(x, cache=None):
        calls.append(x.shape[1])
        return original_forward(x, cache)

    model.forward = counting_forward
    out = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert calls == [10]  # the prefix is never recomputed: the rest goes through step()
    model.forward = original_forward
    assert out.shape == (2, 22) and torch.equal(out[:, :10], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", ["transformer", "hybrid", "bmojo"])
def test_generate_with_a_prompt_in_pieces_is_the_same(name):
    from bmojo.models.sampling import stream_generate

    model = tiny_model(name)
    prompt = tokens(length=31)
    whole = list(stream_generate(model, prompt, 10, temperature=0.0))
    for piece in (1, 6, 31, 64):
        assert [t.tolist() for t in stream_generate(model, prompt, 10, temperature=0.0, prefill_piece=piece)] == \
            [t.tolist() for t in whole]
    with pytest.raises(ValueError, match="prefill_piece"):
        list(stream_generate(model, prompt, 1, prefill_piece=0))


def test_generate_sampling_is_seeded():
    model = tiny_model("hybrid")
    prompt = tokens(length=5)
    a = model.generate(prompt, 8, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    b = model.generate(prompt, 8, temperature=1.0, top_k=10, top_p=0.9, seed=3)
    c = model.generate(prompt, 8, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < TINY["vocab_size"]


@pytest.mark.parametrize("name", ["swa", "mamba2", "hybrid", "bmojo-f", "bmojo"])
def test_cache_is_fixed_size_and_counted_by_state_size(name):
    model = tiny_model(name)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(tokens(batch=1, length=9), cache)
        after_prefill = cache.nbytes()
        for t in range(60):
            model(torch.tensor([[t % 37]]), cache)
    assert cache.nbytes() == after_prefill == model.state_size_bytes()


def test_state_size_by_hand():
    fp32 = 4
    hkv, dh = TINY["n_kv_heads"], TINY["d_model"] // TINY["n_heads"]
    kv = 2 * hkv * dh * fp32  # one key + one value
    assert tiny_model("swa").state_size_bytes() == 2 * TINY["window"] * (kv + 8)  # + int64 position
    assert tiny_model("transformer").state_size_bytes() == 2 * TINY["max_seq_len"] * (kv + 8)
    d_inner, n = 2 * TINY["d_model"], TINY["d_state"]
    conv = (d_inner + 2 * n) * (4 - 1) * fp32
    ssm = d_inner * n * fp32
    assert tiny_model("mamba2").state_size_bytes() == 2 * (conv + ssm)
    W, Fs, C, M = TINY["window"], TINY["fading_span"], TINY["chunk_size"], TINY["eidetic_capacity"]
    bmojo_f = conv + ssm + W * (kv + 8) + (W + Fs) * (kv + 8) + TINY["d_model"] * fp32
    assert tiny_model("bmojo-f").state_size_bytes() == 2 * bmojo_f
    memory = M * (kv + 8 + fp32) + C * (kv + fp32)  # slots (k, v, pos, score) + chunk candidates
    assert tiny_model("bmojo").state_size_bytes() == 2 * (bmojo_f + memory)
    qkv = (TINY["n_heads"] + 2 * hkv) * dh  # channels of the optional convolution over q, k, v: its last 3 inputs
    assert tiny_model("bmojo", qkv_conv=4).state_size_bytes() == 2 * (bmojo_f + memory + 3 * qkv * fp32)


def test_num_params_counts_tied_embedding_once():
    tied = tiny_model("swa")
    untied = tiny_model("swa", tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == TINY["vocab_size"] * TINY["d_model"]
    assert tied.num_params() == sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())


def test_no_weight_decay_on_ssm_scalars_norms_and_biases():
    model = tiny_model("bmojo")
    decay, no_decay = model.optimizer_param_groups(0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, p in model.named_parameters():
        expected_no_decay = name.endswith(("A_log", "D", "dt_bias", "bias")) or "norm" in name
        assert (id(p) in no_decay_ids) == expected_no_decay, name
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_checkpoint_keeps_the_saved_dtype(tmp_path):
    model = tiny_model("bmojo").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_corrupt_checkpoint_files_give_clear_errors(tmp_path):
    model = tiny_model("swa")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors .*corrupt"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not a valid bmojo config"):
        LanguageModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_cache_never_holds_an_autograd_graph(name):
    """Decoding with gradients enabled must not chain graphs through the cache (it would grow
    with every token and keep the prefill's activations alive)."""
    model = tiny_model(name)
    cache = model.new_cache(2)
    model(tokens(length=9), cache).logits.sum().backward()
    for t in range(5):
        model(torch.tensor([[t], [t + 1]]), cache)

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif hasattr(obj, "__dataclass_fields__"):
            for field in obj.__dataclass_fields__:
                yield from tensors(getattr(obj, field))

    for layer in cache.layers:
        for tensor in tensors(layer):
            assert not tensor.requires_grad and tensor.grad_fn is None
