"""Typed configs for every component, with the real numbers of both released variants and the
tiny presets of the same architectures.

Real values come from the official configs (see ../shared/design/model-spec.md). Tiny presets keep
every structural choice (norm kinds, MLA vs GQA, interleaved rope, query rows, the 8x1032 audio
block, 32 kHz output) and shrink only widths and depths, so tests exercise the same code paths.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

N_CODEBOOKS = 8
CODES_PER_BOOK = 1024
# Each codebook owns 1024 codes + 8 pad/delay ids in one contiguous block of the vocabulary.
IDS_PER_BOOK = 1032
SPEAKER_DIM = 192
ENCODER_OUT_DIM = 512  # the projector input width is fixed at 512 in the official code
# Positions per backbone call when prefilling: a long prompt runs in chunks over the cache, so the
# attention scores of one call stay chunk x context and TensorRT profiles need no longer prompt.
PREFILL_CHUNK = 512


@dataclass(frozen=True)
class SenseVoiceConfig:
    """SenseVoiceSmall SAN-M encoder (FunASR `SenseVoiceEncoderSmall`)."""

    input_size: int = 560  # 80 mel x LFR m=7
    output_size: int = 512
    attention_heads: int = 4
    linear_units: int = 2048
    num_blocks: int = 50  # encoders0 (1 layer, 560->512) + encoders (49)
    tp_blocks: int = 20
    kernel_size: int = 11
    sanm_shift: int = 0
    embed_rows: int = 16
    # language "auto", event, emotion, text-norm "woitn": the 4 query rows put in front.
    query_ids: tuple[int, ...] = (0, 1, 2, 15)
    # Official code rounds the 560-d features to bf16 before the encoder (model-spec 10.5).
    round_features_bf16: bool = True
    ctc_vocab: int = 25055  # CTC head exists in the weights; QinYu does not use it
    lfr_m: int = 7
    lfr_n: int = 6
    n_mels: int = 80

    def param_count(self) -> int:
        """Parameters of the encoder as export/models/sensevoice.py builds it (the CTC head aside)."""
        d, u = self.output_size, self.linear_units

        def layer(width_in: int) -> int:
            attention = width_in * 3 * d + 3 * d + d * self.kernel_size + d * d + d  # qkv, FSMN conv, out
            return 2 * width_in + attention + 2 * d + d * u + u + u * d + d  # two LayerNorms, feed-forward

        return (self.embed_rows * self.input_size + layer(self.input_size)
                + (self.num_blocks - 1 + self.tp_blocks) * layer(d) + 2 * 2 * d)  # after_norm, tp_norm

    def matrix_param_count(self) -> int:
        """The weights of its Linear layers (qkv, out, feed-forward): what a weight-only quantization
        of the encoder's MatMuls narrows. The rest (query rows, FSMN kernels, biases, norms) stays."""
        d, u = self.output_size, self.linear_units

        def layer(width_in: int) -> int:
            return width_in * 3 * d + d * d + 2 * d * u

        return layer(self.input_size) + (self.num_blocks - 1 + self.tp_blocks) * layer(d)


@dataclass(frozen=True)
class ProjectorConfig:
    """Audio projector or speaker projector: norm -> Linear -> GELU -> Linear, no biases."""

    input_size: int
    hidden_size: int
    norm: Literal["layer_norm", "rms_norm"]
    # nn.RMSNorm(eps=None) takes the input dtype's epsilon; the official environment (torch 2.5,
    # bf16) gives 2^-7. Explicit here so it does not depend on our torch version.
    eps: float = 1e-5


