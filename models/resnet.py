"""ResNet-18-style CNN in plain torch (no torchvision): conv/BN/ReLU, residual basic blocks.

Layout of ResNet-18: 7x7 stem + max pool, four stages of two basic blocks (the first block of
stages 2-4 strides by 2 and projects its shortcut with a 1x1 conv + BN), global average
pool, a linear head. BatchNorm gets random running stats so a wrong BN fold shows.
Full: widths 64-512, 1000 classes. ``tiny``: widths 8-64, 10 classes.
"""

from __future__ import annotations

from models import cnn_common, common
from models.entry import ZooEntry


def build(tiny: bool):
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self, base: int, classes: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, base, 7, 2, 3, bias=False),
                nn.BatchNorm2d(base),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            blocks, cin = [], base
            for stage in range(4):
                cout = base * 2**stage
                blocks += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, pixel_values):
            x = self.pool(self.blocks(self.stem(pixel_values)))
            return self.fc(torch.flatten(x, 1))

    common.seeded()
    model = ResNet18(8, 10) if tiny else ResNet18(64, 1000)
    common.randomize_batchnorm(model)
    return model.eval()


ENTRY = ZooEntry(
    name="resnet",
    family="cnn",
    description="ResNet-18-style CNN in plain torch, random weights",
    build=build,
    example_inputs=cnn_common.example_inputs,
    input_names=("pixel_values",),
    output_names=("logits",),
    dynamic_axes=cnn_common.DYNAMIC_AXES,
    exporters=("torch-legacy", "torch-dynamo"),
)
