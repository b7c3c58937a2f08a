"""SenseVoice SAN-M encoder: spec fidelity (independent NumPy reference), ONNX at dynamic lengths,
checkpoint folder round trip and the loader's errors."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from qinyu_edge.config import TINY_SENSEVOICE, SenseVoiceConfig
from qinyu_edge.errors import CheckpointError
from qinyu_edge.export.models.sensevoice import SenseVoiceEncoder
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx
from qinyu_edge.export.sensevoice_checkpoint import (
    QINYU_SHARD_PREFIX,
    load_sensevoice,
    load_sensevoice_config,
    load_sensevoice_state,
    read_am_mvn,
    write_sensevoice_folder,
)

log = logging.getLogger(__name__)

CFG = TINY_SENSEVOICE
SPEC_QUERY_IDS = [0, 1, 2, 15]  # language "auto", event, emotion, text-norm "woitn" (model-spec 1.2)
LAYER_KEYS = {
    "self_attn.linear_q_k_v.weight", "self_attn.linear_q_k_v.bias", "self_attn.linear_out.weight",
    "self_attn.linear_out.bias", "self_attn.fsmn_block.weight", "feed_forward.w_1.weight",
    "feed_forward.w_1.bias", "feed_forward.w_2.weight", "feed_forward.w_2.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
}


def randomized(cfg: SenseVoiceConfig, keep: bool, seed: int = 0) -> SenseVoiceEncoder:
    """Module with every parameter random, norms included, so no layer is an accidental identity."""
    module = SenseVoiceEncoder(cfg, keep).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return module


def features(t: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return 3 * torch.randn(batch, t, CFG.input_size, generator=torch.Generator().manual_seed(seed))


# --- independent reference, written from model-spec 1.2 / 10.5 / 10.6 -----------------------------


def _bf16_round(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest, ties to even
    return bits.astype(np.uint32).view(np.float32)


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def _reference_layer(x, sd, p, cfg):
    d, h = cfg.output_size, cfg.attention_heads
    t = x.shape[0]
    y = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    qkv = y @ sd[p + "self_attn.linear_q_k_v.weight"].T + sd[p + "self_attn.linear_q_k_v.bias"]
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    left = (cfg.kernel_size - 1) // 2 + cfg.sanm_shift
    vpad = np.concatenate([np.zeros((left, d)), v, np.zeros((cfg.kernel_size - 1 - left, d))])
    taps = sd[p + "self_attn.fsmn_block.weight"][:, 0, :]  # [d, kernel]
    memory = v + sum(taps[:, j] * vpad[j : j + t] for j in range(cfg.kernel_size))
    dk = d // h
    heads = []
    for i in range(h):
        s = slice(i * dk, (i + 1) * dk)
        scores = (q[:, s] / np.sqrt(dk)) @ k[:, s].T
        prob = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((prob / prob.sum(-1, keepdims=True)) @ v[:, s])
    att = np.concatenate(heads, -1) @ sd[p + "self_attn.linear_out.weight"].T + sd[p + "self_attn.linear_out.bias"]
    att = att + memory
    x = x + att if x.shape[1] == d else att
    y = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    ff = np.maximum(y @ sd[p + "feed_forward.w_1.weight"].T + sd[p + "feed_forward.w_1.bias"], 0)
    return x + ff @ sd[p + "feed_forward.w_2.weight"].T + sd[p + "feed_forward.w_2.bias"]


def reference(module: SenseVoiceEncoder, feats: np.ndarray, keep: bool) -> np.ndarray:
    cfg = module.cfg
    sd = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    x = _bf16_round(feats) if cfg.round_features_bf16 else feats
    x = np.concatenate([sd["embed.weight"][SPEC_QUERY_IDS], x.astype(np.float64)]) * np.sqrt(cfg.output_size)
    half = cfg.input_size // 2
    # The official encoder computes the frequencies in fp32.
    inv = np.exp(-np.log(np.float32(10000.0)) / np.float32(half - 1) * np.arange(half, dtype=np.float32))
    angle = np.arange(1, x.shape[0] + 1)[:, None] * inv[None, :]
    x = x + np.concatenate([np.sin(angle), np.cos(angle)], -1)
    x = _reference_layer(x, sd, "encoder.encoders0.0.", cfg)
    for i in range(cfg.num_blocks - 1):
        x = _reference_layer(x, sd, f"encoder.encoders.{i}.", cfg)
    x = _layer_norm(x, sd["encoder.after_norm.weight"], sd["encoder.after_norm.bias"])
    for i in range(cfg.tp_blocks):
        x = _reference_layer(x, sd, f"encoder.tp_encoders.{i}.", cfg)
    x = _layer_norm(x, sd["encoder.tp_norm.weight"], sd["encoder.tp_norm.bias"])
    return x if keep else x[len(SPEC_QUERY_IDS) :]


# --- module ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize(
    "cfg",
    [CFG, dataclasses.replace(CFG, round_features_bf16=False), dataclasses.replace(CFG, kernel_size=7, sanm_shift=2)],
    ids=["release", "no-bf16-rounding", "shifted-fsmn"],
)
def test_matches_independent_reference(cfg, keep):
    # In float64 the only rounding left is the fp32 sinusoid frequencies (numpy's and torch's exp
    # differ by an ulp), worth ~1e-7 here; a structural slip costs orders of magnitude more.
    module = randomized(cfg, keep).double()
    x = features(19)
    with torch.no_grad():
        got = module(x.double())[0].numpy()
    ref = reference(module, x[0].numpy().astype(np.float64), keep)
    assert got.shape == (19 + (4 if keep else 0), cfg.output_size)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-6


def test_state_dict_keys_and_shapes_follow_the_checkpoint_names():
    d, i, u, k = CFG.output_size, CFG.input_size, CFG.linear_units, CFG.kernel_size
    want = {"embed.weight": (16, i)}
    for prefix, n, width in [("encoder.encoders0.", 1, i), ("encoder.encoders.", CFG.num_blocks - 1, d),
                             ("encoder.tp_encoders.", CFG.tp_blocks, d)]:
        for j in range(n):
            shapes = {
                "self_attn.linear_q_k_v.weight": (3 * d, width), "self_attn.linear_q_k_v.bias": (3 * d,),
                "self_attn.linear_out.weight": (d, d), "self_attn.linear_out.bias": (d,),
                "self_attn.fsmn_block.weight": (d, 1, k), "feed_forward.w_1.weight": (u, d),
                "feed_forward.w_1.bias": (u,), "feed_forward.w_2.weight": (d, u), "feed_forward.w_2.bias": (d,),
                "norm1.weight": (width,), "norm1.bias": (width,), "norm2.weight": (d,), "norm2.bias": (d,),
            }
            assert set(shapes) == LAYER_KEYS
            want.update({f"{prefix}{j}.{key}": s for key, s in shapes.items()})
    for norm in ("after_norm", "tp_norm"):
        want[f"encoder.{norm}.weight"] = want[f"encoder.{norm}.bias"] = (d,)
    got = {key: tuple(v.shape) for key, v in SenseVoiceEncoder(CFG, True).state_dict().items()}
    assert got == want


def test_drop_variant_is_the_keep_variant_without_query_rows():
    keep, drop = randomized(CFG, True), randomized(CFG, False)
    x = features(13, batch=2)
    with torch.no_grad():
        assert torch.equal(keep(x)[:, 4:], drop(x))
    assert keep.output_frames(13) == 17 and drop.output_frames(13) == 13


def test_only_the_four_query_rows_of_embed_are_used():
    module = randomized(CFG, True)
    x = features(9)
    with torch.no_grad():
        base = module(x)
        unused = [r for r in range(CFG.embed_rows) if r not in SPEC_QUERY_IDS]
        module.embed.weight[unused] += 5.0
        assert torch.equal(module(x), base)
        module.embed.weight[15] += 0.1
        assert not torch.allclose(module(x), base)


def test_features_are_rounded_to_bf16_only_when_configured():
    x = features(11)
    x_rounded = x.to(torch.bfloat16).float()
    assert not torch.equal(x, x_rounded)
    with torch.no_grad():
        on = randomized(CFG, True)
        assert torch.equal(on(x), on(x_rounded))
        off = randomized(dataclasses.replace(CFG, round_features_bf16=False), True)
        assert not torch.equal(off(x), off(x_rounded))


@pytest.mark.parametrize("shift, lo, hi", [(0, -5, 5), (2, -3, 7)])
def test_fsmn_memory_window(shift, lo, hi):
    """With attention's output weights zeroed the layer is just the memory, so its reach is visible:
    frame t influences outputs t+lo..t+hi. With shift 0 (the release) it reaches 5 frames back,
    i.e. the memory looks ahead and is non-causal."""
    cfg = dataclasses.replace(CFG, sanm_shift=shift)
    attn = randomized(cfg, True).encoder.encoders[0].self_attn
    with torch.no_grad():
        attn.linear_out.weight.zero_()
        attn.linear_out.bias.zero_()
        x = torch.randn(1, 30, cfg.output_size)
        y = x.clone()
        y[0, 15] += 1.0
        changed = (attn(y) - attn(x)).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == list(range(15 + lo, 15 + hi + 1))


def test_later_frame_changes_earlier_output():
    module = randomized(CFG, False)
    x = features(20)
    y = x.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(module(x)[0, 0], module(y)[0, 0])


# --- ONNX -----------------------------------------------------------------------------------------


def export_encoder(module: SenseVoiceEncoder, path, trace_frames: int):
    return export_onnx(
        module, (features(trace_frames),), path, ["features"], ["encoder_out"],
        {"features": {0: "batch", 1: "frames"}, "encoder_out": {0: "batch", 1: "rows"}},
    )


@pytest.mark.parametrize("keep", [True, False])
def test_onnx_runs_at_other_lengths(tmp_path, keep):
    module = randomized(CFG, keep)
    path = export_encoder(module, tmp_path / "sensevoice.onnx", trace_frames=11)
    for t, batch in [(7, 1), (23, 2), (60, 1), (1, 1)]:
        x = features(t, batch=batch, seed=t)
        with torch.no_grad():
            ref = module(x).numpy()
        got = run_onnx(path, {"features": x.numpy()})
        assert got["encoder_out"].shape == (batch, t + (4 if keep else 0), CFG.output_size)
        (err,) = compare(got, {"encoder_out": ref})
        assert err.rel <= 1e-4, (t, err)


def test_onnx_keeps_the_bf16_rounding(tmp_path):
    path = export_encoder(randomized(CFG, True), tmp_path / "sensevoice.onnx", trace_frames=8)
    x = features(15)
    a = run_onnx(path, {"features": x.numpy()})["encoder_out"]
    b = run_onnx(path, {"features": x.to(torch.bfloat16).float().numpy()})["encoder_out"]
    assert np.array_equal(a, b)


# --- checkpoint folder ----------------------------------------------------------------------------


def cmvn(cfg: SenseVoiceConfig, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (-10 + rng.standard_normal(cfg.input_size)).astype(np.float32), rng.uniform(0.1, 0.5, cfg.input_size).astype(
        np.float32
    )


@pytest.fixture
def folder(tmp_path):
    module = randomized(CFG, True)
    shift, scale = cmvn(CFG)
    write_sensevoice_folder(module, CFG, shift, scale, tmp_path / "SenseVoiceSmall")
    return tmp_path / "SenseVoiceSmall", module, shift, scale


@pytest.mark.parametrize("keep", [True, False])
def test_write_then_load_gives_identical_outputs(folder, keep):
    path, module, shift, scale = folder
    loaded, shift2, scale2 = load_sensevoice(path, keep_query_rows=keep)
    assert loaded.cfg == CFG and loaded.keep_query_rows is keep and not loaded.training
    assert np.array_equal(shift, shift2) and np.array_equal(scale, scale2)
    x = features(17, batch=2)
    with torch.no_grad():
        want = module(x) if keep else module(x)[:, 4:]
        assert torch.equal(loaded(x), want)


def test_written_folder_has_the_real_layout(folder):
    path, module, shift, scale = folder
    assert sorted(p.name for p in path.iterdir()) == ["am.mvn", "config.yaml", "model.pt"]
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(module.state_dict()) | {"ctc.ctc_lo.weight", "ctc.ctc_lo.bias"}
    assert tuple(state["ctc.ctc_lo.weight"].shape) == (CFG.ctc_vocab, CFG.output_size)
    doc = yaml.safe_load((path / "config.yaml").read_text())
    assert doc["model"] == "SenseVoiceSmall" and doc["encoder"] == "SenseVoiceEncoderSmall"
    assert doc["encoder_conf"]["sanm_shfit"] == CFG.sanm_shift and doc["encoder_conf"]["num_blocks"] == CFG.num_blocks
    assert (doc["frontend_conf"]["lfr_m"], doc["frontend_conf"]["lfr_n"]) == (7, 6)
    # FunASR's parser takes the line after each tag and keeps tokens [3:-1] ("<LearnRateCoef> 0 [ ... ]").
    lines = (path / "am.mvn").read_text().splitlines()
    for tag, want in (("<AddShift>", shift), ("<Rescale>", scale)):
        (i,) = [j for j, line in enumerate(lines) if line.split()[0] == tag]
        tokens = lines[i + 1].split()
        assert tokens[:3] == ["<LearnRateCoef>", "0", "["] and tokens[-1] == "]"
        assert np.array_equal(np.array(tokens[3:-1]).astype(np.float32), want)


def test_loader_drops_and_reports_the_ctc_head(folder):
    path, *_ = folder
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    assert load_sensevoice_state(SenseVoiceEncoder(CFG, True), state) == ["ctc.ctc_lo.bias", "ctc.ctc_lo.weight"]


def test_loader_accepts_nested_and_module_prefixed_checkpoints(folder):
    path, module, *_ = folder
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path / "model.pt")
    loaded, _, _ = load_sensevoice(path, keep_query_rows=True)
    x = features(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def test_loader_takes_bf16_weights_from_llm_shards_by_prefix():
    module = randomized(CFG, True)
    shard = {QINYU_SHARD_PREFIX + k: v.to(torch.bfloat16) for k, v in module.state_dict().items()}
    shard["model.embed_tokens.weight"] = torch.zeros(10, 8)
    shard[QINYU_SHARD_PREFIX + "ctc.ctc_lo.weight"] = torch.zeros(CFG.ctc_vocab, CFG.output_size)
    target = SenseVoiceEncoder(CFG, True)
    assert load_sensevoice_state(target, shard, prefix=QINYU_SHARD_PREFIX) == ["ctc.ctc_lo.weight"]
    for k, v in target.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, module.state_dict()[k].to(torch.bfloat16).float())
    with pytest.raises(CheckpointError, match=r"missing \d+: model\.audio_model\.embed\.weight"):
        load_sensevoice_state(target, shard, prefix="model.audio_model.")
    with pytest.raises(CheckpointError, match="no key starts with"):
        load_sensevoice_state(target, {"model.embed_tokens.weight": torch.zeros(1)}, prefix=QINYU_SHARD_PREFIX)


def test_one_error_lists_missing_unexpected_and_misshaped_keys(folder):
    path, *_ = folder
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    del state["encoder.encoders.1.norm2.bias"]
    state["encoder.encoders.9.norm2.bias"] = torch.zeros(CFG.output_size)
    state["encoder.tp_encoders.0.self_attn.fsmn_block.weight"] = torch.zeros(CFG.output_size, 1, 9)
    torch.save(state, path / "model.pt")
    with pytest.raises(CheckpointError) as e:
        load_sensevoice(path, keep_query_rows=True)
    msg = str(e.value)
    assert "missing 1: encoder.encoders.1.norm2.bias" in msg
    assert "unexpected 1: encoder.encoders.9.norm2.bias" in msg
    assert "encoder.tp_encoders.0.self_attn.fsmn_block.weight: (64, 1, 9) != expected (64, 1, 11)" in msg


def test_depth_mismatch_between_config_and_weights_is_reported(folder):
    path, *_ = folder
    doc = yaml.safe_load((path / "config.yaml").read_text())
    doc["encoder_conf"]["tp_blocks"] = CFG.tp_blocks + 1
    (path / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError, match=rf"missing \d+: encoder\.tp_encoders\.{CFG.tp_blocks}\."):
        load_sensevoice(path, keep_query_rows=True)


@pytest.mark.parametrize("name", ["am.mvn", "model.pt", "config.yaml"])
def test_missing_file_is_named(folder, name):
    path, *_ = folder
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_sensevoice(path, keep_query_rows=True)


def test_truncated_files_are_rejected(folder):
    path, *_ = folder
    blob = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_sensevoice(path, keep_query_rows=True)
    text = (path / "am.mvn").read_text()
    (path / "am.mvn").write_text(text[: text.index("<Rescale>")])
    with pytest.raises(CheckpointError, match="<Rescale>"):
        read_am_mvn(path / "am.mvn")


def test_cmvn_width_must_match_the_encoder_input(folder):
    path, *_ = folder
    text = (path / "am.mvn").read_text()
    (path / "am.mvn").write_text(text.replace(" ]", " 1.0 ]"))
    with pytest.raises(CheckpointError, match="561 values"):
        load_sensevoice(path, keep_query_rows=True)


def test_read_am_mvn_parses_the_kaldi_nnet_text(tmp_path):
    shift = ["-8.311879", "-8.600912", "1e-05"]
    scale = ["0.155775", "0.1547711", "2.5"]
    (tmp_path / "am.mvn").write_text(
        "<Nnet> \n<Splice> 3 3\n[ 0 ]\n"
        f"<AddShift> 3 3 \n<LearnRateCoef> 0 [ {' '.join(shift)} ]\n"
        f"<Rescale> 3 3 \n<LearnRateCoef> 0 [ {' '.join(scale)} ]\n</Nnet> \n"
    )
    got_shift, got_scale = read_am_mvn(tmp_path / "am.mvn")
    assert got_shift.dtype == np.float32 and got_scale.dtype == np.float32
    assert got_shift.tolist() == np.array(shift, dtype=np.float32).tolist()
    assert got_scale.tolist() == np.array(scale, dtype=np.float32).tolist()


def test_release_config_yaml_gives_the_release_config(tmp_path):
    # The fields of FunASR's SenseVoiceSmall config.yaml that describe the network and its frontend.
    (tmp_path / "config.yaml").write_text(
        "encoder: SenseVoiceEncoderSmall\nencoder_conf:\n  output_size: 512\n  attention_heads: 4\n"
        "  linear_units: 2048\n  num_blocks: 50\n  tp_blocks: 20\n  dropout_rate: 0.1\n"
        "  input_layer: pe\n  pos_enc_class: SinusoidalPositionEncoder\n  normalize_before: true\n"
        "  kernel_size: 11\n  sanm_shfit: 0\n  selfattention_layer_type: sanm\n"
        "model: SenseVoiceSmall\nmodel_conf:\n  sos: 1\n  eos: 2\n"
        "frontend: WavFrontend\nfrontend_conf:\n  fs: 16000\n  window: hamming\n  n_mels: 80\n"
        "  frame_length: 25\n  frame_shift: 10\n  lfr_m: 7\n  lfr_n: 6\n  cmvn_file: null\n"
        "dataset_conf:\n  sos: ${model_conf.sos}\n"
    )
    assert load_sensevoice_config(tmp_path) == SenseVoiceConfig()


def test_unsupported_encoder_settings_are_rejected(tmp_path):
    (tmp_path / "config.yaml").write_text("encoder: SenseVoiceEncoderSmall\nencoder_conf:\n  normalize_before: false\n")
    with pytest.raises(CheckpointError, match="normalize_before"):
        load_sensevoice_config(tmp_path)
    (tmp_path / "config.yaml").write_text("encoder: SANMEncoder\nencoder_conf: {}\n")
    with pytest.raises(CheckpointError, match="SANMEncoder"):
        load_sensevoice_config(tmp_path)


# --- real size ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_size_exports_and_runs(tmp_path):
    cfg = SenseVoiceConfig()
    module = SenseVoiceEncoder(cfg, keep_query_rows=True).eval()

    def layer(width: int) -> int:
        d, u = cfg.output_size, cfg.linear_units
        return width * 3 * d + 3 * d + d * d + d + d * cfg.kernel_size + 2 * d * u + u + d + 2 * width + 2 * d

    n_params = sum(p.numel() for p in module.parameters())
    expected = 16 * 560 + layer(560) + (cfg.num_blocks - 1 + cfg.tp_blocks) * layer(512) + 4 * 512
    assert n_params == expected and round(n_params / 1e6, 1) == 221.1  # model-spec 7
    path = export_encoder(module, tmp_path / "sensevoice.onnx", trace_frames=17)
    size_mb = path.stat().st_size / 2**20

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"features": features(17).numpy()})  # warm-up
    x = features(170)  # 10 s of audio at 17 LFR frames per second
    times = []
    for _ in range(3):
        start = time.perf_counter()
        (out,) = session.run(None, {"features": x.numpy()})
        times.append(time.perf_counter() - start)
    got = {"encoder_out": out}
    with torch.no_grad():
        ref = module(x).numpy()
    (err,) = compare(got, {"encoder_out": ref})
    log.info("SenseVoice real size: %.1f MB ONNX, %.3f s CPU per 1 s of audio (best of 3 on 10 s, 2 threads), rel %.2e",
             size_mb, min(times) / 10, err.rel)
    assert got["encoder_out"].shape == (1, 174, 512)
    assert err.rel <= 1e-4
