"""SAE training data: the recipe's corpus, labelled by source, and its residual activations cached on disk.

The cache is keyed by model, corpus and tokenization, not by layer or token count, so:
- it resumes: shards are written atomically, one group of `CHUNK` corpus examples each;
- it extends: raising `training.tokens` collects further shards after the ones on disk;
- several layers come from one forward pass (`collect_layers`), which stops after the deepest of them;
- each token carries its example's index and source label, which splits held-out data by example and
  lets quality.json measure how monosemantic the latents are.

Layout: `store.json` (shard size, corpus size, label names), `tokens/shard_i.npz` (per token: example
index, label index) and `layer_L/shard_i.npy` (fp16, (tokens, d_model)). Shard i holds the counted tokens of
examples [i * CHUNK, (i + 1) * CHUNK) of the seeded corpus order.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mixopt.batching import length_batches, pad_right
from mixopt.encoding import Encoded, encode_chat, encode_text
from mixopt.files import Digest, atomic_write, files_fingerprint, write_json
from mixopt.model import LoadedModel, residual_streams
from mixopt.recipe import CorpusSpec, SAETrainRecipe, SourceSpec
from mixopt.sources import check_columns, describe, load_source, render

CHUNK = 256  # examples per shard: small enough to lose little on a crash
SEPARATORS = "_-."


@dataclass
class Corpus:
    """The encoded corpus in its seeded order, with each example's source label."""

    encoded: list[Encoded]
    labels: np.ndarray  # (examples,) int16 index into `label_names`
    label_names: list[str]


def _common_suffix(stems: list[str]) -> str:
    """The file-name tail every stem shares, cut at a separator ("_test" of "anatomy_test", "law_test")."""
    if len(stems) < 2:
        return ""
    tail = os.path.commonprefix([s[::-1] for s in stems])[::-1]
    cut = min((tail.find(c) for c in SEPARATORS if c in tail), default=-1)
    return "" if cut < 0 else tail[cut:]


def labelled_sources(corpus: CorpusSpec, base_dir: Path) -> list[tuple[str, CorpusSpec]]:
    """(label, corpus spec) per label: the whole source, or each of its files with `label_by_file`."""
    files = corpus.source.paths(base_dir)
    name = corpus.name or (files[0].stem if files else str(corpus.source.hub).replace("/", "."))
    if not corpus.label_by_file or len(files) < 2:
        return [(name, corpus)]
    suffix = _common_suffix([f.stem for f in files])
    return [
        (f"{name}:{f.stem[: len(f.stem) - len(suffix)]}", corpus.model_copy(update={"source": _one_file(corpus, f)}))
        for f in files
    ]


def _one_file(corpus: CorpusSpec, file: Path) -> SourceSpec:
    return corpus.source.model_copy(update={"path": str(file)})


def corpus_encodings(recipe: SAETrainRecipe, lm: LoadedModel) -> Corpus:
    """Every corpus example encoded, interleaved in a seeded order so any prefix mixes all sources."""
    encoded: list[Encoded] = []
    labels: list[int] = []
    names: list[str] = []
    max_len = recipe.training.max_length
    for i, corpus in enumerate(recipe.data):
        for label, part in labelled_sources(corpus, recipe.base_dir):
            ds = load_source(part.source, recipe.base_dir, part.max_examples)  # a streamed source: its head only
            check_columns(ds, part, f"data.{i} ({describe(part.source)})")
            rows = render(ds.select(range(min(len(ds), part.max_examples or len(ds)))), part)
            if label not in names:
                names.append(label)
            for row in rows:
                encoded.append(
                    encode_chat(lm.tokenizer, row["prompt"], row["response"], max_len, lm.format)
                    if part.is_chat
                    else encode_text(lm.tokenizer, row["text"], max_len, lm.format)
                )
                labels.append(names.index(label))
    order = np.random.default_rng(recipe.seed).permutation(len(encoded))
    return Corpus([encoded[i] for i in order], np.asarray(labels, dtype=np.int16)[order], names)


def activation_key(recipe: SAETrainRecipe, model_identity: str) -> str:
    """Activations depend on model, corpus (its files' contents, not where they lie) and tokenization;
    not on the layer, the SAE's shape or `tokens`: sweeps, other layers and longer runs share them."""
    data = [d.model_dump(mode="json", exclude={"source": {"path"}}) for d in recipe.data]
    contents = [files_fingerprint(d.source.paths(recipe.base_dir)) for d in recipe.data]
    fields = {
        "model": model_identity,
        "data": data,
        "contents": contents,
        "seed": recipe.seed,
        "max_length": recipe.training.max_length,
    }
    return Digest().add(fields).hex(16)


