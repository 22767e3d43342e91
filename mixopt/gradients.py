"""Gradients: the `grad` forecast. No training: the first-order change of each domain's loss under the
target's first update, and a domain x domain matrix of gradient cosines for the allocation.

For a source D with mean response-token loss L_D(θ) and the target's update direction u over the chosen
weights, one optimizer step θ' = θ - lr u changes L_D by (first-order Taylor; TAG, Fifty et al. NeurIPS'21,
measures the same change by a lookahead step instead)
    ΔL_D ≈ -lr <∇L_D, u>        positive = D gets worse.
u is the target's mean gradient (`plain`: an SGD step) or an Adam-like step g / (sqrt(v) + eps), v the mean
of the squared per-batch gradients over the first few batches the trainer would draw (`adam`: Adam's first
steps move each weight by about lr where the batches agree on its sign, less where they disagree).

Per example, exactly, without forming any example's gradient: a linear layer y = W a has ∇_W = Σ_t δ_t a_tᵀ
over the positions t of the example (δ_t = ∂loss/∂y_t), so <∇_W ℓ_i, U> = Σ_t δ_tᵀ U a_t: one more matmul
per token and layer (U is u's block for W). The per-example forecasts' token-weighted mean is the source's.

Sketches (LoGra, Choe et al. 2024, "What is your data worth to GPT?"; Bergson's per-module projection): the
same structure gives a Kronecker-factored random projection of ∇_W without forming it,
    P_out ∇_W P_inᵀ = Σ_t (P_out δ_t)(P_in a_t)ᵀ        (r_out, r_in) per layer,
with P seeded Gaussian, entries N(0, 1/r). Sketched inner products are unbiased and their error is bounded
(`sketch_error_bound`); the cosines of the domains' sketches are the `transfer` matrix that the `protect`
objective reads. Memory: O(sketch) per source plus one copy of u, never O(model x sources).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mixopt import distributed
from mixopt.batching import length_batches
from mixopt.encoding import Encoded, loss_digest
from mixopt.errors import RecipeError
from mixopt.features import cached_tensors
from mixopt.files import Digest
from mixopt.finetune import loss_tokens, step_batches, token_losses
from mixopt.model import LoadedModel, decoder_layers
from mixopt.recipe import GradSpec
from mixopt.scores import Forecast, ForecastResult, ScorerCost, Transfer
from mixopt.sts import name_seed

CACHE_VERSION = 2  # 2: each entry keeps what computing it cost (seconds, backward tokens)
Receiver = Callable[[str, torch.Tensor, torch.Tensor], None]  # (layer name, a (B, S, d_in), δ (B, S, d_out))


def chosen_layers(model: nn.Module, spec: GradSpec) -> dict[str, nn.Linear]:
    """The linear layers whose weights count: in the last `spec.blocks` decoder blocks (every block when 0),
    those whose name inside the block matches a pattern of `spec.modules`. Keyed "block.name", e.g.
    "29.mlp.down_proj". The LM head (tied to the embeddings in most small models) is never one."""
    blocks = decoder_layers(model)
    first = 0 if spec.blocks == 0 else max(0, len(blocks) - spec.blocks)
    layers = {
        f"{b}.{name}": module
        for b in range(first, len(blocks))
        for name, module in blocks[b].named_modules()
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in spec.modules)
    }
    if not layers:
        raise RecipeError(
            f"{spec.modules} matches no linear layer in blocks {first}..{len(blocks) - 1}; "
            "use e.g. ['*'], ['mlp.*'] or ['self_attn.*']",
            field="sts.grad.modules",
        )
    return layers


# ------------------------------------------------------------------------------------------ sketches


def projection(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """(rows, cols) seeded Gaussian, entries N(0, 1/rows): E[PᵀP] = I, so inner products survive on average
    (Johnson-Lindenstrauss). rows >= cols gives the identity: the side is kept exactly."""
    if rows >= cols:
        return torch.eye(cols)
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.randn(rows, cols, generator=generator) / rows**0.5


def sketch_error_bound(r_in: int | None, r_out: int | None) -> float:
    """Bound on the standard deviation of a sketched inner product, relative to ||G||_F ||H||_F, for one
    weight sketched as P_out G P_inᵀ with Gaussian P of r_out and r_in rows (None: that side kept exactly).

    Derivation: for A (r, d) with entries N(0, 1/r) and any M, tr(M AᵀA) = (1/r) Σ_k z_kᵀ M z_k with
    z_k ~ N(0, I), so it is unbiased for tr(M) with variance (||M||² + tr(M²)) / r <= 2 ||M||² / r. Condition
    on P_in (M = H' G'ᵀ, G' = G P_inᵀ, ||M|| <= ||G'|| ||H'||), then average over P_in the same way:
        Var <= ||G||² ||H||² (a_in + a_out + a_in a_out),   a = 2 / r.
    Summed over weights sketched independently, the variances add, so the same bound holds for the whole
    model's inner product (Cauchy-Schwarz over the weights), and is loose by about the number of weights
    when the gradient mass is spread over them."""
    a_in, a_out = (0.0 if r is None else 2.0 / r for r in (r_in, r_out))
    return (a_in + a_out + a_in * a_out) ** 0.5


@dataclass
class Sketcher:
    """Per-layer Kronecker-factored projections (LoGra): a weight gradient G (d_out, d_in) -> P_out G P_inᵀ."""

    p_in: dict[str, torch.Tensor]  # (r_in, d_in)
    p_out: dict[str, torch.Tensor]  # (r_out, d_out)

    @classmethod
    def build(cls, layers: dict[str, nn.Linear], size: int, seed: int, device: torch.device) -> Sketcher:
        p_in = {n: projection(size, m.in_features, seed, f"{n}/in").to(device) for n, m in layers.items()}
        p_out = {n: projection(size, m.out_features, seed, f"{n}/out").to(device) for n, m in layers.items()}
        return cls(p_in, p_out)

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full weight gradients -> one flat sketch, (sum of r_out r_in,), layers in this sketcher's order."""
        return torch.cat([(self.p_out[n] @ grads[n].float() @ self.p_in[n].T).flatten() for n in self.p_in])

    def bound(self) -> float:
        """`sketch_error_bound` of the coarsest layer: a bound for the whole sketch. A square P is the
        identity (`projection`): that side is exact."""

        def rows(p: torch.Tensor) -> int | None:
            return None if p.shape[0] == p.shape[1] else p.shape[0]

        return max(sketch_error_bound(rows(self.p_in[n]), rows(self.p_out[n])) for n in self.p_in)


# --------------------------------------------------------------------------------------------- passes


@contextmanager
def tapped(layers: dict[str, nn.Linear], receive: Receiver) -> Iterator[None]:
    """While open, every forward of a chosen layer keeps its input a, and the backward hands (a, δ) to
    `receive`, δ being the gradient of the loss with respect to the layer's output."""

    def keep(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            a = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda delta: receive(name, a, delta.detach()))

        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def only_trainable(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Gradients flow to `weights` alone, so the backward stops at the first chosen block."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def update_direction(
    lm: LoadedModel, layers: dict[str, nn.Linear], examples: list[Encoded], spec: GradSpec, seed: int
) -> tuple[dict[str, torch.Tensor], int]:
    """(u per chosen weight, response tokens it differentiated) from the first `spec.batches` batches the
    trainer would draw (`step_batches`), each with the trainer's token-mean loss: `plain` g = mean of the
    batch gradients; `adam` g / (sqrt(v) + eps), v = mean of their squares (Adam's second moment, every
    batch weighted alike)."""
    names = list(layers)
    weights = [layers[n].weight for n in names]
    g = {n: torch.zeros_like(layers[n].weight, dtype=torch.float32) for n in names}
    v = {n: torch.zeros_like(g[n]) for n in names} if spec.direction == "adam" else {}
    batches = step_batches(len(examples), spec.batches, spec.batch_size, seed)
    pad_id = lm.tokenizer.pad_token_id or 0
    with only_trainable(lm.model, weights):
        for batch in tqdm(batches, unit="batch", desc="grad: target update", leave=False):
            losses, _ = token_losses(lm.model, [examples[i] for i in batch], pad_id, lm.device)
            grads = torch.autograd.grad(losses.mean(), weights)
            for n, grad in zip(names, grads, strict=True):
                g[n] += grad.float() / len(batches)
                if v:
                    v[n] += grad.float().square() / len(batches)
    tokens = int(loss_tokens([examples[i] for batch in batches for i in batch]).sum())  # the trainer's unit
    if not v:
        return g, tokens
    return {n: g[n] / (v[n].sqrt() + spec.eps) for n in names}, tokens


@dataclass
class SourceGradients:
    """One source's gradient pass."""

    alignment: torch.Tensor  # (examples,) float64: <∇ of the example's summed response-token loss, u>
    tokens: torch.Tensor  # (examples,) int64: response tokens its loss reads
    sketch: torch.Tensor  # (sketch dim,) float32: the sketch of the token-mean gradient of the whole source

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"alignment": self.alignment, "tokens": self.tokens, "sketch": self.sketch}


