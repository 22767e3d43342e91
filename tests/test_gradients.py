"""The `grad` forecast on a tiny real Llama: against finite differences of a real SGD step, per-example
gradients from plain autograd, and the sketch's stated error over seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mixopt.encoding import Encoded
from mixopt.finetune import step_batches
from mixopt.gradients import (
    Sketcher,
    chosen_layers,
    grad_forecast,
    sketch_error_bound,
    source_gradients,
    update_direction,
)
from mixopt.model import LoadedModel
from mixopt.recipe import GradSpec
from tests.tiny import chat_sources, tiny_lm

SEED = 3


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    """float64, so a finite difference of one small step resolves the first-order change."""
    return tiny_lm("tiny-float64-grad", torch.float64, seed=1)


def sources(lm: LoadedModel, n: int = 8) -> dict[str, list[Encoded]]:
    return chat_sources(lm.tokenizer, n)


# ------------------------------------------------------------------ independent computations (no batching)


def example_loss_sum(model: torch.nn.Module, e: Encoded) -> torch.Tensor:
    """Σ of the example's response-token losses, one unpadded forward (nothing shared with mixopt's batches)."""
    ids = torch.tensor([e.ids])
    logits = model(input_ids=ids).logits[0, :-1]  # position t predicts token t+1
    reads = torch.tensor(e.response[1:])
    return torch.nn.functional.cross_entropy(logits[reads], ids[0, 1:][reads], reduction="sum")


def source_loss(model: torch.nn.Module, examples: list[Encoded]) -> torch.Tensor:
    """Token-mean response loss over a whole source."""
    tokens = sum(sum(e.response[1:]) for e in examples)
    return sum(example_loss_sum(model, e) for e in examples) / tokens


def exact_gradient(lm: LoadedModel, weights: dict[str, torch.nn.Parameter], loss: torch.Tensor) -> dict:
    return dict(zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True))


def independent_update(lm: LoadedModel, weights: dict, target: list[Encoded], spec: GradSpec) -> dict:
    """u from the formula: batch gradients of the token-mean loss, their mean g and mean square v."""
    grads = [
        exact_gradient(lm, weights, source_loss(lm.model, [target[i] for i in batch]))
        for batch in step_batches(len(target), spec.batches, spec.batch_size, SEED)
    ]
    g = {n: sum(b[n] for b in grads) / len(grads) for n in weights}
    if spec.direction == "plain":
        return g
    v = {n: sum(b[n] ** 2 for b in grads) / len(grads) for n in weights}
    return {n: g[n] / (v[n].sqrt() + spec.eps) for n in weights}


@pytest.mark.parametrize("direction", ["plain", "adam"])
def test_grad__forecast_equals_the_finite_difference_of_one_sgd_step(lm: LoadedModel, direction: str) -> None:
    spec = GradSpec(direction=direction, lr=1e-4, batches=3, batch_size=3, blocks=0, sketch=8)
    data = sources(lm)
    result = grad_forecast(lm, "math", data, spec, batch_tokens=256, seed=SEED)
    weights = {n: m.weight for n, m in chosen_layers(lm.model, spec).items()}
    u = independent_update(lm, weights, data["math"], spec)
    step = 1e-3 if direction == "plain" else 1e-5  # the Adam-like u has entries near 1: a smaller step
    with torch.no_grad():
        before = {name: float(source_loss(lm.model, ex)) for name, ex in data.items()}
        for n, w in weights.items():
            w -= step * u[n]  # one SGD step along u
        after = {name: float(source_loss(lm.model, ex)) for name, ex in data.items()}
        for n, w in weights.items():
            w += step * u[n]
    measured = np.array([after[n] - before[n] for n in data])
    forecast = np.array([result.sources[n].value for n in data]) * step / spec.lr  # the forecast is linear in lr
    assert np.sign(forecast).tolist() == np.sign(measured).tolist()
    assert spearmanr(forecast, measured).statistic == pytest.approx(1.0)
    np.testing.assert_allclose(forecast, measured, rtol=0.02)  # what is left is the second-order term
    for f in result.sources.values():  # per-example values average, token-weighted, to the source's
        assert np.average(f.example_values, weights=f.example_tokens) == pytest.approx(f.value, rel=1e-9)


def test_source_pass__per_example_alignment_and_sketch_equal_plain_autograd(lm: LoadedModel) -> None:
    spec = GradSpec(blocks=1, sketch=4, batches=2, batch_size=2)
    data = sources(lm, n=5)
    layers = chosen_layers(lm.model, spec)
    weights = {n: m.weight for n, m in layers.items()}
    update, _ = update_direction(lm, layers, data["math"], spec, SEED)
    sketcher = Sketcher.build(layers, spec.sketch, SEED, lm.device)
    passed = source_gradients(lm, layers, data["law"], update, sketcher, batch_tokens=128, desc="test")
    for i, e in enumerate(data["law"]):  # <∇ of the example's summed loss, U>, from its own gradient
        grad = exact_gradient(lm, weights, example_loss_sum(lm.model, e))
        exact = sum(float((grad[n] * update[n]).sum()) for n in weights)
        assert float(passed.alignment[i]) == pytest.approx(exact, rel=1e-6, abs=1e-12)
    mean_grad = exact_gradient(lm, weights, source_loss(lm.model, data["law"]))
    torch.testing.assert_close(passed.sketch, sketcher.project(mean_grad).float(), rtol=1e-4, atol=1e-7)
    assert all(m.weight.requires_grad for m in lm.model.modules() if isinstance(m, torch.nn.Linear))  # restored


def test_sketch__inner_products_unbiased_and_within_the_stated_error_over_seeds(lm: LoadedModel) -> None:
    spec = GradSpec(blocks=0)
    data = sources(lm, n=6)
    weights = {n: m.weight for n, m in chosen_layers(lm.model, spec).items()}
    g = exact_gradient(lm, weights, source_loss(lm.model, data["law"]))
    h = exact_gradient(lm, weights, source_loss(lm.model, data["chem"]))
    layer = max(weights, key=lambda n: float(g[n].norm() * h[n].norm()))  # one weight: the bound is per weight
    linear = {layer: chosen_layers(lm.model, spec)[layer]}
    r = 6  # rows of each side, well below the tiny model's 32 and 64
    bound = sketch_error_bound(r, r)
    for a, b in [(g[layer], h[layer]), (g[layer], g[layer])]:  # two domains, and a squared norm
        exact, scale = float((a * b).sum()), float(a.norm() * b.norm())
        errors = []
        for seed in range(1000):
            sketcher = Sketcher.build(linear, r, seed, lm.device)
            errors.append((float(sketcher.project({layer: a}) @ sketcher.project({layer: b})) - exact) / scale)
        errors = np.array(errors)
        assert sketcher.bound() == pytest.approx(bound)
        assert abs(errors.mean()) < 4 * errors.std() / np.sqrt(len(errors))  # unbiased
        # spread within the stated standard deviation; 1.2: the sample rms of 1000 draws exceeds the bound
        # by that factor less than once in 1000 where the bound is attained (rank-1 gradients, simulated)
        assert np.sqrt((errors**2).mean()) <= 1.2 * bound
        assert errors.std() > 0.01  # the sketch really is random, not exact


def test_transfer__exact_cosines_when_the_sketch_keeps_every_dimension(lm: LoadedModel) -> None:
    spec = GradSpec(blocks=0, sketch=4096, batches=2, batch_size=2)  # >= every width: projections are identities
    data = sources(lm, n=4)
    result = grad_forecast(lm, "math", data, spec, batch_tokens=256, seed=SEED)
    weights = {n: m.weight for n, m in chosen_layers(lm.model, spec).items()}
    domains = ["law", "chem", "code"]
    flat = torch.stack(
        [torch.cat([v.flatten() for v in exact_gradient(lm, weights, source_loss(lm.model, data[d])).values()])
         for d in domains]
    )  # fmt: skip
    unit = flat / flat.norm(dim=1, keepdim=True)
    assert result.transfer is not None and result.transfer.domains == domains
    np.testing.assert_allclose(result.transfer.matrix, (unit @ unit.T).numpy(), atol=1e-5)
    assert result.cost.backward_tokens > 0


def test_grad__second_run_reads_the_cache(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import mixopt.gradients

    spec = GradSpec(blocks=1, batches=2, batch_size=2)
    first = grad_forecast(lm, "math", sources(lm, n=3), spec, batch_tokens=256, seed=SEED)

    def no_backward(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached grad forecast must not run a backward pass")

    monkeypatch.setattr(mixopt.gradients, "source_gradients", no_backward)
    monkeypatch.setattr(mixopt.gradients, "update_direction", no_backward)
    second = grad_forecast(lm, "math", sources(lm, n=3), spec, batch_tokens=256, seed=SEED)
    assert {n: f.value for n, f in second.sources.items()} == {n: f.value for n, f in first.sources.items()}
    assert first.cost.backward_tokens > 0 and first.cost.seconds > 0
    assert second.cost == first.cost  # what computing it cost is kept with the cache entry


def test_grad__modules_matching_nothing_is_a_recipe_error(lm: LoadedModel) -> None:
    from mixopt.errors import RecipeError

    with pytest.raises(RecipeError, match="sts.grad.modules.*matches no linear layer"):
        chosen_layers(lm.model, GradSpec(modules=["mlp.nothing_*"]))
