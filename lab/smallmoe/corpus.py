"""Build the small-MoE training corpus and tokenizer from Debian's Python documentation package.

The lab trains its own small Mixtral-architecture model, and it needs real human-written text that
can be obtained without internet access besides the package registries. Debian's ``python3.11-doc``
ships the Sphinx reStructuredText sources of the whole CPython documentation (~500 documents, ~11 MB)
under the PSF licence, which is exactly that. This module turns it into:

    out/tokenizer/            byte-level BPE tokenizer (transformers ``save_pretrained`` format)
    out/train.bin, val.bin    uint16 token ids, documents joined by ``</s>``
    out/meta.json             provenance (package, version, sha256, licence), split and token counts
    out/prompts_heldout.txt   200 prompts from held-out documents (evaluation / serving traces)
    out/prompts_train.txt     200 prompts from train documents (training traces for the expert predictor)
    out/copyright.debian.txt  the package's Debian copyright file, kept next to the derived data

Usage::

    python -m lab.smallmoe.corpus --out data/corpus [--package python3.11-doc] [--vocab-size 4096]
                                  [--heldout-fraction 0.05] [--seed 0] [--deb LOCAL.deb]

Only ``fetch``/``extract``/``deb_info`` need apt and dpkg; everything else is pure and is what the
tests call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 -- the trainer assigns them in this order
UNK, BOS, EOS = SPECIAL_TOKENS
SOURCE_SUFFIX = ".rst.txt"
PROMPT_MIN_WORDS, PROMPT_CUT_MIN, PROMPT_CUT_MAX = 8, 12, 40


# --------------------------------------------------------------------------------------------------
# atomic file writes


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then os.replace, so readers (the trainer, a
    concurrent rerun) never see a half-written file; same folder keeps the rename on one filesystem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the trainer may run as another user
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text written atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_array(path: Path, arr: np.ndarray) -> None:
    """Raw array bytes (ndarray.tofile layout, no header) written atomically."""
    _atomic_write(path, lambda f: arr.tofile(f))


# --------------------------------------------------------------------------------------------------
# fetch / extract (need apt-get and dpkg-deb)


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command and fail loudly with its stderr, because apt errors are otherwise opaque."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def fetch(package: str, dest: Path) -> Path:
    """Download the .deb with ``apt-get download`` (no install, no root needed beyond apt's cache),
    because the Debian mirror is the only text source reachable from the lab machines."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no {package}_*.deb in {dest}")
    return debs[-1]


def deb_info(deb: Path) -> dict:
    """Package name, version and sha256 of the .deb, so meta.json pins exactly which text was used."""
    fields = {}
    for line in _run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]).splitlines():
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    h = hashlib.sha256()
    with open(deb, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"package": fields.get("package"), "version": fields.get("version"),
            "architecture": fields.get("architecture"), "deb_filename": Path(deb).name,
            "deb_sha256": h.hexdigest(), "deb_bytes": Path(deb).stat().st_size}


def extract(deb: Path, dest: Path) -> Path:
    """Unpack with ``dpkg-deb -x`` into a private folder (never installed system-wide)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def find_sources_dir(root: Path) -> Path:
    """The ``_sources`` folder holding the most ``*.rst.txt`` files; searched rather than hard-coded
    (usr/share/doc/python3.11/html/_sources in bookworm) so another pythonX.Y-doc works too. Symlinked
    folders are not followed: the package links html/ under two names and we want each file once."""
    best, best_count = None, 0
    for dirpath, dirnames, _ in os.walk(root):
        if "_sources" in dirnames and not os.path.islink(os.path.join(dirpath, "_sources")):
            cand = Path(dirpath) / "_sources"
            count = sum(1 for _ in _iter_sources(cand))
            if count > best_count or (count == best_count and best is not None and str(cand) < str(best)):
                best, best_count = cand, count
    if best is None:
        raise FileNotFoundError(f"no _sources folder with *{SOURCE_SUFFIX} files under {root}")
    return best


def find_copyright(root: Path, package: str) -> Path:
    """Debian's copyright file for the package (usr/share/doc/<package>/copyright)."""
    direct = Path(root) / "usr/share/doc" / package / "copyright"
    if direct.is_file():
        return direct
    found = sorted(Path(root).glob("usr/share/doc/*/copyright"))
    if not found:
        raise FileNotFoundError(f"no usr/share/doc/*/copyright under {root}")
    return found[0]


