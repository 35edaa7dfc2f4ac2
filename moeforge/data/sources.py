"""Source readers (datatrove ``BaseDiskReader`` subclasses) and source specs -> readers.

A source is a domain name plus a path of one kind: a directory of text files, a source-code
tree (language from the extension), JSONL, or Parquet with a text field. Each becomes a
datatrove reader, so the same pipeline runs locally or under datatrove's Slurm/Ray
executors: files are split across tasks by datatrove.

Choices:
- Bad input never crashes a run: empty files, binary files (a NUL byte in the first 8 KiB),
  non-UTF-8 files or lines, and JSONL lines that are not objects with a text field are
  skipped and counted (``skipped_<why>`` in the manifest's reader stats). A missing path is
  an error before anything runs, naming the path.
- Our JSONL reader reads bytes and decodes per line (datatrove's opens the file as text, so
  one bad byte would end the whole file).
- Parquet goes through datatrove's ParquetReader, which needs ``pyarrow`` (not a core dep).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datatrove.pipeline.readers.base import BaseDiskReader

from moeforge.errors import UserError

CODE_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
    ".rs": "rust", ".go": "go", ".java": "java", ".js": "javascript", ".ts": "typescript", ".sh": "shell",
    ".rb": "ruby", ".lua": "lua", ".sql": "sql", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
}
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".text", "")


def _classify_bytes(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for good UTF-8 text, else (None, reason)."""
    if not raw.strip():
        return None, "empty"
    if b"\x00" in raw[:8192]:
        return None, "binary"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "non_utf8"


class TextFilesReader(BaseDiskReader):
    """One document per file; for code trees, ``metadata['lang']`` from the extension."""

    name = "📄 Text files"

    def __init__(self, data_folder: str, extensions: tuple[str, ...], code: bool = False,
                 default_metadata: dict | None = None, glob_pattern: str | None = None):
        super().__init__(data_folder, default_metadata=default_metadata, glob_pattern=glob_pattern)
        self.extensions, self.code = tuple(extensions), code

    def read_file(self, filepath: str):
        ext = Path(filepath).suffix.lower()
        if self.extensions and ext not in self.extensions:
            return
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        text, why = _classify_bytes(raw)
        if text is None:
            self.stat_update(f"skipped_{why}")
            return
        data: dict[str, Any] = {"text": text, "id": filepath}
        if self.code:
            data["lang"] = CODE_LANGUAGES.get(ext, ext.lstrip(".") or "text")
        yield self.get_document_from_dict(data, filepath, 0)


class JsonlLinesReader(BaseDiskReader):
    """JSONL (optionally .gz): one document per line with a string field ``text_key``."""

    name = "🐿 JSONL (tolerant)"

    def __init__(self, data_folder: str, text_key: str = "text", default_metadata: dict | None = None,
                 glob_pattern: str | None = None):
        super().__init__(data_folder, text_key=text_key, default_metadata=default_metadata, glob_pattern=glob_pattern)

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for li, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    self.stat_update("skipped_non_utf8")
                    continue
                except json.JSONDecodeError:
                    self.stat_update("skipped_bad_json")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(self.text_key), str) or not obj[self.text_key].strip():
                    self.stat_update("skipped_no_text")
                    continue
                yield self.get_document_from_dict(obj, filepath, li)


def _folder_and_glob(path: Path, exts: tuple[str, ...]) -> tuple[str, str | None]:
    if path.is_file():
        return str(path.parent), path.name
    return str(path), None


def make_reader(spec: dict[str, Any]) -> BaseDiskReader:
    """A datatrove reader for one ``[[data.sources]]`` entry, named after its domain so the
    stats say how many documents each domain read and skipped."""
    reader = _make_reader(spec)
    reader.name = f"{reader.name} [{spec['domain']}]"
    reader.stats.name = str(reader)
    return reader


def _make_reader(spec: dict[str, Any]) -> BaseDiskReader:
    path = Path(spec["path"]).expanduser()
    if not path.exists():
        raise UserError(f"{path}: source path for domain {spec['domain']!r} does not exist")
    kind = spec.get("kind", "text")
    profile = spec.get("filters", "code" if kind == "code" else "prose")
    meta = {"domain": spec["domain"], "profile": profile}
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise UserError(f"{path}: source directory for domain {spec['domain']!r} contains no files")
    if kind in ("text", "code"):
        exts = tuple(spec.get("extensions") or (CODE_LANGUAGES if kind == "code" else TEXT_EXTENSIONS))
        folder, glob = _folder_and_glob(path, exts)
        return TextFilesReader(folder, exts if not glob else (), code=kind == "code", default_metadata=meta,
                               glob_pattern=glob)
    folder, glob = _folder_and_glob(path, ())
    if kind == "jsonl":
        return JsonlLinesReader(folder, spec.get("text_key", "text"), default_metadata=meta,
                                glob_pattern=glob or "**/*.jsonl*")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: Parquet sources need pyarrow (pip install pyarrow)") from None
    from datatrove.pipeline.readers import ParquetReader

    return ParquetReader(folder, text_key=spec.get("text_key", "text"), default_metadata=meta,
                         glob_pattern=glob or "**/*.parquet")


def write_jsonl(path: Path, docs: list[dict]) -> int:
    """Write documents atomically; returns bytes of text written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += len(d.get("text", "").encode("utf-8"))
    tmp.replace(path)
    return n
