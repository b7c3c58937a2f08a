"""XY-Tokenizer decode path as VITA-QinYu runs it: 8 x 1024 RVQ codes at 12.5 Hz -> waveform.

This is the MOSS-TTSD v0.7 copy of XY-Tokenizer (`XY_Tokenizer/xy_tokenizer`, 32 kHz config), which
QinYu pins; module and buffer names follow it so `state_dict()` keys equal the checkpoint's
decode-side keys. Differences from the official code, all output-preserving:

- No sequence lengths: one reply is decoded at a time (batched decode is not padding-invariant,
  model-spec 10.8), so every position is valid and attention needs no mask at all. That also
  removes the official additive `finfo.min` mask, which overflows in fp16.
- The fp16/bf16 inf/NaN clamp after each transformer layer is a `torch.where` on a global
  "any non-finite" flag instead of a Python `if`, so the traced graph keeps it.
- The ISTFT is real-valued: an inverse-real-DFT basis matmul, the window, overlap-add by
  pad-and-sum of hop-sized blocks, and division by the window envelope computed in the graph.
  No complex tensors, no DFT/fold ops: it exports to opset 17 and parses in TensorRT 10.x.
- `quantizer.output_proj` holds the plain (folded) weight; the checkpoint stores it weight-normed
  (see `qinyu_edge.export.xy_checkpoint`).

Length limit: the post-RVQ adapter's position table has `cfg.adapter.max_positions` rows (375
codes = 30 s). Eager calls raise ValueError beyond it; an exported graph fails inside the
position-table add instead, so the host must cut longer inputs into windows (the official offline
`decode` uses 375-code windows; streaming chunks are far shorter).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from qinyu_edge.config import TransformerStackConfig, XYDecoderConfig
from qinyu_edge.errors import ConfigError

# The official acoustic decoder upsamples 50 Hz -> 100 Hz with ConvTranspose1d(k=3, s=2) and a
# second ConvTranspose1d(k=3, s=1); its yaml keys `stride_size`/`kernel_size` are fixed to these.
DECODER_STRIDE = 2
DECODER_KERNEL = 3
TRANSFORMER_LN_EPS = 1e-5  # nn.LayerNorm default, used by the transformer stacks
VOCOS_LN_EPS = 1e-6
MAG_CLIP = 100.0
# The fp32 graph is meant to be built in fp16 by TensorRT, where the official clamp bound is
# finfo(float16).max - 1000; finfo(float32).max would become inf there and clamp nothing.
FP16_CLAMP = torch.finfo(torch.float16).max - 1000.0


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper-style position table [length, channels]: sin half, then cos half.

    Only the initial value: the checkpoint carries the table and overrides it.
    """
    half = channels // 2
    inc = math.log(max_timescale) / (half - 1)
    inv = torch.exp(-inc * torch.arange(half, dtype=torch.float64))
    t = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1).float()


def _clamp_if_nonfinite(h: torch.Tensor) -> torch.Tensor:
    # The official layer clamps the whole tensor when any element is inf/NaN (fp16/bf16 only).
    limit = FP16_CLAMP if h.dtype in (torch.float32, torch.float16) else torch.finfo(h.dtype).max - 1000.0
    # h - h is 0 where finite and NaN at inf/NaN, so one float sum flags both; isinf/any would
    # trace to a float64 cast and an int64 reduction that TensorRT handles poorly.
    bad = torch.isnan((h - h).sum())
    return torch.where(bad, h.clamp(-limit, limit), h)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # Scaling q before the product (as the official code does) keeps fp16 scores smaller.
        q = (self.q_proj(x) * self.head_dim**-0.5).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, t, d))