@dataclass
class Activations:
    """One layer's cached activations with, per token, its example's index and source label."""

    acts: torch.Tensor  # (tokens, d_model) fp16
    examples: np.ndarray  # (tokens,) int32 corpus-order example index
    labels: np.ndarray  # (tokens,) int16 index into label_names
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class ActivationStore:
    folder: Path

    def _meta(self) -> dict:
        path = self.folder / "store.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def shard_tokens(self) -> list[int]:
        """Tokens in each complete token shard, in order."""
        paths = sorted((self.folder / "tokens").glob("shard_*.npz"))
        return [len(np.load(p)["examples"]) for p in paths]

    def layer_shards(self, layer: int) -> int:
        return len(list((self.folder / f"layer_{layer}").glob("shard_*.npy")))

    def shards_for(self, tokens: int) -> int:
        """Shards whose tokens first reach `tokens` (all of them if they fall short)."""
        cumulative = np.cumsum(self.shard_tokens())
        return min(len(cumulative), int(np.searchsorted(cumulative, tokens)) + 1)

    def complete(self, layers: list[int], tokens: int) -> bool:
        """The cache holds `tokens` (or the whole corpus) at every layer."""
        meta, sizes = self._meta(), self.shard_tokens()
        if not meta:
            return False
        needed = self.shards_for(tokens) if sum(sizes) >= tokens else math.ceil(meta["examples"] / meta["chunk"])
        return all(self.layer_shards(layer) >= needed for layer in layers)

    def load(self, layer: int, tokens: int, holdout: float) -> tuple[Activations, Activations]:
        """(train, held-out) activations of the first shards of `layer` that hold `tokens` (all shards
        collected so far if fewer). Every round(1/holdout)-th example of the seeded corpus order is held
        out, so the held-out set stays held out when the cache grows. Each part is filled in place: peak
        memory is the activations once (GBs for millions of tokens)."""
        n = min(self.shards_for(tokens), self.layer_shards(layer))
        meta = [np.load(self.folder / "tokens" / f"shard_{i:05d}.npz") for i in range(n)]
        examples = np.concatenate([m["examples"] for m in meta]) if meta else np.zeros(0, np.int32)
        labels = np.concatenate([m["labels"] for m in meta]) if meta else np.zeros(0, np.int16)
        period = max(2, round(1 / holdout))
        held = examples % period == period - 1
        offsets = np.cumsum([0] + [len(m["examples"]) for m in meta])
        shards = [np.load(self.folder / f"layer_{layer}" / f"shard_{i:05d}.npy", mmap_mode="r") for i in range(n)]
        width = shards[0].shape[1] if shards else 0
        parts = []
        for mask in (~held, held):
            acts = np.empty((int(mask.sum()), width), dtype=np.float16)  # (tokens, d_model)
            filled = 0
            for i, shard in enumerate(shards):
                rows = mask[offsets[i] : offsets[i + 1]]
                acts[filled : filled + rows.sum()] = shard[rows]
                filled += int(rows.sum())
            parts.append(Activations(torch.from_numpy(acts), examples[mask], labels[mask], self._meta()["labels"]))
        return parts[0], parts[1]

    def write_shard(self, i: int, acts: dict[int, np.ndarray], examples: np.ndarray, labels: np.ndarray) -> None:
        """Token metadata first, then each layer's activations: a crash leaves whole files only."""
        meta = self.folder / "tokens" / f"shard_{i:05d}.npz"
        if not meta.exists():
            _save(meta, {"examples": examples, "labels": labels})
        for layer, block in acts.items():
            _save(self.folder / f"layer_{layer}" / f"shard_{i:05d}.npy", block.astype(np.float16))


def _save(path: Path, data: np.ndarray | dict[str, np.ndarray]) -> None:
    """An .npy array or .npz archive, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            if isinstance(data, dict):
                np.savez(f, **data)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
            else:
                np.save(f, data)

    atomic_write(path, write)


def collect_activations(recipe: SAETrainRecipe, lm: LoadedModel, corpus: Corpus, store: ActivationStore) -> None:
    """Run the truncated forward over the corpus until every layer of `recipe.layers` holds
    `training.tokens` activations; resumes and extends. A layer behind the others catches up first."""
    store.folder.mkdir(parents=True, exist_ok=True)
    meta = {"chunk": CHUNK, "examples": len(corpus.encoded), "labels": corpus.label_names}
    write_json(store.folder / "store.json", meta)
    total, layers = recipe.training.tokens, recipe.layers
    n_shards = math.ceil(len(corpus.encoded) / CHUNK)
    sizes = store.shard_tokens()
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"activations, layers {layers}")
    while True:
        done = {layer: store.layer_shards(layer) for layer in layers}
        i = min(done.values())
        if i >= n_shards or sum(sizes[:i]) >= total:  # corpus used up, or every layer holds `total` tokens
            break
        behind = [layer for layer in layers if done[layer] == i]
        bar.n = min(total, sum(sizes[:i]))
        bar.refresh()
        acts, examples, labels = _forward_shard(recipe, lm, corpus, i, behind)
        store.write_shard(i, acts, examples, labels)
        if i == len(sizes):
            sizes.append(len(examples))
    bar.n = min(total, sum(sizes))
    bar.close()


def _forward_shard(
    recipe: SAETrainRecipe, lm: LoadedModel, corpus: Corpus, shard: int, layers: list[int]
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Counted-token activations of one shard's examples at `layers`, with each token's example and label."""
    first = shard * CHUNK
    group = corpus.encoded[first : first + CHUNK]
    acts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    examples: list[np.ndarray] = []
    for batch in length_batches([len(e) for e in group], recipe.training.batch_tokens):
        ids, mask = pad_right([group[i].ids for i in batch], lm.tokenizer.pad_token_id or 0, lm.device)
        resid = residual_streams(lm.model, ids, mask, layers)  # {layer: (batch, seq, d_model)}
        counted = torch.zeros_like(mask, dtype=torch.bool)
        for b, i in enumerate(batch):
            counted[b, : len(group[i])] = torch.tensor(group[i].counted)
            examples.append(np.full(sum(group[i].counted), first + i, dtype=np.int32))
        for layer in layers:
            acts[layer].append(resid[layer][counted].float().cpu().numpy())  # (counted tokens, d_model)
    example_ids = np.concatenate(examples)
    return {layer: np.concatenate(a) for layer, a in acts.items()}, example_ids, corpus.labels[example_ids]
