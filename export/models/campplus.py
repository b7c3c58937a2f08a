"""CAM++ speaker encoder (3D-Speaker `CAMPPlus`), inference only, written to trace to ONNX.

Input is a batch of mean-normalised Kaldi fbank features [B, T, 80]; output one 192-d speaker
embedding per row. The submodule names reproduce the released `campplus_cn_common.bin` keys, so the
checkpoint loads 1:1 (BatchNorm running statistics included).

Structure (model-spec §2):
- `head` (FCM): 2-D conv + two stages of 2-D residual blocks that stride the frequency axis only,
  then a frequency-strided conv; frequency is folded into channels (80 bins -> 10 rows).
- `xvector`: TDNN (kernel 5, stride 2 in time), three CAM dense TDNN blocks each followed by a
  transit layer that halves the channels, BN-ReLU, mean/std statistics pooling, and a dense layer
  whose BatchNorm has no affine parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from qinyu_edge.config import CamPPConfig

# Fixed in the released architecture rather than configurable upstream.
SEGMENT_FRAMES = 100  # CAM segment pooling window, in TDNN output frames (after the stride-2 TDNN)
CAM_REDUCTION = 2
TDNN_KERNEL = 5
TDNN_STRIDE = 2


def _bn_relu(channels: int) -> nn.Sequential:
    # Named children give the upstream keys `<...>.batchnorm.*`; the ReLU has no state.
    return nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())]))


class _ResBlock2d(nn.Module):
    """Basic residual block whose stride applies to the frequency axis only."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _FCM(nn.Module):
    """Front-end convolution module: [B, F, T] -> [B, C * F/8, T]."""

    def __init__(self, cfg: CamPPConfig) -> None:
        super().__init__()
        m = cfg.fcm_channels
        self.conv1 = nn.Conv2d(1, m, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.layer1 = nn.Sequential(*[_ResBlock2d(m, m, 2 if i == 0 else 1) for i in range(cfg.fcm_blocks[0])])
        self.layer2 = nn.Sequential(*[_ResBlock2d(m, m, 2 if i == 0 else 1) for i in range(cfg.fcm_blocks[1])])
        self.conv2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m)
        self.out_channels = m * (cfg.feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        return out.flatten(1, 2)


class _TDNN(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(
            in_channels, out_channels, TDNN_KERNEL, stride=TDNN_STRIDE, padding=TDNN_KERNEL // 2, bias=False
        )
        self.nonlinear = _bn_relu(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


def segment_mean(x: torch.Tensor, seg: int = SEGMENT_FRAMES) -> torch.Tensor:
    """Mean of each `seg`-frame segment, broadcast back to every frame of that segment.

    Upstream uses `avg_pool1d(ceil_mode=True)`, whose last, partial window averages only the frames
    it covers. ONNX AveragePool's ceil-mode edge handling differs between runtimes, so the same
    numbers are computed explicitly: zero-pad to whole segments, sum, divide by the true counts.
    """
    length = x.shape[-1]
    n_seg = (length + seg - 1) // seg
    padded = F.pad(x, (0, n_seg * seg - length))
    sums = padded.reshape(x.shape[0], x.shape[1], n_seg, seg).sum(-1)
    counts = torch.clamp(length - torch.arange(n_seg, device=x.device) * seg, max=seg).to(x.dtype)
    means = sums / counts
    return means.repeat_interleave(seg, dim=-1)[..., :length]


class _CAMLayer(nn.Module):
    """Local TDNN conv gated by a context mask from global + segment means."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // CAM_REDUCTION, 1)
        self.linear2 = nn.Conv1d(bn_channels // CAM_REDUCTION, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        context = x.mean(-1, keepdim=True) + segment_mean(x)
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return y * mask


class _CAMDenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bn_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = _CAMLayer(bn_channels, growth, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _CAMDenseBlock(nn.Module):
    """Densely connected: each layer's output is appended to the running channel stack."""

    def __init__(self, n_layers: int, in_channels: int, growth: int, bn_channels: int, kernel: int, dilation: int):
        super().__init__()
        for i in range(n_layers):
            self.add_module(
                f"tdnnd{i + 1}", _CAMDenseLayer(in_channels + i * growth, growth, bn_channels, kernel, dilation)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _Transit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _StatsPool(nn.Module):
    """Concatenated mean and unbiased standard deviation over time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1)
        # Written out rather than `std` so the graph is plain Reduce ops; divisor T-1 as upstream.
        var = (x - mean.unsqueeze(-1)).pow(2).sum(-1) / (x.shape[-1] - 1)
        # dim=1, not -1: the exporter mis-resolves a negative Concat axis here to 2.
        return torch.cat([mean, var.sqrt()], dim=1)


class _Dense(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # A 1x1 Conv1d, not a Linear, because the checkpoint stores a [out, in, 1] weight.
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict([("batchnorm", nn.BatchNorm1d(out_channels, affine=False))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """fbank [B, T, feat_dim] (per-utterance mean removed) -> speaker embedding [B, embedding_size]."""

    def __init__(self, cfg: CamPPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = _FCM(cfg)
        channels = cfg.init_channels
        xvector: OrderedDict[str, nn.Module] = OrderedDict(tdnn=_TDNN(self.head.out_channels, channels))
        stages = zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations)
        for i, (n_layers, kernel, dilation) in enumerate(stages, start=1):
            xvector[f"block{i}"] = _CAMDenseBlock(
                n_layers, channels, cfg.growth_rate, cfg.bn_size * cfg.growth_rate, kernel, dilation
            )
            channels += n_layers * cfg.growth_rate
            xvector[f"transit{i}"] = _Transit(channels, channels // 2)
            channels //= 2
        xvector["out_nonlinear"] = _bn_relu(channels)
        xvector["stats"] = _StatsPool()
        xvector["dense"] = _Dense(channels * 2, cfg.embedding_size)
        self.xvector = nn.Sequential(xvector)
        # Inference only: BatchNorm must use the checkpoint's running statistics.
        self.eval()

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.xvector(self.head(fbank.transpose(1, 2)))
