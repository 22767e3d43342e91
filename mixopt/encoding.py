"""Encoding: an example -> token ids, with masks of the tokens that count.

Only the *content* of an example counts (its prompt and response text): chat-template text, BOS and
other special tokens are never scored (DESIGN.md section 3). Masks come from the fast tokenizer's
character offsets, so they are exact whatever the template.

Example:
    >>> enc = encode_chat(tokenizer, "2+2?", "4", max_length=512)   # doctest: +SKIP
    >>> sum(enc.counted), sum(enc.response)                        # doctest: +SKIP
    (5, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

from mixopt.errors import ModelError
from mixopt.files import Digest


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


def render_chat(tokenizer: object, turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, bool]]]:
    """Render (prompt, response) turns as one string; also each content span (start, end, is_response)."""
    if has_chat_template(tokenizer):
        messages = [m for p, r in turns for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]
        text = tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[attr-defined]
    else:
        text = "\n\n".join(f"{p}\n{r}" for p, r in turns)
    spans, cursor = [], 0
    for prompt, response in turns:
        for content, is_response in ((prompt, False), (response, True)):
            start = text.find(content, cursor)
            if start < 0:
                raise ModelError("the chat template altered the example text; mixopt cannot align its tokens")
            spans.append((start, start + len(content), is_response))
            cursor = start + len(content)
    return text, spans


def conversation_head(tokenizer: object, prompt: str, response: str) -> int:
    """Characters of the rendered one-turn conversation that precede the turn itself (the template's system
    block). Found as what the turn does not repeat when it follows another turn: render([x, q]) =
    render([x]) + T(q), and render([q]) = head + T(q). 0 when the template is not append-only that way."""
    if not has_chat_template(tokenizer):
        return 0
    text, _ = render_chat(tokenizer, [(prompt, response)])
    first, _ = render_chat(tokenizer, [("x", "y")])
    both, _ = render_chat(tokenizer, [("x", "y"), (prompt, response)])
    turn = both[len(first) :]
    return len(text) - len(turn) if both.startswith(first) and text.endswith(turn) else 0


def _tokenize(
    tokenizer: object, text: str, spans: list[tuple[int, int, bool]], max_length: int, head: int = 0
) -> Encoded:
    """Tokenize `text[:head]` and `text[head:]` separately and concatenate: the turn's ids do not depend on
    what precedes it, so they are identical after the head or after demonstrations."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("mixopt needs a fast tokenizer (character offsets); load one with use_fast=True")
    # A chat template already carries its special tokens; plain text gets the tokenizer's BOS, if any.
    special = not has_chat_template(tokenizer)
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


def encode_chat(tokenizer: object, prompt: str, response: str, max_length: int) -> Encoded:
    """A prompt/response example, in the chat template when the tokenizer has one."""
    text, spans = render_chat(tokenizer, [(prompt, response)])
    return _tokenize(tokenizer, text, spans, max_length, conversation_head(tokenizer, prompt, response))


def encode_text(tokenizer: object, text: str, max_length: int) -> Encoded:
    """Plain text: every non-special token counts, and all of it is loss-bearing."""
    return _tokenize(tokenizer, text, [(0, len(text), True)], max_length)


def encode_demonstrations(tokenizer: object, demos: list[tuple[str, str]]) -> list[int]:
    """Ids of the in-context demonstrations, tokenized on their own so the query's ids never change."""
    if not demos:
        return []
    text, spans = render_chat(tokenizer, demos)
    return _tokenize(tokenizer, text, spans, max_length=1 << 30).ids
