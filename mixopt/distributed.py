"""Distributed: scoring on torch.distributed, launched by `torchrun` or `accelerate launch`.

    torchrun --nproc-per-node 2 -m mixopt score recipes/quickstart.yaml

Every rank runs the same pipeline on the same examples; each forward pass is split by its *batches*: the
single-process batch plan (`batching.length_batches` over all the pass's examples) is dealt out round-robin,
rank r taking batches r, r + N, r + 2N, ... (`shard`). A batch holds the same rows, padded alike, as in one
process, so every per-example value is bitwise the one a single process computes; the per-latent totals
(float64) differ only by the order their per-batch sums are added. Each rank then holds its part of each
reduction (the others' rows are zero), and `all_sum` adds them up on every rank: every rank ends each
pass with the whole result, so all ranks take the same path through the rest of the pipeline. Rank 0
alone writes (the cache, scores, the plan's output); the others meet it at a final barrier and exit 0.

One process (no `WORLD_SIZE` > 1 in the environment): nothing here does anything; `shard` returns
everything and `all_sum` leaves its tensors alone.

Backends: gloo on CPU, nccl on CUDA (each rank on `cuda:LOCAL_RANK`). The reductions move CPU tensors,
so under nccl they go through a second, gloo group. The process group has a timeout
(`$MIXOPT_DIST_TIMEOUT` seconds, default 3600: rank 0 trains `probe`'s pilot while the others wait).
A rank that raises ends the run: its error is one `error: rank R of N: ...` line; torchrun then stops
the others (SIGTERM), and a rank that loses its peers inside a collective says so in one line too. Rank 0
writes a cache entry only when the whole pass is summed (atomically), so a failed run leaves no
half-written entry.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mixopt.errors import DistributedError, MixoptError, Terminated

T = TypeVar("T")
TIMEOUT_ENV = "MIXOPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600
_cpu_group: Any = None  # the gloo group for CPU tensors (the default group under gloo; a second one under nccl)


def launched() -> bool:
    """Started as one of several ranks (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes."""
    return rank() == 0


def describe() -> str:
    """`rank R of N`, for messages."""
    return f"rank {rank()} of {world_size()}"


def local_device() -> torch.device:
    """`model.device: auto`: under a launcher with CUDA, this rank's GPU (`LOCAL_RANK`); else cuda or cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda")


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; e.g. {TIMEOUT_ENV}=3600") from None
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Around a command: with WORLD_SIZE > 1, join the process group (gloo on CPU, nccl on CUDA, with a
    timeout); on success every rank waits at a barrier until rank 0 has written, then the group closes.

    On failure there is no barrier (it would wait for a rank that will never come): the rank says in one
    line what stopped it (DistributedError), and the launcher stops the others. Without a launcher this is
    a no-op."""
    global _cpu_group
    if not launched() or active():
        yield
        return
    limit = timeout()
    try:
        if torch.cuda.is_available():
            device = local_device()
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=limit, device_id=device)
            _cpu_group = dist.new_group(backend="gloo", timeout=limit)
        else:
            dist.init_process_group("gloo", timeout=limit)
            _cpu_group = dist.group.WORLD
    except Exception as err:  # rendezvous errors come in many types; all mean the group did not form
        raise DistributedError(f"cannot join the process group ({_reason(err)}); check the launcher's flags") from None
    where = describe()
    try:
        yield
        with _collective("the final barrier"):
            dist.barrier(group=_cpu_group)  # the others wait here while rank 0 writes
    except MixoptError as err:
        if isinstance(err, DistributedError) or world_size() == 1:
            raise
        raise DistributedError(f"{where}: {err}") from None
    except Terminated:  # torchrun stops every rank with SIGTERM once one has failed (or on Ctrl-C)
        raise DistributedError(
            f"{where} stopped by SIGTERM: the launcher stops every rank when one fails (its error is above) or "
            "the run is interrupted; nothing half-written is left"
        ) from None
    except Exception as err:
        traceback.print_exc(file=sys.stderr)  # a bug's traceback first; the run's one line last
        raise DistributedError(f"{where} failed: {type(err).__name__}: {_reason(err)}; nothing was written") from None
    finally:
        _cpu_group = None
        dist.destroy_process_group()


def _reason(err: BaseException) -> str:
    """The error's first sentence on one line, without gloo's `[file.cc:line]` prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(err).split()))
    return text.split(". ")[0][:300] or type(err).__name__


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A peer that died or timed out makes a collective raise; say which rank lost its peers, and where."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        raise DistributedError(
            f"{describe()}: lost the other ranks during {what} ({_reason(err)}); another rank failed or hung "
            f"(the limit is {TIMEOUT_ENV}); nothing half-written is left"
        ) from None


# ------------------------------------------------------------------------------------------- sharding


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: r, r + N, r + 2N, ... (every item in one process)."""
    return list(items[rank() :: world_size()])


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor across ranks, in place, on every rank (sums and counts: float64; per-example rows
    a rank did not compute are zero there, so their sum is the computing rank's value exactly)."""
    if not active():
        return
    with _collective("a sum across ranks"):
        for tensor in tensors:
            cpu = tensor.detach().cpu()
            dist.all_reduce(cpu, op=dist.ReduceOp.SUM, group=_cpu_group)
            tensor.copy_(cpu)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape everywhere), in rank order; [tensor] in one process."""
    if not active():
        return [tensor]
    parts = [torch.empty_like(tensor, device="cpu") for _ in range(world_size())]
    with _collective("a gather across ranks"):
        dist.all_gather(parts, tensor.detach().cpu().contiguous(), group=_cpu_group)
    return parts


def agree(flag: bool) -> bool:
    """True when `flag` is true on every rank (e.g. every rank sees a cache entry); `flag` in one process."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    with _collective("a vote across ranks"):
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_cpu_group)
    return bool(value.item())


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's copy (e.g. the pilot model rank 0 trained)."""
    if not active():
        return
    with _collective("the broadcast of rank 0's weights"):
        for tensor in [*module.parameters(), *module.buffers()]:
            cpu = tensor.detach().cpu()
            dist.broadcast(cpu, src=0, group=_cpu_group)
            with torch.no_grad():
                tensor.copy_(cpu)
