"""Backbones: torchvision ResNets with frozen BatchNorm (the original's) or GroupNorm (from scratch), and timm
``features_only`` models.

A backbone returns its feature maps finest first, each with the image padding mask resized to it. ``Joiner`` pairs
it with a position encoding; its state_dict keys are ``0.body.*`` (the network) and ``1.*`` (the encoding), the
original's ``backbone.0.body.*`` layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from .config import Config, ConfigError
from .position_encoding import build_position_encoding

# Output channels of layer2, layer3, layer4 (strides 8, 16, 32).
RESNET_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
}
RESNET_WEIGHTS = {  # the weights the original's ``pretrained=True`` loads
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}
# The input normalisation the ImageNet-trained backbones (and the original) expect: applied by the data pipeline
# (deformable.data.transforms) and stated in a transformers folder's preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_BACKBONE_LEVELS = 3  # multi-scale uses at most the last three stages (strides 8/16/32)
MAX_EXTRA_LEVELS = 3  # stride-2 convolutions on top of the last stage


def resize_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """``(B, H, W)`` bool padding mask -> ``(B, h, w)`` bool by nearest interpolation of the float mask."""
    if mask.shape[0] == 0:  # interpolate refuses an empty batch
        return mask.new_zeros((0, *tuple(size)))
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Backbone(nn.Module):
    """A feature extractor returning feature maps with their padding masks.

    Args:
        body: module mapping ``(B, 3, H, W)`` images to a dict (sorted by key) or list of feature maps, finest
            first; only the last ``len(strides)`` are kept.
        strides: stride of each kept map.
        num_channels: channels of each returned map.
    """

    def __init__(self, body: nn.Module, strides: list[int], num_channels: list[int]) -> None:
        super().__init__()
        self.body = body
        self.strides = list(strides)
        self.num_channels = list(num_channels)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, 3, H, W)`` images and ``(B, H, W)`` bool mask (True = padding) -> per level
        ``((B, C_l, H_l, W_l) features, (B, H_l, W_l) mask)``, finest first."""
        out = self.body(images)
        maps = [out[k] for k in sorted(out)] if isinstance(out, dict) else list(out)
        maps = maps[len(maps) - len(self.strides) :]  # a body may return earlier stages too
        return [(x, resize_mask(mask, x.shape[-2:])) for x in maps]


class Joiner(nn.Sequential):
    """``Joiner(backbone, position_encoding)``: feature maps, their masks and their position encodings."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Returns ``(features, masks, pos)``, lists over levels of ``(B, C_l, H_l, W_l)``, ``(B, H_l, W_l)`` bool
        and ``(B, hidden_dim, H_l, W_l)`` in the features' dtype."""
        levels = self[0](images, mask)
        features = [x for x, _ in levels]
        masks = [m for _, m in levels]
        pos = [self[1](x, m).to(x.dtype) for x, m in levels]
        return features, masks, pos


def _freeze(module: nn.Module, trainable_prefixes: tuple[str, ...] | None) -> None:
    """Freezes every parameter whose name starts with none of ``trainable_prefixes`` (None: freeze all)."""
    for name, parameter in module.named_parameters():
        if trainable_prefixes is None or not name.startswith(trainable_prefixes):
            parameter.requires_grad_(False)


def resnet_backbone(
    name: str,
    num_levels: int,
    dilation: bool = False,
    pretrained: bool = False,
    train_backbone: bool = True,
    norm: str = "frozen_bn",
) -> Backbone:
    """A torchvision ResNet returning its last ``num_levels`` stages.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        num_levels: how many of layer2..layer4 to return, the last ones (1: layer4 only).
        dilation: DC5, dilate layer4 instead of striding it (its stride becomes 16).
        pretrained: load the ImageNet weights the original used (``IMAGENET1K_V1``).
        train_backbone: False freezes every parameter.
        norm: ``frozen_bn``, the original's: FrozenBatchNorm2d, stem and layer1 frozen (the rule for pretrained
            weights); ``gn``: GroupNorm with 32 groups, every layer trained and each residual branch's last norm
            zero-initialised, the recipe for training from random weights (He et al., Rethinking ImageNet
            Pre-training, 2019; Goyal et al. 2017), where frozen statistics would leave the network unnormalised.
    """
    if dilation and name in ("resnet18", "resnet34"):
        raise ValueError(f"model.dilation (DC5) needs bottleneck blocks: use resnet50/resnet101, not {name}")
    if norm == "gn" and pretrained:
        raise ValueError(
            "model.backbone_norm=gn trains the backbone from random weights; the ImageNet weights are BatchNorm "
            "weights: use model.backbone_norm=frozen_bn with model.pretrained_backbone=true"
        )
    weights = getattr(torchvision.models, RESNET_WEIGHTS[name]).IMAGENET1K_V1 if pretrained else None
    group_norm = norm == "gn"
    with _downloading(name, pretrained):
        net = getattr(torchvision.models, name)(
            weights=weights,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=(lambda channels: nn.GroupNorm(32, channels)) if group_norm else FrozenBatchNorm2d,
            zero_init_residual=group_norm,
        )
    trainable = (("",) if group_norm else ("layer2", "layer3", "layer4")) if train_backbone else None
    _freeze(net, trainable)
    layers = ["layer2", "layer3", "layer4"][-num_levels:]
    strides = [8, 16, 16 if dilation else 32][-num_levels:]
    body = IntermediateLayerGetter(net, return_layers={layer: str(i) for i, layer in enumerate(layers)})
    return Backbone(body, strides, RESNET_CHANNELS[name][-num_levels:])