def _iter_sources(sources_dir: Path):
    for dirpath, _, filenames in os.walk(sources_dir):
        for name in filenames:
            if name.endswith(SOURCE_SUFFIX):
                yield Path(dirpath) / name


def load_documents(sources_dir: Path) -> list[tuple[str, str]]:
    """(relative posix path, raw text) for every *.rst.txt, sorted by path so that everything
    downstream is independent of filesystem listing order."""
    sources_dir = Path(sources_dir)
    docs = []
    for path in _iter_sources(sources_dir):
        rel = path.relative_to(sources_dir).as_posix()
        docs.append((rel, path.read_text(encoding="utf-8", errors="replace")))
    return sorted(docs)


# --------------------------------------------------------------------------------------------------
# reST cleanup

# explicit markup: ".. something" or a bare ".."
_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_DIRECTIVE = re.compile(r"^([A-Za-z][\w:.-]*)::(?:\s+(.*))?$")
_FOOTNOTE = re.compile(r"^\[([^\]]+)\]\s+(.*)$")
_OPTION = re.compile(r"^\s+:[\w][\w .-]*:(\s|$)")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+_<>])\1{2,}\s*$")
_TABLE_BORDER = re.compile(r"^\s*(=+(\s+=+)+|\+([-=]+\+)+)\s*$")
_ANON_TARGET = re.compile(r"^\s*__ \S+\s*$")

_NB = r"(?:[^`\n]|\n(?![ \t]*\n))"  # any char but a backquote; newlines allowed, blank lines not
_ROLE = re.compile(r":([A-Za-z][\w.-]*(?::[A-Za-z][\w.-]*)*):`(" + _NB + r"*?)`")
_LINK_TITLED = re.compile(r"`((?:(?!<)" + _NB + r")*?)\s*<([^`<>]*)>`__?")
_LINK_PLAIN = re.compile(r"`(" + _NB + r"+?)`__?(?![\w`])")
_LITERAL = re.compile(r"``(" + _NB + r"+?)``")
_FIELD = re.compile(r"^:([A-Za-z][\w -]*):(?=\s|$)", re.M)
_META_FIELD = re.compile(r"^(orphan|tocdepth|nosearch):")
_DEFAULT_ROLE = re.compile(r"(?<![`\w])`([^`\n]+)`(?![`\w])")
_STRONG = re.compile(r"(?<![\w*\\])\*\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*\*(?![\w*])")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])")
_SUBST = re.compile(r"\|(release|version|today)\|")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.S)

# Directives whose line *and* indented body are dropped: navigation, index entries, hidden test
# setup, file inclusions and metadata carry no prose.
DROP_WITH_BODY = frozenset({
    "index", "toctree", "testsetup", "testcleanup", "tabularcolumns", "include", "literalinclude",
    "image", "figure", "contents", "raw", "highlight", "module", "moduleauthor", "sectionauthor",
    "currentmodule", "program", "audit-event", "c:namespace", "limited-api-list", "miscnews",
    "default-role", "role", "sectnum", "meta", "py:module", "py:currentmodule", "c:module",
})
# API description directives: keep the signature as a line of text, like the rendered page does.
DESCRIBE_PREFIX = {
    "function": "", "method": "", "attribute": "", "data": "", "describe": "", "object": "",
    "cmdoption": "", "option": "", "envvar": "", "opcode": "", "pdbcommand": "", "2to3fixer": "",
    "class": "class ", "exception": "exception ", "decorator": "@", "decoratormethod": "@",
    "classmethod": "classmethod ", "staticmethod": "staticmethod ", "abstractmethod": "abstractmethod ",
    "coroutinefunction": "coroutine ", "coroutinemethod": "coroutine ", "awaitablefunction": "awaitable ",
    "awaitablemethod": "awaitable ",
}
# Admonitions: rendered pages show a label; keep it so the body still reads as a sentence.
ADMONITION_LABEL = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "caution": "Caution:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:",
    "error": "Error:", "impl-detail": "CPython implementation detail:", "availability": "Availability:",
}
TITLE_DIRECTIVES = frozenset({"rubric", "topic", "sidebar", "table", "admonition"})


def _role_text(role: str, content: str) -> str:
    """What Sphinx would display for a role: the explicit title if any, ``~a.b.c`` -> ``c``,
    ``:pep:`8``` -> ``PEP 8``; roles are resolved to text because the model should learn prose."""
    content = content.strip()
    m = _TITLED.match(content)
    if m and m.group(1):
        return m.group(1)
    if m:  # `<target>` only
        content = m.group(2)
    content = content.lstrip("!")
    if content.startswith("~"):  # show only the last dotted component, keep any "(...)"
        name, paren, args = content[1:].partition("(")
        content = name.split(".")[-1] + paren + args
    base = role.split(":")[-1]
    if base == "pep":
        return "PEP " + content.split("#")[0]
    if base == "rfc":
        return "RFC " + content.split("#")[0]
    if base == "issue":
        return "bpo-" + content
    if base == "gh":
        return "gh-" + content
    return content


