"""RULER's synthetic long-context tasks (Hsieh et al. 2024), generated offline: needle in a
haystack (single, multi-key, multi-value, multi-query), variable tracking, common and frequent
words extraction. Haystacks and words come from local text files (by default the Python
standard library's sources), so nothing is downloaded; a case is deterministic given the seed
and the files. Prompts are completions (a base model reads them): each ends where its answer
starts, and a case is scored by the share of its answers that the generated text contains
(RULER's string_match_all). The passkey, multi-key and variables tasks of our training data
are served the same way.
"""

from __future__ import annotations

import functools
import itertools
import keyword
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .data import TASKS as TRAINING_TASKS
from .data import filler, read_text, source_texts, task

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
               "variable_tracking", "common_words", "frequent_words")  # fmt: skip

ANSWER_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48,
                 "niah_multiquery": 48, "variable_tracking": 40, "common_words": 72,
                 "frequent_words": 32, **dict.fromkeys(TRAINING_TASKS, 8)}  # fmt: skip
"""Tokens a greedy generation gets per task: room for every answer (Gemma's tokenizer spells
a 7-digit number in 7 tokens) and the separators between them."""
ALL_TASKS = tuple(ANSWER_TOKENS)

HAYSTACK_SUFFIXES = (".py", ".md", ".rst", ".txt")
CHARS_PER_TOKEN_PROXY = 3.5
"""Characters per token where no tokenizer sizes a prompt (Gemma's runs 3.3-3.8 on source)."""


@dataclass(frozen=True)
class RulerCase:
    """One prompt. answers: every string a correct completion contains."""

    task: str
    prompt: str
    answers: tuple[str, ...]

    @property
    def answer_tokens(self) -> int:
        """How many tokens a greedy generation gets to hold the answers."""
        return ANSWER_TOKENS[self.task]

    @property
    def reference(self) -> str:
        """A completion that holds every answer, in order (what decoding is teacher-forced on)."""
        return " " + ", ".join(self.answers)


def haystack_files(roots: list[str] | None = None, max_file_bytes: int = 400_000) -> list[Path]:
    """Readable text files under roots (default: the standard library), sorted by path."""
    roots = roots or [sysconfig.get_paths()["stdlib"]]
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.suffix in HAYSTACK_SUFFIXES and "site-packages" not in path.parts:
                try:
                    if path.is_file() and 0 < path.stat().st_size <= max_file_bytes:
                        found.append(path)
                except OSError:
                    continue
    return found


def vocabulary(files: list[Path], size: int = 4000) -> list[str]:
    """Lower-case words of 4-10 letters from the first files (in path order) until `size`
    distinct ones, Python keywords left out: keys of needles and the words of the word tasks."""
    words: dict[str, None] = {}
    for path in files:
        for word in re.findall(r"\b[a-z]{4,10}\b", read_text(path) or ""):
            if not keyword.iskeyword(word):
                words.setdefault(word)
        if len(words) >= size:
            break
    if len(words) < 100:
        raise ValueError(f"the haystack files hold only {len(words)} distinct words, need 100")
    return sorted(words)[:size]


class Haystack:
    """Where background text and words come from, shared by the cases of a run: the files'
    texts in an order drawn from the seed, endlessly, and their vocabulary (read on first use).
    Cases drawn in the same order from the same seed and files are the same."""

    def __init__(self, files: list[Path], seed: int):
        self.files = list(files)
        self.texts: Iterator[str] = source_texts(tuple(files), random.Random(seed))
        self._words: list[str] | None = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = vocabulary(self.files)
        return self._words


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, words: list[str], count: int) -> list[str]:
    """Distinct two-word keys ("brisk-harbor")."""
    keys: dict[str, None] = {}
    while len(keys) < count:
        keys.setdefault(f"{rng.choice(words)}-{rng.choice(words)}")
    return list(keys)


def _scatter(rng: random.Random, lines: list[str], characters: int, haystack: Haystack) -> str:
    """Background of about `characters` characters with `lines` inserted at random line
    boundaries, in the given order."""
    background = filler(rng, max(0, characters - sum(map(len, lines))), haystack.texts)
    breaks = [i + 1 for i, c in enumerate(background) if c == "\n"] or [len(background)]
    cuts = sorted(rng.choice(breaks) for _ in lines)
    parts, start = [], 0
    for cut, line in zip(cuts, lines, strict=True):
        parts += [background[start:cut], line]
        start = cut
    return "".join(parts) + background[start:]


def _needle(key: str, value: str) -> str:
    return f"\nOne of the special magic numbers for {key} is: {value}.\n"