class _TransformerLayer(nn.Module):
    """Bidirectional pre-LN layer (official `OmniWhisperTransformerLayer`, LayerNorm, GELU)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = _SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=TRANSFORMER_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return _clamp_if_nonfinite(x)


def _add_positions(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # Slicing by the traced length keeps T dynamic; T > rows fails in the add (documented cap).
    return x + table[: x.shape[1]]


class _PostRVQAdapter(nn.Module):
    """Official `Transformer` (post_rvq_adapter): [B, T, in] -> [B, T, out], channel-last."""

    def __init__(self, input_dim: int, cfg: TransformerStackConfig, output_dim: int) -> None:
        super().__init__()
        d = cfg.d_model
        # The official stack has these projections only when the widths differ.
        self.proj = nn.Linear(input_dim, d) if input_dim != d else None
        self.register_buffer("positional_embedding", sinusoid_table(cfg.max_positions, d))
        self.layers = nn.ModuleList(_TransformerLayer(d, cfg.heads, cfg.ffn_dim) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(d, eps=TRANSFORMER_LN_EPS)
        self.out_proj = nn.Linear(d, output_dim) if output_dim != d else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x)
        x = _add_positions(x, self.positional_embedding)
        for layer in self.layers:
            x = layer(x)
        x = self.layer_norm(x)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x


class _UpConv(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose1d(in_dim, out_dim, kernel_size=stride, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, D, stride*T]
        return self.up_conv(x)


class _AcousticDecoder(nn.Module):
    """Official `OmniAudioDecoder`: [B, 4T, D] (50 Hz) -> mel-like features [B, n_mels, 8T] (100 Hz)."""

    def __init__(self, cfg: TransformerStackConfig, n_mels: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.deconv1 = nn.ConvTranspose1d(d, d, DECODER_KERNEL, stride=DECODER_STRIDE)
        self.deconv2 = nn.ConvTranspose1d(d, n_mels, DECODER_KERNEL, stride=1)
        self.register_buffer("positional_embedding", sinusoid_table(cfg.max_positions, d))
        self.layers = nn.ModuleList(_TransformerLayer(d, cfg.heads, cfg.ffn_dim) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(d, eps=TRANSFORMER_LN_EPS)
        # The two transposed convs give stride*T + (2k - 1 - stride) frames; the official code keeps
        # the first stride*T. A constant tail trim keeps the graph free of shape arithmetic.
        self.excess = 2 * DECODER_KERNEL - 1 - DECODER_STRIDE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _add_positions(x, self.positional_embedding)
        for layer in self.layers:
            x = layer(x)
        x = self.layer_norm(x).transpose(1, 2)
        x = F.gelu(self.deconv1(x))
        x = F.gelu(self.deconv2(x))
        return x[:, :, : -self.excess]


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate)
        self.pwconv2 = nn.Linear(intermediate, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L]
        y = self.dwconv(x).transpose(1, 2)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.transpose(1, 2)


class _VocosBackbone(nn.Module):
    def __init__(self, n_mels: int, dim: int, intermediate: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(n_mels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)
        self.convnext = nn.ModuleList(_ConvNeXtBlock(dim, intermediate, 1.0 / layers) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=VOCOS_LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, n_mels, L] -> [B, L, dim]
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


def inverse_rdft_basis(n_fft: int) -> torch.Tensor:
    """[2 * (n_fft/2 + 1), n_fft]: `[Re X, Im X] @ basis` equals `torch.fft.irfft(X, n_fft)`.

    Bins 1..n/2-1 count twice (their conjugate mirrors); DC and Nyquist once, and their imaginary
    parts are ignored, as irfft does.
    """
    bins = n_fft // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    # Reduce k*n modulo n_fft before scaling so large products keep full float64 accuracy.
    angle = 2.0 * math.pi * torch.remainder(k * n, n_fft) / n_fft
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    weight[-1] = 1.0
    cos = weight * torch.cos(angle) / n_fft
    sin = -weight * torch.sin(angle) / n_fft
    sin[0] = 0.0
    sin[-1] = 0.0
    return torch.cat([cos, sin], dim=0).float()


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """Sum frames [B, L, win] placed every `hop` samples -> [B, (L - 1) * hop + win].

    With win = r * hop, output block m is the sum over j < r of block j of frame m - j: r shifted
    zero-pads and adds, no Col2Im/fold op (TensorRT has none) and no large-kernel transposed conv.
    """
    b, n, win = frames.shape
    r = win // hop
    blocks = frames.reshape(b, n, r, hop)
    out = F.pad(blocks[:, :, 0], (0, 0, 0, r - 1))
    for j in range(1, r):
        out = out + F.pad(blocks[:, :, j], (0, 0, j, r - 1 - j))
    return out.reshape(b, -1)


class RealISTFT(nn.Module):
    """ISTFT with Vocos "same" padding from magnitude and phase, using only real-valued ops.

    Matches the official `ISTFT(padding="same")` on `mag * exp(i * phase)`: irfft, times the window,
    overlap-add, trim (win - hop) / 2 samples at both ends, divide by the overlap-added squared
    window. L frames give L * hop samples.
    """

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        self.pad = (n_fft - hop) // 2
        # Persistent and named as in the checkpoint, which carries it.
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("basis", inverse_rdft_basis(n_fft), persistent=False)

    def forward(self, mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:  # [B, L, bins] each
        spec = torch.cat([mag * torch.cos(phase), mag * torch.sin(phase)], dim=-1)
        frames = (spec @ self.basis) * self.window
        y = overlap_add(frames, self.hop)
        # The envelope depends only on L, so it is built from the window inside the graph.
        env = overlap_add((self.window * self.window).expand(1, frames.shape[1], self.n_fft), self.hop)
        if self.pad > 0:
            y = y[:, self.pad : -self.pad]
            env = env[:, self.pad : -self.pad]
        return y / env


class _ISTFTHead(nn.Module):
    def __init__(self, dim: int, n_fft: int, hop: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = RealISTFT(n_fft, hop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, dim] -> [B, L * hop]
        x = self.out(x)
        bins = self.istft.bins
        mag = torch.exp(x[..., :bins]).clamp(max=MAG_CLIP)
        return self.istft(mag, x[..., bins:])


class _Vocos(nn.Module):
    def __init__(self, cfg: XYDecoderConfig) -> None:
        super().__init__()
        self.backbone = _VocosBackbone(cfg.n_mels, cfg.vocos_dim, cfg.vocos_intermediate, cfg.vocos_layers)
        self.head = _ISTFTHead(cfg.vocos_dim, cfg.n_fft, cfg.hop_length)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(mel))


class _VectorQuantize(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("codebook", torch.zeros(codebook_size, dim))


class _ResidualVQ(nn.Module):
    """Dequantizer: sum of the 8 codebook lookups, then the 1x1 `output_proj` conv."""

    def __init__(self, cfg: XYDecoderConfig) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            _VectorQuantize(cfg.codebook_size, cfg.code_dim) for _ in range(cfg.num_quantizers)
        )
        self.output_proj = nn.Conv1d(cfg.code_dim, cfg.rvq_output_dim, kernel_size=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # [B, nq, T] -> [B, T, out] channel-last
        z = F.embedding(codes[:, 0], self.quantizers[0].codebook)
        for k in range(1, len(self.quantizers)):
            z = z + F.embedding(codes[:, k], self.quantizers[k].codebook)
        return F.linear(z, self.output_proj.weight[:, :, 0], self.output_proj.bias)


def check_config(cfg: XYDecoderConfig) -> None:
    """Raise ConfigError when `cfg` does not describe an official XY decoder shape."""
    problems = []
    if cfg.adapter_output_dim != cfg.upsample_factor * cfg.decoder.d_model:
        problems.append(
            f"adapter_output_dim {cfg.adapter_output_dim} must be upsample_factor x decoder d_model "
            f"({cfg.upsample_factor} x {cfg.decoder.d_model}): the official UpConv reads that many channels"
        )
    for name, stack in (("adapter", cfg.adapter), ("decoder", cfg.decoder)):
        if stack.d_model % stack.heads:
            problems.append(f"{name} d_model {stack.d_model} is not divisible by {stack.heads} heads")
        if stack.d_model % 2 or stack.d_model < 4:
            problems.append(f"{name} d_model {stack.d_model} must be even and >= 4 for the sinusoid table")
    if cfg.n_fft % 2 or cfg.n_fft % cfg.hop_length or cfg.n_fft < cfg.hop_length:
        problems.append(f"n_fft {cfg.n_fft} must be even and a multiple of hop_length {cfg.hop_length}")
    if problems:
        raise ConfigError("XY decoder config is inconsistent: " + "; ".join(problems))


class XYDecoder(nn.Module):
    """codes [B, nq, T] int64 in [0, codebook_size) -> waveform [B, T * samples_per_frame] float32."""

    def __init__(self, cfg: XYDecoderConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.max_codes = min(cfg.adapter.max_positions, cfg.decoder.max_positions // cfg.upsample_factor)
        self.quantizer = _ResidualVQ(cfg)
        self.post_rvq_adapter = _PostRVQAdapter(cfg.rvq_output_dim, cfg.adapter, cfg.adapter_output_dim)
        self.upsample = _UpConv(cfg.adapter_output_dim, cfg.decoder.d_model, cfg.upsample_factor)
        self.acoustic_decoder = _AcousticDecoder(cfg.decoder, cfg.n_mels)
        self.enhanced_vocos = _Vocos(cfg)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        # A Python check on the traced length would bake a branch into the graph; the exported
        # graph leaves this cap to the host (see module docstring).
        if not torch.jit.is_tracing() and codes.shape[-1] > self.max_codes:
            raise ValueError(
                f"XY decoder takes at most {self.max_codes} code frames per call "
                f"(position tables); got {codes.shape[-1]}. Decode in windows."
            )
        z = self.quantizer(codes)
        h = self.post_rvq_adapter(z)
        h = self.upsample(h.transpose(1, 2)).transpose(1, 2)
        mel = self.acoustic_decoder(h)
        return self.enhanced_vocos(mel)
