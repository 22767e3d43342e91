"""Evaluate: per-item capability metrics on multiple-choice items, and the statistics that say which
changes are signal (bootstrap errors, split-half reliability, correlations with intervals).

Metrics of one item (question q, choices c_1..c_n, correct choice a), all read from next-token log-probs
in the model's prompt format (its chat template, or plain text for a base model), content tokens only:
- `answer_nll`:  mean over the reply's tokens of -log p(token), prompt = q with lettered choices, reply = c_a
- `cloze_nll`:   the same with prompt = q alone (the choices are not shown)
- `letter_mass`: sum over letters L of p(L | prompt = q with choices, reply start "Answer:")
- `accuracy`:    1 if the correct letter has the highest logit among the letters, else 0
- `letter_nll`:  -log p(correct letter) at the same position (unnormalised: mass off the letters counts)
One model-facing function (`next_token_logprobs`) runs the forwards; everything else is pure.

Example:
    >>> lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]]), -1)[0]
    >>> letter_metrics(lp[[0, 1, 2, 3]].numpy(), answer=0)["accuracy"]
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mixopt.batching import length_batches, pad_right
from mixopt.encoding import PromptFormat, encode_chat
from mixopt.errors import ModelError
from mixopt.files import text_digest
from mixopt.model import LoadedModel

METRICS = ("answer_nll", "cloze_nll", "letter_mass", "accuracy", "letter_nll")
HIGHER_IS_BETTER = {"answer_nll": False, "cloze_nll": False, "letter_mass": True, "accuracy": True, "letter_nll": False}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REPLY_START = "Answer:"  # the letter is read at the token after this, e.g. "Answer: B"


def content_key(text: str, seed: int = 0) -> str:
    """sha256 of `seed` and the text: equal on every process and machine (the built-in hash is salted)."""
    return text_digest(f"{seed}\x00{text}").hex()


def normalized(text: str) -> str:
    """Text compared for overlap: case and whitespace runs do not matter."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class MCQItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the correct choice

    @property
    def text(self) -> str:
        """What the content hash covers: the question and its choices."""
        return "\n".join([self.question, *self.choices])

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]

    @property
    def prompt(self) -> str:
        """The question with lettered choices, as the model sees it for `answer_nll` and the letters."""
        return "\n".join([self.question, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))])


def parse_answer(value: str, n_choices: int) -> int:
    """The correct choice's index from a letter ("B", "b", "B.") or a 0-based index ("1"); ValueError if neither."""
    text = value.strip().rstrip(".").strip()
    if len(text) == 1 and text.upper() in LETTERS[:n_choices]:
        return LETTERS.index(text.upper())
    if text.isdigit() and int(text) < n_choices:
        return int(text)
    raise ValueError(f"answer '{value}' is not a letter A-{LETTERS[n_choices - 1]} or an index 0-{n_choices - 1}")