def _niah(rng, characters, haystack, *, name: str, keys: int, values: int,
          queries: int) -> RulerCase:  # fmt: skip
    """Needles "special magic number for KEY is: VALUE"; `values` values for each asked key,
    `queries` keys asked, `keys` keys in all (the others are distractors)."""
    keys_drawn = _keys(rng, haystack.words, keys)
    asked = keys_drawn[:queries]
    needles = [(key, _number(rng)) for key in asked for _ in range(values)]
    needles += [(key, _number(rng)) for key in keys_drawn[queries:]]
    rng.shuffle(needles)
    body = _scatter(rng, [_needle(k, v) for k, v in needles], characters, haystack)
    answers = tuple(v for key in asked for k, v in needles if k == key)
    subject = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
    if len(answers) == 1:
        question = (f"What is the special magic number for {subject} mentioned in the provided "
                    f"text? The special magic number for {subject} mentioned in the provided "
                    f"text is")  # fmt: skip
    else:
        question = (f"What are all the special magic numbers for {subject} mentioned in the "
                    f"provided text? The special magic numbers for {subject} mentioned in the "
                    f"provided text are")  # fmt: skip
    return RulerCase(name, body + "\n" + question, answers)


def _variable_tracking(rng, characters, haystack, hops: int = 4, chains: int = 2) -> RulerCase:
    """Chains VAR A = 12345, VAR B = VAR A, ...; the first chain's names are the answers, the
    other chains (other values) are distractors."""
    names: dict[str, None] = {}
    while len(names) < (hops + 1) * chains:
        names.setdefault("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    pool = list(names)
    values = rng.sample(range(10_000, 99_999), chains)
    chain_lines = []
    for number in range(chains):
        chain = pool[number * (hops + 1) : (number + 1) * (hops + 1)]
        lines = [f"\nVAR {chain[0]} = {values[number]}\n"]
        lines += [f"\nVAR {b} = VAR {a}\n" for a, b in zip(chain, chain[1:], strict=False)]
        chain_lines.append(lines)
    # interleave the chains while each keeps its order: a hop always comes after the one before
    order = [n for n in range(chains) for _ in range(hops + 1)]
    rng.shuffle(order)
    lines = [chain_lines[n].pop(0) for n in order]
    body = _scatter(rng, lines, characters, haystack)
    answers = tuple(pool[: hops + 1])
    question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the "
                f"text above. Answer: According to the chain(s) of variable assignment in the "
                f"text above, {hops + 1} variables are assigned the value {values[0]}, they "
                f"are:")  # fmt: skip
    return RulerCase("variable_tracking", body + question, answers)


def _numbered(words: list[str]) -> str:
    return "".join(f"{i}. {word}\n" for i, word in enumerate(words, 1))


