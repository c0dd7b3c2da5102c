"""The ``torch`` backend of the ``free`` op family (the original FreeAT's sign step): pure
PyTorch, any device.

The executable statement of the op math that csrc/cpu/free.cpp, csrc/cuda/free.cu and
fused_adv/_triton/free.py implement (docs/methods.md §8 (FreeAT and YOPO)):

* freeat_update_: noise <- clamp(noise + step * sign(grad), -clip, clip), element math in float32
  (float64 tensors: float64), one rounding to the noise's dtype; sign is torch.sign (NaN -> 0);
  the clamp keeps NaN.  No host sync.
"""
from __future__ import annotations

from torch import Tensor

from fused_adv._torch.weight import _opmath


def freeat_update_(noise: Tensor, grad: Tensor, step: float, clip: float) -> None:
    new = (_opmath(noise) + step * _opmath(grad).sign()).clamp_(-clip, clip)
    noise.copy_(new)
