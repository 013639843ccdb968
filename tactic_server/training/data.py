"""What the model reads: Python source files found under some directories (split into training
and held-out files by a hash of their path, so the split is stable), and synthetic long-context
documents whose answer sits far back in the context: passkey, multi-key/value retrieval and
variable tracking. Each task renders as text that ends in its answer, so it trains as plain
language modelling and evaluates by greedy completion."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS = ("passkey", "multikey", "variables")


@dataclass(frozen=True)
class SourceFiles:
    roots: tuple[str, ...]
    train: tuple[Path, ...]
    held_out: tuple[Path, ...]
    train_bytes: int
    held_out_bytes: int

    def summary(self) -> dict:
        return {"roots": list(self.roots), "train_files": len(self.train),
                "held_out_files": len(self.held_out), "train_bytes": self.train_bytes,
                "held_out_bytes": self.held_out_bytes}  # fmt: skip


def find_sources(
    roots: list[str], held_out_share: float = 0.02, max_file_bytes: int = 400_000
) -> SourceFiles:
    """Every readable *.py file under roots (files over max_file_bytes skipped: generated
    tables); a file is held out when the hash of its path relative to its root says so."""
    train, held_out, sizes = [], [], {"train": 0, "held_out": 0}
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if not 0 < size <= max_file_bytes:
                continue
            digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
            side = "held_out" if digest[0] < 256 * held_out_share else "train"
            (held_out if side == "held_out" else train).append(path)
            sizes[side] += size
    return SourceFiles(tuple(roots), tuple(train), tuple(held_out), sizes["train"],
                       sizes["held_out"])  # fmt: skip


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def source_texts(files: tuple[Path, ...], rng: random.Random) -> Iterator[str]:
    """The files' texts in a random order, endlessly (a new order each pass)."""
    order = list(files)
    while order:
        rng.shuffle(order)
        for path in order:
            if (text := read_text(path)) is not None:
                yield text


def filler(rng: random.Random, characters: int, sources: Iterator[str] | None) -> str:
    """Background text: source code when there is some, else numbered sentences."""
    parts, length = [], 0
    while length < characters:
        text = next(sources) if sources is not None else (
            f"Line {rng.randint(0, 99999)}: the grass is green and the sky is blue.\n")  # fmt: skip
        parts.append(text)
        length += len(text)
    return "".join(parts)[:characters]


def task(kind: str, rng: random.Random, characters: int,
         sources: Iterator[str] | None = None) -> tuple[str, str]:  # fmt: skip
    """(prompt, answer) of one synthetic document of about `characters` characters; the
    prompt ends where the answer starts."""
    if kind == "passkey":
        key = str(rng.randint(10_000, 99_999))
        needle = f"\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
        before = filler(rng, int(characters * rng.random()), sources)
        after = filler(rng, characters - len(before), sources)
        return before + needle + after + "\n# What is the pass key? The pass key is", f" {key}"
    if kind == "multikey":
        pairs = {f"{rng.randint(0, 16**6):06x}": str(rng.randint(10_000, 99_999))
                 for _ in range(max(8, characters // 400))}  # fmt: skip
        lines = [f'KEYS["{k}"] = "{v}"\n' for k, v in pairs.items()]
        gaps = filler(rng, max(0, characters - sum(map(len, lines))), sources)
        step = max(1, len(gaps) // len(lines))
        body = "".join(gaps[i * step : (i + 1) * step] + line for i, line in enumerate(lines))
        asked = rng.choice(list(pairs))
        return body + f'\nassert KEYS["{asked}"] == "', pairs[asked] + '"'
    if kind == "variables":
        names = [f"v{rng.randint(0, 9999)}" for _ in range(6)]
        value = str(rng.randint(10_000, 99_999))
        chain = [f"{names[0]} = {value}\n"]
        chain += [f"{b} = {a}\n" for a, b in zip(names, names[1:], strict=False)]
        gaps = filler(rng, max(0, characters - sum(map(len, chain))), sources)
        step = max(1, len(gaps) // len(chain))
        body = "".join(gaps[i * step : (i + 1) * step] + line for i, line in enumerate(chain))
        return body + f"\nprint({names[-1]})  # prints", f" {value}"
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {kind!r}")
