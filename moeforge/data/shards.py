"""Token shard files and the manifest: writing them atomically, reading them back safely.

A shard is a flat little-endian array of token ids (``uint16`` when the vocabulary fits in
65536 ids, else ``uint32``) with no header, so ``numpy.memmap`` reads it directly. Its
name, token count, byte size and SHA-256 live in ``manifest.json`` beside it. The manifest
is written last: a data_dir without one is "not prepared", never "half prepared".

Every problem a user can cause (missing, truncated or edited shard, broken manifest,
tokenizer that does not belong to the shards) is a one-line :class:`UserError` that names
the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from moeforge.errors import UserError

FORMAT = "moeforge-shards-v1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, tokens: np.ndarray) -> dict:
    """Write one shard via a temporary file + rename; return its manifest entry."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "tokens": int(tokens.size), "bytes": int(tokens.nbytes), "sha256": sha256_file(path)}


def write_manifest(data_dir: Path, manifest: dict) -> Path:
    path = data_dir / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no manifest (run `moeforge prepare` first)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    for key in ("vocab_size", "dtype", "splits", "tokenizer"):
        if key not in m:
            raise UserError(f"{path}: manifest is missing {key!r}")
    return m


def verify_shard(data_dir: Path, entry: dict, dtype: str, checksum: bool = True) -> Path:
    """Size always (cheap), SHA-256 when ``checksum``; a UserError naming the shard otherwise."""
    path = data_dir / entry["file"]
    if not path.is_file():
        raise UserError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    expected = entry["tokens"] * np.dtype(dtype).itemsize
    if size != expected:
        raise UserError(f"{path}: size mismatch ({size} bytes, manifest says {expected}; truncated or replaced?)")
    if checksum and sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path}: checksum mismatch (SHA-256 differs from the manifest; the file was modified)")
    return path


def verify_tokenizer(data_dir: Path, manifest: dict, tokenizer_path: str | Path | None = None) -> Path:
    """The tokenizer must be the one the shards were made with (same file hash and vocab)."""
    tpath = Path(tokenizer_path) if tokenizer_path else data_dir / manifest["tokenizer"]["file"]
    if not tpath.is_file():
        raise UserError(f"{tpath}: tokenizer file not found")
    if sha256_file(tpath) != manifest["tokenizer"]["sha256"]:
        from moeforge.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(tpath).vocab_size
        raise UserError(f"{tpath}: tokenizer does not match the shards in {data_dir} (vocab {vocab} vs "
                        f"{manifest['vocab_size']}, or different merges); re-run `moeforge prepare --force`")
    return tpath
