"""Parallel training pairs for hybrid-batch training, and their readers.

A training set is E examples in L languages. Example e in language l has a
query and a positive passage (and optionally hard negatives) when
`availability[e, l]` is true; an example keeps one id across languages, so its
rows are translations of one another. The sampler only needs `availability`
(and `groups`); the trainer's collate asks for texts with `query(e, l)`,
`positive(e, l)` and `negatives(e, l)`.

Three formats are read (see `load_training_pairs`):
  * LAReQA folders (XQuAD-R, MLQA-R): question -> its answer sentence with its paragraph;
  * JSONL: one object per line, `{"id", "lang", "query", "positive", "negatives"?}`;
  * mMARCO-style folders: `<lang>/collection.tsv`, `<lang>/queries.train.tsv`, and
    id triples `qid<TAB>pos_pid<TAB>neg_pid` (in the root or in each language folder).

`groups`: examples whose positive texts coincide in some language (duplicates:
two questions answered by one sentence) share a group, so the sampler never
puts both in one batch and the loss never treats one's positive as the other's
negative. It is None when every example is its own group.
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from hybridfast import rules
from hybridfast.data.benchmark import candidate_text, check_languages
from hybridfast.data.downloads import DATASETS, resolve_dataset, verify_dataset
from hybridfast.data.lareqa import examples_with_languages
from hybridfast.rules import TRAIN_SPLITS, check_language_code, json_objects, read_lines

# mMARCO names its language folders in English words; map them to ISO 639-1.
MMARCO_LANGUAGES = {
    "arabic": "ar", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr",
    "german": "de", "hindi": "hi", "indonesian": "id", "italian": "it", "japanese": "ja",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "vietnamese": "vi",
}

_TRIPLE_NAMES = ("triples.train.ids.small.tsv", "triples.train.ids.tsv", "triples.ids.tsv",
                 "triples.train.ids.small.tsv.gz", "triples.train.ids.tsv.gz")


class ParallelPairs:
    """E examples x L languages of (query, positive, negatives) texts.

    Built from `rows`: {example_id: {lang: (query, positive, [negatives])}}
    (insertion order = example order). Languages are sorted.
    """

    def __init__(self, rows: Dict[str, Dict[str, tuple]], name: str = "pairs"):
        if not rows:
            raise ValueError(f"{name}: no training examples found")
        self.name = name
        self.example_ids: List[str] = list(rows)
        self.languages: List[str] = sorted({l for per in rows.values() for l in per})
        col = {l: i for i, l in enumerate(self.languages)}
        E, L = len(self.example_ids), len(self.languages)
        self.availability = np.zeros((E, L), dtype=np.bool_)
        # texts[l][e] is None where unavailable: flat lists index fast and pickle small
        self._queries = [[None] * E for _ in range(L)]
        self._positives = [[None] * E for _ in range(L)]
        self._negatives = [[None] * E for _ in range(L)]
        for e, per in enumerate(rows.values()):
            for lang, (query, positive, negatives) in per.items():
                j = col[lang]
                self.availability[e, j] = True
                self._queries[j][e] = query
                self._positives[j][e] = positive
                self._negatives[j][e] = list(negatives) if negatives else []
        self.groups = self._duplicate_groups()

    def _duplicate_groups(self) -> Optional[np.ndarray]:
        # union-find over "same positive text in the same language"
        parent = np.arange(len(self.example_ids))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for positives in self._positives:
            first = {}
            for e, text in enumerate(positives):
                if text is None:
                    continue
                if text in first:
                    a, b = find(first[text]), find(e)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                else:
                    first[text] = e
        roots = np.array([find(i) for i in range(len(parent))], dtype=np.int64)
        if np.array_equal(roots, np.arange(len(parent))):
            return None
        return roots

    def group_of(self, e: int) -> int:
        """The group id of example e (its own index when groups is None)."""
        return int(e) if self.groups is None else int(self.groups[e])

    def positive_groups(self, lang: int) -> Dict[str, int]:
        """{positive text in `lang`: group}: lets a hard negative that is some
        example's positive carry that example's group (it is a false negative there)."""
        cache = self.__dict__.setdefault("_pos_group_cache", {})
        if lang not in cache:
            cache[lang] = {t: self.group_of(e) for e, t in enumerate(self._positives[lang]) if t is not None}
        return cache[lang]

    def _check(self, e, l):
        if not self.availability[e, l]:
            raise KeyError(f"example {self.example_ids[e]!r} has no text in language "
                           f"{self.languages[l]!r}")

    def query(self, e: int, l: int) -> str:
        self._check(e, l)
        return self._queries[l][e]

    def positive(self, e: int, l: int) -> str:
        self._check(e, l)
        return self._positives[l][e]

    def negatives(self, e: int, l: int) -> List[str]:
        self._check(e, l)
        return self._negatives[l][e]

    def __len__(self):
        return len(self.example_ids)

    def fingerprint(self) -> str:
        """sha256 of the data as loaded (languages, example ids, every text): a resumed run
        compares it with its checkpoint's to refuse changed training data."""
        h = hashlib.sha256()
        h.update(json.dumps([self.languages, self.example_ids]).encode("utf-8"))
        step = 1 << 14  # in slices: one JSON string of a whole large corpus would double its memory
        for j in range(len(self.languages)):
            for texts in (self._queries[j], self._positives[j], self._negatives[j]):
                for start in range(0, len(texts), step):
                    h.update(json.dumps(texts[start:start + step]).encode("utf-8"))
        return h.hexdigest()

    def __repr__(self):
        per = dict(zip(self.languages, self.availability.sum(0).tolist()))
        return (f"ParallelPairs(name={self.name!r}, examples={len(self)}, per_language={per}, "
                f"duplicate_groups={'none' if self.groups is None else len(set(self.groups.tolist()))})")


