"""Distributed scoring: tokens/s of the streaming engine (`run_pass`) with 1 and 2 gloo ranks, and whether the
two give the same result.

    python benchmarks/bench_distributed.py [--tokens 40000] [--quick]

A small random Llama (4 blocks, hidden 256, 8 heads; built in-process, nothing downloaded) and a random
sae-lens SAE (d_sae 2048) at block 2; length-varied random-token examples (16-256 tokens) up to `--tokens`
counted tokens, with a 64-token demonstration prefix so the pass also computes the ICL shift (two forwards
per batch, as the target's pass does). Every rank is a forked process with one thread (OMP_NUM_THREADS=1,
as torchrun sets it) inside `mixopt.distributed.process_group()`, the code `torchrun -m mixopt score` runs;
the 1-rank run is a single process with one thread. Time: from a barrier before the pass to the end of the
sums across ranks (every rank holds the whole result), model building and process start excluded.
Equality: the 2-rank result against the 1-rank one, every tensor; per-example values must be bitwise equal
(each batch is computed whole by one rank), the float64 totals within 1e-12 relative.

The ideal ratio on 2 free cores is 2x; the machine's load (other processes) caps what is measured.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Metric, check, report

LAYER = 2


def build(tokens: int, seed: int = 0) -> tuple:
    """(LoadedModel, SAE, examples, prefix): the same on every call with the same seed."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixopt.encoding import Encoded
    from mixopt.model import LoadedModel

    torch.manual_seed(seed)
    vocab = 4096
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    sae = StandardSAE(StandardSAEConfig(d_in=256, d_sae=2048)).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)

    class Tokenizer:  # what run_pass reads of a tokenizer
        pad_token_id = 0

    lm = LoadedModel(model, Tokenizer(), "bench", "bench-distributed", torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    examples, counted = [], 0
    while counted < tokens:
        n = int(torch.randint(16, 257, (1,), generator=generator))
        ids = torch.randint(1, vocab, (n,), generator=generator).tolist()
        examples.append(Encoded(ids, [True] * n, [True] * n))
        counted += n
    prefix = torch.randint(1, vocab, (64,), generator=generator).tolist()
    return lm, sae, examples, prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, tokens: int, batch_tokens: int, out: str) -> None:
    """One rank: torchrun's environment, one thread, the pass inside mixopt's process group; rank 0 saves."""
    import torch.distributed as dist

    from mixopt import distributed
    from mixopt.features import run_pass

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    lm, sae, examples, prefix = build(tokens)
    with distributed.process_group():
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        result = run_pass(lm, sae, LAYER, examples, prefix, batch_tokens, "bench")
        seconds = time.perf_counter() - start
        if distributed.is_main():
            tensors = result.stats.to_tensors("stats.") | (result.shift.to_tensors("shift.") if result.shift else {})
            torch.save({"seconds": seconds, "tensors": tensors}, out)
    os._exit(0)


def run(world: int, tokens: int, batch_tokens: int) -> tuple[float, dict[str, torch.Tensor]]:
    """(seconds, rank 0's result tensors) of the pass on `world` forked ranks (1: one process alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        context = multiprocessing.get_context("fork")
        port = _free_port()
        ranks = [context.Process(target=_rank, args=(r, world, port, tokens, batch_tokens, out)) for r in range(world)]
        if world == 1:  # a single process: no launcher environment at all
            ranks = [context.Process(target=_single, args=(tokens, batch_tokens, out))]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        if any(process.exitcode for process in ranks):
            sys.exit(f"a rank failed: exit codes {[process.exitcode for process in ranks]}")
        saved = torch.load(out)
    return saved["seconds"], saved["tensors"]


def _single(tokens: int, batch_tokens: int, out: str) -> None:
    from mixopt.features import run_pass

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    lm, sae, examples, prefix = build(tokens)
    start = time.perf_counter()
    result = run_pass(lm, sae, LAYER, examples, prefix, batch_tokens, "bench")
    seconds = time.perf_counter() - start
    tensors = result.stats.to_tensors("stats.") | (result.shift.to_tensors("shift.") if result.shift else {})
    torch.save({"seconds": seconds, "tensors": tensors}, out)
    os._exit(0)


def compare(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(every per-example tensor bitwise equal and every total within 1e-12 relative, largest relative difference
    of the totals). Top contexts are left out: among exactly equal activations either example is a top one."""
    worst = 0.0
    equal = one.keys() == two.keys()
    for key in one:
        if ".top." in key:
            continue
        a, b = one[key].double(), two[key].double()
        if "per_example" in key or key.endswith("example_tokens"):
            equal &= torch.equal(a, b)
        else:
            difference = float(((a - b).abs() / a.abs().clamp(min=1e-300)).max()) if a.numel() else 0.0
            worst = max(worst, difference)
            equal &= difference <= 1e-12
    return equal, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40_000, help="counted tokens in the pass")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward batch")
    parser.add_argument("--quick", action="store_true", help="2,000 tokens: a smoke run")
    args = parser.parse_args()
    tokens = 2_000 if args.quick else args.tokens
    os.environ["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    print(f"{tokens:,} counted tokens, batches of <= {args.batch_tokens} padded tokens; load average {load:.1f}")
    seconds_one, one = run(1, tokens, args.batch_tokens)
    seconds_two, two = run(2, tokens, args.batch_tokens)
    counted = int(one["stats.example_tokens"].sum())
    rate_one, rate_two = counted / seconds_one, counted / seconds_two
    equal, worst = compare(one, two)
    print(f"1 rank: {seconds_one:.2f} s, {rate_one:,.0f} tok/s; 2 ranks: {seconds_two:.2f} s, {rate_two:,.0f} tok/s")
    print(f"2-rank result equal to 1 rank: {equal} (largest relative difference of a float64 total {worst:.2g})")
    report(
        "distributed",
        [
            Metric("1 gloo rank tokens/s (1 thread)", rate_one, "tok/s"),
            Metric("2 gloo ranks tokens/s (1 thread each)", rate_two, "tok/s"),
            check("2 ranks vs 1 rank", rate_two / rate_one, "x", ">=", 1.6),
            Metric("results equal (per-example bitwise, totals 1e-12)", float(equal), "", "= 1", met=equal),
            Metric("largest relative difference of a total", worst),
            Metric("load average at start", load),
        ],
    )


if __name__ == "__main__":
    main()
