"""Text to token ids and back for a Hugging Face checkpoint (tokenizer.json), its chat template
rendered as transformers renders it, and streaming detokenization that never splits a character."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .model_config import eos_token_ids

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence
# the special tokens transformers passes to chat templates by name
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool = False,
        extra_eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        """special_tokens maps names the chat template sees (bos_token, eos_token, ...) to their
        text. The EOS ids are eos_token's id followed by extra_eos_token_ids."""
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.add_bos_token = add_bos_token
        self.bos_token_id = self._token_id(self.special_tokens.get("bos_token"))
        eos = [self._token_id(self.special_tokens.get("eos_token")), *extra_eos_token_ids]
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        self._chat_template = _compile_chat_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """tokenizer.json, with tokenizer_config.json's special tokens, add_bos_token and chat
        template (chat_template.jinja wins where present, as in transformers), and the EOS ids
        of generation_config.json or config.json."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            chat_template = template_file.read_text()
        else:
            chat_template = _default_template(config.get("chat_template"))
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = config.get(name)
            # transformers saves an AddedToken as a dict holding its text under "content"
            text = token.get("content") if isinstance(token, dict) else token
            if text is not None:
                special_tokens[name] = text
        return cls(
            tokenizers.Tokenizer.from_file(str(tokenizer_file)),
            chat_template=chat_template,
            special_tokens=special_tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            extra_eos_token_ids=eos_token_ids(model_dir),
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token covers more characters of text than this (its vocabulary's longest entry:
        a byte-level token's string has one character per byte, a text character at least one
        byte), so a text of n characters has at least n / max_token_chars tokens."""
        return max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in the text (e.g. by a chat template) always become their ids;
        add_special_tokens adds those the tokenizer puts around a text (BOS), once."""
        # encode_batch lets go of the GIL while it works (encode holds it: seconds of a long
        # prompt would stop the server's event loop even from a worker thread)
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        wants_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        if wants_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json or "
                "chat_template.jinja); use completions with a plain prompt instead"
            )
        return self._chat_template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


def _default_template(chat_template: str | list | None) -> str | None:
    """tokenizer_config.json holds one template, or a list of named ones of which "default"
    is the one transformers uses."""
    if isinstance(chat_template, list):
        named = {entry["name"]: entry["template"] for entry in chat_template}
        return named.get("default")
    return chat_template


class GenerationBlock(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, which some templates use to mark the assistant's
    text for transformers' training masks, renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _compile_chat_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in (utils/chat_template_utils.py)."""

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)


class IncrementalDetokenizer:
    """Turns generated token ids, added one at a time, into the text they complete. Decodes a
    short window (the previous emission plus what is new) so that tokenizers which drop or add
    spaces at a boundary still join up, and holds back text ending in an incomplete character:
    the concatenated outputs equal decode() of the whole sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_start = 0  # the window starts here; its text was emitted before
        self._read_start = 0  # tokens from here on have not been emitted

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        emitted = decode(self.token_ids[self._prefix_start : self._read_start])
        window = decode(self.token_ids[self._prefix_start :])
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT_CHARACTER):
            return ""
        self._prefix_start, self._read_start = self._read_start, len(self.token_ids)
        return window[len(emitted) :]


class TextStream:
    """A request's text as its tokens arrive, the one place both engines stream it through:
    decoded incrementally, ended at the first stop string, and sent with a hold-back, since text
    that may be the start of a stop string must not reach the client before it is known not to
    be one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text already taken
        self.stop_at: int | None = None  # where the first stop string starts, once one appears

    def add(self, token_id: int) -> bool:
        """Decode one token (EOS stays out: the caller knows its own); True once the text holds
        a stop string."""
        self.text += self.detokenizer.add(token_id)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.stop_at = min(hits)
        return self.stop_at is not None

    def take(self, finished: bool) -> str:
        """The text not taken yet: while generating, all but the hold-back; once finished, all
        of it up to the stop string."""
        if finished:
            end = len(self.text) if self.stop_at is None else self.stop_at
        else:
            end = len(self.text) - self.holdback
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece
