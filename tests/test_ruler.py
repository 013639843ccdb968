"""The offline RULER tasks: every answer is really in its prompt and is the right one (the asked
key's values, the chain of the asked value, the most common and most frequent words), prompts
have the asked length (in Gemma 3's tokenizer where it was pulled, else the character proxy),
the same seed gives the same cases, and scoring counts the answers a generation contains."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tactic_server.models.pull import pulled_model_dir
from tactic_server.training.ruler import (
    ALL_TASKS,
    CHARS_PER_TOKEN_PROXY,
    RULER_TASKS,
    Haystack,
    PromptSizeError,
    RulerCase,
    haystack_files,
    score,
    sized_case,
)

ROOT = Path(__file__).resolve().parent.parent
FILES = haystack_files([str(ROOT / "tactic_server"), str(ROOT / "README.md")])


def haystack(seed: int = 0) -> Haystack:
    return Haystack(FILES, seed)


def test_haystack_files_are_local_text():
    assert FILES and all(p.suffix in (".py", ".md") for p in FILES)
    assert sorted(FILES) == FILES
    # the default is the standard library's sources
    assert any(p.name == "random.py" for p in haystack_files())


@pytest.mark.parametrize("task", RULER_TASKS)
@pytest.mark.parametrize("tokens", [1000, 4000])
def test_answers_are_in_the_prompt_and_right(task, tokens):
    rng = random.Random(7)
    for _ in range(3):
        case = sized_case(task, rng, tokens, haystack(tokens))
        prompt, answers = case.prompt, case.answers
        assert case.task == task and answers and all(a in prompt for a in answers)
        assert 0.97 * tokens <= len(prompt) / CHARS_PER_TOKEN_PROXY <= tokens + 1
        question = prompt[prompt.rindex("\n") :]
        if task.startswith("niah"):
            asked = re.findall(r"for ([a-z]+-[a-z]+)", question)[0]
            keys = re.findall(r"([a-z]+-[a-z]+)", question[: question.index(" mentioned")])
            needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.",
                                 prompt)  # fmt: skip
            assert asked in keys and set(answers) == {v for k, v in needles if k in keys}
            expected = {"niah_single": (1, 1, 1), "niah_multikey": (1, 1, 4),
                        "niah_multivalue": (1, 4, 4), "niah_multiquery": (4, 4, 4)}[task]
            assert (len(keys), len(answers), len(needles)) == expected
        elif task == "variable_tracking":
            value = re.findall(r"assigned the value (\d+) in", question)[0]
            found, frontier = set(), {value}
            while frontier:  # follow the assignments from the value
                names = {n for n, v in re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?(\w+)", prompt)
                         if v in frontier} - found  # fmt: skip
                found |= names
                frontier = names
            assert found == set(answers) and len(answers) == 5
        elif task == "common_words":
            listed = Counter(re.findall(r"^\d+\. (\w+)$", prompt, flags=re.M))
            assert {w for w, _ in listed.most_common(10)} == set(answers)
            assert min(listed[a] for a in answers) > max(
                n for w, n in listed.items() if w not in answers)
        else:
            counts = Counter(prompt[: prompt.rindex("\nQuestion")].split())
            assert [w for w, _ in counts.most_common(3)] == list(answers)
            assert counts[answers[2]] > counts.most_common(4)[3][1]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_cases_are_deterministic_by_seed(task):
    first = [sized_case(task, random.Random(3), 800, haystack(1)) for _ in range(2)]
    again = sized_case(task, random.Random(3), 800, haystack(1))
    assert first[0] == first[1] == again
    assert sized_case(task, random.Random(4), 800, haystack(1)) != again


def test_tokenizer_sizes_the_prompt():
    def count(text: str) -> int:  # a tokenizer of four characters a token, BOS included
        return 1 + len(text) // 4

    for task in RULER_TASKS:
        case = sized_case(task, random.Random(0), 2000, haystack(), count)
        assert 0.97 * 2000 <= count(case.prompt) <= 2000


def test_short_prompts_in_a_coarse_tokenizer():
    """A small tokenizer (two characters a token, a list item of several tokens) at a few
    hundred tokens: the length is bracketed and bisected, within 3% where a prompt of that size
    exists, else the longest that fits if it has 90% (never over); common words' shortest
    list (10 words, 5 times each) does not fit in 300 tokens, and says so."""

    def count(text: str) -> int:
        return 1 + len(text) // 2

    for task in RULER_TASKS:
        case = sized_case(task, random.Random(1), 1000, haystack(), count)
        assert 0.9 * 1000 <= count(case.prompt) <= 1000, task
    with pytest.raises(PromptSizeError, match="common_words prompt to 300 tokens"):
        sized_case("common_words", random.Random(1), 300, haystack(), count)


def test_lines_coarser_than_three_percent_take_the_longest_that_fits():
    def count(text: str) -> int:  # every line 40 tokens: none in 97-100% of 1035 tokens
        return 40 * (text.count("\n") + 1)

    case = sized_case("niah_single", random.Random(2), 1035, haystack(), count)
    assert count(case.prompt) in (960, 1000)


@pytest.mark.skipif(pulled_model_dir("gemma-3-270m") is None, reason="gemma-3-270m not pulled")
@pytest.mark.parametrize("tokens", [4096, 8192])
def test_gemma_tokenizer_lengths(tokens):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(pulled_model_dir("gemma-3-270m") / "tokenizer.json"))

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    for task in RULER_TASKS:
        case = sized_case(task, random.Random(tokens), tokens, haystack(), count)
        assert 0.97 * tokens <= count(case.prompt) <= tokens
        ids = tokenizer.encode(case.prompt).ids
        for answer in case.answers:  # each answer survives tokenization: decode gives it back
            assert answer in tokenizer.decode(ids)


def test_score_counts_the_answers_contained():
    case = RulerCase("niah_multivalue", "...", ("1234567", "7654321"))
    assert score(case, " 1234567, 7654321.") == 1.0
    assert score(case, " 1234567 and 1111111") == 0.5
    assert score(case, "no idea") == 0.0
    words = RulerCase("common_words", "...", ("Alpha",))
    assert score(words, " 1. alpha 2. beta") == 1.0
    assert case.reference == " 1234567, 7654321" and score(case, case.reference) == 1.0


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        sized_case("niah_double", random.Random(0), 500, haystack())