def select_languages(available, languages, name="data"):
    """`languages` checked against what a data set has: hybridfast.data.benchmark.check_languages
    (the one selector), which also takes a comma string here (training configs carry 'en,de')."""
    if isinstance(languages, str):
        languages = [languages]
    return check_languages(languages, available, where=name)


# ----------------------------------------------------------------------------- readers

def load_training_pairs(spec, data_dir=None, split="train", languages=None, allow_modified=False) -> ParallelPairs:
    """Read a training set into ParallelPairs.

    spec: a LAReQA name ("xquad-r", "mlqa-r") or folder (one SQuAD-format JSON per
    language), a .jsonl file (or a folder of them), or an mMARCO-style folder.
    split: LAReQA's deterministic article split ("train", "test", "all"); for
    mMARCO-style folders it picks `queries.<split>.tsv`; JSONL has no splits and
    only accepts "train" or "all".
    languages: ISO 639-1 codes to keep (default: all the data has).
    allow_modified: use a named set whose files differ from their pinned sha256, with a warning
    (hybridfast.data.checksums); without it such a set is refused naming the file.
    """
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise TypeError(f"spec must be a path or data set name, got {spec!r}")
    if split not in TRAIN_SPLITS:
        raise ValueError(f"split must be 'train', 'test', 'all' (or 'dev' for mMARCO), got {split!r}")
    if languages is not None:  # format check before any I/O; the data set check comes with the data
        languages = rules.check_languages(languages if isinstance(languages, str) else
                                          list(dict.fromkeys(rules.flatten_languages(languages))))
    if str(spec) in DATASETS:  # a data set name: found where benchmarks live, checked against its pins
        folder = resolve_dataset(str(spec), data_dir=data_dir)
        verify_dataset(str(spec), folder, allow_modified=allow_modified)
        return read_lareqa(folder, split=split, languages=languages)
    path = Path(spec).expanduser()
    if not path.exists() and data_dir is not None and (Path(data_dir) / str(spec)).exists():
        path = Path(data_dir) / str(spec)
    if path.is_file():
        if split not in ("train", "all"):
            raise ValueError(f"split={split!r}: JSONL training files have no splits; use 'train'")
        return read_jsonl([path], languages)
    if path.is_dir():
        kind = detect_format(path)
        if kind == "jsonl":
            if split not in ("train", "all"):
                raise ValueError(f"split={split!r}: JSONL training files have no splits; use 'train'")
            return read_jsonl(sorted(path.glob("*.jsonl")) + sorted(path.glob("*.jsonl.gz")), languages)
        if kind == "mmarco":
            return read_mmarco(path, split=split, languages=languages)
        return read_lareqa(path, split=split, languages=languages)
    if path.suffix in (".jsonl", ".gz", ".json", ".tsv") or "/" in str(spec):
        raise FileNotFoundError(f"training data {str(spec)!r} not found")
    return read_lareqa(resolve_dataset(str(spec), data_dir=data_dir), split=split, languages=languages)


