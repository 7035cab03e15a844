"""MobileNetV2-style CNN in plain torch: inverted residuals with depthwise separable convs.

Each block: 1x1 expand (BN, ReLU6) -> 3x3 depthwise (BN, ReLU6) -> 1x1 linear project (BN),
with a residual add when stride is 1 and the widths match. The last 1x1 conv uses Hardswish
(as MobileNetV3 does) so both activations the fusers know appear. Full: MobileNetV2's
width and block table, 1000 classes; ``tiny``: width x0.25, one block per stage, 10 classes.
"""

from __future__ import annotations

from models import cnn_common, common
from models.entry import ZooEntry

# expansion t, output channels c, repeats n, first stride s (MobileNetV2, table 2)
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
BLOCKS += ((6, 160, 3, 2), (6, 320, 1, 1))


def build(tiny: bool):
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act) -> nn.Module:
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, 1, 1, nn.ReLU6)]
            layers += [
                conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6),  # depthwise
                conv_bn(hidden, cout, 1, 1, 1, None),  # linear bottleneck
            ]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            out = self.body(x)
            return x + out if self.residual else out

    class MobileNetV2(nn.Module):
        def __init__(self, width: float, classes: int, repeats: int | None) -> None:
            super().__init__()

            def ch(c: int) -> int:
                return max(8, int(c * width + 4) // 8 * 8)

            cin = ch(32)
            layers: list[nn.Module] = [conv_bn(3, cin, 3, 2, 1, nn.ReLU6)]
            for t, c, n, s in BLOCKS:
                for i in range(n if repeats is None else min(n, repeats)):
                    layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                    cin = ch(c)
            last = ch(1280) if width > 1 else 1280 if repeats is None else 64
            layers.append(conv_bn(cin, last, 1, 1, 1, nn.Hardswish))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

        def forward(self, pixel_values):
            x = self.pool(self.features(pixel_values))
            return self.classifier(torch.flatten(x, 1))

    common.seeded()
    model = MobileNetV2(0.25, 10, 1) if tiny else MobileNetV2(1.0, 1000, None)
    common.randomize_batchnorm(model)
    return model.eval()


ENTRY = ZooEntry(
    name="mobilenet",
    family="cnn",
    description="MobileNetV2-style CNN (inverted residuals, ReLU6/Hardswish), random weights",
    build=build,
    example_inputs=cnn_common.example_inputs,
    input_names=("pixel_values",),
    output_names=("logits",),
    dynamic_axes=cnn_common.DYNAMIC_AXES,
    exporters=("torch-legacy", "torch-dynamo"),
)
