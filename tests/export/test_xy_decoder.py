"""XY-Tokenizer decode path: real-valued ISTFT, ONNX export at dynamic lengths, checkpoint I/O."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import pytest
import torch
import yaml
from torch.nn import functional as F

from qinyu_edge.config import TINY_XY, XYDecoderConfig
from qinyu_edge.errors import CheckpointError
from qinyu_edge.export.models.xy_decoder import RealISTFT, XYDecoder, inverse_rdft_basis
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx
from qinyu_edge.export.xy_checkpoint import (
    config_path_for,
    fold_weight_norm,
    load_xy_config,
    load_xy_decoder,
    write_xy_checkpoint,
    write_xy_config,
)

log = logging.getLogger(__name__)

DYNAMIC = {"codes": {0: "batch", 2: "frames"}, "wav": {0: "batch", 1: "samples"}}


def _random_decoder(cfg: XYDecoderConfig, seed: int = 0) -> XYDecoder:
    torch.manual_seed(seed)
    m = XYDecoder(cfg).eval()
    with torch.no_grad():
        # Codebooks start at zero (they are buffers); give every lookup a distinct vector.
        for q in m.quantizer.quantizers:
            q.codebook.normal_()
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.normal_(0.0, 0.1)  # non-zero biases and layer scales, so every term matters
    return m


def _codes(batch: int, frames: int, seed: int, cfg: XYDecoderConfig = TINY_XY) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=g)


def _complex_istft(mag: torch.Tensor, phase: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Vocos "same" ISTFT the way the official head computes it, with complex tensors and fold."""
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.polar(mag.double(), phase.double()).transpose(1, 2)  # [B, bins, L]
    frames = torch.fft.irfft(spec, n_fft, dim=1) * window[None, :, None]
    n = frames.shape[-1]
    size = (n - 1) * hop + n_fft
    y = F.fold(frames, (1, size), (1, n_fft), stride=(1, hop))[:, 0, 0]
    env = F.fold(window.square().expand(1, n, -1).transpose(1, 2), (1, size), (1, n_fft), stride=(1, hop))[0, 0, 0]
    pad = (n_fft - hop) // 2
    return y[:, pad:-pad] / env[pad:-pad]


@pytest.mark.parametrize("n_fft,hop", [(1280, 320), (960, 240), (64, 16)])
@pytest.mark.parametrize("frames", [1, 7, 33])
def test_real_istft_matches_complex_reference(n_fft: int, hop: int, frames: int) -> None:
    g = torch.Generator().manual_seed(frames + n_fft)
    bins = n_fft // 2 + 1
    mag = torch.exp(torch.randn(2, frames, bins, generator=g) * 2).clamp(max=100.0)
    phase = torch.randn(2, frames, bins, generator=g) * 4
    got = RealISTFT(n_fft, hop)(mag, phase)
    ref = _complex_istft(mag, phase, n_fft, hop)
    assert got.shape == (2, frames * hop)
    err = compare({"y": got.numpy()}, {"y": ref.numpy()})[0]
    assert err.rel <= 1e-5, err


