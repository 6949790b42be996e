"""Retrieval benchmarks: the in-memory form (RetrievalBenchmark) and LAReQA readers."""
from dataclasses import dataclass, field
from typing import Dict, Set, Tuple


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
