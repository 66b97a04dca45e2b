"""Encoders that misbehave on purpose, at a chosen training step: the public seam (`fastbyol.train(cfg,
encoder=...)`) through which the tests plant a failure inside a run, instead of patching the trainer's names.

The step is counted by the encoder itself: the online copy's weights change in place once per optimizer step
(their tensor version moves), so a new version in a training forward means a new step, however many forwards a
step makes (one pass or two, micro-batches). The target's copy (frozen weights) and meta-device forwards (shape
probes, the FLOP count) count nothing and never misbehave.
"""

from __future__ import annotations

import torch
import torch.nn as nn

FAULTS = ("none", "raise", "nan-output", "nan-weight", "inf-bn", "item", "eval-error")


class FaultyEncoder(nn.Module):
    """(B, 3, H, W) -> (B, 16): a strided convolution, BN, ReLU, global average; `fault` from step `at_step` on
    (1-based):

    raise: RuntimeError("no kernel for this device") (not a FastByolError); nan-output: NaN features; nan-weight: one
    weight set to NaN before the forward; inf-bn: one BN running variance set to inf; item: a host sync
    (`.item()`) in every training forward; eval-error: an IndexError in every eval-mode forward (the kNN
    evaluations), training untouched."""

    num_features = 16

    def __init__(self, fault: str = "none", at_step: int = 1):
        super().__init__()
        assert fault in FAULTS, fault
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fault, self.at_step = fault, at_step
        self.step, self._seen_version = 0, None

    def _count_step(self) -> bool:
        """Count the step this training forward belongs to; True for the step's first forward."""
        version = self.conv.weight._version
        if version == self._seen_version:
            return False
        self._seen_version = version
        self.step += 1
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = x.device.type != "meta"
        online = self.conv.weight.requires_grad
        fault = self.fault if real else "none"
        if not self.training and fault == "eval-error":
            raise IndexError("index 10 is out of bounds for axis 0 with size 10")
        first = self._count_step() if self.training and online and fault != "none" else False
        acting = self.training and online and fault != "none" and self.step >= self.at_step
        if acting and fault == "raise":
            raise RuntimeError("no kernel for this device")
        if acting and first and fault == "nan-weight":  # before the step's first forward uses the weight
            with torch.no_grad():
                self.conv.weight[(0,) * self.conv.weight.ndim] = float("nan")  # channels_last: index, no view
            self._seen_version = self.conv.weight._version  # the same step still
        if acting and first and fault == "inf-bn":
            with torch.no_grad():
                self.bn.running_var[0] = float("inf")
        if acting and fault == "item":
            x.sum().item()  # the sync a step must not have
        out = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return out * float("nan") if acting and fault == "nan-output" else out