def test_inverse_rdft_basis_ignores_dc_and_nyquist_imaginary_parts() -> None:
    n_fft = 32
    g = torch.Generator().manual_seed(3)
    spec = torch.complex(torch.randn(4, n_fft // 2 + 1, generator=g), torch.randn(4, n_fft // 2 + 1, generator=g))
    got = torch.cat([spec.real, spec.imag], dim=-1).double() @ inverse_rdft_basis(n_fft).double()
    ref = torch.fft.irfft(spec.to(torch.complex128), n_fft, dim=-1)
    assert torch.allclose(got, ref, atol=1e-6)


def test_tiny_onnx_runs_at_several_lengths(tmp_path) -> None:
    m = _random_decoder(TINY_XY)
    path = export_onnx(m, (_codes(1, 9, seed=0),), tmp_path / "xy.onnx", ["codes"], ["wav"], DYNAMIC)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    # Ops TensorRT 10.x cannot parse (or torch cannot export as real tensors) must not appear.
    assert not ops & {"DFT", "STFT", "Col2Im", "If", "Loop"}, ops
    assert {"IsNaN", "Where"} <= ops  # the overflow clamp survived tracing
    for batch, frames in [(1, 5), (2, 12), (1, 40)]:
        codes = _codes(batch, frames, seed=frames)
        with torch.no_grad():
            ref = m(codes).numpy()
        got = run_onnx(path, {"codes": codes.numpy()})
        assert got["wav"].shape == (batch, frames * TINY_XY.samples_per_frame)
        err = compare(got, {"wav": ref})[0]
        assert err.rel <= 1e-4, (frames, err)


def test_output_length_and_position_cap() -> None:
    m = _random_decoder(TINY_XY)
    with torch.no_grad():
        assert m(_codes(1, 3, seed=1)).shape == (1, 3 * 2560)
        assert m(_codes(1, m.max_codes, seed=2)).shape == (1, m.max_codes * 2560)
    assert m.max_codes == 375
    with pytest.raises(ValueError, match="at most 375"):
        m(_codes(1, 376, seed=3))


def test_write_load_roundtrip(tmp_path) -> None:
    m = _random_decoder(TINY_XY, seed=1)
    ckpt = write_xy_checkpoint(m, TINY_XY, tmp_path / "xy_tokenizer.ckpt")
    assert config_path_for(ckpt) == tmp_path / "xy_tokenizer_config.yaml"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["generator"]
    # The file really is in the official layout, so the loader's folding and ignoring are exercised.
    assert "quantizer.output_proj.weight_g" in raw and "quantizer.output_proj.weight" not in raw
    assert "quantizer.quantizers.0.embed_avg" in raw and "quantizer.input_proj.weight_v" in raw
    assert load_xy_config(config_path_for(ckpt)) == TINY_XY

    loaded = load_xy_decoder(ckpt)
    want, got = m.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    codes = _codes(1, 6, seed=4)
    with torch.no_grad():
        assert torch.equal(m(codes), loaded(codes))


def test_flat_safetensors_checkpoint_loads(tmp_path) -> None:
    from safetensors.torch import save_file

    m = _random_decoder(TINY_XY, seed=2)
    ckpt = write_xy_checkpoint(m, TINY_XY, tmp_path / "xy_tokenizer.ckpt")
    flat = torch.load(ckpt, map_location="cpu", weights_only=True)["generator"]
    st = tmp_path / "xy_tokenizer.safetensors"  # same stem, so the same yaml is found
    save_file(flat, str(st))
    loaded = load_xy_decoder(st)
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_real_config_survives_yaml_roundtrip(tmp_path) -> None:
    cfg = XYDecoderConfig()
    path = write_xy_config(cfg, tmp_path / "xy_tokenizer_config.yaml")
    params = yaml.safe_load(path.read_text())["generator_params"]
    # The official 32 kHz numbers, under the official key names.
    assert params["decoder_upsample_rate"] == 2560 and params["output_sample_rate"] == 32000
    assert params["vocos_kwargs"]["n_fft"] == 1280 and params["vocos_kwargs"]["hop_size"] == 320
    assert params["post_rvq_adapter_kwargs"]["max_source_positions"] == 375
    assert load_xy_config(path) == cfg


def _conv_out(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return conv(x)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")  # the official code uses it
@pytest.mark.parametrize("style", ["weight_norm", "parametrizations"])
def test_weight_norm_folding_matches_unfolded_conv(style: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 20, kernel_size=1)
    if style == "weight_norm":
        conv = torch.nn.utils.weight_norm(conv)
    else:
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
    with torch.no_grad():
        for name, p in conv.named_parameters():
            if "bias" not in name:
                p.mul_(torch.rand_like(p) * 3 + 0.2)  # g no longer equals ||v||
    x = torch.randn(2, 12, 7)
    want = _conv_out(conv, x)
    folded = fold_weight_norm({k: v.detach() for k, v in conv.state_dict().items()})
    assert set(folded) == {"weight", "bias"}
    plain = torch.nn.Conv1d(12, 20, kernel_size=1)
    plain.load_state_dict(folded)
    assert torch.allclose(_conv_out(plain, x), want, rtol=1e-5, atol=1e-6)


def _resave(ckpt, edit) -> None:
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(obj["generator"])
    torch.save(obj, ckpt)


def test_bad_checkpoints_raise_one_clear_error(tmp_path) -> None:
    m = _random_decoder(TINY_XY)
    ckpt = write_xy_checkpoint(m, TINY_XY, tmp_path / "xy_tokenizer.ckpt")

    def break_it(sd):
        del sd["acoustic_decoder.layers.0.fc1.bias"]
        del sd["quantizer.output_proj.weight_v"]  # a weight-norm half alone cannot be folded
        sd["enhanced_vocos.head.out.weight"] = sd["enhanced_vocos.head.out.weight"][:-2]
        sd["post_rvq_adapter.layers.7.fc1.weight"] = torch.zeros(1)

    _resave(ckpt, break_it)
    with pytest.raises(CheckpointError) as e:
        load_xy_decoder(ckpt)
    msg = str(e.value)
    for needle in (
        "missing", "acoustic_decoder.layers.0.fc1.bias", "quantizer.output_proj.weight",
        "mis-shaped", "enhanced_vocos.head.out.weight", "unexpected", "post_rvq_adapter.layers.7.fc1.weight",
    ):
        assert needle in msg, needle


def test_missing_files_raise_checkpoint_error(tmp_path) -> None:
    m = _random_decoder(TINY_XY)
    ckpt = write_xy_checkpoint(m, TINY_XY, tmp_path / "xy_tokenizer.ckpt")
    config_path_for(ckpt).rename(tmp_path / "elsewhere.yaml")
    with pytest.raises(CheckpointError, match="xy_tokenizer_config.yaml"):
        load_xy_decoder(ckpt)
    assert load_xy_decoder(ckpt, tmp_path / "elsewhere.yaml").cfg == TINY_XY
    with pytest.raises(CheckpointError, match="not found"):
        load_xy_decoder(tmp_path / "nope.ckpt", tmp_path / "elsewhere.yaml")


def test_bad_yaml_lists_every_problem(tmp_path) -> None:
    ckpt = write_xy_checkpoint(_random_decoder(TINY_XY), TINY_XY, tmp_path / "xy_tokenizer.ckpt")
    ypath = config_path_for(ckpt)
    doc = yaml.safe_load(ypath.read_text())
    del doc["generator_params"]["vocos_kwargs"]["n_fft"]
    doc["generator_params"]["vocos_kwargs"]["padding"] = "center"
    ypath.write_text(yaml.safe_dump(doc))
    with pytest.raises(CheckpointError) as e:
        load_xy_decoder(ckpt)
    assert "vocos_kwargs.n_fft is missing" in str(e.value) and "padding" in str(e.value)


@pytest.mark.slow
def test_real_size_decoder_exports_and_runs(tmp_path) -> None:
    cfg = XYDecoderConfig()
    m = _random_decoder(cfg)
    path = export_onnx(m, (_codes(1, 16, seed=0, cfg=cfg),), tmp_path / "xy.onnx", ["codes"], ["wav"], DYNAMIC)
    size = path.stat().st_size + sum(p.stat().st_size for p in tmp_path.glob("xy.onnx.data"))
    log.info("real XY decoder ONNX: %.1f MB", size / 1e6)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for frames in (20, 48):
        codes = _codes(1, frames, seed=frames, cfg=cfg)
        with torch.no_grad():
            ref = m(codes).numpy()
        sess.run(["wav"], {"codes": codes.numpy()})  # warm-up
        t0 = time.perf_counter()
        (wav,) = sess.run(["wav"], {"codes": codes.numpy()})
        dt = time.perf_counter() - t0
        audio_s = frames / cfg.code_rate_hz
        log.info("real XY decoder, %d frames (%.2f s audio): %.3f s CPU, %.3f s per audio second",
                 frames, audio_s, dt, dt / audio_s)
        assert wav.shape == (1, frames * cfg.samples_per_frame)
        assert np.isfinite(wav).all()
        err = compare({"wav": wav}, {"wav": ref})[0]
        assert err.rel <= 1e-4, (frames, err)


def test_overflow_clamp_only_when_something_is_not_finite():
    from qinyu_edge.export.models.xy_decoder import FP16_CLAMP, _clamp_if_nonfinite

    big = torch.tensor([[1.0, 7e4, -8e4]])
    assert torch.equal(_clamp_if_nonfinite(big), big)  # all finite: untouched, even above the fp16 range
    with_inf = torch.tensor([[1.0, float("inf"), -7e4]])
    assert _clamp_if_nonfinite(with_inf).tolist() == [[1.0, FP16_CLAMP, -FP16_CLAMP]]
    with_nan = torch.tensor([[2e5, float("nan")]])
    out = _clamp_if_nonfinite(with_nan)
    assert out[0, 0] == FP16_CLAMP and torch.isnan(out[0, 1])