@dataclass(frozen=True)
class BackboneConfig:
    """The LLM: Qwen3 (GQA with per-head q/k norm) or Youtu-LLM utu v1 (MLA)."""

    arch: Literal["qwen3", "utu_mla"]
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    # MLA only (utu_mla):
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    use_audio_heads: bool = False

    @property
    def is_mla(self) -> bool:
        return self.arch == "utu_mla"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def cache_width(self) -> int:
        """Floats cached per position per layer per kv head: K and V (GQA) or latent+rope key (MLA)."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.head_dim

    def param_count(self) -> int:
        h, n = self.hidden_size, self.num_layers
        if self.is_mla:
            nh = self.num_attention_heads
            attn = (
                h * self.q_lora_rank
                + self.q_lora_rank
                + self.q_lora_rank * nh * self.qk_head_dim
                + h * (self.kv_lora_rank + self.qk_rope_head_dim)
                + self.kv_lora_rank
                + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
                + nh * self.v_head_dim * h
            )
        else:
            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        return n * layer + embed + head + h


@dataclass(frozen=True)
class TransformerStackConfig:
    """A bidirectional pre-LN transformer stack of the XY decoder (post-RVQ adapter, acoustic decoder)."""

    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    max_positions: int


@dataclass(frozen=True)
class XYDecoderConfig:
    """XY-Tokenizer decode path as QinYu runs it (MOSS-TTSD v0.7 copy, 32 kHz)."""

    num_quantizers: int = N_CODEBOOKS
    codebook_size: int = CODES_PER_BOOK
    code_dim: int = 512
    rvq_output_dim: int = 3072  # quantizer.output_proj 512 -> 3072
    adapter: TransformerStackConfig = TransformerStackConfig(768, 4, 12, 3072, 375)
    adapter_output_dim: int = 3072
    upsample_factor: int = 4  # 12.5 Hz -> 50 Hz
    decoder: TransformerStackConfig = TransformerStackConfig(768, 12, 12, 3072, 1500)
    n_mels: int = 80
    vocos_dim: int = 512
    vocos_intermediate: int = 4096
    vocos_layers: int = 30
    n_fft: int = 1280
    hop_length: int = 320
    sample_rate: int = 32000
    code_rate_hz: float = 12.5

    @property
    def samples_per_frame(self) -> int:
        # one code frame -> 4 (upsample) x 2 (acoustic decoder) mel frames -> hop samples each
        return self.upsample_factor * 2 * self.hop_length

    def param_count(self) -> int:
        """Parameters of the decode path as export/models/xy_decoder.py builds it: the RVQ output
        projection, adapter, upsampler, acoustic decoder and Vocos. Codebooks and tables are buffers
        (`table_count`)."""
        a, d = self.adapter, self.decoder.d_model
        rvq, out = self.rvq_output_dim, self.adapter_output_dim
        # The adapter projects in and out only where the widths differ.
        adapter = (rvq * a.d_model + a.d_model if rvq != a.d_model else 0) + _stack_params(a) \
            + (a.d_model * out + out if out != a.d_model else 0)
        upsample = out * d * self.upsample_factor  # ConvTranspose1d, no bias
        # Two transposed convs of kernel 3 (d -> d, d -> n_mels) with biases.
        acoustic = _stack_params(self.decoder) + 3 * d * d + d + 3 * d * self.n_mels + self.n_mels
        v, i = self.vocos_dim, self.vocos_intermediate
        convnext = 7 * v + v + 2 * v + v * i + i + i * v + v + v  # depthwise conv, LayerNorm, MLP, layer scale
        vocos = (7 * self.n_mels * v + v + 2 * v + self.vocos_layers * convnext + 2 * v
                 + v * (self.n_fft + 2) + self.n_fft + 2)  # embed conv, norms, ISTFT head
        rvq_out = self.code_dim * self.rvq_output_dim + self.rvq_output_dim
        return rvq_out + adapter + upsample + acoustic + vocos

    def table_count(self) -> int:
        """Floats the graph holds besides parameters: codebooks, both position tables, the ISTFT
        window and its inverse-DFT basis (2 x (n_fft/2 + 1) x n_fft, the largest in a tiny preset)."""
        codebooks = self.num_quantizers * self.codebook_size * self.code_dim
        positions = sum(s.max_positions * s.d_model for s in (self.adapter, self.decoder))
        return codebooks + positions + self.n_fft + 2 * (self.n_fft // 2 + 1) * self.n_fft


def _stack_params(s: TransformerStackConfig) -> int:
    """A pre-LN transformer stack: per layer q/v/out projections with biases, k without, two
    LayerNorms and the GELU MLP; then the final LayerNorm."""
    d, f = s.d_model, s.ffn_dim
    return s.layers * (4 * d * d + 3 * d + 2 * 2 * d + d * f + f + f * d + d) + 2 * d


@dataclass(frozen=True)
class CamPPConfig:
    """CAM++ speaker encoder (3D-Speaker `CAMPPlus`)."""

    feat_dim: int = 80
    embedding_size: int = SPEAKER_DIM
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    fcm_channels: int = 32
    fcm_blocks: tuple[int, ...] = (2, 2)
    chunk_seconds: float = 10.0
    max_seconds: float = 90.0

    def param_count(self) -> int:
        """Parameters of export/models/campplus.py's CAMPPlus (BatchNorm running statistics are buffers)."""
        m = self.fcm_channels

        def res_block(stride: int) -> int:
            shortcut = m * m + 2 * m if stride != 1 else 0  # every block is m -> m wide
            return 9 * m * m + 2 * m + 9 * m * m + 2 * m + shortcut

        fcm = 9 * m + 2 * m + sum(res_block(2) + (n - 1) * res_block(1) for n in self.fcm_blocks) + 9 * m * m + 2 * m
        c = self.init_channels
        total = fcm + m * (self.feat_dim // 8) * c * 5 + 2 * c  # TDNN, kernel 5, and its BatchNorm
        g = self.growth_rate
        bn = self.bn_size * g
        for n_layers, kernel in zip(self.block_layers, self.block_kernels):
            for i in range(n_layers):
                width = c + i * g
                cam = bn * g * kernel + bn * (bn // 2) + bn // 2 + (bn // 2) * g + g
                total += 2 * width + width * bn + 2 * bn + cam
            c += n_layers * g
            total += 2 * c + c * (c // 2)  # transit: BatchNorm, 1x1 conv halving the channels
            c //= 2
        return total + 2 * c + 2 * c * self.embedding_size  # BatchNorm, dense 1x1 conv (its BatchNorm has no affine)


@dataclass(frozen=True)
class ModelConfig:
    """One VITA-QinYu variant: every component's config plus the variant-level choices."""

    name: str
    variant: Literal["8b", "4b"]
    backbone: BackboneConfig
    sensevoice: SenseVoiceConfig
    audio_projector: ProjectorConfig
    speaker_projector: ProjectorConfig
    xy: XYDecoderConfig
    campplus: CamPPConfig
    # 8B keeps the 4 query rows in the encoder output; 4B drops them (model-spec 1.2).
    keep_query_rows: bool
    n_codebooks: int = N_CODEBOOKS
    ids_per_book: int = IDS_PER_BOOK
    codes_per_book: int = CODES_PER_BOOK
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.1
    repetition_window: int = 5
    # Default agent voice and role description of the official config.
    default_speaker: str = "tian"
    tiny: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        try:
            return _build(cls, d)
        except (TypeError, KeyError, ValueError) as e:
            raise ConfigError(f"model config is not valid: {e}. Re-export the bundle with this version of qinyu-edge.") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _build(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from its asdict() form."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)} for {cls.__name__}")
    for name, value in d.items():
        ftype = hints[name].type
        sub = _NESTED.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None and isinstance(value, dict):
            value = _build(sub, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_NESTED = {
    "BackboneConfig": BackboneConfig,
    "SenseVoiceConfig": SenseVoiceConfig,
    "ProjectorConfig": ProjectorConfig,
    "XYDecoderConfig": XYDecoderConfig,
    "CamPPConfig": CamPPConfig,
    "TransformerStackConfig": TransformerStackConfig,
}

# --- presets -------------------------------------------------------------------------------

RMS_EPS_BF16 = 2.0**-7  # what nn.RMSNorm(eps=None) gives on bf16 input under torch < 2.7

QWEN3_8B = BackboneConfig(
    arch="qwen3", hidden_size=4096, num_layers=36, intermediate_size=12288,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=159960,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=40960,
)
UTU_4B = BackboneConfig(
    arch="utu_mla", hidden_size=2560, num_layers=40, intermediate_size=9728,
    num_attention_heads=32, num_key_value_heads=32, head_dim=64, vocab_size=136544,
    rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=131072,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, rope_interleave=True,
)

TINY_SENSEVOICE = SenseVoiceConfig(
    output_size=64, attention_heads=4, linear_units=128, num_blocks=3, tp_blocks=2, ctc_vocab=64,
)
TINY_XY = XYDecoderConfig(
    code_dim=32, rvq_output_dim=64,
    # adapter_output_dim must be upsample_factor x decoder d_model (the official UpConv's input width).
    adapter=TransformerStackConfig(32, 1, 2, 64, 375), adapter_output_dim=128,
    decoder=TransformerStackConfig(32, 1, 2, 64, 1500),
    vocos_dim=32, vocos_intermediate=64, vocos_layers=2,
)
TINY_CAMPP = CamPPConfig(
    growth_rate=8, bn_size=2, init_channels=16, block_layers=(1, 1, 1), fcm_channels=8, fcm_blocks=(1, 1),
)
# Tiny backbones: the vocabulary size is set from the tiny tokenizer when the preset is built.
TINY_QWEN3 = BackboneConfig(
    arch="qwen3", hidden_size=64, num_layers=2, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=0,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=4096,
)
TINY_MLA = BackboneConfig(
    arch="utu_mla", hidden_size=64, num_layers=2, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=0,
    rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, rope_interleave=True,
)


def _variant(name: str, variant: str, backbone: BackboneConfig, sv: SenseVoiceConfig,
             xy: XYDecoderConfig, campp: CamPPConfig, tiny: bool) -> ModelConfig:
    h = backbone.hidden_size
    if variant == "8b":
        norm, eps = "layer_norm", 1e-5
    else:
        norm, eps = "rms_norm", RMS_EPS_BF16
    return ModelConfig(
        name=name, variant=variant, backbone=backbone, sensevoice=sv,
        audio_projector=ProjectorConfig(ENCODER_OUT_DIM if not tiny else sv.output_size, h, norm, eps),
        speaker_projector=ProjectorConfig(SPEAKER_DIM, h, norm, eps),
        xy=xy, campplus=campp, keep_query_rows=(variant == "8b"), tiny=tiny,
    )


PRESETS: dict[str, ModelConfig] = {
    "qinyu-8b": _variant("qinyu-8b", "8b", QWEN3_8B, SenseVoiceConfig(), XYDecoderConfig(), CamPPConfig(), False),
    "qinyu-4b": _variant("qinyu-4b", "4b", UTU_4B, SenseVoiceConfig(), XYDecoderConfig(), CamPPConfig(), False),
    "tiny-8b": _variant("tiny-8b", "8b", TINY_QWEN3, TINY_SENSEVOICE, TINY_XY, TINY_CAMPP, True),
    "tiny-4b": _variant("tiny-4b", "4b", TINY_MLA, TINY_SENSEVOICE, TINY_XY, TINY_CAMPP, True),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def with_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The tiny presets take their vocabulary size from the tiny tokenizer."""
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, vocab_size=vocab_size))


__all__ = [
    "SenseVoiceConfig", "ProjectorConfig", "BackboneConfig", "TransformerStackConfig", "XYDecoderConfig",
    "CamPPConfig", "ModelConfig", "PRESETS", "preset", "with_vocab",
]