def detect_format(folder: Path) -> str:
    """'mmarco' (language subfolders with collection.tsv), 'jsonl' or 'lareqa'."""
    if any((sub / "collection.tsv").exists() for sub in folder.iterdir() if sub.is_dir()):
        return "mmarco"
    if any(folder.glob("*.jsonl")) or any(folder.glob("*.jsonl.gz")):
        return "jsonl"
    if any(folder.glob("*.json")):
        return "lareqa"
    raise FileNotFoundError(
        f"{folder}: no training data recognised (expected <lang>.json LAReQA files, *.jsonl files, "
        "or <lang>/collection.tsv + queries.train.tsv mMARCO-style folders)")


def read_lareqa(path, split="train", languages=None) -> ParallelPairs:
    """LAReQA folder: query = question, positive = candidate_text(answer sentence, paragraph).

    Hard negatives: the other answer sentences of the same paragraph (same
    paragraph, different sentence: the distractors LAReQA itself ranks against).
    """
    # lareqa_examples lists the folder and checks the languages: once (the one selector)
    languages, records = examples_with_languages(path, languages=languages, split=split)
    if not records:
        raise ValueError(f"{path}: no questions in split {split!r} for languages {languages}")
    empty = sorted(set(languages) - {r["lang"] for r in records})
    if empty:
        raise ValueError(f"{path}: no questions in split {split!r} for languages {empty}; leave them out with "
                         f"languages={sorted(set(languages) - set(empty))}")
    rows: Dict[str, Dict[str, tuple]] = {}
    by_paragraph: Dict[tuple, Dict[str, str]] = {}  # (lang, context) -> {sentence: positive}
    for r in records:
        positive = candidate_text(r["sentence"], r["context"])
        rows.setdefault(r["id"], {})[r["lang"]] = (r["question"], positive, None)
        by_paragraph.setdefault((r["lang"], r["context"]), {})[r["sentence"]] = positive
    for r in records:
        siblings = by_paragraph[(r["lang"], r["context"])]
        q, pos, _ = rows[r["id"]][r["lang"]]
        rows[r["id"]][r["lang"]] = (q, pos, [p for s, p in siblings.items() if s != r["sentence"]])
    return ParallelPairs(rows, name=Path(path).name)


def read_jsonl(files, languages=None) -> ParallelPairs:
    """JSONL: one object per line with id, lang, query, positive and optional negatives."""
    if not files:
        raise FileNotFoundError("no .jsonl files given")
    rows: Dict[str, Dict[str, tuple]] = {}
    keep = set(languages) if languages is not None else None
    seen_langs = set()
    for file in files:
        for lineno, obj in json_objects(Path(file)):
            where = f"{file}:{lineno}"
            for key in ("id", "lang", "query", "positive"):
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r} (need id, lang, query, positive)")
            for key in ("query", "positive"):
                if not isinstance(obj[key], str) or not obj[key].strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string")
            lang = obj["lang"]
            try:
                check_language_code(lang, arg="lang")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            negatives = obj.get("negatives") or []
            if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
                raise ValueError(f"{where}: 'negatives' must be a list of strings")
            seen_langs.add(lang)
            if keep is not None and lang not in keep:
                continue
            eid = _example_id(obj["id"], where)
            per = rows.setdefault(eid, {})
            if lang in per:
                raise ValueError(f"{where}: id {eid!r} already has a {lang!r} line")
            per[lang] = (obj["query"], obj["positive"], negatives)
    if languages is not None:
        select_languages(seen_langs, languages, name=", ".join(str(f) for f in files))
    name = Path(files[0]).stem if len(files) == 1 else Path(files[0]).parent.name
    return ParallelPairs(rows, name=name)


