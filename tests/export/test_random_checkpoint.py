"""The random real-layout checkpoint writer: folders the real loaders read, in bounded memory."""

import dataclasses
import json
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from qinyu_edge.cli import main
from qinyu_edge.errors import ConfigError, QinyuError
from qinyu_edge.export.qinyu_checkpoint import INDEX, SENSEVOICE_PREFIX, load_qinyu
from qinyu_edge.export.random_checkpoint import checkpoint_plan, random_config, write_random_checkpoint
from qinyu_edge.export.sensevoice_checkpoint import load_sensevoice


@pytest.mark.parametrize("name", ["tiny-4b", "tiny-8b"])
def test_written_folders_load_through_the_real_loaders(name, tmp_path):
    cfg = random_config(name)
    f = write_random_checkpoint(cfg, tmp_path / "ckpt", seed=5, shard_bytes=300_000)
    index = json.loads((f["checkpoint"] / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    plan = checkpoint_plan(cfg)
    assert sorted(index["weight_map"]) == [t.name for t in plan]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in plan)

    model = load_qinyu(f["checkpoint"], f["sensevoice"], f["models"], name=name, tiny=True)
    assert model.config.backbone == cfg.backbone
    with safe_open(str(f["checkpoint"] / index["weight_map"]["model.embed_tokens.weight"]), "pt") as s:
        embed = s.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16
    assert torch.equal(model.backbone.embed_tokens.weight, embed.float())
    head_key = "model.embed_tokens.weight" if cfg.backbone.tie_word_embeddings else "lm_head.weight"
    with safe_open(str(f["checkpoint"] / index["weight_map"][head_key]), "pt") as s:
        assert torch.equal(model.heads.weight, s.get_tensor(head_key).float())
    # The SenseVoice folder's model.pt holds the very weights the shards carry.
    encoder, _, _ = load_sensevoice(f["sensevoice"], cfg.keep_query_rows)
    key = next(k for k in index["weight_map"] if k.startswith(SENSEVOICE_PREFIX) and k.endswith("w_1.weight"))
    with safe_open(str(f["checkpoint"] / index["weight_map"][key]), "pt") as s:
        from_shard = s.get_tensor(key).float()
    assert torch.equal(encoder.state_dict()[key[len(SENSEVOICE_PREFIX):]], from_shard)
    assert torch.equal(model.encoder.state_dict()[key[len(SENSEVOICE_PREFIX):]], from_shard)
    assert not list(tmp_path.glob(".*partial*"))


def test_same_seed_same_shards_other_seed_other_weights(tmp_path):
    cfg = random_config("tiny-4b")
    a, b, c = (write_random_checkpoint(cfg, tmp_path / n, seed=s)["checkpoint"] for n, s in (("a", 1), ("b", 1), ("c", 2)))
    shard = sorted(a.glob("*.safetensors"))[0].name
    assert (a / shard).read_bytes() == (b / shard).read_bytes() != (c / shard).read_bytes()


def test_real_size_plans_have_the_released_keys_and_shapes():
    four = {t.name: t.shape for t in checkpoint_plan(random_config("qinyu-4b"))}
    eight = {t.name: t.shape for t in checkpoint_plan(random_config("qinyu-8b", layers=2))}
    assert four["model.embed_tokens.weight"] == (136544, 2560) and "lm_head.weight" not in four
    assert "model.layers.39.mlp.down_proj.weight" in four
    assert four["model.audio_projection.mlp.0.weight"][1] == 512
    assert eight["lm_head.weight"] == (159960, 4096) and "model.layers.2.input_layernorm.weight" not in eight
    assert 8.5e9 < sum(t.nbytes for t in checkpoint_plan(random_config("qinyu-4b"))) < 10e9
    with pytest.raises(ConfigError, match="1 to 40"):
        random_config("qinyu-4b", layers=0)


def test_not_enough_disk_is_refused_before_anything_is_written(tmp_path):
    cfg = random_config("tiny-8b")
    huge = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, vocab_size=2**40))
    with pytest.raises(QinyuError, match=r"needs \d+\.\d\d GB of disk under .* but only"):
        write_random_checkpoint(huge, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_writer_peak_memory_is_a_block_not_the_model(tmp_path):
    """A writer that held the model would grow by the whole shard size; this one by about a block."""
    script = textwrap.dedent(f"""
        import dataclasses, json, resource, sys
        from qinyu_edge.export.random_checkpoint import checkpoint_plan, random_config, write_random_checkpoint
        cfg = random_config("tiny-8b")
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(
            cfg.backbone, hidden_size=512, num_layers=24, intermediate_size=2048, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, vocab_size=32768))
        plan = checkpoint_plan(cfg)
        write_random_checkpoint(random_config("tiny-8b"), {str(tmp_path / 'warm')!r})  # imports and allocator warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_random_checkpoint(cfg, {str(tmp_path / 'big')!r}, shard_bytes=200 * 2**20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"growth": after - before, "total": sum(t.nbytes for t in plan),
                           "largest": max(t.nbytes for t in plan)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(m)
    assert m["total"] > 6 * m["largest"]
    assert m["growth"] < min(2 * m["largest"], m["total"] / 3)


def test_cli_checkpoint_only_then_bad_flag_combinations(tmp_path, capsys):
    out = tmp_path / "folders"
    assert main(["export", "--random-weights", "tiny-4b", "--layers", "1", "--checkpoint-only", str(out)]) == 0
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["model_type"] == "vita_utu_v1"
    assert {p.name for p in out.iterdir()} == {"checkpoint", "sensevoice", "models"}
    assert main(["export", "--random-weights", "tiny-4b", "--checkpoint-only", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--random-weights", "tiny-4b"]) == 2
    assert "exactly one of --out" in capsys.readouterr().err


def test_cli_exports_random_weights_and_removes_the_scratch_checkpoint(tmp_path):
    out = tmp_path / "bundle"
    assert main(["export", "--random-weights", "tiny-8b", "--out", str(out)]) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["config"]["backbone"]["num_layers"] == 2 and manifest["parity"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.slow
def test_real_width_4b_with_two_layers_loads_through_the_real_loader(tmp_path):
    """1.6 GB of shards; the backbone stays hollow (streamed at export), the rest is loaded."""
    assert main(["export", "--random-weights", "qinyu-4b", "--layers", "2", "--checkpoint-only", str(tmp_path / "f")]) == 0
    f = tmp_path / "f"
    model = load_qinyu(f / "checkpoint", f / "sensevoice", f / "models", name="qinyu-4b")
    assert model.backbone.embed_tokens.weight.shape == (136544, 2560)
    assert model.backbone_weights is not None and model.backbone.layers[0].mlp.up_proj.weight.is_meta
    assert model.backbone_weights("layers.1.mlp.up_proj.weight").shape == (model.config.backbone.intermediate_size, 2560)
    assert model.config.backbone.num_layers == 2 and model.config.audio_projector.input_size == 512


@pytest.mark.slow
@pytest.mark.timeout(5400)  # the suite's 600 s per test would stop it halfway
def test_real_size_4b_exports_within_12_gib_and_quantizes_within_20(tmp_path):
    """The whole 4B, 40 layers of random weights in the real layout, through the user's commands:
    export about 6 minutes and 34 GB of disk here (checkpoint and bundle), peak RSS about 8 GB; the
    INT4 backbone about 8 minutes, peak RSS about 5 GB, 10 GB more disk (the rest is copied)."""
    out = tmp_path / "b"
    cli = "import sys; from qinyu_edge.cli import main; sys.exit(main(sys.argv[1:]))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", cli, "export", "--random-weights", "qinyu-4b", "--out", str(out)],
                   check=True, timeout=3600)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak > before * 1024 and peak < 12 * 2**30
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["parity"]["ok"] and manifest["config"]["backbone"]["num_layers"] == 40
    rows = json.loads((out / "parity.json").read_text())["rows"]
    assert any(r["output"] == "hidden (end to end)" and "layer by layer (40)" in r["inputs"] for r in rows)
    assert (out / "backbone.onnx.data").stat().st_size > 16e9
    assert main(["lint", "--bundle", str(out)]) == 0
    q = tmp_path / "q"
    subprocess.run([sys.executable, "-c", cli, "quantize", "--bundle", str(out), "--out", str(q), "--recipe", "int4-awq",
                    "--components", "backbone", "--no-accuracy"], check=True, timeout=3600)
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < 20 * 2**30
    record = json.loads((q / "bundle.json").read_text())["origin"]["quantization"]["components"]["backbone"]
    assert record["applied"].startswith("int4-rtn, streamed") and record["quantized_weights"]["int4"] == 240
    assert (q / "backbone.onnx.data").stat().st_size < 2.6e9
    assert main(["lint", "--bundle", str(q)]) == 0
