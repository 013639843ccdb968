"""Reads a checkpoint's safetensors weights (one file, or shards listed by an index) onto a device
in the wanted dtype, under their Hugging Face names, reporting progress tensor by tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_state_dict(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; floating-point ones are cast to dtype. progress(done_bytes,
    total_bytes) is called after each tensor, in bytes as stored in the files."""
    shard_names = _shard_names(Path(model_dir))
    stored_bytes = {}
    for shard, names in shard_names.items():
        sizes = _stored_bytes(shard)
        absent = [name for name in names if name not in sizes]
        if absent:
            raise ValueError(
                f"{INDEX_FILE} places {', '.join(absent[:5])} in {shard.name}, which lacks "
                f"{'it' if len(absent) == 1 else 'them'}"
            )
        stored_bytes.update({name: sizes[name] for name in names})
    total_bytes, done_bytes = sum(stored_bytes.values()), 0
    state = {}
    for shard, names in shard_names.items():
        with safe_open(shard, framework="pt", device="cpu") as file:
            for name in names:
                tensor = file.get_tensor(name)
                target = dtype if tensor.is_floating_point() else tensor.dtype
                state[name] = tensor.to(device=device, dtype=target)
                done_bytes += stored_bytes[name]
                if progress is not None:
                    progress(done_bytes, total_bytes)
    return state


def _shard_names(model_dir: Path) -> dict[Path, list[str]]:
    """The tensor names to read from each safetensors file of the checkpoint."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    index_file = model_dir / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shard_names: dict[Path, list[str]] = {}
        for name, file_name in weight_map.items():
            shard_names.setdefault(model_dir / file_name, []).append(name)
        missing = [shard.name for shard in shard_names if not shard.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{INDEX_FILE} in {model_dir} lists shards that are missing: {', '.join(missing)}"
            )
        return shard_names
    single_file = model_dir / SINGLE_FILE
    if single_file.is_file():
        return {single_file: list(_stored_bytes(single_file))}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def _stored_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor of a safetensors file takes, from the file's JSON header (an 8-byte
    little-endian length, then the header)."""
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
    return {
        name: info["data_offsets"][1] - info["data_offsets"][0]
        for name, info in header.items()
        if name != "__metadata__"
    }