def timm_backbone(
    name: str, num_levels: int, dilation: bool = False, pretrained: bool = False, train_backbone: bool = True
) -> Backbone:
    """A timm model with ``features_only``: its last ``num_levels`` of its last three stages, BatchNorm frozen, the
    layers before those three stages frozen (the ResNet rule); ``dilation`` asks timm for ``output_stride=16``."""
    import timm  # slow to import; only needed here
    from timm.layers import freeze_batch_norm_2d

    kwargs = {"output_stride": 16, "features_only": True, "out_indices": (-3, -2, -1)}
    kwargs = kwargs if dilation else {k: v for k, v in kwargs.items() if k != "output_stride"}
    try:
        net = timm.create_model(name, pretrained=False, **kwargs)  # the name and stages checked before any download
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:  # unknown name, too few stages, ...
        raise ValueError(f"unknown or unsupported timm backbone 'timm/{name}': {exc}") from exc
    if pretrained:
        with _downloading(f"timm/{name}", pretrained):
            net = timm.create_model(name, pretrained=True, **kwargs)
    net = freeze_batch_norm_2d(net)
    _freeze_before(net, net.feature_info.module_name()[0], name, train_backbone)
    return Backbone(net, net.feature_info.reduction()[-num_levels:], net.feature_info.channels()[-num_levels:])


@contextlib.contextmanager
def _downloading(name: str, pretrained: bool) -> Iterator[None]:
    """Turns a failure to fetch the ImageNet weights of backbone ``name`` (no network, a proxy, a broken download)
    into a ConfigError that says how to go on without them."""
    try:
        yield
    except Exception as exc:  # urllib, huggingface_hub and httpx errors share no base class
        if not pretrained or isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"model.pretrained_backbone=true: the ImageNet weights of the backbone {name} could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'}). Without a "
            "network, start from a checkpoint (train.finetune=PATH, which holds the backbone) or set "
            "model.pretrained_backbone=false (a random backbone: far slower to train); once downloaded, the weights "
            "are cached (TORCH_HOME, HF_HOME)"
        ) from exc


def _freeze_before(net: nn.Module, first_stage: str, name: str, train_backbone: bool) -> None:
    """Freezes every parameter registered before the module ``first_stage`` (timm's dotted name of the first stage
    returned; the features wrapper keeps it as it is, ``blocks.1`` inside ``blocks``, or flattened to ``layer2``), and
    every parameter without ``train_backbone``."""
    prefixes = (f"{first_stage}.", f"{first_stage.replace('.', '_')}.")
    names = [parameter_name for parameter_name, _ in net.named_parameters()]
    start = next((i for i, parameter_name in enumerate(names) if parameter_name.startswith(prefixes)), None)
    if start is None:
        raise ValueError(f"timm backbone 'timm/{name}': its stage {first_stage} holds no parameter to train")
    for i, (_, parameter) in enumerate(net.named_parameters()):
        parameter.requires_grad_(train_backbone and i >= start)


def backbone_levels(num_feature_levels: int) -> int:
    """How many backbone maps ``num_feature_levels`` uses; the rest are extra stride-2 levels."""
    max_levels = MAX_BACKBONE_LEVELS + MAX_EXTRA_LEVELS
    if not 1 <= num_feature_levels <= max_levels:
        raise ValueError(
            f"model.num_feature_levels must be between 1 and {max_levels} (at most {MAX_BACKBONE_LEVELS} backbone "
            f"maps plus {MAX_EXTRA_LEVELS} extra stride-2 levels), got {num_feature_levels}"
        )
    return 1 if num_feature_levels == 1 else min(num_feature_levels, MAX_BACKBONE_LEVELS)


def build_backbone(cfg: Config) -> Joiner:
    """Reads ``cfg.model``: backbone, dilation, num_feature_levels, pretrained_backbone, train_backbone,
    backbone_norm and position_embedding."""
    m = cfg.model
    num_levels = backbone_levels(m.num_feature_levels)
    args = dict(dilation=m.dilation, pretrained=m.pretrained_backbone, train_backbone=m.train_backbone)
    if m.backbone in RESNET_CHANNELS:
        backbone = resnet_backbone(m.backbone, num_levels, norm=m.backbone_norm, **args)
    elif m.backbone.startswith("timm/") and len(m.backbone) > len("timm/"):
        if m.backbone_norm != "frozen_bn":
            raise ValueError(
                f"model.backbone_norm={m.backbone_norm} is built for the torchvision ResNets only; timm backbones "
                f"({m.backbone}) keep their frozen BatchNorm: use model.backbone_norm=frozen_bn"
            )
        backbone = timm_backbone(m.backbone[len("timm/") :], num_levels, **args)
    else:
        raise ValueError(
            f"unknown backbone {m.backbone!r}: expected one of {', '.join(RESNET_CHANNELS)} or timm/<model name>"
        )
    return Joiner(backbone, build_position_encoding(cfg))
