"""Read and write XY-Tokenizer checkpoints (`xy_tokenizer.ckpt` + `xy_tokenizer_config.yaml`).

The official file (MOSS-TTSD v0.7 `XY_Tokenizer.load_from_checkpoint`) is a torch state dict of the
whole codec, possibly nested under `generator`. Only the decode side is kept here: the encoder
side and the quantizer's EMA training buffers (`inited`, `cluster_size`, `embed_avg`) are read and
dropped, and the weight-normed `quantizer.output_proj` is folded into a plain weight. The yaml
sits beside the checkpoint; its name is the checkpoint's stem plus `_config.yaml`, which is what
QinYu's `xy_tokenizer.ckpt` -> `xy_tokenizer_config.yaml` replacement gives for the shipped name.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from qinyu_edge.config import TransformerStackConfig, XYDecoderConfig
from qinyu_edge.errors import CheckpointError, ConfigError
from qinyu_edge.fileio import atomic_path

from .models.xy_decoder import DECODER_KERNEL, DECODER_STRIDE, XYDecoder, check_config

log = logging.getLogger(__name__)

DECODE_PREFIXES = (
    "quantizer.quantizers.",
    "quantizer.output_proj.",
    "post_rvq_adapter.",
    "upsample.",
    "acoustic_decoder.",
    "enhanced_vocos.",
)
TRAINING_BUFFERS = ("inited", "cluster_size", "embed_avg")
# Which decode-side modules the official code wraps in torch.nn.utils.weight_norm.
WEIGHT_NORMED = ("quantizer.output_proj",)
_WN_OLD = ("weight_g", "weight_v")
_WN_NEW = ("parametrizations.weight.original0", "parametrizations.weight.original1")

# Mel-frame geometry the official OmniAudioDecoder uses to size its position table when the yaml
# leaves it out: (max_audio_seconds * sampling_rate // hop_length) // stride_size.
_DEC_DEFAULTS = {"sampling_rate": 16000, "hop_length": 160, "max_audio_seconds": 30}
_FETCH_HINT = (
    "Use xy_tokenizer.ckpt and xy_tokenizer_config.yaml from VITA-MLLM/VITA-QinYu-Models "
    "(the 32 kHz MOSS-TTSD v0.7 XY-Tokenizer), side by side."
)


def config_path_for(ckpt_path: str | os.PathLike) -> Path:
    """`.../xy_tokenizer.ckpt` -> `.../xy_tokenizer_config.yaml`."""
    p = Path(ckpt_path)
    return p.with_name(p.stem + "_config.yaml")


# --- yaml -> config -------------------------------------------------------------------------


class _Reader:
    """Looks keys up in the yaml and collects every problem, to report them together."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params
        self.problems: list[str] = []

    def section(self, name: str) -> Mapping[str, Any]:
        sec = self.params.get(name)
        if not isinstance(sec, Mapping):
            self.problems.append(f"generator_params.{name} is missing")
            return {}
        return sec

    def get(self, sec: Mapping[str, Any], where: str, key: str, default: int | None = None) -> int:
        """An integer value; `default` (the official constructor's) when given and the key is absent."""
        if key not in sec:
            if default is None:
                if sec:  # a missing section is reported once, not per key
                    self.problems.append(f"{where}.{key} is missing")
                return 0
            return default
        value = sec[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{where}.{key} = {value!r} is not an integer")
            return 0
        return value

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


def load_xy_config(yaml_path: str | os.PathLike) -> XYDecoderConfig:
    """Decode-side architecture from an official XY-Tokenizer yaml (`generator_params`)."""
    path = Path(yaml_path)
    if not path.is_file():
        raise CheckpointError(f"XY-Tokenizer config {path} not found. {_FETCH_HINT}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"XY-Tokenizer config {path} is not valid yaml ({e}). {_FETCH_HINT}") from e
    params = doc.get("generator_params") if isinstance(doc, Mapping) else None
    if not isinstance(params, Mapping):
        raise CheckpointError(f"XY-Tokenizer config {path} has no generator_params section. {_FETCH_HINT}")

    r = _Reader(params)
    g = "generator_params"
    in_rate = r.get(params, g, "input_sample_rate")
    out_rate = r.get(params, g, "output_sample_rate")
    enc_down = r.get(params, g, "encoder_downsample_rate")
    dec_up = r.get(params, g, "decoder_upsample_rate")

    q, qw = r.section("quantizer_kwargs"), f"{g}.quantizer_kwargs"
    rvq_dim = r.get(q, qw, "rvq_dim")
    code_dim = r.get(q, qw, "codebook_dim")
    rvq_out = r.get(q, qw, "output_dim")
    r.require(
        not q or rvq_dim == code_dim,
        f"{qw}: rvq_dim {rvq_dim} != codebook_dim {code_dim} (per-codebook projections are not supported)",
    )

    a, aw = r.section("post_rvq_adapter_kwargs"), f"{g}.post_rvq_adapter_kwargs"
    adapter_in = r.get(a, aw, "input_dim")
    r.require(not a or not q or adapter_in == rvq_out, f"{aw}.input_dim {adapter_in} != quantizer output_dim {rvq_out}")
    r.require(a.get("activation_function", "gelu") == "gelu", f"{aw}.activation_function must be gelu")
    adapter = TransformerStackConfig(
        d_model=r.get(a, aw, "d_model"),
        layers=r.get(a, aw, "encoder_layers"),
        heads=r.get(a, aw, "encoder_attention_heads"),
        ffn_dim=r.get(a, aw, "encoder_ffn_dim"),
        max_positions=r.get(a, aw, "max_source_positions"),
    )

    u, uw = r.section("upsample_kwargs"), f"{g}.upsample_kwargs"
    up_d = r.get(u, uw, "d_model")
    stride = r.get(u, uw, "stride")

    d, dw = r.section("acoustic_decoder_kwargs"), f"{g}.acoustic_decoder_kwargs"
    for key, fixed in (("stride_size", DECODER_STRIDE), ("kernel_size", DECODER_KERNEL)):
        r.require(r.get(d, dw, key, fixed) == fixed, f"{dw}.{key} must be {fixed}")
    r.require(d.get("activation_function", "gelu") == "gelu", f"{dw}.activation_function must be gelu")
    geo = {k: r.get(d, dw, k, v) for k, v in _DEC_DEFAULTS.items()}
    dec_positions = (geo["max_audio_seconds"] * geo["sampling_rate"] // max(geo["hop_length"], 1)) // DECODER_STRIDE
    decoder = TransformerStackConfig(
        d_model=r.get(d, dw, "d_model"),
        layers=r.get(d, dw, "decoder_layers"),
        heads=r.get(d, dw, "decoder_attention_heads"),
        ffn_dim=r.get(d, dw, "decoder_ffn_dim"),
        max_positions=dec_positions,
    )
    n_mels = r.get(d, dw, "num_mel_bins")
    r.require(
        not u or not d or up_d == decoder.d_model, f"{uw}.d_model {up_d} != acoustic decoder d_model {decoder.d_model}"
    )

    v, vw = r.section("vocos_kwargs"), f"{g}.vocos_kwargs"
    r.require(
        not v or not d or r.get(v, vw, "input_channels") == n_mels, f"{vw}.input_channels != num_mel_bins {n_mels}"
    )
    r.require(v.get("padding", "same") == "same", f"{vw}.padding must be 'same'")
    r.require(v.get("adanorm_num_embeddings") is None, f"{vw}.adanorm_num_embeddings is not supported")

    fields = dict(
        num_quantizers=r.get(q, qw, "num_quantizers"),
        codebook_size=r.get(q, qw, "codebook_size"),
        code_dim=code_dim,
        rvq_output_dim=rvq_out,
        adapter=adapter,
        adapter_output_dim=r.get(a, aw, "output_dim"),
        upsample_factor=stride,
        decoder=decoder,
        n_mels=n_mels,
        vocos_dim=r.get(v, vw, "dim"),
        vocos_intermediate=r.get(v, vw, "intermediate_dim"),
        vocos_layers=r.get(v, vw, "num_layers"),
        n_fft=r.get(v, vw, "n_fft"),
        hop_length=r.get(v, vw, "hop_size"),
        sample_rate=out_rate,
        code_rate_hz=in_rate / enc_down if enc_down else 0.0,
    )
    if r.problems:
        raise CheckpointError(
            f"XY-Tokenizer config {path} is not usable: " + "; ".join(r.problems) + f". {_FETCH_HINT}"
        )
    try:
        cfg = XYDecoderConfig(**fields)
        check_config(cfg)
    except ConfigError as e:
        raise CheckpointError(f"XY-Tokenizer config {path}: {e}. {_FETCH_HINT}") from e
    if dec_up != cfg.samples_per_frame or cfg.sample_rate != cfg.samples_per_frame * cfg.code_rate_hz:
        raise CheckpointError(
            f"XY-Tokenizer config {path}: decoder_upsample_rate {dec_up}, output_sample_rate {out_rate} and "
            f"code rate {cfg.code_rate_hz} Hz disagree with {cfg.samples_per_frame} samples per code frame "
            f"(upsample stride x 2 x hop_size). {_FETCH_HINT}"
        )
    return cfg


# --- checkpoint -> module -------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"XY-Tokenizer checkpoint {path} not found. {_FETCH_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"XY-Tokenizer checkpoint {path} cannot be read as plain tensors ({e}). It may be truncated, or "
                f"hold pickled objects besides the weights: re-save its state dict with torch.save. {_FETCH_HINT}"
            ) from e
    for key in ("generator", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"XY-Tokenizer checkpoint {path} holds no state dict. {_FETCH_HINT}")
    return dict(obj)


def _weight_norm_dims(g: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    # g keeps its size along the normalised axis and has size 1 elsewhere (all axes for dim=None).
    if g.dim() != v.dim():
        return tuple(range(v.dim()))
    return tuple(i for i in range(v.dim()) if g.shape[i] == 1)


def fold_weight_norm(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every weight-norm pair (old `weight_g`/`weight_v` or parametrizations
    `original0`/`original1`) by the plain `weight` = g * v / ||v||, as torch computes it."""
    out = dict(sd)
    for g_suffix, v_suffix in (_WN_OLD, _WN_NEW):
        for key in [k for k in sd if k == g_suffix or k.endswith("." + g_suffix)]:
            base = key[: -len(g_suffix)]
            if base + v_suffix not in sd:
                continue
            g = out.pop(key).float()
            v = out.pop(base + v_suffix).float()
            norm = torch.linalg.vector_norm(v, dim=_weight_norm_dims(g, v), keepdim=True)
            out[base + "weight"] = v * (g / norm)
    return out


def _is_ignored(key: str) -> bool:
    if not key.startswith(DECODE_PREFIXES):
        return True  # encoder side: semantic/acoustic encoders, adapters, downsample, input_proj
    return key.startswith("quantizer.quantizers.") and key.rsplit(".", 1)[-1] in TRAINING_BUFFERS


def load_xy_decoder(ckpt_path: str | os.PathLike, yaml_path: str | os.PathLike | None = None) -> XYDecoder:
    """Build the decoder from the yaml beside the checkpoint and load its decode-side weights."""
    ckpt = Path(ckpt_path)
    ypath = Path(yaml_path) if yaml_path is not None else config_path_for(ckpt)
    cfg = load_xy_config(ypath)
    raw = _read_state_dict(ckpt)
    kept = {k: v for k, v in raw.items() if not _is_ignored(k)}
    sd = fold_weight_norm(kept)

    module = XYDecoder(cfg)
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    misshaped = sorted(
        f"{k} {tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__} "
        f"(expected {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and (not isinstance(sd[k], torch.Tensor) or sd[k].shape != expected[k].shape)
    )
    unexpected = sorted(k for k in sd if k not in expected)
    if missing or misshaped or unexpected:
        parts = [f"{name}: {', '.join(keys)}" for name, keys in
                 (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)) if keys]
        raise CheckpointError(
            f"XY-Tokenizer checkpoint {ckpt} does not match the architecture in {ypath}. "
            + "; ".join(parts) + f". Check that the two files belong together. {_FETCH_HINT}"
        )
    module.load_state_dict({k: sd[k].float() for k in expected}, strict=True)
    log.info("loaded XY decoder from %s (%d decode-side tensors, %d others ignored)",
             ckpt, len(expected), len(raw) - len(kept))
    return module.eval()


# --- module -> checkpoint (tests, fixtures) ---------------------------------------------------


def _yaml_params(cfg: XYDecoderConfig) -> dict[str, Any]:
    if cfg.decoder.max_positions % 50:
        raise ValueError("decoder.max_positions must be a multiple of 50 (whole seconds at 50 Hz) to be written")
    in_rate = 16000
    return {
        "input_sample_rate": in_rate,
        "output_sample_rate": cfg.sample_rate,
        "encoder_downsample_rate": round(in_rate / cfg.code_rate_hz),
        "decoder_upsample_rate": cfg.samples_per_frame,
        "quantizer_kwargs": {
            "input_dim": cfg.rvq_output_dim, "rvq_dim": cfg.code_dim, "output_dim": cfg.rvq_output_dim,
            "num_quantizers": cfg.num_quantizers, "codebook_size": cfg.codebook_size,
            "codebook_dim": cfg.code_dim, "quantizer_dropout": 0.0, "commitment": 1,
        },
        "post_rvq_adapter_kwargs": {
            "input_dim": cfg.rvq_output_dim, "output_dim": cfg.adapter_output_dim, "d_model": cfg.adapter.d_model,
            "max_source_positions": cfg.adapter.max_positions, "encoder_layers": cfg.adapter.layers,
            "encoder_attention_heads": cfg.adapter.heads, "encoder_ffn_dim": cfg.adapter.ffn_dim,
        },
        "upsample_kwargs": {"d_model": cfg.decoder.d_model, "stride": cfg.upsample_factor},
        "acoustic_decoder_kwargs": {
            "num_mel_bins": cfg.n_mels, "sampling_rate": in_rate, "hop_length": 160,
            "stride_size": DECODER_STRIDE, "kernel_size": DECODER_KERNEL, "d_model": cfg.decoder.d_model,
            "scale_embedding": False, "max_audio_seconds": cfg.decoder.max_positions // 50,
            "decoder_layers": cfg.decoder.layers, "decoder_attention_heads": cfg.decoder.heads,
            "decoder_ffn_dim": cfg.decoder.ffn_dim, "activation_function": "gelu",
        },
        "vocos_kwargs": {
            "input_channels": cfg.n_mels, "dim": cfg.vocos_dim, "intermediate_dim": cfg.vocos_intermediate,
            "num_layers": cfg.vocos_layers, "n_fft": cfg.n_fft, "hop_size": cfg.hop_length, "padding": "same",
        },
    }


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_xy_checkpoint(module: XYDecoder, cfg: XYDecoderConfig, ckpt_path: str | os.PathLike) -> Path:
    """Write `module` in the official layout: under `generator`, `output_proj` weight-normed, with a
    few encoder-side tensors and the quantizer training buffers a real file carries, plus the yaml
    beside it. Returns the checkpoint path."""
    if module.cfg != cfg:
        raise ValueError("module was built from a different XYDecoderConfig than the one to write")
    ckpt = Path(ckpt_path)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    sd = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    for base in WEIGHT_NORMED:
        w = sd.pop(base + ".weight")
        # Rescale v per channel so folding really has to normalise; powers of two keep g * v / ||v||
        # bit-exact, so a write/load roundtrip returns the very same weight.
        scale = 2.0 ** torch.randint(-3, 4, (w.shape[0],) + (1,) * (w.dim() - 1), generator=gen).float()
        sd[base + ".weight_v"] = w * scale
        sd[base + ".weight_g"] = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)

    for k in range(cfg.num_quantizers):
        p = f"quantizer.quantizers.{k}."
        sd[p + "inited"] = torch.tensor([True])
        sd[p + "cluster_size"] = torch.rand(cfg.codebook_size, generator=gen)
        sd[p + "embed_avg"] = torch.randn(cfg.codebook_size, cfg.code_dim, generator=gen)
    sd["quantizer.input_proj.weight_g"] = torch.rand(cfg.code_dim, 1, 1, generator=gen)
    sd["quantizer.input_proj.weight_v"] = torch.randn(cfg.code_dim, cfg.rvq_output_dim, 1, generator=gen)
    sd["quantizer.input_proj.bias"] = torch.zeros(cfg.code_dim)
    sd["downsample.layer_norm.weight"] = torch.ones(cfg.rvq_output_dim)
    sd["semantic_encoder.layer_norm.weight"] = torch.ones(cfg.adapter.d_model)
    sd["pre_rvq_adapter.positional_embedding"] = torch.zeros(4, cfg.adapter.d_model)

    _atomic_write(ckpt, lambda tmp: torch.save({"generator": sd}, tmp))
    write_xy_config(cfg, config_path_for(ckpt))
    log.info("wrote XY checkpoint %s", ckpt)
    return ckpt


def write_xy_config(cfg: XYDecoderConfig, yaml_path: str | os.PathLike) -> Path:
    """Write the decode-side part of an official `generator_params` yaml (same key names)."""
    path = Path(yaml_path)
    text = yaml.safe_dump({"generator_params": _yaml_params(cfg)}, sort_keys=False)
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
