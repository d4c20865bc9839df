"""Multilingual text for the charlm task: one language per site, as UTF-8 bytes.

Sources (read from the system at run time, never copied into the project):
  fortunes   the Debian fortune packages, one language each (``LANGUAGE_PACKAGES``); the files
             a package installed are listed in dpkg's ``/var/lib/dpkg/info/<package>.list``
  folder     a user's own corpus: ``<text-dir>/<site name>/*.txt``, one sub-folder per site in
             sorted order (the site name plays the language's part)
Each corpus is split by position: the last ``TEST_FRACTION`` of its bytes is held out. Examples
are windows of seq_len + 1 bytes (input and next-byte target), non-overlapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where windows are cut: the run config reads LANGUAGE_PACKAGES and must load fast
    import torch

VOCAB_SIZE = 256  # tokens are bytes
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DPKG_INFO = Path("/var/lib/dpkg/info")
LANGUAGE_PACKAGES = {
    "en": ("fortunes", "fortunes-min"),
    "de": ("fortunes-de",),
    "it": ("fortunes-it",),
    "es": ("fortunes-es",),
    "ru": ("fortunes-ru",),
    "pl": ("fortunes-pl",),
    "cs": ("fortunes-cs",),
    "pt": ("fortunes-br",),
}
TEST_FRACTION = 0.1


class TextUnavailable(RuntimeError):
    """A language or site corpus has no text on this machine."""


def fortune_files(language: str) -> list[Path]:
    """The fortune files the language's packages installed (not the .dat indexes, .u8 links or
    the offensive sets)."""
    if language not in LANGUAGE_PACKAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGE_PACKAGES)}")
    files = []
    for package in LANGUAGE_PACKAGES[language]:
        listing = DPKG_INFO / f"{package}.list"
        if not listing.exists():
            continue
        for line in listing.read_text().splitlines():
            path = Path(line)
            if (path.parent == FORTUNES_DIR or path.parent.parent == FORTUNES_DIR) and path.suffix not in (".dat", ".u8") \
                    and "off" not in path.relative_to(FORTUNES_DIR).parts[:-1] and path.is_file() and not path.is_symlink():
                files.append(path)
    return sorted(files)


@lru_cache(maxsize=16)
def corpus_bytes(source: str) -> bytes:
    """All text of one language ('fortunes:<lang>') or site folder ('folder:<path>'), fortunes'
    '%' separator lines removed."""
    kind, _, name = source.partition(":")
    if kind == "fortunes":
        files = fortune_files(name)
        hint = f"apt-get install {' '.join(LANGUAGE_PACKAGES[name])}"
    elif kind == "folder":
        files = sorted(Path(name).rglob("*.txt"))
        hint = f"put .txt files in {name}"
    else:
        raise ValueError(f"text source must be fortunes:<language> or folder:<path>, got {source!r}")
    chunks = []
    for path in files:
        lines = path.read_bytes().splitlines(keepends=True)
        chunks.append(b"".join(line for line in lines if line.strip() != b"%"))
    text = b"".join(chunks)
    if not text:
        raise TextUnavailable(f"no text for {source} ({hint})")
    return text


def site_sources(languages: list[str], text_dir: str) -> list[tuple[str, str]]:
    """(label, source) per corpus: the languages' fortunes, or the sub-folders of text_dir."""
    if text_dir:
        folders = sorted(p for p in Path(text_dir).iterdir() if p.is_dir())
        if not folders:
            raise TextUnavailable(f"text-dir {text_dir} has no sub-folder per site")
        return [(p.name, f"folder:{p}") for p in folders]
    return [(lang, f"fortunes:{lang}") for lang in languages]


def windows(data: bytes, seq_len: int, max_windows: int = 0) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 bytes: [W, seq_len + 1] (long)."""
    import torch

    array = np.frombuffer(data, dtype=np.uint8)
    count = (len(array) - 1) // seq_len
    if max_windows:
        count = min(count, max_windows)
    starts = np.arange(count) * seq_len
    return torch.from_numpy(array[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))


@dataclass(frozen=True)
class TextSplit:
    train: torch.Tensor  # [W, seq_len + 1]
    test: torch.Tensor
    test_characters: int  # characters (UTF-8 code points) in the held-out bytes the windows cover
    test_bytes: int


def split_corpus(source: str, seq_len: int, max_windows: int = 0) -> TextSplit:
    """Train windows from the first 90% of the corpus, test windows from the held-out rest."""
    text = corpus_bytes(source)
    cut = int(len(text) * (1 - TEST_FRACTION))
    test = windows(text[cut:], seq_len, max_windows)
    covered = text[cut : cut + len(test) * seq_len + 1]
    return TextSplit(
        train=windows(text[:cut], seq_len, max_windows), test=test,
        test_characters=len(covered.decode("utf-8", errors="replace")), test_bytes=len(covered),
    )