def clean_inline(text: str) -> str:
    """Resolve inline markup (roles, links, literals, emphasis) to its displayed text. Works on a
    whole text because roles and literals often wrap onto the next line (never across a blank line).
    Patterns are conservative so that code (``*args``, ``a * b``, ``2**8``) passes through unchanged."""
    text = _ROLE.sub(lambda m: _role_text(m.group(1), m.group(2)), text)
    text = _LINK_TITLED.sub(lambda m: m.group(1) or m.group(2), text)
    text = _LINK_PLAIN.sub(lambda m: m.group(1), text)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = _DEFAULT_ROLE.sub(lambda m: m.group(1), text)
    text = _STRONG.sub(lambda m: m.group(1), text)
    text = _EMPHASIS.sub(lambda m: m.group(1), text)
    text = _SUBST.sub(lambda m: m.group(1), text)
    text = _FIELD.sub(lambda m: m.group(1) + ":", text)  # ":Author: X" -> "Author: X"
    return text.replace("\\ ", "")


def _clean_line_end(line: str) -> str | None:
    """Per-line finishing: "For example::" renders as "For example:", " ::" and a lone "::" vanish,
    and page-metadata fields (orphan, tocdepth) are dropped (None)."""
    line = line.rstrip()
    if _META_FIELD.match(line):
        return None
    if line.endswith("::"):
        if line.strip() == "::":
            return ""
        line = line[:-3].rstrip() if line.endswith(" ::") else line[:-1]
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last line of the block indented deeper than ``indent`` starting at ``start``
    (blank lines inside are part of the block, trailing blank lines are not)."""
    end, k = start, start
    while k < len(lines):
        if not lines[k].strip():
            k += 1
            continue
        if _indent(lines[k]) <= indent:
            break
        k += 1
        end = k
    return end


def _directive_header(name: str, arg: str) -> str | None:
    """The text line a directive contributes (signature, admonition label, version note) or None."""
    if name in DESCRIBE_PREFIX or name.startswith(("c:", "py:", "cpp:")):
        return (DESCRIBE_PREFIX.get(name, "") + arg) if arg else None
    if name in ADMONITION_LABEL:
        return f"{ADMONITION_LABEL[name]} {arg}".rstrip()
    if name in TITLE_DIRECTIVES:
        return arg or None
    if name in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
        parts = arg.split(None, 2 if name == "deprecated-removed" else 1)
        if not parts:
            return None
        if name == "deprecated-removed":
            head = f"Deprecated since version {parts[0]}" + (
                f", will be removed in version {parts[1]}" if len(parts) > 1 else "")
            rest = parts[2] if len(parts) > 2 else ""
        else:
            head = {"versionadded": "New in version", "versionchanged": "Changed in version",
                    "deprecated": "Deprecated since version"}[name] + " " + parts[0]
            rest = parts[1] if len(parts) > 1 else ""
        return f"{head}: {rest}" if rest else f"{head}."
    return None  # code-block, doctest, productionlist, only, ...: drop the line, keep the body


def clean_rst(text: str) -> str:
    """Turn one Sphinx reST source into readable plain text: drop directive/option/comment/target
    lines and section underlines, keep API signatures, admonition labels and version notes, resolve
    inline markup, keep code examples (indented, verbatim apart from inline markup), collapse blank
    runs. Deterministic and line-based on purpose: good enough for LM training, easy to audit."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        m = _EXPLICIT.match(line)
        if not m:
            if not (_UNDERLINE.match(line) or _TABLE_BORDER.match(line) or _ANON_TARGET.match(line)):
                out.append(line)
            i += 1
            continue
        indent, rest = m.group(1), (m.group(2) or "").strip()
        body_end = _block_end(lines, i + 1, len(indent))
        d = _DIRECTIVE.match(rest)
        if d:
            name, arg = d.group(1).lower(), (d.group(2) or "").strip()
            if name in DROP_WITH_BODY:
                i = body_end
                continue
            header = _directive_header(name, arg)
            if header:
                out.append(indent + header)
            k = i + 1  # the directive's head: continuation lines and :options:, up to a blank line
            while k < body_end and lines[k].strip():
                if not _OPTION.match(lines[k]):
                    out.append(lines[k])
                k += 1
            i = k  # the body itself goes through the main loop (nested directives, code, prose)
            continue
        f = _FOOTNOTE.match(rest)
        if f:
            out.append(f"{indent}[{f.group(1)}] {f.group(2)}")
            i += 1
            continue
        # comment, hyperlink target (.. _x:), substitution definition (.. |x| ...): drop with body;
        # a bare ".." followed by a blank line is an empty comment and owns nothing.
        if not rest and (i + 1 >= n or not lines[i + 1].strip()):
            i += 1
        else:
            i = max(body_end, i + 1)
    cleaned: list[str] = []
    for line in clean_inline("\n".join(out)).split("\n"):
        line = _clean_line_end(line)
        if line is None or (not line and (not cleaned or not cleaned[-1])):
            continue
        cleaned.append(line)
    while cleaned and not cleaned[-1]:
        cleaned.pop()
    return "\n".join(cleaned)


