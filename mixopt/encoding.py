"""Encoding: an example -> token ids, with masks of the tokens that count.

Only the *content* of an example counts (its prompt and response text): chat-template text, BOS and
other special tokens are never scored (DESIGN.md section 3). Masks come from the fast tokenizer's
character offsets, so they are exact whatever the template.

A prompt/response example is rendered in the model's `PromptFormat`: its tokenizer's chat template, or
plain text (prompt + separator + response, with the tokenizer's BOS) for a base model, which has none.
In-context demonstrations are the same renderings, each followed by the format's joiner.

Example:
    >>> enc = encode_chat(tokenizer, "2+2?", "4", max_length=512)   # doctest: +SKIP
    >>> sum(enc.counted), sum(enc.response)                        # doctest: +SKIP
    (5, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixopt.errors import ModelError
from mixopt.files import Digest

if TYPE_CHECKING:
    from mixopt.recipe import FormatSpec

Span = tuple[int, int, bool]  # (start, end, is_response): a content span of a rendered text, in characters


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    counted: list[bool]  # content tokens: scored
    response: list[bool]  # response tokens: what a trainer puts loss on (all content for plain text)
    # Where the example's own turn starts: ids before it are the conversation's head (the template's system
    # block, or BOS), which an ICL input has once, before the demonstrations (DESIGN.md section 3, step 1).
    turn_start: int = 0

    @property
    def turn(self) -> Encoded:
        """The example's own turn: what follows the demonstrations in an ICL input."""
        return Encoded(self.ids[self.turn_start :], self.counted[self.turn_start :], self.response[self.turn_start :])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_counted(self) -> int:
        return sum(self.counted)


def loss_digest(examples: list[Encoded]) -> str:
    """Content key of examples as a trainer or a loss sees them: their exact ids and response masks."""
    key = Digest()
    for e in examples:
        key.add([e.ids, e.response])
    return key.hex()


def has_chat_template(tokenizer: object) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class PromptFormat:
    """How prompt/response examples become one text: the tokenizer's chat template (`chat`), or plain text:
    prompt + `separator` + response, an in-context demonstration followed by `joiner`."""

    chat: bool
    separator: str = "\n"
    joiner: str = "\n\n"


def prompt_format(tokenizer: object, spec: FormatSpec | None = None) -> PromptFormat:
    """The recipe's `model.format` resolved for this tokenizer. `auto` (the default) takes the chat template
    when the tokenizer has one and plain text otherwise: a base model has no other way to be prompted, and
    an error would make every base-model recipe restate it. `chat` without a template is an error."""
    kind, separator, joiner = (spec.kind, spec.separator, spec.joiner) if spec else ("auto", "\n", "\n\n")
    template = has_chat_template(tokenizer)
    if kind == "chat" and not template:
        raise ModelError(
            "model.format.kind is 'chat' but the model's tokenizer has no chat template (a base model); "
            "set model.format.kind to plain (or auto)"
        )
    return PromptFormat(template and kind != "plain", separator, joiner)


def _render_plain(turns: list[tuple[str, str]], fmt: PromptFormat) -> tuple[str, list[Span]]:
    """prompt + separator + response per turn, turns joined by the joiner; spans exact by construction (a
    search could find the response inside the separator, e.g. "A" in "\nAnswer: "). A turn with no response
    (a plain-text demonstration) is its prompt alone."""
    text, spans = "", []
    for i, (prompt, response) in enumerate(turns):
        text += fmt.joiner if i else ""
        spans.append((len(text), len(text) + len(prompt), False))
        text += prompt
        if response:
            text += fmt.separator
            spans.append((len(text), len(text) + len(response), True))
            text += response
    return text, spans


def render_chat(
    tokenizer: object, turns: list[tuple[str, str]], fmt: PromptFormat | None = None
) -> tuple[str, list[Span]]:
    """Render (prompt, response) turns as one string in `fmt` (default: `prompt_format(tokenizer)`); also
    each content span (start, end, is_response)."""
    fmt = fmt or prompt_format(tokenizer)
    if not fmt.chat:
        return _render_plain(turns, fmt)
    messages = [m for p, r in turns for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]
    text = tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[attr-defined]
    spans, cursor = [], 0
    for prompt, response in turns:
        for content, is_response in ((prompt, False), (response, True)):
            start = text.find(content, cursor)
            if start < 0:
                raise ModelError("the chat template altered the example text; mixopt cannot align its tokens")
            spans.append((start, start + len(content), is_response))
            cursor = start + len(content)
    return text, spans


