"""What the training step calls: BYOL's one-pass forward with each network compiled on its own and, over several
processes, DDP around the online network alone.

    net = compile_networks(model, "default", online=wrap_online(model, device, settings))  # or online=None: 1 process
    p1, p2, z1, z2, h1 = net(v1, v2)                     # BYOL.forward's outputs

Compiling per network instead of `torch.compile(model)`: the online network's training graph (forward and, through
AOTAutograd, backward) and the target network's no-grad graph, each one pass over both views; the online probe's
features are one of the online network's outputs, so the graph the benchmarks time is the graph the trainer trains.
One graph of the whole BYOL module inlined every pass of both networks (four ResNet-50 passes before the one-pass
forward), and compile time grows with the graph. A network that repeats blocks (ResNets, ViTs) goes further: each
distinct block is compiled once (ResNet-50: 8 block shapes, each once for the online network and once for the
target) and every block of that shape runs the same code, while the stem and the heads run eagerly; the block graphs
are used in training mode only (evaluations run the blocks eagerly). benchmarks/compile_time.py measures it.

DDP wraps only the online network (`OnlineNetwork`: BYOL's own online modules, shared, not copied); the target has no
gradients and no DDP. A network compiled whole compiles DDP with it (Dynamo's DDP optimizer splits the graph at the
gradient buckets, so their all-reduces overlap the rest of the backward); a network compiled block by block keeps DDP
eager around compiled blocks (its hooks fire as each block's backward ends, as in eager training). Under
`torch.compile` the collectives of the cross-replica BN (fastbyol.system.batchnorm) are traced into the graphs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .byol import BYOL, check_features


class OnlineNetwork(nn.Module):
    """encoder -> projector -> predictor of a BYOL model (the same module objects): (N, 3, H, W) -> (predictions,
    encoder features), as `BYOL.online_pass` (an encoder output that is not (N, D) features is one line). What DDP
    wraps and torch.compile compiles."""

    def __init__(self, model: BYOL):
        super().__init__()
        self.encoder, self.projector, self.predictor = model.online_encoder, model.online_projector, model.predictor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        check_features(h, x)
        return self.predictor(self.projector(h)), h


class TargetNetwork(nn.Module):
    """encoder -> projector of a BYOL model's target (the same module objects), as `BYOL.target_pass`."""

    def __init__(self, model: BYOL):
        super().__init__()
        self.encoder, self.projector = model.target_encoder, model.target_projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


class StepNetworks:
    """Called as the BYOL model is: (v1, v2) -> (p1, p2, z1, z2, h1), through `BYOL.views_forward` with the online
    and target networks given here (plain, DDP-wrapped and/or compiled); keeps the last call's h1 as `features` (the
    trainer hands it to the online probe). `mode` is the torch.compile mode or 'off'."""

    def __init__(self, model: BYOL, online, target, mode: str = "off"):
        self.model, self.online, self.target, self.mode = model, online, target, mode
        self.features: torch.Tensor | None = None  # h1 of the last call: the online probe's input

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor):
        out = self.model.views_forward(v1, v2, self.online, self.target)
        self.features = out[4]
        return out

    def ddp(self):
        """The DDP module around the online network, or None (one process)."""
        from torch.nn.parallel import DistributedDataParallel

        inner = getattr(self.online, "_orig_mod", self.online)  # torch.compile keeps the module it compiled here
        return inner if isinstance(inner, DistributedDataParallel) else None

    def no_sync(self):
        """DDP's no_sync (gradients kept local: all micro-batches of an accumulated step but the last); nothing to
        hold back with one process."""
        ddp = self.ddp()
        return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


def repeated_blocks(network: nn.Module) -> list[nn.Module]:
    """The blocks a network repeats: children of an nn.Sequential / nn.ModuleList whose class (not one of torch.nn's)
    occurs more than once there (ResNet's blocks in each stage, a ViT's transformer blocks)."""
    found = []
    for container in network.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            kids = list(container.children())
            for kid in kids:
                if not type(kid).__module__.startswith("torch.nn") and sum(type(k) is type(kid) for k in kids) > 1:
                    found.append(kid)
    return found


def compile_networks(model: BYOL, mode: str = "off", backend: str = "inductor",
                     online: nn.Module | None = None) -> StepNetworks:
    """The step's networks: the online network (`online`: DDP around `OnlineNetwork(model)` under torchrun, else a
    plain `OnlineNetwork`) and the target, each compiled on its own (`mode`: a torch.compile mode, or 'off' to undo
    an earlier compile); backend: torch.compile's ('inductor'; 'aot_eager' and 'eager' in tests and the GPU plan's
    CPU dry run).

    A network that repeats blocks (`repeated_blocks`) is compiled block by block: Dynamo compiles a block's forward
    once per distinct shape and grad mode, and every block of that shape runs the same code (ResNet-50's 16 blocks:
    8 shapes, each once for the online network's training graph and once for the target's no-grad graph), while
    its stem and heads run eagerly; a network without repeated blocks is compiled whole."""
    online = online if online is not None else OnlineNetwork(model)
    target = TargetNetwork(model)
    blocks = repeated_blocks(model.online_encoder) + repeated_blocks(model.target_encoder)
    for block in blocks:  # 'off', or a fallback after a failed compile: the blocks' own forward again
        block.__dict__.pop("forward", None)
    if mode == "off":
        return StepNetworks(model, online, target, mode)
    options = dict(mode=None if mode == "default" else mode, backend=backend)
    if not blocks:
        return StepNetworks(model, torch.compile(online, **options), torch.compile(target, **options), mode)
    import torch._dynamo.config as dynamo_config

    # one compiled entry a block shape and grad mode, all on the block class's forward: keep room for them all
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 2 * len(blocks)))
    # static shapes: each block shape its own graph (no dynamic-shape graph after the second shape); the compiled
    # forward is an instance attribute, so the state_dict and the module tree stay as they are
    for block in blocks:
        block.forward = _in_training(block, torch.compile(block.forward, dynamic=False, **options))
    return StepNetworks(model, online, target, mode)


def _in_training(block: nn.Module, compiled):
    """The block's forward: `compiled` in training mode (the step's networks), its own eager forward in evaluation
    mode (the kNN checks and the online probe's accuracy read the online encoder in eval mode, at other batch sizes:
    compiling those too would add graphs after the first step for no training speed)."""
    plain = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        return (compiled if block.training else plain)(*args, **kwargs)

    return forward
