"""Model: load a causal LM + tokenizer, and run its forward pass only up to the hooked layer.

Sources: a built-in alias (the embedded SmolLM2-135M-Instruct), a hub id, a local folder, or a `.gguf`
file; all go through `transformers.AutoModelForCausalLM.from_pretrained`. A GGUF model is dequantized
once and cached as safetensors under `$MIXOPT_CACHE` (default ~/.cache/mixopt), since dequantizing costs
~13 s per load on a laptop CPU.

Example:
    >>> from mixopt.recipe import ModelSpec
    >>> lm = load_model(ModelSpec(path="smollm2-135m-instruct"))        # doctest: +SKIP
    >>> ids = torch.tensor([lm.tokenizer("Hello").input_ids])          # doctest: +SKIP
    >>> residual_stream(lm.model, ids, torch.ones_like(ids), layer=20).shape  # doctest: +SKIP
    torch.Size([1, 1, 576])
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixopt.artifacts import BUILTIN_MODELS, builtin_gguf, dense_copy_dir, hub_offline, require_hub
from mixopt.encoding import PromptFormat, prompt_format
from mixopt.errors import ModelError
from mixopt.files import files_fingerprint
from mixopt.placement import Placement, auto_placement
from mixopt.quiet import quiet_libraries
from mixopt.recipe import ModelSpec


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizerBase (untyped library: Any at the boundary)
    name: str  # what the recipe said (alias, id, path)
    identity: str  # content fingerprint of the weights, for caches and the manifest
    device: torch.device
    dtype: torch.dtype
    format: PromptFormat | None = None  # how prompt/response examples are rendered; None: `prompt_format` default

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def resolve_device(device: str) -> torch.device:
    if device == "auto":  # under torchrun / accelerate launch: this rank's own GPU
        from mixopt.distributed import local_device

        return local_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is '{device}' but CUDA is not available here; use 'auto' or 'cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 halves memory and is fast on GPUs; CPUs are fastest and exact in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _dense_copy_of_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model once into the cache as safetensors; later loads take ~0.1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = dense_copy_dir(gguf)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dense now; save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        staged = Path(tmp) / "model"
        staged.mkdir()
        for item in Path(tmp).iterdir():
            if item != staged:
                shutil.move(str(item), staged / item.name)
        if not target.exists():  # another process may have won the race; both copies are equal
            os.replace(staged, target)
    return target


def resolve_model_source(spec: ModelSpec, base_dir: Path) -> tuple[str, str]:
    """(folder or hub id to load, identity fingerprint)."""
    if spec.path in BUILTIN_MODELS:
        gguf = builtin_gguf(spec.path)
        return str(_dense_copy_of_gguf(gguf)), f"{spec.path}:{files_fingerprint([gguf])}"
    local = (base_dir / os.path.expanduser(spec.path)).resolve()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"model.path: GGUF file not found: {local}")
        return str(_dense_copy_of_gguf(local)), f"{local.name}:{files_fingerprint([local])}"
    if local.is_dir():
        weights = [p for p in local.iterdir() if p.suffix in {".safetensors", ".bin", ".json"}]
        return str(local), f"{local.name}:{files_fingerprint(weights)}"
    if spec.path.startswith((".", "/", "~")):
        raise ModelError(f"model.path: folder not found: {local} (relative paths resolve against the recipe)")
    return spec.path, f"{spec.path}@{spec.revision or 'main'}"


def load_model(spec: ModelSpec, base_dir: Path | None = None) -> LoadedModel:
    """Load model and tokenizer for inference on the recipe's device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # mixopt draws its own bars; a per-load weight bar is noise
    source, identity = resolve_model_source(spec, base_dir or Path.cwd())
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)

    def load(local_only: bool) -> tuple[Any, Any, Placement]:
        with quiet_libraries():
            options = {"revision": spec.revision, "local_files_only": local_only}
            placement = Placement(device)
            if spec.device == "auto" and device.type == "cuda":  # a model too big for one GPU is spread
                placement = auto_placement(source, dtype, options)
            spread = {"device_map": placement.device_map, "max_memory": placement.max_memory}
            return (
                AutoTokenizer.from_pretrained(source, **options),
                AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options, **spread),
                placement,
            )

    hub = not Path(source).is_dir()
    try:
        try:  # a hub id: the local cache first, with no network round trip; offline it is all there is
            tokenizer, model, placement = load(local_only=hub)
        except OSError:
            if not hub or hub_offline():
                raise
            require_hub(f"model '{spec.path}'", ModelError)
            tokenizer, model, placement = load(local_only=False)
    except OSError as err:
        hint = " (HF_HUB_OFFLINE is set: download it first, or use a local folder)" if hub and hub_offline() else ""
        raise ModelError(f"cannot load model '{spec.path}': {' '.join(str(err).split())}{hint}") from None
    if placement.device_map is None:  # accelerate placed a spread model's layers itself
        model.to(placement.device)
    model.eval()
    fmt = prompt_format(tokenizer, spec.format)
    return LoadedModel(model, tokenizer, spec.path, identity, placement.device, dtype, fmt)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (Llama/Mistral/Qwen/Gemma: model.layers; GPT-2: transformer.h)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module: object = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}; mixopt supports decoder-only LMs")