def conversation_head(tokenizer: object, prompt: str, response: str, fmt: PromptFormat | None = None) -> int:
    """Characters of the rendered one-turn conversation that precede the turn itself (the template's system
    block). Found as what the turn does not repeat when it follows another turn: render([x, q]) =
    render([x]) + T(q), and render([q]) = head + T(q). 0 when the template is not append-only that way, and
    for plain text (its head is the BOS token, which `_tokenize` finds)."""
    fmt = fmt or prompt_format(tokenizer)
    if not fmt.chat:
        return 0
    text, _ = render_chat(tokenizer, [(prompt, response)], fmt)
    first, _ = render_chat(tokenizer, [("x", "y")], fmt)
    both, _ = render_chat(tokenizer, [("x", "y"), (prompt, response)], fmt)
    turn = both[len(first) :]
    return len(text) - len(turn) if both.startswith(first) and text.endswith(turn) else 0


def _tokenize(
    tokenizer: object, text: str, spans: list[Span], max_length: int, special: bool, head: int = 0
) -> Encoded:
    """Tokenize `text[:head]` and `text[head:]` separately and concatenate: the turn's ids do not depend on
    what precedes it, so they are identical after the head or after demonstrations. `special`: add the
    tokenizer's special tokens (BOS) in front, as plain text needs (a chat template carries its own)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("mixopt needs a fast tokenizer (character offsets); load one with use_fast=True")
    ids: list[int] = []
    counted, response = [], []
    turn_start = 0
    for offset, piece in ((0, text[:head]), (head, text[head:])):
        if not piece:
            continue
        if offset:
            turn_start = len(ids)
        enc = tokenizer(piece, add_special_tokens=special and not offset, return_offsets_mapping=True)  # type: ignore[operator]
        ids += enc["input_ids"]
        for start, end in enc["offset_mapping"]:
            start, end = start + offset, end + offset
            inside = [is_resp for s, e, is_resp in spans if start < e and end > s and end > start]
            counted.append(bool(inside))
            response.append(any(inside))
    if special:  # plain text: the leading special tokens (BOS) are the head
        turn_start = next((i for i, c in enumerate(counted) if c), 0)
    ids = ids[:max_length]
    return Encoded(ids, counted[: len(ids)], response[: len(ids)], min(turn_start, len(ids)))


def encode_chat(
    tokenizer: object, prompt: str, response: str, max_length: int, fmt: PromptFormat | None = None
) -> Encoded:
    """A prompt/response example in `fmt` (default: the chat template when the tokenizer has one, else plain)."""
    fmt = fmt or prompt_format(tokenizer)
    text, spans = render_chat(tokenizer, [(prompt, response)], fmt)
    return _tokenize(
        tokenizer, text, spans, max_length, not fmt.chat, conversation_head(tokenizer, prompt, response, fmt)
    )


def encode_text(tokenizer: object, text: str, max_length: int, fmt: PromptFormat | None = None) -> Encoded:
    """Plain text: every non-special token counts, and all of it is loss-bearing. It gets the tokenizer's BOS
    when `fmt` is plain (the template's special tokens are not added to a chat model's text rows)."""
    fmt = fmt or prompt_format(tokenizer)
    return _tokenize(tokenizer, text, [(0, len(text), True)], max_length, not fmt.chat)


def encode_demonstrations(
    tokenizer: object, demos: list[tuple[str, str]], fmt: PromptFormat | None = None
) -> list[int]:
    """Ids of the in-context demonstrations, tokenized on their own so the query's ids never change. Plain
    text: each demonstration followed by the joiner, so prefix + query is their plain concatenation."""
    if not demos:
        return []
    fmt = fmt or prompt_format(tokenizer)
    text, spans = render_chat(tokenizer, demos, fmt)
    text += "" if fmt.chat else fmt.joiner
    return _tokenize(tokenizer, text, spans, 1 << 30, not fmt.chat).ids
