"""Readers for the retrieval formats users already hold: BEIR folders and MIRACL's native layout.

Both become a `GradedRetrievalBenchmark`: a `hybridfast.data.RetrievalBenchmark` (the
contract's plain dicts, unchanged) plus

- ``grades``: ``{query_id: {candidate_id: grade}}``, the relevance grades (>= 1) of the
  relevant candidates in ``qrels``. nDCG uses them as gains (trec_eval's ``ndcg_cut``);
  map, mrr and recall count every grade >= 1 as relevant. Lines with grade <= 0 are
  judged non-relevant and change no metric, so they are not kept.
- ``shared_query_ids``: whether one query id names the same question in every language
  (cross-lingual and multilingual settings need that; see below);
- ``notes``: what a reader wants the user to see in the evaluation output.

Layouts (`load_beir` detects them):

1. One folder per language, ``PATH/<lang>/`` (MIRACL once converted to BEIR):
   ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
   ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, a header line). A language's
   qrels name that language's corpus. Candidate ids become ``<lang>:<_id>`` (corpora of
   different languages may reuse ids). Query ids are per language unless
   ``shared_query_ids=True`` (the same id is the same question, e.g. a converted XQuAD-R):
   then they are kept and qrels of one id are merged over languages; otherwise they
   become ``<lang>:<_id>`` and only the monolingual setting is evaluated.
2. One folder with a ``lang`` field on every corpus and query line, one ``qrels/<split>.tsv``:
   ids are global (a query id may appear in several languages: the same question), so
   cross-lingual pairs are evaluated wherever qrels link a query to another language.
3. MIRACL's native files, per language folder ``PATH/<lang>/`` (or ``PATH/miracl-v1.0-<lang>/``),
   searched recursively: topics ``topics*<split>*.tsv`` (``qid<TAB>query``), qrels
   ``qrels*<split>*.tsv`` in TREC format (``qid Q0 docid rel``), and the corpus as
   ``*.jsonl`` / ``*.jsonl.gz`` files (``docid``, ``title``, ``text``). Ids as in layout 1.

Every format error names the file and the line.
"""
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from hybridfast.data.benchmark import RetrievalBenchmark, check_languages
from hybridfast.rules import is_language_code, json_objects, read_lines

__all__ = ["GradedRetrievalBenchmark", "BEIRFormatError", "BEIRWarning", "load_beir", "detect_layout"]

_MIRACL_PREFIX = re.compile(r"^miracl-(?:corpus-)?v\d+(?:\.\d+)*-")


class BEIRFormatError(ValueError):
    """A BEIR / MIRACL file does not have the expected structure (the message names file and line)."""


class BEIRWarning(UserWarning):
    """Qrels lines skipped while loading (unknown query or document)."""


@dataclass(repr=False)
class GradedRetrievalBenchmark(RetrievalBenchmark):
    """A RetrievalBenchmark with relevance grades (see the module docstring)."""

    grades: Dict[str, Dict[str, int]] = field(default_factory=dict)
    shared_query_ids: bool = True
    notes: List[str] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        for qid, rel in self.grades.items():
            for cid, g in rel.items():
                if cid not in self.qrels.get(qid, ()):
                    raise ValueError(f"grades[{qid!r}][{cid!r}]: not in qrels[{qid!r}]")
                if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                    raise ValueError(f"grades[{qid!r}][{cid!r}] must be an int >= 1, got {g!r}")

    def subset(self, languages):
        base = super().subset(languages)
        grades = {q: {c: g for c, g in rel.items() if c in base.qrels.get(q, ())} for q, rel in self.grades.items()}
        return GradedRetrievalBenchmark(base.queries, base.candidates, base.qrels, name=self.name,
                                        grades={q: r for q, r in grades.items() if r},
                                        shared_query_ids=self.shared_query_ids, notes=list(self.notes))


# ----------------------------------------------------------------------------- line readers

