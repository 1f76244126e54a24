import pytest

from bmojo.ops.storage import store_file_name


@pytest.mark.parametrize("on_disk", [False, True])
def test_quick_run_reports_memory_at_every_length(bench, json_line, tmp_path, on_disk):
    argv = ["context", "--quick", "--json", "--no-progress", "--storage-block-size", "16"]
    if on_disk:
        argv += ["--storage-dir", str(tmp_path)]
    code, out = bench(argv)
    doc = json_line(out)
    assert code == 0 and doc["command"] == "bench context"
    rows = doc["rows"]
    assert [r["context"] for r in rows] == doc["settings"]["lengths"] == [256, 1024]
    assert doc["settings"]["config"]["storage_blocks"] == 4
    for r in rows:
        assert 0 < r["rss_anon"] <= r["vm_rss"] <= r["vm_hwm"] and r["rss_file"] > 0
        assert r["tokens_per_s"] > 0
    assert rows[0]["cache_bytes"] == rows[1]["cache_bytes"] > 0  # the decoding state is fixed
    assert 0 < rows[0]["store_bytes"] < rows[1]["store_bytes"]  # only the store grows
    assert 0 < rows[0]["index_bytes"] < rows[1]["index_bytes"] < rows[1]["store_bytes"] / 16
    assert (tmp_path / store_file_name(0)).is_file() == on_disk
    assert "RssAnon" in out


def test_a_model_without_eidetic_memory_is_a_clear_error(bench, tmp_path):
    from bmojo import LanguageModel, ModelConfig

    LanguageModel(ModelConfig.preset("mamba2", d_model=32, n_layers=1, d_state=8, ssm_headdim=16,
                                     vocab_size=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no B'MOJO layer"):
        bench(["context", "--ckpt", str(tmp_path), "--no-progress"])