# ---------------------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """One forward's worth of reading: the log-probs of `targets[i]` as the token after `positions[i]`.

    A query may hold two branches (`branched`): tokens from `branch_start` on continue the first `shared`
    tokens, so they see that prefix and their own branch only, at the positions they would have alone.
    """

    ids: list[int]
    positions: list[int]
    targets: list[list[int]]  # the candidate ids read at each position
    branch_start: int | None = None
    shared: int = 0

    def position_ids(self) -> list[int]:
        if self.branch_start is None:
            return list(range(len(self.ids)))
        return [*range(self.branch_start), *range(self.shared, self.shared + len(self.ids) - self.branch_start)]

    def visible(self, width: int) -> torch.Tensor:
        """(width, width) bool: may token i attend to token j; padding rows see only themselves."""
        t = torch.arange(width)
        i, j = t[:, None], t[None, :]
        real = t < len(self.ids)
        allowed = (j <= i) & real[:, None] & real[None, :]
        if self.branch_start is not None:
            in_branch = t >= self.branch_start
            allowed &= ~(in_branch[:, None] & ~in_branch[None, :] & (j >= self.shared))
        return allowed | torch.eye(width, dtype=torch.bool)


def branched(first: Query, second: Query) -> Query:
    """`first` and `second` in one forward: `second`'s tokens after the prefix they share are appended as a
    branch that sees that prefix only (tree attention). The prompt is run once instead of twice, and every
    read log-prob equals the one its own query would give."""
    shared = 0
    while shared < min(len(first.ids), len(second.ids)) and first.ids[shared] == second.ids[shared]:
        shared += 1
    start = len(first.ids)
    moved = [p if p < shared else start + p - shared for p in second.positions]
    return Query(
        first.ids + second.ids[shared:],
        first.positions + moved,
        first.targets + second.targets,
        branch_start=start,
        shared=shared,
    )


def reply_query(
    tokenizer: object, prompt: str, reply: str, max_length: int, fmt: PromptFormat | None = None
) -> Query | None:
    """Read the reply's own tokens (teacher forcing); None if the example is longer than `max_length`.
    `fmt`: the model's prompt format (default: its chat template, else plain text)."""
    enc = encode_chat(tokenizer, prompt, reply, 1 << 30, fmt)
    if len(enc) > max_length:
        return None
    where = [t for t, is_reply in enumerate(enc.response) if is_reply and t > 0]
    if not where:
        raise ModelError(f"reply '{reply[:40]}' has no tokens after encoding; the item cannot be scored")
    return Query(enc.ids, [t - 1 for t in where], [[enc.ids[t]] for t in where])


def letter_query(
    tokenizer: object, prompt: str, n_choices: int, max_length: int, fmt: PromptFormat | None = None
) -> Query | None:
    """Read the letters' log-probs after the reply start "Answer:" (one position, one candidate per letter)."""
    replies = [f"{REPLY_START} {LETTERS[i]}" for i in range(n_choices)]
    encodings = [encode_chat(tokenizer, prompt, reply, 1 << 30, fmt).ids for reply in replies]
    prefix = 0
    while all(len(e) > prefix for e in encodings) and len({e[prefix] for e in encodings}) == 1:
        prefix += 1  # the token ids all choices share: template, prompt, "Answer:" (and a lone space)
    letters = [e[prefix] if len(e) > prefix else -1 for e in encodings]
    if prefix == 0 or len(set(letters)) != n_choices or -1 in letters:
        raise ModelError(
            "the tokenizer does not give each answer letter its own token after 'Answer:'; "
            "letter metrics need single-token letters"
        )
    if prefix > max_length:
        return None
    return Query(encodings[0][:prefix], [prefix - 1], [letters])


@torch.inference_mode()
def next_token_logprobs(
    lm: LoadedModel, queries: Sequence[Query], batch_tokens: int, desc: str
) -> list[list[np.ndarray]]:
    """For each query, for each read position, the log-probs of its candidate ids as the next token.

    Only the read positions go through the LM head (`logits_to_keep` as a boolean mask, transformers >= 5):
    a 49k-token vocabulary at every position would cost more memory than the model itself. The attention
    mask is explicit (additive, 4D) so that branched queries share their prompt.
    """
    out: list[list[np.ndarray]] = [[] for _ in queries]
    with tqdm(total=sum(len(q.ids) for q in queries), unit="tok", unit_scale=True, desc=desc, leave=False) as bar:
        for batch in length_batches([len(q.ids) for q in queries], batch_tokens):
            rows = [queries[i] for i in batch]
            ids, _ = pad_right([q.ids for q in rows], lm.tokenizer.pad_token_id or 0, lm.device)
            width = ids.shape[1]
            positions, _ = pad_right([q.position_ids() for q in rows], 0, lm.device)
            visible = torch.stack([q.visible(width) for q in rows])[:, None].to(lm.device)
            mask = torch.zeros(visible.shape, dtype=lm.dtype, device=lm.device)
            mask.masked_fill_(~visible, torch.finfo(lm.dtype).min)
            kept = [sorted(set(q.positions)) for q in rows]
            keep = torch.zeros_like(ids, dtype=torch.bool)
            for b, where in enumerate(kept):
                keep[b, where] = True
            logits = lm.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
            ).logits
            logprobs = logits.reshape(-1, logits.shape[-1]).float().log_softmax(-1)  # (kept positions, vocab)
            start = 0  # boolean indexing keeps row-major order: row by row, positions ascending
            for i, q, where in zip(batch, rows, kept, strict=True):
                row_of = {p: start + n for n, p in enumerate(where)}
                read = torch.tensor([row_of[p] for p, t in zip(q.positions, q.targets, strict=True) for _ in t])
                values = logprobs[read, torch.tensor([c for t in q.targets for c in t])].cpu().numpy()
                out[i] = np.split(values, np.cumsum([len(t) for t in q.targets])[:-1])
                start += len(where)
            bar.update(sum(len(q.ids) for q in rows))
    return out