def _lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line without its end) for the non-blank lines of a text file (.gz too);
    a line that is not UTF-8 or a damaged file is a BEIRFormatError naming its line."""
    try:
        for n, line in read_lines(path, BEIRFormatError):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line
    except OSError as e:  # unreadable file (permissions, I/O)
        raise BEIRFormatError(f"{path}: cannot be read ({e})") from None


def _jsonl(path: Path) -> Iterator[Tuple[int, dict]]:
    return json_objects(path, BEIRFormatError)


def _field(path, n, obj, key, kinds=(str,), required=True, what=None):
    if key not in obj or obj[key] is None:
        if required:
            raise BEIRFormatError(f"{path}:{n}: missing field {key!r}" + (f" ({what})" if what else ""))
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BEIRFormatError(f"{path}:{n}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _grade(path, n, text):
    try:
        value = float(text)
    except ValueError:
        raise BEIRFormatError(f"{path}:{n}: relevance {text!r} is not a number") from None
    if value != int(value):
        raise BEIRFormatError(f"{path}:{n}: relevance {text!r} is not an integer grade")
    return int(value)


def _check_lang(lang, where):
    if not is_language_code(lang):
        raise BEIRFormatError(f"{where}: {lang!r} is not a language code (ISO 639-1, e.g. 'en', 'pt-BR')")
    return lang


# ----------------------------------------------------------------------------- file readers

def _read_corpus(path: Path, id_key: str, lang_key: Optional[str], into: Dict[str, Dict[str, tuple]],
                 lang=None, prefix=False, where_seen=None):
    """Corpus JSONL -> into[lang][cid] = (title, text) or (text, '') without a title."""
    where_seen = {} if where_seen is None else where_seen
    for n, obj in _jsonl(path):
        did = _field(path, n, obj, id_key, (str, int))
        text = _field(path, n, obj, "text")
        title = _field(path, n, obj, "title", required=False) or ""
        doc_lang = lang if lang_key is None else _check_lang(
            _field(path, n, obj, lang_key, what="a single-folder benchmark needs a 'lang' field on every line, "
                                               "or one subfolder per language"), f"{path}:{n}")
        cid = f"{doc_lang}:{did}" if prefix else did
        if cid in where_seen:
            raise BEIRFormatError(f"{path}:{n}: document id {did!r} already defined at {where_seen[cid]}")
        where_seen[cid] = f"{path}:{n}"
        into.setdefault(doc_lang, {})[cid] = (title, text) if title.strip() else (text, "")
    return into


def _read_queries_jsonl(path: Path, lang_key, lang=None):
    """-> {lang: {qid: text}}, {(lang, qid): 'file:line'}."""
    out, seen = {}, {}
    for n, obj in _jsonl(path):
        qid = _field(path, n, obj, "_id", (str, int))
        text = _field(path, n, obj, "text")
        q_lang = lang if lang_key is None else _check_lang(
            _field(path, n, obj, lang_key, what="a single-folder benchmark needs a 'lang' field on every line, "
                                               "or one subfolder per language"), f"{path}:{n}")
        if (q_lang, qid) in seen:
            raise BEIRFormatError(f"{path}:{n}: query id {qid!r} ({q_lang}) already defined at {seen[q_lang, qid]}")
        seen[q_lang, qid] = f"{path}:{n}"
        out.setdefault(q_lang, {})[qid] = text
    return out


def _read_topics_tsv(path: Path):
    out, seen = {}, {}
    for n, line in _lines(path):
        parts = line.split("\t")
        if len(parts) < 2:
            raise BEIRFormatError(f"{path}:{n}: expected 'qid<TAB>query', got {line[:80]!r}")
        qid, text = parts[0].strip(), "\t".join(parts[1:]).strip()
        if qid in seen:
            raise BEIRFormatError(f"{path}:{n}: query id {qid!r} already defined at line {seen[qid]}")
        seen[qid] = n
        out[qid] = text
    return out


def _read_qrels(path: Path, trec: bool):
    """-> [(qid, docid, grade, 'file:line')]. BEIR: 'query-id corpus-id score' (tab
    separated, a header line); TREC: 'qid Q0 docid rel' (whitespace separated)."""
    out = []
    for n, line in _lines(path):
        parts = line.split() if trec else line.split("\t")
        parts = [p.strip() for p in parts]
        if trec:
            if len(parts) != 4:
                raise BEIRFormatError(f"{path}:{n}: expected 'qid Q0 docid rel' (4 columns), got {line[:80]!r}")
            qid, _, did, rel = parts
        else:
            if len(parts) != 3:
                raise BEIRFormatError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score' (3 columns), "
                                      f"got {line[:80]!r}")
            qid, did, rel = parts
            if not out and n == 1 and not re.fullmatch(r"[-+]?\d+(?:\.0*)?", rel):
                continue  # the header line
        out.append((qid, did, _grade(path, n, rel), f"{path}:{n}"))
    return out


# ----------------------------------------------------------------------------- layouts

def _lang_of_folder(name):
    return _MIRACL_PREFIX.sub("", name)


def _is_beir_folder(p: Path) -> bool:
    return (p / "corpus.jsonl").is_file() and (p / "queries.jsonl").is_file()


def _for_split(name: str, stem: str, split: str) -> bool:
    """topics.miracl-v1.0-ar-dev.tsv, qrels.dev.tsv, topics.tsv (no split in the name)."""
    return (name.startswith(stem) and name.endswith((f"-{split}.tsv", f".{split}.tsv", f"-{split}.txt",
                                                     f".{split}.txt"))) or name in (f"{stem}.tsv", f"{stem}.txt")


def _miracl_files(p: Path, split: str):
    topics = sorted(f for f in p.rglob("topics*") if _for_split(f.name, "topics", split))
    qrels = sorted(f for f in p.rglob("qrels*") if _for_split(f.name, "qrels", split))
    corpus = sorted(f for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.gz"))
                    and not f.name.startswith(("topics", "qrels")))
    return topics, qrels, corpus


def _is_miracl_folder(p: Path) -> bool:
    return p.is_dir() and any(p.rglob("topics*.tsv")) and any(p.rglob("qrels*"))


def detect_layout(path) -> Optional[str]:
    """'beir-single', 'beir' (per-language), 'miracl', or None (not such a folder)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if _is_beir_folder(path):
        return "beir-single"
    subs = [p for p in sorted(path.iterdir()) if p.is_dir()]
    if any(_is_beir_folder(p) for p in subs):
        return "beir"
    if any(_is_miracl_folder(p) for p in subs):
        return "miracl"
    return None


