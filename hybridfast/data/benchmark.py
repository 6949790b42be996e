"""The in-memory benchmark and the rules every reader shares, defined once.

    RetrievalBenchmark   queries / candidates / qrels in plain dicts (DESIGN.md "Benchmarks")
    candidate_text       the one way a candidate becomes encoder input
    check_languages      the one language selector: codes checked (hybridfast.rules), then
                         matched against what a data set has
    language_files       the one rule for "which JSON of a LAReQA folder is a language":
                         ``<ISO 639-1 code>.json`` (optionally with a region, ``pt-BR.json``)
    SPLITS / check_split LAReQA's article split, hybridfast.rules.BENCHMARK_SPLITS
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Set, Tuple

from hybridfast import rules

SPLITS = rules.BENCHMARK_SPLITS


@dataclass
class RetrievalBenchmark:
    """A multilingual retrieval benchmark held in plain dicts.

    queries:    {lang: {query_id: text}}; a question keeps its id across languages.
    candidates: {lang: {candidate_id: (sentence, context)}}; ids unique over all languages.
    qrels:      {query_id: set(candidate_ids)}: relevant candidates, in any language.
    """

    queries: Dict[str, Dict[str, str]]
    candidates: Dict[str, Dict[str, Tuple[str, str]]]
    qrels: Dict[str, Set[str]]
    name: str = field(default="benchmark")

    def __post_init__(self):
        for arg in ("queries", "candidates", "qrels"):
            if not isinstance(getattr(self, arg), dict):
                raise TypeError(f"{arg} must be a dict, got {type(getattr(self, arg)).__name__}")
        if not self.queries or not any(self.queries.values()):
            raise ValueError("queries is empty: a benchmark needs at least one query")
        if not self.candidates or not any(self.candidates.values()):
            raise ValueError("candidates is empty: a benchmark needs at least one candidate")
        seen = {}
        for lang, cands in self.candidates.items():
            for cid in cands:
                if cid in seen:
                    raise ValueError(
                        f"candidates: id {cid!r} appears in both {seen[cid]!r} and {lang!r}; "
                        "candidate ids must be unique over all languages")
                seen[cid] = lang
        self.qrels = {qid: set(rel) for qid, rel in self.qrels.items()}
        for qid, rel in self.qrels.items():
            unknown = [c for c in rel if c not in seen]
            if unknown:
                raise ValueError(f"qrels[{qid!r}] names unknown candidate ids {unknown[:3]}")

    @property
    def languages(self):
        """Languages with queries or candidates, sorted."""
        return sorted(set(self.queries) | set(self.candidates))

    def subset(self, languages):
        """The benchmark restricted to `languages` (qrels restricted to their candidates)."""
        unknown = sorted(set(languages) - set(self.languages))
        if unknown:
            raise ValueError(f"languages: {unknown} not in this benchmark (has {self.languages})")
        queries = {l: self.queries[l] for l in languages if l in self.queries}
        candidates = {l: self.candidates[l] for l in languages if l in self.candidates}
        kept = {cid for cands in candidates.values() for cid in cands}
        qrels = {q: rel & kept for q, rel in self.qrels.items()}
        return RetrievalBenchmark(queries, candidates, qrels, name=self.name)

    def __repr__(self):
        nq = sum(len(v) for v in self.queries.values())
        nc = sum(len(v) for v in self.candidates.values())
        return (f"RetrievalBenchmark(name={self.name!r}, languages={self.languages}, "
                f"queries={nq}, candidates={nc})")


def candidate_text(sentence: str, context: str) -> str:
    """The one way a candidate becomes encoder input: the sentence, then its paragraph.

    The sentence comes first so that truncation to the encoder's max_length cuts
    the context, never the answer sentence itself.
    """
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a str, got {type(sentence).__name__}")
    if not isinstance(context, str):
        raise TypeError(f"context must be a str, got {type(context).__name__}")
    return f"{sentence} {context}" if context else sentence


def check_languages(languages, available, where=None):
    """The requested languages in order (all available, sorted, for None).

    `languages` is a list (or tuple) of codes; an item may hold a comma list (`['en,de']`,
    what `--languages en,de` gives), and repeats are dropped. Codes are checked by
    hybridfast.rules; errors name the argument and, with `where`, the data set that lacks a
    language. A bare string is refused: 'en' and 'en,de' look alike to a caller who meant a list.
    """
    if languages is None:
        return sorted(available)
    if isinstance(languages, str) or not isinstance(languages, (list, tuple)) or \
            not all(isinstance(l, str) for l in languages):
        raise TypeError("languages must be a list of language codes (str), e.g. ['en', 'de'], "
                        f"got {languages!r}")
    languages = rules.check_languages(list(dict.fromkeys(rules.flatten_languages(languages))))
    missing = [l for l in languages if l not in available]
    if missing:
        if where is not None:
            raise ValueError(f"languages: {missing} not in {where} (it has {sorted(available)})")
        raise ValueError(f"languages: {missing} not found (available: {sorted(available)})")
    return languages


def is_language_file(path: Path) -> bool:
    """A LAReQA language file: ``<code>.json`` with an ISO 639-1 code (hybridfast.rules);
    other JSON in the folder (metadata, ``dataset_info.json``) is not data."""
    return path.suffix == ".json" and rules.is_language_code(path.stem)


def language_files(path) -> Dict[str, Path]:
    """{language: file} of a LAReQA folder; FileNotFoundError naming `path` when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {path} is not a folder (expected a LAReQA folder of <lang>.json files)")
    files = {p.stem: p for p in sorted(path.glob("*.json")) if is_language_file(p)}
    if not files:
        raise FileNotFoundError(f"path: no <lang>.json files in {path}")
    return files


def check_split(split, choices=SPLITS):
    """`split` if it is one of `choices`, else ValueError naming the argument."""
    return rules.check_choice("split", split, choices)
