"""Stage 1: the corpus, English prose that ships with Python itself.

The reference-manual topics of `pydoc_data.topics` (what `help("if")` shows) and the docstrings of a
fixed list of standard-library modules. Paragraphs that look like prose are kept (no code, no
doctests, no tables), long ones are cut at sentence ends, duplicates dropped, and each goes to
training or held-out by a hash of its text (deterministic for a given Python).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from quickstart_lib.settings import Settings
from utils import atomic_path

logger = logging.getLogger("quickstart")

# Pure-Python standard-library modules whose docstrings are mostly prose (a fixed list, so the
# corpus does not depend on what else is installed). Modules missing from a build are skipped.
DOC_MODULES = (
    "abc argparse ast asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams asyncio.tasks "
    "base64 bdb bisect bz2 calendar cmd code codecs collections collections.abc colorsys compileall "
    "concurrent.futures configparser contextlib copy copyreg csv dataclasses datetime decimal difflib dis "
    "doctest email.header email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser "
    "http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.metadata "
    "importlib.resources inspect io ipaddress itertools json json.decoder json.encoder keyword linecache locale "
    "logging logging.config logging.handlers lzma mailbox mimetypes modulefinder multiprocessing.connection "
    "multiprocessing.managers multiprocessing.pool multiprocessing.queues netrc numbers operator optparse os "
    "pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats pyclbr "
    "pydoc queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal "
    "site smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sysconfig "
    "tabnanny tarfile tempfile textwrap threading timeit tokenize tomllib trace traceback tracemalloc types "
    "typing unittest.case unittest.loader unittest.mock unittest.result unittest.runner unittest.suite "
    "urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave weakref wsgiref.handlers "
    "wsgiref.simple_server wsgiref.util xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax.handler "
    "xml.sax.saxutils xmlrpc.client xmlrpc.server zipapp zipfile zipimport zoneinfo"
).split()
PROSE_CHARS = set(".,;:'\"()-?!")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def docstrings(module) -> Iterator[str]:
    """Docstrings of a module, its public classes and functions, and their public methods."""
    seen: set[int] = set()

    def visit(obj, depth: int) -> Iterator[str]:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(getattr(obj, "__doc__", None), str):
            yield inspect.cleandoc(obj.__doc__)
        if depth == 2 or not (inspect.ismodule(obj) or inspect.isclass(obj)):
            return
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_"):
                continue
            member = getattr(member, "__func__", getattr(member, "fget", member))  # static/class methods, properties
            if (inspect.isclass(member) or inspect.isroutine(member)) and getattr(
                member, "__module__", module.__name__
            ) == module.__name__:
                yield from visit(member, depth + 1)

    yield from visit(module, 0)


def source_texts() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        logger.warning("pydoc_data is not installed: the corpus has docstrings only")
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        for name in DOC_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            yield from docstrings(module)


def prose_paragraphs(text: str, max_words: int) -> Iterator[str]:
    """Paragraphs of `text` that read as prose, whitespace-normalised, cut to <= max_words words."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        # Indented lines are code, grammar rules, tables or list continuations.
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        para = " ".join(line.strip() for line in lines)
        if ">>>" in para or "::=" in para or len(para.split()) < 10:
            continue
        if not (para[0].isupper() and para[-1] in ".?!:"):
            continue
        if sum(c.isalpha() or c.isspace() or c in PROSE_CHARS for c in para) < 0.95 * len(para):
            continue
        chunk: list[str] = []
        for sentence in SENTENCE_END.split(para):
            if chunk and len(" ".join(chunk + [sentence]).split()) > max_words:
                yield " ".join(chunk)
                chunk = []
            chunk.append(sentence)
        yield " ".join(chunk)


def build_corpus(s: Settings) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs: deduplicated, split and ordered by a hash of the text."""
    paragraphs = dict.fromkeys(p for text in source_texts() for p in prose_paragraphs(text, s.max_words))
    keyed = sorted((hashlib.sha256(p.encode()).hexdigest(), p) for p in paragraphs if len(p.split()) >= 8)
    heldout = [p for h, p in keyed if int(h[:8], 16) % 100 < s.heldout_percent]
    train = [p for h, p in keyed if int(h[:8], 16) % 100 >= s.heldout_percent]
    return train[: s.max_docs], heldout[: s.max_heldout_docs]


def write_lines(lines: list[str], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
