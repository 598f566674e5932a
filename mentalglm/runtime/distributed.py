"""Multi-process helpers around Lightning's strategies: batch sharding, gathering, FSDP2 wrapping and the
parameter gathering that makes generation fast (and hang-free) on sharded models.

Lightning runs the processes and the collectives; this module only decides which rank sees which batch and
how a sharded LoRA model is wrapped, generates and exports. See README.md, "Multi-GPU and multi-node".
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batch sharding
def shard_eval_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of the evaluation batches: every item on exactly one rank, once.

    Whole batches are dealt round-robin (batch composition, hence every generated token, is the same as in
    a single process). Ranks left short get empty batches, so every rank runs the same number of steps:
    a rank with no step at all would skip the epoch hooks whose metric sync the other ranks wait on, and
    a sharded model all-gathers its parameters once per step on every rank."""
    _check_rank(rank, world)
    mine = batches[rank::world]
    steps = max(1, -(-len(batches) // world))
    return mine + [[] for _ in range(steps - len(mine))]


def shard_train_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of the training batches, padded by wrapping around (as torch's DistributedSampler
    pads): every rank must run the same number of optimizer steps or the gradient all-reduce hangs."""
    _check_rank(rank, world)
    if not batches:
        return []
    steps = -(-len(batches) // world)
    padded = batches + [batches[i % len(batches)] for i in range(steps * world - len(batches))]
    return padded[rank::world]


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} process(es)")


# ----------------------------------------------------------------------------- process group
def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def is_global_zero() -> bool:
    return global_rank() == 0


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows, concatenated in rank order, on every rank (plain Python objects)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


# ----------------------------------------------------------------------------- strategy checks
def missing_strategy_package(trainer_cfg: Mapping[str, Any]) -> str | None:
    """A one-line remedy when the configured strategy needs a package that is not installed."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    if "deepspeed" in target.lower() and importlib.util.find_spec("deepspeed") is None:
        return (
            "this trainer config uses DeepSpeed, which is not installed: `pip install deepspeed` "
            "(or `pip install -e '.[deepspeed]'`) on every node, or use trainer=fsdp or trainer=ddp"
        )
    return None


def resume_strategy_problem(trainer_cfg: Mapping[str, Any], ckpt_path: str | None) -> str | None:
    """Why a checkpoint cannot resume under this trainer, or None.

    Weights load across strategies, but Lightning 2.6 maps a single-process/DDP optimizer state onto FSDP
    parameters by position over *all* parameters, while only the adapter is in the optimizer: it fails
    with a shape mismatch. (FSDP checkpoints resume in a single process: the positions line up there.)"""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    if not ckpt_path or "ModelParallelStrategy" not in target or not os.path.isfile(ckpt_path):
        return None
    meta = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("mentalglm") or {}
    if meta.get("fsdp"):
        return None
    return (
        f"{ckpt_path} was saved without FSDP: its optimizer state cannot resume under trainer=fsdp. Resume it "
        "with the trainer it was saved with, or start a new run from its adapter (stages.<stage>.init=.../best_adapter)"
    )


# ----------------------------------------------------------------------------- FSDP2 (ModelParallelStrategy)
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the `layers` ModuleList of GLM / Llama-style models): the FSDP units."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(module):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList of transformer blocks to shard")


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 (`fully_shard`) per transformer block, then the rest (embeddings, final norm, head) as the root.

    On Lightning's 2-D mesh (nodes x GPUs per node) this is HSDP: parameters are sharded across the GPUs of
    a node and replicated across nodes, so the all-gathers stay on the fast intra-node links."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _deepspeed_zero3_engine(strategy) -> Any | None:
    if (
        strategy is None
        or type(strategy).__name__ != "DeepSpeedStrategy"
        or getattr(strategy, "zero_stage_3", False) is False
    ):
        return None
    return getattr(strategy, "deepspeed_engine", None)


@contextmanager
def gathered_for_generation(model: nn.Module, strategy=None) -> Iterator[None]:
    """Make a sharded model's full parameters resident for one generate() call, then shard them again.

    Without it every forward of every generated token all-gathers every block (FSDP / ZeRO-3 default), and
    ranks that generate different numbers of tokens hang in those collectives. FSDP2: `unshard()` every
    FSDP module once and turn off resharding after forward; ZeRO-3: `GatheredParameters` and the engine's
    fetch/release hooks removed for the call. The cost: the whole model unsharded on each GPU while the
    batch generates (~18 GB for GLM-4-9B in bf16) on top of the KV cache. Every rank must enter it (it is
    a collective), which the equal step counts of `shard_eval_batches` guarantee. A no-op unsharded."""
    fsdp = _fsdp_modules(model)
    engine = _deepspeed_zero3_engine(strategy)
    if fsdp:
        with _fsdp2_unsharded(fsdp):
            yield
    elif engine is not None:
        with _zero3_gathered(engine):
            yield
    else:
        yield


@contextmanager
def _fsdp2_unsharded(modules: list[nn.Module]) -> Iterator[None]:
    for m in modules:
        m.unshard()
    # modules() lists the root first; the root already keeps its parameters after forward (FSDP2 default).
    blocks = modules[1:]
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)
        for m in modules:
            m.reshard()


@contextmanager
def _zero3_gathered(engine) -> Iterator[None]:
    # The approach of TRL's unwrap_model_for_generation: with DeepSpeed's fetch/release hooks in place each
    # block would be released after its forward and gathered again for the next token.
    import deepspeed

    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if not hasattr(offload, "forward_hooks"):
            log.warning("ZeRO-3 engine without parameter hooks: generating with DeepSpeed's per-layer gathering")
            yield
            return
        for param in engine.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            register = getattr(offload, "_register_deepspeed_module", None) or offload._register_hooks_recursively
            register(offload.module)


# ----------------------------------------------------------------------------- adapter weights
def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def adapter_state_dict(model: nn.Module, strategy=None) -> dict[str, torch.Tensor]:
    """The full trainable (adapter) weights as plain CPU tensors, keyed like `model.state_dict()`.

    Sharded models gather them (a collective: call on every rank); only the adapter travels, never the
    frozen base."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if any(_is_dtensor(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        )
        return {k: v for k, v in state.items() if k in set(trainable)}
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    engine = _deepspeed_zero3_engine(strategy)
    if engine is not None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in zip(trainable, params)}
    return {n: p.detach().cpu() for n, p in zip(trainable, params)}


def load_adapter_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load full (unsharded) adapter tensors into `module`, sharded (FSDP2: every rank calls) or not."""
    if any(_is_dtensor(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    module.load_state_dict(dict(state), strict=False)
