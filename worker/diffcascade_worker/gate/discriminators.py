"""Discriminator networks for the gate, in plain torch (torchvision is not a dependency).

Both have a two-class head: index 0 = generated/fake, index 1 = real/good (the order
torchvision's ImageFolder gives the folders `fake` and `real`), so the gate's confidence is
softmax[:, 1].

`EfficientNetV2S` reproduces torchvision's `efficientnet_v2_s` module for module, with the same
parameter and buffer names (`features.0.0.weight`, `features.1.0.block.0.0.weight`, ...,
`classifier.1.weight`), so a state_dict trained with torchvision (DiffServe's discriminator:
classifier = Dropout(0.2) + Linear(1280, 2)) loads here with `strict=True`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

Architecture = Literal["tiny-cnn", "efficientnet_v2_s"]
ARCHITECTURES: tuple[Architecture, ...] = ("tiny-cnn", "efficientnet_v2_s")

REAL_CLASS = 1  # index of the real/good class in every two-class head


@dataclass(frozen=True)
class Normalization:
    """Per-channel (or single-channel, broadcast) mean/std applied to [0, 1] pixels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


#: Input size and normalisation each architecture is trained with by default.
DEFAULT_IMAGE_SIZE: dict[Architecture, int] = {"tiny-cnn": 64, "efficientnet_v2_s": 224}
DEFAULT_NORMALIZATION: dict[Architecture, Normalization] = {
    "tiny-cnn": Normalization(mean=(0.5,), std=(0.5,)),
    # DiffServe's discriminator: single-channel mean/std (src/worker/model.py).
    "efficientnet_v2_s": Normalization(mean=(0.507,), std=(0.255,)),
}


class TinyCNN(nn.Module):
    """Three strided convolutions and a linear head: ~24 k parameters, milliseconds on CPU."""

    def __init__(self, *, width: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(x))


# --- EfficientNet-V2-S, structured exactly like torchvision.models.efficientnet ----------------


def _make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class Conv2dNormActivation(nn.Sequential):
    """conv (no bias when normalised) -> norm -> activation, as `torchvision.ops.misc`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Callable[[int], nn.Module] | None = None,
        activation_layer: Callable[..., nn.Module] | None = nn.SiLU,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                groups=groups,
                bias=norm_layer is None,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention, as `torchvision.ops.misc.SqueezeExcitation` (fc1/fc2 are 1x1 convs)."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return cast(torch.Tensor, scale * x)


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample while training ("row" mode)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise


@dataclass
class _BlockConfig:
    fused: bool
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def _v2_s_setting() -> list[_BlockConfig]:
    """Table 4 of the EfficientNetV2 paper, as torchvision's `_efficientnet_conf`."""
    return [
        _BlockConfig(True, 1, 3, 1, 24, 24, 2),
        _BlockConfig(True, 4, 3, 2, 24, 48, 4),
        _BlockConfig(True, 4, 3, 2, 48, 64, 4),
        _BlockConfig(False, 4, 3, 2, 64, 128, 6),
        _BlockConfig(False, 6, 3, 1, 128, 160, 9),
        _BlockConfig(False, 6, 3, 2, 160, 256, 15),
    ]


class MBConv(nn.Module):
    def __init__(
        self,
        cnf: _BlockConfig,
        stochastic_depth_prob: float,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = _make_divisible(cnf.input_channels * cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels, expanded, kernel_size=1, norm_layer=norm_layer
                )
            )
        layers.append(
            Conv2dNormActivation(
                expanded,
                expanded,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=expanded,
                norm_layer=norm_layer,
            )
        )
        layers.append(SqueezeExcitation(expanded, max(1, cnf.input_channels // 4)))
        layers.append(
            Conv2dNormActivation(
                expanded,
                cnf.out_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=None,
            )
        )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = cast(torch.Tensor, self.block(x))
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class FusedMBConv(nn.Module):
    def __init__(
        self,
        cnf: _BlockConfig,
        stochastic_depth_prob: float,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = _make_divisible(cnf.input_channels * cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    expanded,
                    kernel_size=cnf.kernel,
                    stride=cnf.stride,
                    norm_layer=norm_layer,
                )
            )
            layers.append(
                Conv2dNormActivation(
                    expanded,
                    cnf.out_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=None,
                )
            )
        else:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    cnf.out_channels,
                    kernel_size=cnf.kernel,
                    stride=cnf.stride,
                    norm_layer=norm_layer,
                )
            )
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = cast(torch.Tensor, self.block(x))
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNetV2S(nn.Module):
    """torchvision's `efficientnet_v2_s(num_classes=...)`, same names, same init."""

    def __init__(
        self,
        *,
        num_classes: int = 2,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        last_channel: int = 1280,
    ) -> None:
        super().__init__()
        setting = _v2_s_setting()
        norm_layer = partial(nn.BatchNorm2d, eps=1e-3)
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                3, setting[0].input_channels, kernel_size=3, stride=2, norm_layer=norm_layer
            )
        ]
        total_blocks = sum(cnf.num_layers for cnf in setting)
        block_id = 0
        for cnf in setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1
                sd_prob = stochastic_depth_prob * float(block_id) / total_blocks
                block_cls = FusedMBConv if cnf.fused else MBConv
                stage.append(block_cls(block_cnf, sd_prob, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        layers.append(
            Conv2dNormActivation(
                setting[-1].out_channels, last_channel, kernel_size=1, norm_layer=norm_layer
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                init_range = 1.0 / module.out_features**0.5
                nn.init.uniform_(module.weight, -init_range, init_range)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return cast(torch.Tensor, self.classifier(x))


def build_discriminator(architecture: str, *, num_classes: int = 2) -> nn.Module:
    """A fresh (randomly initialised) network of the named architecture."""
    if architecture == "tiny-cnn":
        return TinyCNN(num_classes=num_classes)
    if architecture == "efficientnet_v2_s":
        return EfficientNetV2S(num_classes=num_classes)
    raise ValueError(
        f"unknown discriminator architecture {architecture!r}; use one of {ARCHITECTURES}"
    )


def prepare_input(
    images: torch.Tensor, *, image_size: int, normalization: Normalization
) -> torch.Tensor:
    """[0, 1] images of any size -> the network's input (resized square, normalised)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    return normalization.apply(x)