def source_gradients(
    lm: LoadedModel,
    layers: dict[str, nn.Linear],
    examples: list[Encoded],
    update: dict[str, torch.Tensor],
    sketcher: Sketcher,
    batch_tokens: int,
    desc: str,
) -> SourceGradients:
    """Stream `examples` through forward and backward in length-sorted batches; per example Σ_t δ_tᵀ U a_t,
    and the sum of Σ_t (P_out δ_t)(P_in a_t)ᵀ over the source. Memory: one batch's activations + sketches."""
    tokens = loss_tokens(examples)
    alignment = torch.zeros(len(examples), dtype=torch.float64)
    sketch = {n: torch.zeros(sketcher.p_out[n].shape[0], sketcher.p_in[n].shape[0], device=lm.device) for n in layers}
    rows = torch.zeros(0, dtype=torch.int64)  # the example index of each row of the current batch

    def receive(name: str, a: torch.Tensor, delta: torch.Tensor) -> None:
        a, delta = a.float(), delta.float()  # (B, S, d_in), (B, S, d_out); padding positions have δ = 0
        per_row = (delta * (a @ update[name].T)).sum((1, 2))  # (B,): Σ_t δ_tᵀ U a_t
        alignment.index_add_(0, rows, per_row.double().cpu())
        projected_delta = (delta @ sketcher.p_out[name].T).flatten(0, 1)  # (B S, r_out)
        sketch[name] += projected_delta.T @ (a @ sketcher.p_in[name].T).flatten(0, 1)  # (r_out, r_in)

    weights = [layer.weight for layer in layers.values()]
    pad_id = lm.tokenizer.pad_token_id or 0
    # with several ranks, this rank's share of the one-process batch plan; the sums are added up below
    batches = distributed.shard(list(length_batches([len(e) for e in examples], batch_tokens)))
    mine = int(sum(tokens[batch].sum() for batch in batches))
    with (
        only_trainable(lm.model, weights),
        tapped(layers, receive),
        tqdm(total=mine, unit="tok", unit_scale=True, desc=desc, leave=False, disable=not distributed.is_main()) as bar,
    ):
        for batch in batches:
            rows = torch.tensor(batch, dtype=torch.int64)
            losses, _ = token_losses(lm.model, [examples[i] for i in batch], pad_id, lm.device)
            if losses.numel():
                torch.autograd.grad(losses.sum(), weights)  # fires `receive`; the weight gradients are not kept
            bar.update(int(tokens[rows].sum()))
    distributed.all_sum(alignment, *sketch.values())  # each example's row from the one rank that ran it
    total = max(int(tokens.sum()), 1)
    flat = torch.cat([(sketch[n] / total).flatten() for n in layers]).cpu()
    return SourceGradients(alignment, tokens, flat)


# ---------------------------------------------------------------------------------------------- scorer


def grad_forecast(
    lm: LoadedModel,
    target: str,
    sources: dict[str, list[Encoded]],
    spec: GradSpec,
    batch_tokens: int,
    seed: int,
) -> ForecastResult:
    """The `grad` scorer: every source's forecast loss change, -lr <∇L_source, u>, with per-example values,
    and the cosines of the domains' gradient sketches (`transfer`; every source but `target`). `sources`
    holds each source's scoring examples, `target`'s being the rows its update is estimated from.
    Each source's pass is cached by the model, `spec`, seed, the target's and the source's exact token ids."""
    layers = chosen_layers(lm.model, spec)
    sketcher = Sketcher.build(layers, spec.sketch, seed, lm.device)
    setting = {"v": CACHE_VERSION, "model": lm.identity, "dtype": str(lm.dtype), "seed": seed}
    setting |= spec.model_dump(exclude={"lr"})  # lr only scales the stored alignments
    setting["target"] = loss_digest(sources[target])  # what u is estimated from
    update: dict[str, torch.Tensor] | None = None
    passes: dict[str, SourceGradients] = {}
    seconds, backward_tokens = 0.0, 0  # what computing the passes cost, cached or not
    for name, examples in sources.items():

        def compute(name: str = name, examples: list[Encoded] = examples) -> dict[str, torch.Tensor]:
            nonlocal update
            started, tokens = time.perf_counter(), int(loss_tokens(examples).sum())
            if update is None:  # only when some source is not cached; its cost goes to the first such source
                update, update_tokens = update_direction(lm, layers, sources[target], spec, seed)
                tokens += update_tokens
            result = source_gradients(lm, layers, examples, update, sketcher, batch_tokens, f"grad {name}")
            cost = {"seconds": torch.tensor(time.perf_counter() - started), "backward_tokens": torch.tensor(tokens)}
            return result.to_tensors() | cost  # the cost stays with the entry: a cached run reports it too

        key = Digest().add(setting).add(loss_digest(examples)).hex(24)
        tensors, _ = cached_tensors("gradients", key, compute)
        seconds += float(tensors.pop("seconds"))
        backward_tokens += int(tensors.pop("backward_tokens"))
        passes[name] = SourceGradients(**tensors)
    forecasts = {name: _forecast(p, spec.lr) for name, p in passes.items()}
    domains = [name for name in sources if name != target]
    cost = ScorerCost(seconds=seconds, backward_tokens=backward_tokens)
    return ForecastResult(forecasts, cost, transfer_matrix(domains, [passes[d].sketch for d in domains]))


def _forecast(p: SourceGradients, lr: float) -> Forecast:
    """-lr <∇L, u>, token-mean over the source, and per example (0 for an example no loss reads)."""
    per_example = -lr * p.alignment / p.tokens.clamp(min=1).double()
    value = -lr * float(p.alignment.sum()) / max(int(p.tokens.sum()), 1)
    return Forecast(value, [float(x) for x in per_example], [int(t) for t in p.tokens])


def transfer_matrix(domains: list[str], sketches: list[torch.Tensor]) -> Transfer:
    """Cosines of the domains' sketched gradients: +1 = a step on one lowers the other's loss as much as
    its own (relative to their sizes), -1 = it raises it."""
    stacked = torch.stack(sketches).double()  # (domains, sketch dim)
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return Transfer(list(domains), [[round(float(x), 6) for x in row] for row in unit @ unit.T])