# ---------------------------------------------------------------------------------------- metrics


def reply_nll(reads: Sequence[np.ndarray]) -> float:
    """Mean negative log-likelihood per reply token; `reads` holds one (1,) array per reply token."""
    return float(-np.concatenate(reads).mean())


def letter_metrics(letter_logprobs: np.ndarray, answer: int) -> dict[str, float]:
    """`letter_mass`, `accuracy` and `letter_nll` from the letters' log-probs, (n_choices,)."""
    lp = np.asarray(letter_logprobs, dtype=np.float64).reshape(-1)
    return {
        "letter_mass": float(np.exp(lp).sum()),
        "accuracy": float(np.argmax(lp) == answer),
        "letter_nll": float(-lp[answer]),
    }


def score_items(
    lm: LoadedModel, items: Sequence[MCQItem], max_length: int, batch_tokens: int, desc: str = "evaluate"
) -> dict[str, np.ndarray]:
    """Every metric for every item, (items,) each; NaN for an item longer than `max_length` tokens.
    The answer-text and letter queries share their prompt, so they run as one branched forward."""
    answer, cloze, letters = [], [], []
    for item in items:
        answer.append(reply_query(lm.tokenizer, item.prompt, item.answer_text, max_length, lm.format))
        cloze.append(reply_query(lm.tokenizer, item.question, item.answer_text, max_length, lm.format))
        letters.append(letter_query(lm.tokenizer, item.prompt, len(item.choices), max_length, lm.format))
    usable = [i for i in range(len(items)) if answer[i] and cloze[i] and letters[i]]
    queries = [q for i in usable for q in (branched(answer[i], letters[i]), cloze[i])]  # type: ignore[arg-type]
    logprobs = next_token_logprobs(lm, queries, batch_tokens, desc)
    values = {m: np.full(len(items), np.nan) for m in METRICS}
    for n, i in enumerate(usable):
        (*answer_reads, letter), cloze_reads = logprobs[2 * n], logprobs[2 * n + 1]
        values["answer_nll"][i] = reply_nll(answer_reads)
        values["cloze_nll"][i] = reply_nll(cloze_reads)
        for name, value in letter_metrics(letter, items[i].answer).items():
            values[name][i] = value
    return values


def score_replies(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], max_length: int, batch_tokens: int, desc: str = "held-out"
) -> np.ndarray:
    """Reply NLL of (prompt, reply) pairs, (pairs,); NaN for a pair longer than `max_length` tokens."""
    queries = [reply_query(lm.tokenizer, p, r, max_length, lm.format) for p, r in pairs]
    usable = [i for i, q in enumerate(queries) if q is not None]
    logprobs = next_token_logprobs(lm, [queries[i] for i in usable], batch_tokens, desc)
    values = np.full(len(pairs), np.nan)
    for i, reads in zip(usable, logprobs, strict=True):
        values[i] = reply_nll(reads)
    return values
