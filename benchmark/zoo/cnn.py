"""A small plain CNN classifier (no batch norm, no dropout: eval == train forward)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-fc(128)-fc(num_classes), ReLU.

    Takes images in [0, 1] of shape (B, in_channels, image_size, image_size) and returns
    logits (B, num_classes); it maps its input to [-1, 1] itself. ``image_size`` must be
    divisible by 4. The defaults fit the 16x16 digits; ``in_channels=3, image_size=32`` fits
    CIFAR-10.
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 16, num_classes: int = 10,
                 width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * (image_size // 4) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x * 2.0 - 1.0))