def _qrels_file(folder: Path, split: str) -> Path:
    f = folder / "qrels" / f"{split}.tsv"
    if not f.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise FileNotFoundError(f"split: {f} not found" + (f" (splits here: {have})" if have else
                                                            " (no qrels/ folder)"))
    return f


def _assemble(path, queries, candidates, qrels_lines, shared, name, notes, elsewhere=frozenset()):
    """Qrels lines -> qrels and grades over known queries and candidates; drop queries without
    a relevant candidate. qrels_lines: [(lang or None, qid, cid, grade, where)]; elsewhere:
    query and document ids of languages not loaded (their lines are dropped without a word)."""
    known_q = {(l, q) for l, qs in queries.items() for q in qs}
    known_c = {c for cs in candidates.values() for c in cs}
    grades: Dict[str, Dict[str, int]] = {}
    seen: Dict[tuple, tuple] = {}
    unknown_q, unknown_c = [], []
    q_langs_of: Dict[str, List[str]] = {}
    for l, qs in queries.items():
        for q in qs:
            q_langs_of.setdefault(q, []).append(l)
    for lang, qid, cid, grade, where in qrels_lines:
        if lang is not None and (lang, qid) not in known_q or lang is None and qid not in q_langs_of:
            if qid not in elsewhere:
                unknown_q.append(where)
            continue
        if cid not in known_c:
            if cid not in elsewhere:
                unknown_c.append(where)
            continue
        if (qid, cid) in seen and seen[qid, cid][0] != grade:
            raise BEIRFormatError(f"{where}: query {qid!r}, document {cid!r} judged {grade} here but "
                                  f"{seen[qid, cid][0]} at {seen[qid, cid][1]}")
        seen[qid, cid] = (grade, where)
        if grade > 0:
            grades.setdefault(qid, {})[cid] = grade
    for what, lines in (("query ids not in the queries file", unknown_q),
                        ("document ids not in the loaded corpus", unknown_c)):
        if lines:
            warnings.warn(f"{path}: {len(lines)} qrels line(s) name {what} and were skipped "
                          f"(first: {lines[0]})", BEIRWarning, stacklevel=3)
    # only queries with a relevant candidate are kept (the others cannot be scored)
    queries = {l: {q: t for q, t in qs.items() if q in grades} for l, qs in queries.items()}
    if not any(queries.values()):
        raise ValueError(f"{path}: no query has a relevant document (grade >= 1) in the loaded corpus")
    if shared is False:
        notes.append("query ids are per language here (not shared across languages): only the monolingual "
                     "setting is evaluated; pass shared_query_ids=True (--shared-query-ids) if one id is "
                     "the same question in every language")
    bench = GradedRetrievalBenchmark(queries, candidates, {q: set(r) for q, r in grades.items()}, name=name,
                                     grades=grades, shared_query_ids=bool(shared), notes=notes)
    return bench