def _common_words(rng, characters, haystack, common: int = 10, common_repeats: int = 30,
                  rare_repeats: int = 3) -> RulerCase:  # fmt: skip
    """A numbered list in which `common` words appear common_repeats times each (fewer in a
    short list: the common words fill at most a third of it) and the rest rare_repeats times
    each; the common words are the answers."""
    per_word = 5 + sum(map(len, haystack.words)) / len(haystack.words)  # "123. word\n"
    slots = int(characters / per_word)
    common_repeats = min(common_repeats, max(rare_repeats + 2, slots // (3 * common)))
    rare = max(1, (slots - common * common_repeats) // rare_repeats)
    pool = list(haystack.words)
    rng.shuffle(pool)  # the whole pool, so a longer list keeps a shorter one's words
    chosen = pool[: common + rare]
    listed = chosen[:common] * common_repeats + chosen[common:] * rare_repeats
    rng.shuffle(listed)
    question = (f"\nQuestion: What are the {common} most common words in the above list? "
                f"Answer: The top {common} words that appear most often in the list are:")
    return RulerCase("common_words", _numbered(listed) + question, tuple(chosen[:common]))


def _frequent_words(rng, characters, haystack, alpha: float = 2.0, top: int = 3) -> RulerCase:
    """Coded words (random letters) with Zipf frequencies, rank r appearing in proportion to
    r^-alpha (shuffled); the `top` most frequent are the answers, in order."""
    words: dict[str, None] = {}
    while len(words) < 200:
        words.setdefault("".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                 for _ in range(rng.randint(3, 6))))  # fmt: skip
    coded = list(words)
    weights = [rank**-alpha for rank in range(1, len(coded) + 1)]
    # characters per slot: the words' lengths weighted by frequency, and a separator
    per_slot = 1 + sum(w * len(word) for w, word in zip(weights, coded, strict=True)) / sum(weights)
    slots = max(100, int(characters / per_slot))
    counts = [round(slots * w / sum(weights)) for w in weights]  # the rarest round to none
    text = [word for word, count in zip(coded, counts, strict=True) for _ in range(count)]
    rng.shuffle(text)
    lines = "".join(" ".join(text[i : i + 10]) + "\n" for i in range(0, len(text), 10))
    question = (f"\nQuestion: What are the {top} most frequently appeared coded words in the "
                f"above coded text? Answer: According to the coded text above, the {top} most "
                f"frequently appeared words are:")  # fmt: skip
    return RulerCase("frequent_words", lines + question, tuple(coded[:top]))


def _training_task(kind: str) -> Callable[[random.Random, int, Haystack], RulerCase]:
    """A task of our training data (tactic_server.training.data) as a case."""

    def generate(rng: random.Random, characters: int, haystack: Haystack) -> RulerCase:
        prompt, answer = task(kind, rng, characters, haystack.texts)
        return RulerCase(kind, prompt, (answer.strip().strip('"'),))

    return generate


NEEDLES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
           "niah_multiquery": (4, 1, 4)}  # fmt: skip
"""(keys in the haystack, values per asked key, keys asked) of each needle task."""

GENERATORS: dict[str, Callable[[random.Random, int, Haystack], RulerCase]] = {
    **{name: functools.partial(_niah, name=name, keys=keys, values=values, queries=queries)
       for name, (keys, values, queries) in NEEDLES.items()},
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
    **{kind: _training_task(kind) for kind in TRAINING_TASKS},
}


def ruler_case(task: str, rng: random.Random, characters: int, haystack: Haystack) -> RulerCase:
    """One case of about `characters` characters of prompt."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {', '.join(ALL_TASKS)}, got {task!r}")
    return GENERATORS[task](rng, characters, haystack)


class _Replayed:
    """One case's haystack while it is sized: texts drawn once and replayed from the start at
    every attempt, so that a prompt's length follows the characters asked for."""

    def __init__(self, haystack: Haystack, characters: int):
        self.drawn, total = [], 0
        while total < characters:
            self.drawn.append(next(haystack.texts))
            total += len(self.drawn[-1])
        self._haystack = haystack

    @property
    def texts(self) -> Iterator[str]:
        return itertools.cycle(self.drawn)

    @property
    def words(self) -> list[str]:
        return self._haystack.words


SIZING_ATTEMPTS = 24


class PromptSizeError(ValueError):
    """No prompt of the task fits the tokens asked for (its shortest is longer, or its steps
    are coarser than the 10% below the size)."""


def sized_case(task: str, rng: random.Random, tokens: int, haystack: Haystack,
               count_tokens: Callable[[str], int] | None = None) -> RulerCase:  # fmt: skip
    """A case whose prompt has between 97% and 100% of `tokens` tokens as count_tokens counts
    them (the model's tokenizer; without one, characters / CHARS_PER_TOKEN_PROXY). A prompt
    is regenerated smaller or larger from the same seed and background, never cut, so its
    needles stay in it: proportional steps until the length is bracketed, then bisection of
    the characters asked for. Where one more list item or line is more than 3% (a short
    prompt, a coarse tokenizer), the longest prompt that fits is taken if it has 90% of the
    tokens. Draws one number from rng and background text from the haystack."""
    count_tokens = count_tokens or (lambda text: round(len(text) / CHARS_PER_TOKEN_PROXY))
    characters = int(tokens * CHARS_PER_TOKEN_PROXY)
    seed = rng.random()
    replayed = _Replayed(haystack, 3 * characters)
    fits, fits_length, under, over = None, 0, 0, None  # under/over: characters bracketing
    for _ in range(SIZING_ATTEMPTS):
        case = ruler_case(task, random.Random(seed), characters, replayed)
        length = count_tokens(case.prompt)
        if 0.97 * tokens <= length <= tokens:
            return case
        if length < tokens:
            under = max(under, characters)
            if length > fits_length:
                fits, fits_length = case, length
        else:
            over = characters if over is None else min(over, characters)
        guess = int(characters * 0.985 * tokens / max(length, 1))
        if over is None:
            guess = max(guess, under + 1)
        elif not under < guess < over:
            guess = (under + over) // 2
        if guess in (under, over):
            break  # one character apart: no prompt in between
        characters = guess
    if fits is not None and fits_length >= 0.9 * tokens:
        return fits
    raise PromptSizeError(f"could not size a {task} prompt to {tokens} tokens "
                     f"(the nearest had {fits_length} under, {length} last)")  # fmt: skip


def score(case: RulerCase, generated: str) -> float:
    """Share of the case's answers that the generated text contains (case-insensitive)."""
    text = generated.lower()
    return sum(answer.lower() in text for answer in case.answers) / len(case.answers)
