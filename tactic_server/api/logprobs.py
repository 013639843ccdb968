"""Token log-probabilities as OpenAI returns them, for either engine: chat's `logprobs.content`
(token, logprob, bytes, top_logprobs per token) and text completions' parallel lists (tokens,
token_logprobs, top_logprobs, text_offset). A token's bytes come from the tokenizer's vocabulary,
so that a token holding part of a character still says which bytes it is."""

from __future__ import annotations

from collections.abc import Sequence

from tactic_server.engine.tokenizer import Tokenizer
from tactic_server.engine.types import TokenLogprob

from .schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells byte b as one printable character: b itself where printable,
    else chr(256 + k) for the k-th unprintable byte; this maps the characters back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    alphabet, unprintable = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + unprintable)] = byte
            unprintable += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class TokenText:
    """What a token id reads as: its UTF-8 bytes and its text (with U+FFFD for a part of a
    character, as OpenAI writes it)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._byte_level = type(backend.decoder).__name__ == "ByteLevel"
        self._special = {i for i, token in backend.get_added_tokens_decoder().items()
                         if token.special}  # fmt: skip
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self._bytes:
            self._bytes[token_id] = self._read_bytes(token_id)
        return self._bytes[token_id]

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def _read_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id) or ""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level and all(character in _BYTE_LEVEL for character in piece):
            return bytes(_BYTE_LEVEL[character] for character in piece)
        return self.tokenizer.decode([token_id]).encode()


def chat_logprobs(entries: Sequence[TokenLogprob], tokens: TokenText) -> ChatLogprobs:
    def top_logprob(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=tokens.text(token_id), logprob=logprob,
                          bytes=list(tokens.bytes(token_id)))  # fmt: skip

    content = [
        ChatTokenLogprob(
            **top_logprob(entry.token_id, entry.logprob).model_dump(),
            top_logprobs=[top_logprob(token_id, logprob) for token_id, logprob in entry.top],
        )
        for entry in entries
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: Sequence[TokenLogprob], tokens: TokenText, text_offset: int
) -> CompletionLogprobs:
    """text_offset: where the first entry's token starts in the completion's text (a stream's
    later chunks start after the text sent before)."""
    texts = [tokens.text(entry.token_id) for entry in entries]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(
        tokens=texts,
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{tokens.text(token_id): logprob for token_id, logprob in entry.top}
                      for entry in entries],  # fmt: skip
        text_offset=offsets,
    )