def _read_language_folder(folder: Path, lang: str, layout: str, split: str, candidates):
    """One language of a per-language layout: its corpus into `candidates` (ids <lang>:<id>)
    -> ({qid: text}, [(qid, docid, grade, where)])."""
    if layout == "beir":
        _read_corpus(folder / "corpus.jsonl", "_id", None, candidates, lang=lang, prefix=True)
        qs = _read_queries_jsonl(folder / "queries.jsonl", None, lang=lang).get(lang, {})
        return qs, _read_qrels(_qrels_file(folder, split), trec=False)
    topics, qrels, corpus = _miracl_files(folder, split)
    for what, found in (("topics (topics*-<split>.tsv)", topics), ("qrels (qrels*-<split>.tsv)", qrels),
                        ("corpus (*.jsonl or *.jsonl.gz)", corpus)):
        if not found:
            raise FileNotFoundError(f"{folder}: no {what} file for split {split!r}")
    for what, found in (("topics", topics), ("qrels", qrels)):
        if len(found) > 1:
            raise ValueError(f"{folder}: {len(found)} {what} files match split {split!r} "
                             f"({', '.join(f.name for f in found)}); keep one")
    seen_docs: Dict[str, str] = {}
    for f in corpus:
        _read_corpus(f, "docid", None, candidates, lang=lang, prefix=True, where_seen=seen_docs)
    return _read_topics_tsv(topics[0]), _read_qrels(qrels[0], trec=True)


def load_beir(path, languages=None, split="test", shared_query_ids=None) -> GradedRetrievalBenchmark:
    """Read a BEIR folder (per-language subfolders or one folder with a ``lang`` field) or
    MIRACL's native per-language files into a GradedRetrievalBenchmark (module docstring).

    split: the qrels to use (BEIR: ``qrels/<split>.tsv``; MIRACL: ``*-<split>.tsv``,
    e.g. 'dev'). shared_query_ids: per-language layouts only (see the module docstring);
    None means False there (one folder: ids are global, True).
    """
    path = Path(path)
    if not isinstance(split, str) or not split or "/" in split:
        raise ValueError(f"split must be a qrels name such as 'test' or 'dev', got {split!r}")
    if shared_query_ids is not None and not isinstance(shared_query_ids, bool):
        raise TypeError(f"shared_query_ids must be None or a bool, got {type(shared_query_ids).__name__}")
    layout = detect_layout(path)
    if layout is None:
        raise FileNotFoundError(f"path: {path} is not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) "
                                "nor a folder of per-language BEIR or MIRACL folders")
    notes: List[str] = []
    name = path.name if split == "test" else f"{path.name}[{split}]"
    if layout == "beir-single":
        if shared_query_ids is False:
            raise ValueError("shared_query_ids=False: a single-folder benchmark has one qrels file, so its "
                             "query ids are global")
        candidates = _read_corpus(path / "corpus.jsonl", "_id", "lang", {})
        queries = _read_queries_jsonl(path / "queries.jsonl", "lang")
        langs = check_languages(languages, set(candidates) | set(queries), where=path)
        elsewhere = {i for l, d in list(candidates.items()) + list(queries.items()) if l not in langs for i in d}
        candidates = {l: candidates.get(l, {}) for l in langs}
        queries = {l: queries.get(l, {}) for l in langs if queries.get(l)}
        lines = [(None, q, c, g, w) for q, c, g, w in _read_qrels(_qrels_file(path, split), trec=False)]
        return _assemble(path, queries, candidates, lines, True, name, notes, elsewhere)

    folders = {}
    for p in sorted(path.iterdir()):
        if p.is_dir() and (_is_beir_folder(p) if layout == "beir" else _is_miracl_folder(p)):
            folders[_check_lang(_lang_of_folder(p.name), f"{p}")] = p
    langs = check_languages(languages, folders, where=path)
    shared = bool(shared_query_ids)
    queries, candidates, lines = {}, {}, []
    for lang in langs:
        qs, raw = _read_language_folder(folders[lang], lang, layout, split, candidates)
        key = (lambda q: q) if shared else (lambda q, lang=lang: f"{lang}:{q}")
        queries[lang] = {key(q): t for q, t in qs.items()}
        lines += [(lang, key(q), f"{lang}:{d}", g, w) for q, d, g, w in raw]
        candidates.setdefault(lang, {})
    return _assemble(path, queries, candidates, lines, shared, name, notes)
