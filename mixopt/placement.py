"""Placement: where `model.device: auto` puts a model on a machine with GPUs.

A model that fits the first GPU goes there, as it always did; one that fits another GPU goes to the one
with the most free memory; one that fits no single GPU is spread over all of them by accelerate's big-model
inference (`from_pretrained(..., device_map="auto", max_memory=...)`, transformers' own route: accelerate
is a dependency of mixopt), layer by layer, and what does not fit the GPUs is offloaded to the CPU (slow,
but it runs). Under torchrun each rank owns one GPU, so a model that does not fit it is an error that says
to run one process instead.

`choose_placement` is a pure function of the free memory per GPU and the model's size, so the choice is
unit-tested without a GPU; `model_bytes` sizes a model from its config on the meta device (no weights
loaded, no memory used).

Example:
    >>> GiB = 1 << 30
    >>> choose_placement([80 * GiB, 80 * GiB], 140 * GiB).device_map
    'auto'
    >>> str(choose_placement([80 * GiB, 80 * GiB], 14 * GiB).device)
    'cuda:0'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixopt.errors import ModelError

HEADROOM = 1.2  # weights x this must fit: activations of a batch, the SAE, CUDA's own allocations
GPU_SHARE = 0.9  # of a GPU's free memory that accelerate may fill with layers (activations need the rest)
_GiB = 1 << 30


@dataclass(frozen=True)
class Placement:
    """Where the model goes: one device, or accelerate's `device_map="auto"` with a memory cap per device."""

    device: torch.device  # where inputs go: the device, or the first GPU of a spread model
    device_map: str | None = None  # "auto": spread over `max_memory`'s devices by accelerate
    max_memory: dict[int | str, int] | None = None  # GPU index (or "cpu") -> bytes accelerate may fill
    reason: str = ""


def choose_placement(free: list[int], model_bytes: int, rank_gpu: int | None = None, cpu_bytes: int = 0) -> Placement:
    """The placement of a model of `model_bytes` bytes (weights) on GPUs with `free` bytes free each.

    `rank_gpu`: under torchrun, the GPU this rank owns (each rank holds a whole model: no spreading).
    `cpu_bytes`: host memory accelerate may offload layers to when the GPUs together are too small.
    """
    if not free:
        return Placement(torch.device("cpu"), reason="no GPU")
    need = int(model_bytes * HEADROOM)
    size = f"{model_bytes / _GiB:.1f} GiB of weights"
    if rank_gpu is not None:
        if free[rank_gpu] < need:
            raise ModelError(
                f"the model ({size}) does not fit this rank's GPU {rank_gpu} ({free[rank_gpu] / _GiB:.1f} GiB free); "
                "under torchrun each rank holds a whole model: run one process (`mixopt score`), which spreads it "
                "over the GPUs"
            )
        return Placement(torch.device("cuda", rank_gpu), reason=f"{size} fit this rank's GPU {rank_gpu}")
    if free[0] >= need:
        return Placement(torch.device("cuda", 0), reason=f"{size} fit GPU 0")
    best = max(range(len(free)), key=lambda i: (free[i], -i))
    if free[best] >= need:
        return Placement(torch.device("cuda", best), reason=f"{size} fit GPU {best}, the one with most free memory")
    caps: dict[int | str, int] = {i: int(f * GPU_SHARE) for i, f in enumerate(free)}
    spread = f"{size} fit no single GPU; spread over {len(free)} GPUs"
    if sum(caps.values()) < model_bytes:
        if not cpu_bytes:
            raise ModelError(
                f"the model ({size}) does not fit the {len(free)} GPUs ({sum(free) / _GiB:.1f} GiB free in all); "
                "use model.dtype: bfloat16, more GPUs, or model.device: cpu"
            )
        caps["cpu"] = cpu_bytes
        spread += " and the CPU (offloaded layers are slow)"
    return Placement(torch.device("cuda", 0), "auto", caps, spread)


def auto_placement(source: str, dtype: torch.dtype, options: dict[str, Any]) -> Placement:
    """`choose_placement` on this machine: its GPUs' free memory, the model's size from its config, 80% of
    the available host memory for offloading, and the rank's own GPU under torchrun."""
    import psutil  # an accelerate dependency

    from mixopt import distributed

    rank_gpu = distributed.local_device().index if distributed.launched() else None
    host = int(psutil.virtual_memory().available * 0.8)
    return choose_placement(gpu_free_memory(), model_bytes(source, dtype, options), rank_gpu, host)


def model_bytes(source: str, dtype: torch.dtype, options: dict[str, Any]) -> int:
    """Bytes of the model's weights in `dtype`, from its config: built on the meta device, nothing loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **options)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in empty.parameters()) * dtype.itemsize


def gpu_free_memory() -> list[int]:
    """Free bytes on each visible GPU (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def require_one_device(model: Any, what: str) -> None:
    """`what` (a training or backward pass) needs the whole model on one device, not spread by accelerate."""
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        raise ModelError(
            f"{what} needs the model on one device, but it is spread over several (it fits no single GPU); "
            "use a scorer without a look-ahead (e.g. sts.score: similarity) or a GPU that holds the model"
        )
