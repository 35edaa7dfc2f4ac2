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
    _check_structure(path, m)
    return m


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_structure(path: Path, m: dict) -> None:
    """The types of everything the loaders index, so a hand-edited manifest fails in one line."""
    def bad(where: str, what: str) -> UserError:
        return UserError(f"{path}: manifest {where} {what}")

    if not _is_count(m["vocab_size"]) or m["vocab_size"] == 0:
        raise bad("vocab_size", f"must be a positive integer, got {m['vocab_size']!r:.60}")
    if m["dtype"] not in ("uint16", "uint32"):
        raise bad("dtype", f"must be 'uint16' or 'uint32', got {m['dtype']!r:.60}")
    tok = m["tokenizer"]
    if not isinstance(tok, dict) or not all(isinstance(tok.get(k), str) for k in ("file", "sha256")):
        raise bad("tokenizer", "must be a table with string 'file' and 'sha256'")
    if not isinstance(m["splits"], dict):
        raise bad("splits", "must be a table of splits")
    for name, split in m["splits"].items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise bad(f"splits.{name}", "must be a table with a list of 'shards'")
        for i, e in enumerate(split["shards"]):
            f = e.get("file") if isinstance(e, dict) else None
            # shards live in data_dir: a path elsewhere (../, /etc/...) is refused, not read
            if not (isinstance(f, str) and f not in ("", ".", "..") and Path(f).name == f and _is_count(e.get("tokens"))
                    and isinstance(e.get("sha256"), str)):
                raise bad(f"splits.{name}.shards[{i}]", "needs a plain 'file' name, an integer 'tokens' and a 'sha256'")


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
