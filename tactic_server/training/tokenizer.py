"""The byte-level BPE tokenizers of our models (the trained one and the tests' tiny ones): trained
on text, written as Hugging Face files with BOS, EOS and the chat template."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, "<|user|>", "<|assistant|>", "<|system|>")  # ids 0..4
TOKENIZER_VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tokenizer(model_dir: Path, tokenizer: tokenizers.Tokenizer, max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json (BOS, EOS, the chat template) as Hugging Face
    writes them."""
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (model_dir / "tokenizer_config.json").write_text(text)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB_SIZE
) -> tokenizers.Tokenizer:
    """A byte-level BPE like Llama 3's (every byte is a token, so any text encodes), trained on
    texts, that puts BOS before a text when asked for special tokens."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer
