"""The two non-timm baselines: a small CNN trained from scratch and torchvision's GoogLeNet.

Both offer timm's feature / head API (``forward_features``, ``forward_head``,
``get_classifier``) so the engine, SMOTE and Grad-CAM treat them like timm models.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from timm.models import adapt_input_conv
from torchvision.models import GoogLeNet_Weights, googlenet

from kidneyscan.models.weights import PretrainedUnavailableWarning

__all__ = ["GoogLeNetClassifier", "SmallCNN"]


# --------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """A plain 4-stage CNN (conv-GroupNorm-ReLU x2 + max-pool per stage), trained from scratch.

    GroupNorm instead of BatchNorm keeps it usable with DP-SGD (Opacus) and tiny batches.

    Parameters
    ----------
    num_classes
        Output logits.
    in_chans
        Input channels.
    width
        Channels of the first stage; doubled at each of the 4 stages.
    dropout
        Dropout before the linear head.
    """

    def __init__(
        self, num_classes: int, *, in_chans: int = 3, width: int = 32, dropout: float = 0.2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(4):
            c_out = width * 2**i
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        self.head_drop = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``(B, 8*width, S/16, S/16)``."""
        out: torch.Tensor = self.features(x)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then (unless ``pre_logits``) dropout + linear head."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        out: torch.Tensor = self.fc(self.head_drop(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc


# --------------------------------------------------------------------------- torchvision
class GoogLeNetClassifier(nn.Module):
    """torchvision GoogLeNet (Inception v1, no auxiliary heads) with timm's feature/head API.

    The torchvision model lives in ``.net`` so torchvision state dicts load into it unchanged.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_chans: int = 3,
        pretrained: bool = False,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        net = None
        if pretrained:
            try:
                net = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1)
            except Exception as exc:  # offline
                warnings.warn(
                    f"could not load pretrained weights for 'googlenet' ({type(exc).__name__}: "
                    f"{str(exc)[:200]}); using random initialisation",
                    PretrainedUnavailableWarning,
                    stacklevel=2,
                )
        if net is None:
            net = googlenet(weights=None, aux_logits=False, init_weights=True, dropout=dropout)
        # ImageNet weights expect the (x - mean)/std input the Preprocessor already gives.
        net.transform_input = False
        net.aux1 = net.aux2 = None
        net.aux_logits = False
        if in_chans != 3:
            old = net.conv1.conv
            new = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            new.weight.data = adapt_input_conv(in_chans, old.weight.data)
            net.conv1.conv = new
        net.dropout = nn.Dropout(dropout)
        net.fc = nn.Linear(1024, num_classes)
        self.net = net
        self.num_features = 1024

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of ``inception5b``: ``(B, 1024, h, w)``."""
        n = self.net
        for layer in (
            n.conv1,
            n.maxpool1,
            n.conv2,
            n.conv3,
            n.maxpool2,
            n.inception3a,
            n.inception3b,
            n.maxpool3,
            n.inception4a,
            n.inception4b,
            n.inception4c,
            n.inception4d,
            n.inception4e,
            n.maxpool4,
            n.inception5a,
            n.inception5b,
        ):
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling, then (unless ``pre_logits``) dropout + fc."""
        x = torch.flatten(self.net.avgpool(x), 1)
        if pre_logits:
            return x
        out: torch.Tensor = self.net.fc(self.net.dropout(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.net.fc