def _example_id(value, where) -> str:
    """A JSONL id: a non-empty string or an integer (1 and "1" are one example). null, bools,
    floats and containers are refused: str() would merge null with a real id "None"."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {json.dumps(value)}")
    return str(value)


def _read_tsv(path: Path, keep=None) -> Dict[str, str]:
    """id<TAB>text rows; only ids in `keep` when given (a collection can be huge)."""
    out = {}
    for lineno, line in read_lines(path):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'id<TAB>text'")
        if keep is None or parts[0] in keep:
            out[parts[0]] = parts[1]
    return out


def _find_triples(folder: Path) -> Optional[Path]:
    for name in _TRIPLE_NAMES:
        if (folder / name).exists():
            return folder / name
    found = sorted(folder.glob("triples*.tsv"))
    return found[0] if found else None


def _read_triples(path: Path, triples: Dict[str, tuple]):
    """qid<TAB>pos_pid<TAB>neg_pid; per qid the first positive and its distinct negatives."""
    for lineno, line in read_lines(path):
        line = line.strip()
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 'qid<TAB>pos_pid<TAB>neg_pid', got {len(parts)} fields")
        qid, pos, neg = parts
        if qid not in triples:
            triples[qid] = (pos, [])
        if triples[qid][0] == pos and neg not in triples[qid][1]:
            triples[qid][1].append(neg)


def read_mmarco(root, split="train", languages=None) -> ParallelPairs:
    """mMARCO-style folder: per language `collection.tsv` (pid, text), `queries.<split>.tsv`
    (qid, text); id triples (qid, pos_pid, neg_pid) in the root or in the language folders.
    Query and passage ids are shared across languages: one qid is one example."""
    root = Path(root)
    folders = {}
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and (sub / "collection.tsv").exists():
            code = MMARCO_LANGUAGES.get(sub.name, sub.name)
            check_language_code(code, arg=f"language folder {sub}")
            if code in folders:
                raise ValueError(f"{root}: two folders for language {code!r}")
            folders[code] = sub
    languages = select_languages(sorted(folders), languages, name=str(root))
    triples: Dict[str, tuple] = {}
    sources = [p for p in [_find_triples(root)] + [_find_triples(folders[l]) for l in languages] if p]
    if not sources:
        raise FileNotFoundError(f"{root}: no id triples file (qid<TAB>pos_pid<TAB>neg_pid), e.g. "
                                f"{root}/triples.train.ids.small.tsv")
    for src in dict.fromkeys(sources):
        _read_triples(src, triples)
    needed = {pid for pos, negs in triples.values() for pid in [pos, *negs]}
    rows: Dict[str, Dict[str, tuple]] = {qid: {} for qid in triples}
    for lang in languages:
        folder = folders[lang]
        qfile = folder / f"queries.{split}.tsv"
        if not qfile.exists():
            raise FileNotFoundError(f"{qfile} not found (queries of split {split!r} for language {lang!r})")
        queries = _read_tsv(qfile, keep=triples)
        passages = _read_tsv(folder / "collection.tsv", keep=needed)
        found = 0
        for qid, (pos, negs) in triples.items():
            if qid in queries and pos in passages:
                rows[qid][lang] = (queries[qid], passages[pos], [passages[n] for n in negs if n in passages])
                found += 1
        if not found:
            raise ValueError(f"{folder}: no triple has both its query (queries.{split}.tsv) and its positive passage "
                             f"(collection.tsv) in language {lang!r}; leave it out with "
                             f"languages={[l for l in languages if l != lang]}")
    rows = {qid: per for qid, per in rows.items() if per}
    if not rows:
        raise ValueError(f"{root}: no triple has both its query and positive passage in {languages}")
    return ParallelPairs(rows, name=root.name)
