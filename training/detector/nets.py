"""MTCNN P-, R- and O-Net (Zhang et al. 2016), layer for layer as in facenet-pytorch 2.6.0,
so that its state dicts (facenet_pytorch/data/{pnet,rnet,onet}.pt) load unchanged.

Each network here takes float32 pixels in [0, 255], RGB, (N, 3, H, W), normalises inside
(MTCNN's (x - 127.5) / 128), and returns ONE tensor, so the exported graph runs through
protocol.runtime.OnnxModel (one input, one output):
  P-Net (N, 5, H', W'): box regression (4) and face probability, per 12x12 window, stride 2
  R-Net (N, 5):         box regression (4) and face probability of a 24x24 crop
  O-Net (N, 15):        box regression (4), landmarks x1..x5, y1..y5 (relative to the
                        box), face probability of a 48x48 crop
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

WHEEL_PACKAGE = "facenet-pytorch"
WHEEL_VERSION = "2.6.0"
WEIGHT_FILES = {"pnet": "facenet_pytorch/data/pnet.pt", "rnet": "facenet_pytorch/data/rnet.pt",
                "onet": "facenet_pytorch/data/onet.pt"}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(_normalise(x))))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        prob = self.softmax4_1(self.conv4_1(x))[:, 1:2]
        return torch.cat([self.conv4_2(x), prob], dim=1)


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(_normalise(x))))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were converted from Caffe, whose flatten runs over (W, H, C)
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu4(self.dense4(x))
        prob = self.softmax5_1(self.dense5_1(x))[:, 1:2]
        return torch.cat([self.dense5_2(x), prob], dim=1)


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(_normalise(x))))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu5(self.dense5(x))
        prob = self.softmax6_1(self.dense6_1(x))[:, 1:2]
        return torch.cat([self.dense6_2(x), self.dense6_3(x), prob], dim=1)


NETS: dict[str, type[nn.Module]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def load_nets(wheel: str | Path) -> dict[str, nn.Module]:
    """The three networks with the trained weights read from the facenet-pytorch wheel
    (`pip download facenet-pytorch==2.6.0 --no-deps`): the package is never installed or
    imported, and the state dicts are read with weights_only=True (tensors only, no code)."""
    from protocol.errors import InvalidInputError

    nets: dict[str, nn.Module] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            for key, member in WEIGHT_FILES.items():
                state = torch.load(io.BytesIO(zf.read(member)), map_location="cpu", weights_only=True)
                net = NETS[key]()
                net.load_state_dict(state)
                nets[key] = net.eval()
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError) as exc:
        raise InvalidInputError(f"{wheel}: cannot read MTCNN weights from the wheel ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return nets
