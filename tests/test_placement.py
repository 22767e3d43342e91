"""`model.device: auto` on GPUs: which device, or accelerate's device_map, for a model of a given size. The
choice is a pure function of free memory per GPU and model size, so it is tested here without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixopt.errors import ModelError
from mixopt.placement import GPU_SHARE, HEADROOM, choose_placement, model_bytes

GiB = 1 << 30


def test_no_gpu__places_the_model_on_the_cpu() -> None:
    assert choose_placement([], 10 * GiB).device == torch.device("cpu")


def test_a_model_that_fits_gpu_0__goes_there_whole() -> None:
    placement = choose_placement([24 * GiB, 80 * GiB], 14 * GiB)  # 14 x 1.2 = 16.8 <= 24
    assert placement.device == torch.device("cuda", 0) and placement.device_map is None


def test_a_model_too_big_for_gpu_0__goes_whole_to_the_gpu_with_most_free_memory() -> None:
    placement = choose_placement([12 * GiB, 40 * GiB, 30 * GiB], 14 * GiB)
    assert placement.device == torch.device("cuda", 1) and placement.device_map is None


def test_a_model_that_fits_no_single_gpu__is_spread_by_accelerate_over_all_of_them() -> None:
    free = [80 * GiB, 80 * GiB, 60 * GiB]
    placement = choose_placement(free, 140 * GiB, cpu_bytes=100 * GiB)  # a 70B model in bf16
    assert placement.device_map == "auto" and placement.device == torch.device("cuda", 0)
    assert placement.max_memory == {i: int(f * GPU_SHARE) for i, f in enumerate(free)}  # no CPU: GPUs suffice
    assert "spread over 3 GPUs" in placement.reason


def test_a_model_bigger_than_all_gpus__offloads_the_rest_to_the_cpu_or_says_what_to_change() -> None:
    free = [40 * GiB, 40 * GiB]
    offloaded = choose_placement(free, 100 * GiB, cpu_bytes=200 * GiB)
    assert offloaded.device_map == "auto" and offloaded.max_memory == {0: 36 * GiB, 1: 36 * GiB, "cpu": 200 * GiB}
    with pytest.raises(ModelError, match=r"does not fit the 2 GPUs \(80.0 GiB free in all\).*bfloat16"):
        choose_placement(free, 100 * GiB)


def test_the_boundary__is_weights_times_headroom() -> None:
    size = 10 * GiB
    fits = int(size * HEADROOM)
    assert choose_placement([fits, 0], size).device == torch.device("cuda", 0)
    assert choose_placement([fits - 1, fits], size).device == torch.device("cuda", 1)


def test_under_torchrun__each_rank_takes_its_own_gpu_and_never_spreads() -> None:
    assert choose_placement([20 * GiB, 20 * GiB], 10 * GiB, rank_gpu=1).device == torch.device("cuda", 1)
    with pytest.raises(ModelError, match="under torchrun each rank holds a whole model: run one process"):
        choose_placement([80 * GiB, 20 * GiB], 30 * GiB, rank_gpu=1)


def test_model_bytes__counts_the_weights_from_the_config_alone(tmp_path: Path) -> None:
    from tests.tiny import tiny_llama

    model = tiny_llama(vocab_size=400)
    model.save_pretrained(tmp_path)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once, as in memory
    assert model_bytes(str(tmp_path), torch.bfloat16, {}) == params * 2
    assert model_bytes(str(tmp_path), torch.float32, {}) == params * 4


def test_load_model__spreads_a_model_too_big_for_each_gpu_with_device_map_auto(tmp_path: Path, monkeypatch) -> None:
    """The wiring: on (pretend) GPUs too small for the model, from_pretrained gets accelerate's device_map."""
    import transformers

    from mixopt import model as model_module
    from mixopt import placement
    from mixopt.recipe import ModelSpec
    from tests.tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    size = model_bytes(str(tmp_path / "m"), torch.bfloat16, {})
    monkeypatch.setattr(model_module, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(placement, "gpu_free_memory", lambda: [size, size])  # each too small by the headroom
    seen: dict = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def capture(source, **kwargs):
        seen.update(kwargs)
        return real(source, dtype=kwargs["dtype"])  # no GPU here: load on the CPU, as if accelerate had placed it

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    lm = model_module.load_model(ModelSpec(path=str(tmp_path / "m"), dtype="bfloat16"))
    assert seen["device_map"] == "auto"
    assert seen["max_memory"] == {0: int(size * GPU_SHARE), 1: int(size * GPU_SHARE)}
    assert lm.device == torch.device("cuda", 0)
