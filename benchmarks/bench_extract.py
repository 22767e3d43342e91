"""Feature extraction: mixopt's streaming engine against the naive approach. DESIGN.md section 7, "Speed", "Memory".

    python benchmarks/bench_extract.py [--tokens 40000] [--quick]

Text: MMLU test questions (choices + answer) and GSM8K train problems from `${MIXOPT_DATA:-../shared/data}`
(relative to the repo root) as chat examples, drawn by `mixopt.pipeline.sample_source` until `--tokens`
counted tokens; generated sentences when the data is absent. Model: the embedded SmolLM2-135M-Instruct.
SAE: the built-in layer-22 SAE, or a random sae-lens TopKSAE of the same shape until it is built (same cost).

- mixopt: `run_pass` with no prefix: length-sorted batches of at most 4096 padded tokens cut where padding
  + per-batch cost is least, forward stopped after block 22, per-latent float64 reductions.
- naive (the paper's code): the whole model with `output_hidden_states=True` (all 30 blocks and the LM
  head), fixed batches of 8 examples padded to the longest, every counted token's SAE features kept and grown
  with `torch.cat`, statistics (sum, sum of squares, active count) computed at the end.

Each engine runs on `--tokens` and on a quarter of that (40k and 10k by default), each run in a subprocess of
its own so its peak RSS (`ru_maxrss`) is its alone; tokens/s come from the larger runs (both engines on the same
text). FLOP rate: useful FLOPs (non-padding tokens only) per second of mixopt's pass, against a dense fp32 matmul
measured in the same run with the same threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import Metric, check, report

ROOT = Path(__file__).resolve().parents[1]
MODEL, SAE_ALIAS, LAYER = "smollm2-135m-instruct", "smollm2-135m-instruct-res-l22", 22
NAIVE_BATCH = 8  # examples per naive batch
ENGINES = ("mixopt", "naive")
WORKER_PREFIX = "WORKER "


# ---------------------------------------------------------------------------------------------- text


def chat_rows(data_dir: Path) -> list[dict[str, str]]:
    """(prompt, response) rows: MMLU test questions and GSM8K train problems, or generated ones if absent."""
    rows = []
    for path in sorted((data_dir / "mmlu" / "test").glob("*.csv")):
        with path.open(newline="") as f:
            for question, *choices, answer in (r for r in csv.reader(f) if len(r) == 6):
                options = "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True))
                rows.append({"prompt": f"{question}\n{options}", "response": f"Answer: {answer}"})
    gsm8k = data_dir / "gsm8k" / "train.jsonl"
    if gsm8k.exists():
        with gsm8k.open() as f:
            rows += [{"prompt": r["question"], "response": r["answer"]} for r in map(json.loads, f)]
    return rows or generated_rows()


def generated_rows(n: int = 5000, seed: int = 0) -> list[dict[str, str]]:
    import numpy as np

    words = ["the", "a", "of", "to", "and", "court", "water", "price", "river", "sum", "treaty", "acid", "cell", "law"]
    rng = np.random.default_rng(seed)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words, size=n_words)).capitalize() + "."

    return [{"prompt": text(rng.integers(20, 120)), "response": text(rng.integers(3, 80))} for _ in range(n)]


# ---------------------------------------------------------------------------------------------- worker


def load_bench_sae(device: torch.device) -> tuple[Any, str]:
    """The built-in SAE, or a seeded random TopKSAE of its shape (d_in 576, d_sae 4608, k 32) until it exists."""
    from mixopt.errors import SAEError
    from mixopt.recipe import SAESpec
    from mixopt.sae import load_sae

    try:
        return load_sae(SAESpec(path=SAE_ALIAS, layer=LAYER), ROOT, device), f"built-in {SAE_ALIAS}"
    except SAEError:
        from sae_lens import TopKSAE, TopKSAEConfig

        torch.manual_seed(0)
        return TopKSAE(TopKSAEConfig(d_in=576, d_sae=4608, k=32, device=str(device))).eval(), "random TopKSAE"


@torch.inference_mode()
def naive_pass(lm: Any, sae: Any, examples: list[Any]) -> tuple[torch.Tensor, ...]:
    """The paper's way: full forward with all hidden states, every token's features kept, statistics at the end."""
    from mixopt.batching import pad_right

    features = torch.zeros(0, sae.cfg.d_sae)
    for start in range(0, len(examples), NAIVE_BATCH):
        rows = examples[start : start + NAIVE_BATCH]
        ids, attention = pad_right([r.ids for r in rows], lm.tokenizer.pad_token_id or 0, lm.device)
        hidden = lm.model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        counted = torch.zeros(ids.shape, dtype=torch.bool)
        for b, row in enumerate(rows):
            counted[b, : len(row)] = torch.tensor(row.counted)
        h = hidden[LAYER + 1][counted.to(lm.device)]  # (counted tokens, d_model)
        features = torch.cat([features, sae.encode(h).float().cpu()])  # (tokens so far, d_sae): copied each batch
    return (
        features.sum(0, dtype=torch.float64),
        features.square().sum(0, dtype=torch.float64),
        (features > 0).sum(0, dtype=torch.float64),
    )


def mixopt_pass(lm: Any, sae: Any, examples: list[Any], batch_tokens: int) -> tuple[torch.Tensor, ...]:
    from mixopt.features import run_pass

    latents = run_pass(lm, sae, LAYER, examples, [], batch_tokens, "mixopt").stats.latents
    return latents.total, latents.total_sq, latents.active


def useful_flops(config: Any, d_sae: int, lengths: list[int], counted: int) -> float:
    """Forward FLOPs (2 per multiply-add) of blocks 0..LAYER on the non-padding tokens, plus the SAE encoder
    on the counted tokens. Per block and token: q, k, v, o projections (k, v at the GQA width) and the gated
    MLP's three matrices; attention scores QK^T and AV cost 2 * 2 * heads * head_dim per visible token, and
    under the causal mask token p (1-based) sees p tokens: a length-L row sums L(L+1)/2 (PaLM, appendix B)."""
    d, d_ff, heads, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    head_dim = getattr(config, "head_dim", None) or d // heads
    linear = 2 * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * d_ff)  # per token and block
    attention = 4 * heads * head_dim * sum(n * (n + 1) // 2 for n in lengths)  # per block
    return (LAYER + 1) * (linear * sum(lengths) + attention) + 2 * config.hidden_size * d_sae * counted


def padded_tokens(engine: str, lengths: list[int], batch_tokens: int) -> int:
    from mixopt.batching import length_batches

    if engine == "mixopt":
        batches = list(length_batches(lengths, batch_tokens))
    else:
        batches = [list(range(i, min(i + NAIVE_BATCH, len(lengths)))) for i in range(0, len(lengths), NAIVE_BATCH)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def worker(engine: str, tokens: int) -> dict[str, Any]:
    """One engine over `tokens` counted tokens, in this process alone: its time, peak RSS and statistics."""
    import datasets

    from mixopt.model import load_model
    from mixopt.pipeline import sample_source
    from mixopt.recipe import ModelSpec, STSSpec

    spec = STSSpec()
    lm = load_model(ModelSpec(path=MODEL))
    sae, sae_name = load_bench_sae(lm.device)
    rows = datasets.Dataset.from_list(chat_rows(ROOT / os.environ.get("MIXOPT_DATA", "../shared/data")))
    examples = sample_source(rows, lm, seed=0, n_demos=0, token_budget=tokens, max_length=spec.max_length).examples

    def run(batch: list[Any]) -> tuple[torch.Tensor, ...]:
        return mixopt_pass(lm, sae, batch, spec.batch_tokens) if engine == "mixopt" else naive_pass(lm, sae, batch)

    run(examples[:2])  # warm-up: first-call costs belong to neither engine
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    total, total_sq, active = run(examples)
    seconds = time.perf_counter() - start
    lengths = [len(e) for e in examples]
    counted = sum(e.n_counted for e in examples)
    return {
        "engine": engine,
        "sae": sae_name,
        "threads": torch.get_num_threads(),
        "counted": counted,
        "input": sum(lengths),
        "padded": padded_tokens(engine, lengths, spec.batch_tokens),
        "mean_length": sum(lengths) / len(lengths),
        "seconds": seconds,
        "flops": useful_flops(lm.model.config, sae.cfg.d_sae, lengths, counted),
        "rss_loaded_mib": rss_loaded,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "checksum": [float(total.sum()), float(total_sq.sum()), float(active.sum())],
    }


# ---------------------------------------------------------------------------------------------- parent


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 matmul FLOP/s on this machine (best of `repeats`, same threads as the workers)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def spawn(engine: str, tokens: int) -> dict[str, Any]:
    print(f"  {engine} on {tokens:,} tokens ...", flush=True)
    cmd = [sys.executable, __file__, "--worker", engine, "--tokens", str(tokens)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(
        next(line for line in reversed(out.splitlines()) if line.startswith(WORKER_PREFIX)).removeprefix(WORKER_PREFIX)
    )


def relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40_000, help="counted tokens of the larger run (speed, memory)")
    parser.add_argument("--quick", action="store_true", help="--tokens 2000: a CI smoke run (~1 min)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(WORKER_PREFIX + json.dumps(worker(args.worker, args.tokens)), flush=True)
        return
    large = 2_000 if args.quick else args.tokens
    small = large // 4
    print(f"# extraction benchmark: {MODEL}, layer {LAYER}, torch threads: {torch.get_num_threads()}")
    rate = matmul_rate()
    runs = {(engine, n): spawn(engine, n) for n in (small, large) for engine in ENGINES}
    rate = max(rate, matmul_rate())  # before and after: the machine's best, so the share is not flattered
    if any(r["sae"] == "random TopKSAE" for r in runs.values()):
        print(f"WARNING: built-in SAE {SAE_ALIAS} not found; used a random TopKSAE of the same shape", file=sys.stderr)

    print(
        f"\n{'engine':<7}{'budget':>8}{'counted':>9}{'input':>8}{'pad %':>7}{'seconds':>9}{'tok/s':>7}{'peak MiB':>10}"
    )
    for (engine, n), r in runs.items():
        pad = 100 * (r["padded"] - r["input"]) / r["padded"]
        tps = r["input"] / r["seconds"]
        print(
            f"{engine:<7}{n:>8,}{r['counted']:>9,}{r['input']:>8,}{pad:>7.1f}{r['seconds']:>9.1f}{tps:>7.0f}"
            f"{r['rss_mib']:>10.0f}"
        )
    mixopt, naive = runs["mixopt", large], runs["naive", large]
    mixopt_tps, naive_tps = (r["input"] / r["seconds"] for r in (mixopt, naive))
    flop_rate = mixopt["flops"] / mixopt["seconds"]
    agree = relative_difference(mixopt["checksum"], naive["checksum"])
    print(
        f"\nspeed at {large:,} tokens (non-padding input tokens/s): mixopt {mixopt_tps:,.0f}, naive {naive_tps:,.0f},"
        f" ratio {mixopt_tps / naive_tps:.2f}x; the two engines' statistics agree to {agree:.1e} (relative)"
    )
    per_token = mixopt["flops"] / mixopt["input"] / 1e6
    print(
        f"FLOPs: {per_token:.1f} MFLOP per token (mean length {mixopt['mean_length']:.0f}); "
        f"mixopt {flop_rate / 1e9:.1f} GFLOP/s, dense fp32 matmul {rate / 1e9:.1f} GFLOP/s"
    )
    growth = {e: 100 * (runs[e, large]["rss_mib"] / runs[e, small]["rss_mib"] - 1) for e in ENGINES}
    span = f"{small // 1000}k->{large // 1000}k" if small >= 1000 else f"{small}->{large}"
    report(
        "extract",
        [
            Metric("mixopt tokens/s", mixopt_tps, "tok/s"),
            Metric("naive tokens/s", naive_tps, "tok/s"),
            check("speedup over naive", mixopt_tps / naive_tps, "x", ">=", 2.5),
            check("share of fp32 matmul FLOP rate", 100 * flop_rate / rate, "%", ">=", 80),
            check(f"mixopt peak RSS growth {span} tokens", growth["mixopt"], "%", "<", 20),
            Metric(f"naive peak RSS growth {span} tokens", growth["naive"], "%"),
            Metric(f"mixopt peak RSS at {large:,} tokens", runs["mixopt", large]["rss_mib"], "MiB"),
            Metric(f"naive peak RSS at {large:,} tokens", runs["naive", large]["rss_mib"], "MiB"),
        ],
    )


if __name__ == "__main__":
    main()