# --------------------------------------------------------------------------------------------------
# split


def _unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from sha256 of the parts: stable across runs, machines, Python
    versions (unlike hash()) and independent of document order."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / float(1 << 64)


def is_heldout(relpath: str, fraction: float, seed: int = 0) -> bool:
    """Held-out membership depends only on (seed, path): adding or removing other documents, or a
    new package version, never moves a document between splits."""
    return _unit_hash("split", seed, relpath) < fraction


def split_documents(paths: Iterable[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) sorted path lists. If the hash puts nothing on one side (tiny inputs) the
    document with the lowest hash is moved so that both splits exist."""
    paths = sorted(set(paths))
    held = [p for p in paths if is_heldout(p, fraction, seed)]
    if fraction > 0 and not held and len(paths) > 1:
        held = [min(paths, key=lambda p: _unit_hash("split", seed, p))]
    if len(held) == len(paths) and len(paths) > 1:
        held.remove(max(held, key=lambda p: _unit_hash("split", seed, p)))
    held_set = set(held)
    return [p for p in paths if p not in held_set], held


# --------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE (no unknown bytes, exact decode) trained on the train split only, so held-out
    text is not seen even through the vocabulary. Wrapped as PreTrainedTokenizerFast so the trainer
    and the serving code load it with AutoTokenizer; the post-processor prepends <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError("token ids are stored as uint16: vocab_size must be <= 65536")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if [ids[t] for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise AssertionError(f"special token ids are {ids}, expected <unk>=0 <s>=1 </s>=2")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {EOS} {BOS} $B",
                                      special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, dest: Path) -> list[str]:
    """save_pretrained into a temp folder next to ``dest``, then os.replace each file into ``dest``
    (each file atomic; stale files from an older run are removed). Returns the file names."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        tokenizer.save_pretrained(str(tmp))
        dest.mkdir(exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, dest / name)
        for old in dest.iterdir():
            if old.name not in names and old.is_file():
                old.unlink()
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# encode


def encode_documents(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """One uint16 stream: doc0 </s> doc1 </s> ... docN (no <s>, no trailing </s>). The trainer cuts
    random windows from it; </s> marks document boundaries, <s> is left to the window sampler."""
    eos = tokenizer.eos_token_id
    encs = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    pieces: list[np.ndarray] = []
    for k, enc in enumerate(encs):
        if k:
            pieces.append(np.array([eos], dtype=np.uint16))
        ids = np.asarray(enc.ids, dtype=np.int64)
        if ids.size and ids.max() > np.iinfo(np.uint16).max:
            raise ValueError("token id does not fit uint16")
        pieces.append(ids.astype(np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def decode_stream(tokenizer, ids: np.ndarray) -> list[str]:
    """Inverse of encode_documents: split on </s> and decode each document (used as a self-check)."""
    ids = np.asarray(ids, dtype=np.int64)
    cuts = np.flatnonzero(ids == tokenizer.eos_token_id)
    chunks = np.split(ids, cuts)
    chunks = [chunks[0]] + [c[1:] for c in chunks[1:]]
    return tokenizer.backend_tokenizer.decode_batch([c.tolist() for c in chunks], skip_special_tokens=False)


# --------------------------------------------------------------------------------------------------
# prompts

_PROSE_WORD = re.compile(r"^[\"'(\[]*[A-Za-z][A-Za-z'\u2019-]*[\"')\].,;:!?]*$")


def _prompt_from_paragraph(paragraph: str, key: str, seed: int) -> str | None:
    """One-line prompt from a paragraph beginning, or None if it is not prose. Length is a
    deterministic 12..40 words (hash of the key) so prompts cover a spread of token lengths."""
    words = paragraph.split()
    if len(words) < PROMPT_MIN_WORDS or not words[0][:1].isupper():
        return None
    head = words[:PROMPT_CUT_MAX]
    if sum(bool(_PROSE_WORD.match(w)) for w in head) < 0.75 * len(head):
        return None  # code, tables, signatures, tracebacks
    span = PROMPT_CUT_MAX - PROMPT_CUT_MIN + 1
    n_words = PROMPT_CUT_MIN + int(_unit_hash("prompt", seed, key) * span)
    return " ".join(words[:n_words])


def make_prompts(docs: Sequence[tuple[str, str]], n: int = 200, seed: int = 0) -> list[str]:
    """Up to n unique prompts from the given (path, cleaned text) documents only, taken round-robin
    over the documents in path order (1st paragraph of every doc, then 2nd, ...) so that a few long
    documents do not dominate; deterministic because the inputs are sorted and nothing is random."""
    per_doc: list[list[str]] = []
    for path, text in sorted(docs):
        cands = []
        for j, para in enumerate(re.split(r"\n\s*\n", text)):
            p = _prompt_from_paragraph(para, f"{path}#{j}", seed)
            if p:
                cands.append(p)
        per_doc.append(cands)
    prompts, seen = [], set()
    for rank in range(max((len(c) for c in per_doc), default=0)):
        for cands in per_doc:
            if rank < len(cands) and cands[rank] not in seen:
                seen.add(cands[rank])
                prompts.append(cands[rank])
                if len(prompts) == n:
                    return prompts
    return prompts


# --------------------------------------------------------------------------------------------------
# licence


def describe_licence(copyright_text: str, licence_doc: str | None = None) -> dict:
    """Name the licence from the Debian copyright file itself (not assumed), plus the documentation's
    own licence statement (license.rst: prose under PSF, code examples also under 0BSD)."""
    m = re.search(r"^PYTHON SOFTWARE FOUNDATION LICENSE VERSION (\d+)\s*$", copyright_text, re.M)
    if m:
        name, spdx = f"Python Software Foundation License Version {m.group(1)}", f"PSF-{m.group(1)}.0"
    else:
        after = copyright_text.split("License:", 1)[-1].strip().splitlines()
        name, spdx = (after[0].strip() if after else "unknown (see copyright file)"), None
    statement = []
    if licence_doc:
        for para in re.split(r"\n\s*\n", licence_doc):
            flat = " ".join(para.split())
            if "documentation are licensed under" in flat or ("Zero-Clause BSD license" in flat and "dual" in flat):
                statement.append(flat)
    zero_bsd = any("Zero-Clause BSD" in s for s in statement)
    if spdx and zero_bsd:
        spdx_full = f"{spdx} (prose); {spdx} OR 0BSD (code examples)"
    else:
        spdx_full = spdx
    return {"name": name, "spdx": spdx_full, "documentation_statement": " ".join(statement) or None}


# --------------------------------------------------------------------------------------------------
# main


def build(out: Path, package: str = "python3.11-doc", vocab_size: int = 4096, heldout_fraction: float = 0.05,
          seed: int = 0, deb: Path | None = None, num_prompts: int = 200) -> dict:
    """The whole pipeline; returns meta. Outputs are a pure function of the .deb and the arguments."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smallmoe-corpus-") as tmpdir:
        tmp = Path(tmpdir)
        fetched_with = f"apt-get download {package}" if deb is None else f"local file {Path(deb).name}"
        deb = Path(deb) if deb is not None else fetch(package, tmp / "deb")
        info = deb_info(deb)
        root = extract(deb, tmp / "root")
        sources_dir = find_sources_dir(root)
        copyright_path = find_copyright(root, info["package"] or package)
        copyright_text = copyright_path.read_text(encoding="utf-8", errors="replace")
        raw = load_documents(sources_dir)
        sources_rel = sources_dir.relative_to(root).as_posix()
        copyright_rel = copyright_path.relative_to(root).as_posix()

    docs = {rel: clean_rst(text) for rel, text in raw}
    empty = sorted(rel for rel, text in docs.items() if not text.strip())
    docs = {rel: text for rel, text in docs.items() if text.strip()}
    train_paths, held_paths = split_documents(docs, heldout_fraction, seed)
    train_texts = [docs[p] for p in train_paths]
    held_texts = [docs[p] for p in held_paths]

    tokenizer = train_tokenizer(train_texts, vocab_size)
    tok_files = save_tokenizer(tokenizer, out / "tokenizer")
    train_ids = encode_documents(tokenizer, train_texts)
    val_ids = encode_documents(tokenizer, held_texts)
    for name, ids, texts in (("train", train_ids, train_texts), ("val", val_ids, held_texts)):
        if decode_stream(tokenizer, ids) != texts:
            raise AssertionError(f"{name}.bin does not decode back to the cleaned documents")
    atomic_write_array(out / "train.bin", train_ids)
    atomic_write_array(out / "val.bin", val_ids)

    prompts_held = make_prompts([(p, docs[p]) for p in held_paths], num_prompts, seed)
    prompts_train = make_prompts([(p, docs[p]) for p in train_paths], num_prompts, seed)
    atomic_write_text(out / "prompts_heldout.txt", "\n".join(prompts_held) + "\n")
    atomic_write_text(out / "prompts_train.txt", "\n".join(prompts_train) + "\n")
    atomic_write_text(out / "copyright.debian.txt", copyright_text)

    licence = describe_licence(copyright_text, docs.get("license.rst.txt"))
    licence.update({"copyright_file": copyright_rel, "copyright_copy": "copyright.debian.txt",
                    "copyright_head": copyright_text.splitlines()[:24]})
    meta = {
        "created_by": "lab.smallmoe.corpus",
        "source": {**info, "fetched_with": fetched_with,
                   "sources_dir": sources_rel, "source_suffix": SOURCE_SUFFIX, "documents_found": len(raw),
                   "documents_empty_after_cleaning": empty},
        "licence": licence,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "split_rule": "held out iff int(sha256(f'split:{seed}:{relpath}')[:16], 16) / 2**64 < heldout_fraction",
        "tokenizer": {"dir": "tokenizer", "files": tok_files, "type": "byte-level BPE (tokenizers), "
                      "PreTrainedTokenizerFast; encode adds <s>", "vocab_size": len(tokenizer),
                      "vocab_size_requested": vocab_size,
                      "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}},
        "bin_format": {"dtype": "uint16", "layout": "doc0 </s> doc1 </s> ... docN (no <s>, no trailing </s>), "
                       "documents in sorted path order", "eos_id": tokenizer.eos_token_id},
        "splits": {
            "train": {"file": "train.bin", "documents": len(train_paths), "tokens": int(train_ids.size),
                      "chars": sum(map(len, train_texts))},
            "val": {"file": "val.bin", "documents": len(held_paths), "tokens": int(val_ids.size),
                    "chars": sum(map(len, held_texts))},
        },
        "heldout_documents": held_paths,
        "prompts": {"heldout": {"file": "prompts_heldout.txt", "count": len(prompts_held)},
                    "train": {"file": "prompts_train.txt", "count": len(prompts_train)},
                    "rule": f"paragraph beginnings, first {PROMPT_CUT_MIN}-{PROMPT_CUT_MAX} words, paragraphs "
                            f"of >= {PROMPT_MIN_WORDS} words that look like prose, round-robin over docs"},
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    meta["_elapsed_s"] = time.perf_counter() - t0
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build everything and print a short summary."""
    ap = argparse.ArgumentParser(prog="python -m lab.smallmoe.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (e.g. data/corpus)")
    ap.add_argument("--package", default="python3.11-doc", help="Debian package to fetch with apt-get download")
    ap.add_argument("--deb", type=Path, default=None, help="use this local .deb instead of downloading")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--heldout-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=200)
    args = ap.parse_args(argv)
    meta = build(args.out, args.package, args.vocab_size, args.heldout_fraction, args.seed, args.deb,
                 args.num_prompts)
    s, tr, va = meta["source"], meta["splits"]["train"], meta["splits"]["val"]
    print(f"{s['package']} {s['version']} ({s['deb_sha256'][:12]}), licence: {meta['licence']['spdx']}")
    print(f"docs: {tr['documents']} train / {va['documents']} held-out "
          f"({len(s['documents_empty_after_cleaning'])} empty after cleaning dropped)")
    print(f"tokens: {tr['tokens']:,} train / {va['tokens']:,} val, vocab {meta['tokenizer']['vocab_size']}")
    print(f"prompts: {meta['prompts']['heldout']['count']} held-out / {meta['prompts']['train']['count']} train")
    print(f"wrote {args.out} in {meta['_elapsed_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
