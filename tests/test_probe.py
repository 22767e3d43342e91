"""The `probe` and `probe_act` forecasts on a tiny real Llama: a pilot fine-tune with validation's trainer,
checked against the trainer run by hand and per-example losses from unbatched forwards."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mixopt.encoding import Encoded
from mixopt.features import run_pass
from mixopt.finetune import finetune
from mixopt.model import LoadedModel, residual_stream
from mixopt.probe import Pilot, measured_shift, probe_act_forecast, probe_forecast, probe_schedule
from mixopt.recipe import ProbeSpec
from tests.tiny import chat_sources, tiny_lm, tiny_sae

SEED = 2
LAYER = 1


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_lm("tiny-probe", seed=4)


@pytest.fixture(scope="module")
def data(lm: LoadedModel) -> dict[str, list[Encoded]]:
    return chat_sources(lm.tokenizer, n=8)


def unbatched_losses(model: torch.nn.Module, examples: list[Encoded]) -> np.ndarray:
    """Each example's mean response-token loss from its own unpadded forward."""
    out = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.ids])
            reads = torch.tensor(e.response[1:])
            logits = model(input_ids=ids).logits[0, :-1]
            out.append(float(torch.nn.functional.cross_entropy(logits[reads], ids[0, 1:][reads])))
    return np.array(out)


def test_probe__zero_steps_forecasts_exactly_zero(lm: LoadedModel, data: dict) -> None:
    pilot = Pilot(lm, data["math"], ProbeSpec(steps=0), SEED)
    result = probe_forecast(lm, pilot, data, batch_tokens=256)
    assert pilot.trained  # the zero-step pilot really was built and measured, not skipped
    for forecast in result.sources.values():
        assert forecast.value == 0.0 and set(forecast.example_values) == {0.0}
    assert result.cost.train_steps == 0 and result.cost.train_tokens == 0


def test_probe__forecast_is_the_loss_change_of_the_trainer_run_by_hand(
    lm: LoadedModel, data: dict, tmp_path: Path
) -> None:
    spec = ProbeSpec(steps=4, batch_size=4, lr=3e-3)
    result = probe_forecast(lm, Pilot(lm, data["math"], spec, SEED), data, batch_tokens=256)
    by_hand = copy.deepcopy(lm.model)
    torch.manual_seed(SEED)
    trained = finetune(by_hand, data["math"], probe_schedule(spec), SEED, tmp_path, pad_id=lm.tokenizer.pad_token_id)
    by_hand.eval()
    for name, examples in data.items():
        change = unbatched_losses(by_hand, examples) - unbatched_losses(lm.model, examples)
        np.testing.assert_allclose(result.sources[name].example_values, change, rtol=1e-4, atol=1e-6)
        tokens = [sum(e.response[1:]) for e in examples]
        assert result.sources[name].example_tokens == tokens
        assert result.sources[name].value == pytest.approx(np.average(change, weights=tokens), abs=1e-6)
    assert result.sources["math"].value < 0  # training on math lowered its own loss
    cost = result.cost
    assert (cost.train_steps, cost.train_tokens) == (trained.steps, trained.tokens) and cost.train_seconds > 0


def test_probe__second_run_trains_nothing(lm: LoadedModel, data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mixopt.probe

    spec = ProbeSpec(steps=2, batch_size=2)
    first = probe_forecast(lm, Pilot(lm, data["math"], spec, SEED), data, batch_tokens=256)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached probe must not fine-tune")

    monkeypatch.setattr(mixopt.probe, "finetune", no_training)
    pilot = Pilot(lm, data["math"], spec, SEED)
    second = probe_forecast(lm, pilot, data, batch_tokens=256)
    assert not pilot.trained
    assert {n: f.example_values for n, f in second.sources.items()} == {
        n: f.example_values for n, f in first.sources.items()
    }
    assert second.cost.train_steps == 2  # the pilot's cost is kept with its cached results


def test_probe_act__identical_model_gives_zero_shift(lm: LoadedModel, data: dict) -> None:
    sae = tiny_sae(layer=LAYER)
    identity = {"model": "tiny-probe", "layer": LAYER, "sae": "tiny"}
    shift = measured_shift(lm, Pilot(lm, data["math"], ProbeSpec(steps=0), SEED), sae, identity, data["math"], 256)
    assert shift.n_tokens > 0
    assert float(shift.latents.total.abs().max()) == 0.0 and float(shift.resid.total.abs().max()) == 0.0


def test_probe_act__shift_is_the_squared_latent_change_token_by_token(lm: LoadedModel, data: dict) -> None:
    sae = tiny_sae(layer=LAYER)
    pilot = Pilot(lm, data["math"], ProbeSpec(steps=3, batch_size=4, lr=3e-3), SEED)
    identity = {"model": "tiny-probe", "layer": LAYER, "sae": "tiny"}
    shift = measured_shift(lm, pilot, sae, identity, data["math"], batch_tokens=256)
    expected = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad():
        for e in data["math"]:  # one unpadded example at a time, both models, the counted positions
            ids, counted = torch.tensor([e.ids]), torch.tensor(e.counted)
            before = sae.encode(residual_stream(lm.model, ids, None, LAYER)[0][counted])
            after = sae.encode(residual_stream(pilot.loaded().model, ids, None, LAYER)[0][counted])
            expected += (after - before).double().square().sum(0)
    torch.testing.assert_close(shift.latents.total, expected, rtol=1e-4, atol=1e-8)
    assert float(expected.max()) > 0
    stats = {name: run_pass(lm, sae, LAYER, ex, [], 256, name).stats for name, ex in data.items()}
    result = probe_act_forecast(shift, stats, k=5)
    top = torch.topk(expected, 5).indices
    for name, s in stats.items():  # the act formula on the measured top-k latents
        act = float(s.latents.total[top].sum() / s.n_tokens)
        assert result.sources[name].value == pytest.approx(act, rel=1e-5)
        weights = result.sources[name].example_tokens
        assert np.average(result.sources[name].example_values, weights=weights) == pytest.approx(act, rel=1e-5)