def check_layer(model: nn.Module, layer: int) -> None:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ModelError(f"sae.layer {layer} is out of range: the model has blocks 0..{n - 1}")


class _Stop(Exception):
    """Raised by the hook to end the forward pass once the hooked block has run."""


@torch.inference_mode()
def residual_stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    prefix: Any | None = None,
) -> torch.Tensor:
    """Residual stream after block `layer` (= `hidden_states[layer + 1]`), computing no later block.

    A forward hook captures the block's output and stops the pass: ~3x cheaper than
    `output_hidden_states=True` at three quarters depth, and unlike lowering `num_hidden_layers`
    it does not apply the final norm.  `prefix` (from `prefix_cache`) is a shared context every row
    continues, e.g. in-context demonstrations: computed once, not once per row.
    Shapes: ids (batch, seq) -> (batch, seq, d_model), positions of `input_ids` only.
    """
    return residual_streams(model, input_ids, attention_mask, [layer], prefix)[layer]


@torch.inference_mode()
def residual_streams(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: list[int],
    prefix: Any | None = None,
) -> dict[int, torch.Tensor]:
    """`residual_stream` at several layers from ONE forward pass, which stops after the deepest of them.

    Shapes: ids (batch, seq) -> {layer: (batch, seq, d_model)}.
    """
    blocks = decoder_layers(model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def capture_at(layer: int) -> Callable[[nn.Module, object, object], None]:
        def capture(_module: nn.Module, _inputs: object, output: object) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _Stop

        return capture

    cache = None
    if prefix is not None:  # each call extends its own copy, so the prefix stays reusable
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(input_ids.shape[0])
    handles = [blocks[layer].register_forward_hook(capture_at(layer)) for layer in sorted(set(layers))]
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **_cache_kwarg(model, cache),
        )
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _cache_kwarg(model: nn.Module, cache: Any | None) -> dict[str, Any]:
    """transformers >= 5.24 names the argument `cache`; earlier versions `past_key_values`."""
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@torch.inference_mode()
def prefix_cache(model: nn.Module, prefix_ids: list[int], layer: int, device: torch.device) -> Any:
    """Keys and values of `prefix_ids` for blocks 0..layer (a transformers DynamicCache), batch size 1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)
    block = decoder_layers(model)[layer]

    def stop(*_: object) -> None:
        raise _Stop

    handle = block.register_forward_hook(stop)
    try:
        model(input_ids=ids, use_cache=True, **_cache_kwarg(model, cache))
    except _Stop:
        pass
    finally:
        handle.remove()
    return cache
