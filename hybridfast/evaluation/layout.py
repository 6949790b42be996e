"""EvalLayout: the rows and columns of one evaluation, shared by the evaluator, the metrics and
the TREC export (none of them reads another's private state).

    query rows        queries with a relevant candidate, languages sorted, then benchmark order:
                      query_ids[i], query_texts[i], query_lang[i] (index into query_languages)
    candidate blocks  candidates of each language in one contiguous block, languages sorted:
                      candidate_ids / candidate_texts, block yi = columns offsets[yi]:offsets[yi+1]
    relevance matrix  relevant[i] = the columns of query i's relevant candidates, padded with -1
    gains             the grade of each relevant slot (graded benchmarks), else None (all 1)
    tie priority      metrics.tie_priority(candidate_ids): trec_eval's order among equal scores
"""
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from hybridfast.data import candidate_text
from hybridfast.evaluation.metrics import tie_priority


@dataclass(frozen=True)
class EvalLayout:
    query_languages: List[str]
    query_lang: np.ndarray          # int [Q]
    query_ids: List[str]
    query_texts: List[str]
    candidate_languages: List[str]
    candidate_ids: List[str]
    candidate_texts: List[str]
    offsets: np.ndarray             # int [L_c + 1]
    relevant: np.ndarray            # int [Q, R], -1 padded
    gains: Optional[np.ndarray]     # float [Q, R] or None
    priority: np.ndarray            # int [C]
    left_out: List[str]             # languages with neither candidates nor a scorable query

    @classmethod
    def from_benchmark(cls, benchmark) -> "EvalLayout":
        """Build the layout of a RetrievalBenchmark (graded ones: `grades` become gains)."""
        languages, cand_ids, cand_texts, offsets = _candidate_blocks(benchmark)
        column = {cid: i for i, cid in enumerate(cand_ids)}
        q_lang, q_ids, q_texts, rel_rows = [], [], [], []
        for lang in sorted(benchmark.queries):
            for qid, text in benchmark.queries[lang].items():
                cols = sorted(column[str(c)] for c in benchmark.qrels.get(qid, ()) if str(c) in column)
                if cols:  # only queries whose id has relevant candidates (in any language) are evaluated
                    q_lang.append(lang)
                    q_ids.append(qid)
                    q_texts.append(text)
                    rel_rows.append(cols)
        if not q_ids:
            raise ValueError("benchmark has no query with a relevant candidate (check qrels and languages)")
        relevant = np.full((len(rel_rows), max(map(len, rel_rows))), -1, dtype=np.int64)
        for i, cols in enumerate(rel_rows):
            relevant[i, :len(cols)] = cols
        query_languages = sorted(set(q_lang))
        left_out = sorted(l for l in set(benchmark.queries) | set(benchmark.candidates)
                          if not benchmark.candidates.get(l) and l not in set(q_lang))
        return cls(query_languages=query_languages,
                   query_lang=np.array([query_languages.index(l) for l in q_lang], dtype=np.int64),
                   query_ids=q_ids, query_texts=q_texts, candidate_languages=languages, candidate_ids=cand_ids,
                   candidate_texts=cand_texts, offsets=np.array(offsets, dtype=np.int64), relevant=relevant,
                   gains=_gains(benchmark, q_ids, rel_rows, cand_ids, relevant.shape),
                   priority=tie_priority(cand_ids), left_out=left_out)

    @property
    def languages(self) -> List[str]:
        """Every language that has queries or candidates in the layout."""
        return sorted(set(self.query_languages) | set(self.candidate_languages))

    @property
    def block_of(self) -> np.ndarray:
        """int [C]: the candidate-language block of each candidate column."""
        return np.repeat(np.arange(len(self.candidate_languages)), np.diff(self.offsets))

    @property
    def relevant_block(self) -> np.ndarray:
        """int [Q, R]: the block of each relevant slot, -1 on padding."""
        valid = self.relevant >= 0
        return np.where(valid, self.block_of[np.maximum(self.relevant, 0)], -1)

    def block(self, yi: int) -> slice:
        """The candidate columns of candidate language yi."""
        return slice(int(self.offsets[yi]), int(self.offsets[yi + 1]))

    def query_rows(self):
        """(language, query id) of each query row, in order."""
        return [(self.query_languages[l], q) for l, q in zip(self.query_lang, self.query_ids)]

    def pairs(self, settings):
        """(xi, yi) index pairs evaluated under `settings`: x == y for mono, x != y for cross."""
        return [(xi, yi) for xi, x in enumerate(self.query_languages)
                for yi, y in enumerate(self.candidate_languages)
                if (x == y and "mono" in settings) or (x != y and "cross" in settings)]

    def texts_of(self, lang: str) -> List[str]:
        """The query and candidate texts of one language (for [UNK] rates)."""
        texts = [t for t, l in zip(self.query_texts, self.query_lang) if self.query_languages[l] == lang]
        if lang in self.candidate_languages:
            texts += self.candidate_texts[self.block(self.candidate_languages.index(lang))]
        return texts

    def warn_left_out(self, name) -> Optional[str]:
        """The warning (also returned, for the result's notes) about languages that vanished."""
        if not self.left_out:
            return None
        msg = (f"benchmark {name!r}: language(s) {self.left_out} have no candidates and no query with a relevant "
               "candidate and are left out of the evaluation (an empty or unmatched data file?)")
        warnings.warn(msg, UserWarning, stacklevel=4)
        return msg


def _candidate_blocks(benchmark):
    languages = sorted(l for l, c in benchmark.candidates.items() if c)
    cand_ids, cand_texts, offsets = [], [], [0]
    for lang in languages:
        for cid, value in benchmark.candidates[lang].items():
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"benchmark.candidates[{lang!r}][{cid!r}] must be (sentence, context)")
            cand_ids.append(str(cid))
            cand_texts.append(candidate_text(*value))
        offsets.append(len(cand_ids))
    if not cand_ids:
        raise ValueError("benchmark has no candidates")
    return languages, cand_ids, cand_texts, offsets


def _gains(benchmark, q_ids, rel_rows, cand_ids, shape):
    """Graded relevance: the gain of each relevant slot (nDCG uses grades as gains); None if all 1."""
    grades = getattr(benchmark, "grades", None) or {}
    if not any(g != 1 for rel in grades.values() for g in rel.values()):
        return None
    gains = np.zeros(shape, dtype=np.float64)
    for i, (qid, cols) in enumerate(zip(q_ids, rel_rows)):
        g = grades.get(qid, {})
        gains[i, :len(cols)] = [float(g.get(cand_ids[c], 1)) for c in cols]
    return gains
