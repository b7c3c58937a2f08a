"""The whole-model loader on folders written in the real layout, and its bad-input errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qinyu_edge.config import preset
from qinyu_edge.errors import CheckpointError, ConfigError, TokenizerError
from qinyu_edge.export.qinyu_checkpoint import INDEX, load_qinyu, write_tiny_folders


@pytest.fixture(scope="module", params=["tiny-8b", "tiny-4b"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_tiny_folders(request.param, root, seed=3)


def copy_folders(folders, tmp_path):
    out = {}
    for k, p in folders.items():
        out[k] = tmp_path / k
        shutil.copytree(p, out[k])
    return out


def load(f, name):
    return load_qinyu(f["checkpoint"], f["sensevoice"], f["models"], name=name,
                      campplus_config=preset(name).campplus, tiny=True)


def test_real_layout_round_trip(folders):
    name, f = folders
    model = load(f, name)
    cfg = model.config
    assert cfg.variant == preset(name).variant and cfg.backbone.arch == preset(name).backbone.arch
    assert cfg.backbone.vocab_size % 8 == 0
    # What the files hold is what the modules carry (bf16 on disk, fp32 in memory).
    state = {}
    for shard in sorted(f["checkpoint"].glob("*.safetensors")):
        state.update(load_file(str(shard)))
    assert torch.equal(model.backbone.state_dict()["norm.weight"], state["model.norm.weight"].float())
    sv_key = next(k for k in state if k.startswith("model.audio_model.model.encoder."))
    own = model.encoder.state_dict()[sv_key[len("model.audio_model.model."):]]
    assert torch.equal(own, state[sv_key].float())
    if cfg.backbone.tie_word_embeddings:
        assert "lm_head.weight" not in state
        assert torch.equal(model.heads.weight, model.embedding.weight)
    else:
        assert torch.equal(model.heads.weight, state["lm_head.weight"].float())
    assert set(model.speakers) >= {"tian"} and model.speakers["tian"].shape == (192,)
    assert model.cmvn_shift.shape == (cfg.sensevoice.input_size,)


def test_same_seed_same_weights(folders, tmp_path):
    name, f = folders
    again = write_tiny_folders(name, tmp_path, seed=3)
    a = load_file(str(next(iter(sorted(f["checkpoint"].glob("*.safetensors"))))))
    b = load_file(str(next(iter(sorted(again["checkpoint"].glob("*.safetensors"))))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit_shard(ckpt, fn, key_prefix="model.layers.0."):
    index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    shard = ckpt / next(v for k, v in sorted(index.items()) if k.startswith(key_prefix))
    state = load_file(str(shard))
    fn(state)
    save_file(state, str(shard))
    return state


def test_missing_unexpected_and_misshaped_keys_in_one_error(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    removed = []

    def damage(state):
        key = sorted(k for k in state if k.startswith("model.layers.0."))[0]
        removed.append(key)
        del state[key]
        state["model.layers.0.surprise.weight"] = torch.zeros(2)
        norm = "model.norm.weight"
        if norm in state:
            state[norm] = torch.zeros(3)

    _edit_shard(f["checkpoint"], damage)
    index = json.loads((f["checkpoint"] / INDEX).read_text())
    index["weight_map"].pop(removed[0])
    (f["checkpoint"] / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load(f, name)
    msg = str(e.value)
    assert removed[0] in msg and "model.layers.0.surprise.weight" in msg and "missing" in msg and "unexpected" in msg
    assert "Fix:" in msg


def test_missing_shard_is_named(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    shard = sorted(f["checkpoint"].glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load(f, name)


def test_unknown_architecture(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    cfg = json.loads((f["checkpoint"] / "config.json").read_text())
    cfg["model_type"] = "llama"
    (f["checkpoint"] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama"):
        load(f, name)


def test_tokenizer_without_audio_tokens(folders, tmp_path):
    from tokenizers import Tokenizer, models

    name, f = folders
    f = copy_folders(f, tmp_path)
    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(f["checkpoint"] / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="lacks"):
        load(f, name)


def test_missing_am_mvn_and_missing_xy(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    (f["sensevoice"] / "am.mvn").unlink()
    with pytest.raises(CheckpointError, match="am.mvn"):
        load(f, name)
    f2 = copy_folders(folders[1], tmp_path / "b")
    (f2["models"] / "xy_tokenizer.ckpt").unlink()
    with pytest.raises(CheckpointError, match="xy_tokenizer"):
        load(f2, name)


def test_index_naming_a_key_that_no_shard_has(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    index = json.loads((f["checkpoint"] / INDEX).read_text())
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (f["checkpoint"] / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layers.99"):
        load(f, name)


def test_separate_audio_heads_are_loaded_when_the_config_enables_them(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    cfg = json.loads((f["checkpoint"] / "config.json").read_text())
    cfg["use_audio_heads"] = True
    (f["checkpoint"] / "config.json").write_text(json.dumps(cfg))
    hidden = cfg["hidden_size"]
    g = torch.Generator().manual_seed(0)
    heads = {f"audio_heads.{i}.weight": torch.randn(1032, hidden, generator=g).bfloat16() for i in range(7)}
    extra = f["checkpoint"] / "model-audio-heads.safetensors"
    save_file(heads, str(extra))
    index = json.loads((f["checkpoint"] / INDEX).read_text())
    index["weight_map"].update({k: extra.name for k in heads})
    (f["checkpoint"] / INDEX).write_text(json.dumps(index))
    model = load(f, name)
    assert model.config.backbone.use_audio_heads
    hidden_state = torch.randn(1, hidden, generator=g)
    hist = torch.full((1, 5), -1)
    ids = model.heads.greedy(hidden_state, hist)[0]
    for k in range(1, 8):
        want = model.layout.book_start(k) + int(torch.argmax(heads[f"audio_heads.{k - 1}.weight"].float() @ hidden_state[0]))
        assert int(ids[k]) == want
    # Without the keys the same config is an error that names them.
    for k in heads:
        index["weight_map"].pop(k)
    (f["checkpoint"] / INDEX).write_text(json.dumps(index))
    extra.unlink()
    with pytest.raises(CheckpointError, match="audio_heads.0.weight"):
        load(f, name)


def test_truncated_shard_is_named_and_no_bundle_is_written(folders, tmp_path, capsys):
    from qinyu_edge.cli import main

    name, f = folders
    f = copy_folders(f, tmp_path)
    shard = sorted(f["checkpoint"].glob("*.safetensors"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard.name} .*truncated: {size - 1000} bytes of the {size}"):
        load(f, name)
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(f["checkpoint"]), "--sensevoice", str(f["sensevoice"]),
                 "--xy", str(f["models"]), "--out", str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "models", "sensevoice"]


def test_tensors_of_another_dtype_are_named(folders, tmp_path):
    name, f = folders
    f = copy_folders(f, tmp_path)
    keys = []

    def retype(state):
        keys.extend(sorted(k for k in state if k.startswith("model.layers.0."))[:2])
        state[keys[0]] = state[keys[0]].to(torch.float16)
        state[keys[1]] = state[keys[1]].to(torch.float32)

    _edit_shard(f["checkpoint"], retype)
    with pytest.raises(CheckpointError, match="2 tensor.* not bfloat16 as config.json declares") as e:
        load(f, name)
    assert f"{keys[0]} (float16)" in str(e.value) and f"{keys[1]} (float32)" in str(e.value)


def test_values_beyond_fp16_are_reported_per_tensor(folders, tmp_path, caplog):
    name, f = folders
    f = copy_folders(f, tmp_path)
    keys = []

    def enlarge(state):
        keys.append(sorted(k for k in state if k.startswith("model.layers.0.") and state[k].dim() == 2)[0])
        flat = state[keys[0]].view(-1)
        flat[:3] = torch.tensor([1e5, -7e4, 3e38], dtype=torch.bfloat16)

    _edit_shard(f["checkpoint"], enlarge)
    with caplog.at_level("WARNING"):
        model = load(f, name)
    assert model.origin["fp16_overflow"] == {keys[0]: 3}
    assert f"{keys[0]}: 3 value(s)" in caplog.text and "fp16" in caplog.text


def test_too_little_disk_names_the_need_and_the_folder(tmp_path):
    import shutil

    from qinyu_edge.errors import QinyuError
    from qinyu_edge.fileio import check_free_space

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "new" / "bundle", free // 2, "bundle")
    with pytest.raises(QinyuError, match=rf"the bundle {tmp_path}/new/bundle needs {(free + 10**12) / 1e9:.2f} GB "
                                         rf"of disk under {tmp_path}"):
        check_free_space(tmp_path / "new" / "bundle", free + 10**12, "bundle")
