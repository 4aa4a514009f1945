"""An independent PyTorch CheapNet, written for the tests from the architecture description.

Only the tests use it: it is the reference the Flax model is compared with. Its module and
parameter names follow the authors' state_dict keys (``encoder1.0.weight`` ...), so it loads
their checkpoints with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(conv: nn.Module, features: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(features), nn.LeakyReLU(0.2))


class TorchCheapNet(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        g = features
        self.encoder1 = _block(nn.Conv2d(1, g, 3, 1, 1), g)
        for name in ("encoder2", "encoder3", "encoder4", "bottleneck"):
            setattr(self, name, _block(nn.Conv2d(g, g, 3, 2, 1, groups=g), g))
        self.decoder1 = _block(nn.ConvTranspose2d(g, g, 3, 2, 1, output_padding=1, groups=g), g)
        for name in ("decoder2", "decoder3", "decoder4"):
            conv = nn.ConvTranspose2d(2 * g, g, 3, 2, 1, output_padding=1, groups=g)
            setattr(self, name, _block(conv, g))
        self.output = _block(nn.Conv2d(2 * g, 1, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW input -> pre-sigmoid logits NCHW (the output block's LeakyReLU)."""
        e1 = self.encoder1(x)
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        b = self.bottleneck(e4)
        d1 = self.decoder1(b)
        d2 = self.decoder2(torch.cat([e4, d1], 1))
        d3 = self.decoder3(torch.cat([e3, d2], 1))
        d4 = self.decoder4(torch.cat([e2, d3], 1))
        return self.output(torch.cat([e1, d4], 1))


def load_reference(path, dtype=torch.float32) -> TorchCheapNet:
    state = torch.load(path, map_location="cpu", weights_only=True)["CheapNet"]
    model = TorchCheapNet(state["encoder1.0.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def random_reference(features: int, seed: int = 0, dtype=torch.float32) -> TorchCheapNet:
    """A CheapNet with PyTorch's random initialisation and random BatchNorm running statistics
    and affine parameters (so that inference-mode BatchNorm is not the identity)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TorchCheapNet(features)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
    return model.to(dtype).eval()


def save_reference(model: TorchCheapNet, path) -> None:
    """Write ``model`` as the authors do: ``{"CheapNet": state_dict}``."""
    torch.save({"CheapNet": model.state_dict()}, path)


def probabilities_nhwc(model: TorchCheapNet, x_nhwc) -> numpy.ndarray:  # noqa: F821
    """Run on an NHWC numpy batch; returns sigmoid probabilities [B, H, W] as numpy."""
    with torch.no_grad():
        x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
        return torch.sigmoid(model(x))[:, 0].numpy()
