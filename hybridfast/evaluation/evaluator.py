"""RetrievalEvaluator: monolingual, cross-lingual and multilingual retrieval metrics.

    benchmark --encode once--> query [Q, D] and candidate [C, D] embeddings
              --search (one scoring pass per query chunk)--> exact ranks of relevant candidates,
                 inside each candidate language and inside the pool of all languages
              --hybridfast.evaluation.metrics--> per pair / per language / summary --> JSON, Markdown, PNG

Settings (LAReQA conventions; README "Evaluation", docs/architecture.md):
- ``mono``: the L pairs x -> x, macro-averaged over pairs;
- ``cross``: the L(L-1) pairs x -> y (x != y), macro-averaged over pairs;
- ``multi``: each query against the pool of all languages' candidates; mean per
  query language, then over languages; adds ``rank_distance`` (max rank
  distance: worst minus best rank of a query's relevant candidates in the pool;
  lower is better; its floor is n_relevant - 1, all relevant candidates side by side).
Within a pair, a metric is the mean over its queries; a query with no relevant
candidate in the pair's candidate language is left out of that pair, and only
queries whose id has relevant candidates are evaluated at all.

Metrics equal trec_eval's (pytrec_eval) on the same float32 scores, ties
included (see hybridfast.evaluation.metrics for the tie policy). With ``ivf_lists`` the
search is approximate (faiss IVF): metrics are then those of the top-k run
(relevant candidates beyond k count as not retrieved) and rank distance is nan.
"""
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from hybridfast.evaluation.metrics import METRICS, MULTI_METRICS, macro_average, mean_metrics, per_query_metrics, tie_priority
from hybridfast import rules
from hybridfast._backends import resolve_device
from hybridfast.data import candidate_text
from hybridfast.evaluation.search import BACKENDS, resolve_backend, search

SETTINGS = ("mono", "cross", "multi")


def _pair_key(pair):
    return f"{pair[0]}->{pair[1]}"


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _none_to_nan(x):
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    return float("nan") if x is None else x


@dataclass
class EvaluationResult:
    """What RetrievalEvaluator.evaluate returns.

    summary:      {"mono"|"cross"|"multi": {metric: value}}
    per_pair:     {(query_lang, candidate_lang): {metric: value}}
    per_language: {query_lang: {metric: value}} in the multilingual pool
    unk_rates:    {lang: fraction of [UNK] tokens} when the encoder has unk_rate(texts), else {}
    n_queries:    {"xx->yy" or "xx->multi": number of queries evaluated}
    per_query:    {"xx->yy" or "xx->multi": {query_id: {metric: value}}} when the evaluator
                  was built with keep_per_query=True (for significance tests), else {}
    """

    summary: Dict[str, Dict[str, float]]
    per_pair: Dict[Tuple[str, str], Dict[str, float]]
    per_language: Dict[str, Dict[str, float]]
    unk_rates: Dict[str, float] = field(default_factory=dict)
    query_languages: list = field(default_factory=list)
    candidate_languages: list = field(default_factory=list)
    n_queries: Dict[str, int] = field(default_factory=dict)
    benchmark: str = "benchmark"
    exact: bool = True
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    per_query: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """JSON-ready: pair keys as "xx->yy", nan as None."""
        return _nan_to_none({
            "benchmark": self.benchmark, "exact": self.exact,
            "query_languages": list(self.query_languages),
            "candidate_languages": list(self.candidate_languages),
            "summary": self.summary,
            "per_pair": {_pair_key(p): m for p, m in self.per_pair.items()},
            "per_language": self.per_language, "unk_rates": self.unk_rates,
            "n_queries": self.n_queries, "config": self.config, "timings": self.timings,
            **({"per_query": self.per_query} if self.per_query else {}),
        })

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationResult":
        data = _none_to_nan(data)
        per_pair = {}
        for key, metrics in data["per_pair"].items():
            q, sep, c = key.partition("->")
            if not sep:
                raise ValueError(f"per_pair key {key!r} is not of the form 'xx->yy'")
            per_pair[(q, c)] = metrics
        return cls(summary=data["summary"], per_pair=per_pair, per_language=data.get("per_language", {}),
                   unk_rates=data.get("unk_rates", {}), query_languages=data.get("query_languages", []),
                   candidate_languages=data.get("candidate_languages", []),
                   n_queries=data.get("n_queries", {}), benchmark=data.get("benchmark", "benchmark"),
                   exact=data.get("exact", True), config=data.get("config", {}),
                   timings=data.get("timings", {}), per_query=data.get("per_query", {}))

    @classmethod
    def from_json(cls, path) -> "EvaluationResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------ views
    def map_matrix(self, metric="map"):
        """[query language][candidate language] list of lists (nan where a pair has no value)."""
        return [[self.per_pair.get((q, c), {}).get(metric, float("nan")) for c in self.candidate_languages]
                for q in self.query_languages]

    def to_markdown(self) -> str:
        def fmt(v, digits=4):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

        lines = [f"### {self.benchmark}: retrieval summary" + ("" if self.exact else " (approximate search)"),
                 "", "| setting | " + " | ".join(MULTI_METRICS) + " |",
                 "|---|" + "---:|" * len(MULTI_METRICS)]
        for setting, metrics in self.summary.items():
            cells = [fmt(metrics.get(m), 2 if m == "rank_distance" else 4) if m in metrics else ""
                     for m in MULTI_METRICS]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        if self.per_pair:
            cols = list(self.candidate_languages)
            head = ["query \\ candidate"] + cols
            if self.per_language:
                head += ["multi", "rank dist."]
            lines += ["", "mAP per language pair (rows: query language, columns: candidate language; "
                      "multi: the pool of all languages)", "",
                      "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            for q, row in zip(self.query_languages, self.map_matrix()):
                cells = [fmt(v) for v in row]
                if self.per_language:
                    pl = self.per_language.get(q, {})
                    cells += [fmt(pl.get("map")), fmt(pl.get("rank_distance"), 1)]
                lines.append(f"| {q} | " + " | ".join(cells) + " |")
        for note in self.config.get("notes", []):
            lines += ["", f"Note: {note}."]
        if self.unk_rates:
            langs = sorted(self.unk_rates)
            lines += ["", "[UNK] token rate per language", "", "| " + " | ".join(langs) + " |",
                      "|" + "---:|" * len(langs),
                      "| " + " | ".join(f"{100 * self.unk_rates[l]:.1f}%" for l in langs) + " |"]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> Path:
        """PNG heatmap of the L x L mAP matrix, the multilingual mAP and rank distance beside it."""
        from hybridfast.evaluation.plots import map_heatmap

        multi = [self.per_language.get(q, {}).get("map", float("nan")) for q in self.query_languages] \
            if self.per_language else None
        rd = [self.per_language.get(q, {}).get("rank_distance", float("nan")) for q in self.query_languages] \
            if self.per_language else None
        parts = [f"{s} mAP {m['map']:.3f}" for s, m in self.summary.items() if "map" in m]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        map_heatmap(path, self.query_languages, self.candidate_languages, self.map_matrix(), multi, rd,
                    title=f"{self.benchmark}: mAP (rows: query language, columns: candidate language)",
                    summary=", ".join(parts))
        return path


def _embeddings(out, n, what):
    """Validate an encoder's output: [n, D] finite floats -> float32 numpy."""
    try:
        import torch

        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(out)
    if arr.ndim != 2:
        raise ValueError(f"encoder.{what} must return a 2-D [n, D] array, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"encoder.{what} returned {arr.shape[0]} rows for {n} texts")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"encoder.{what} must return numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise ValueError(f"encoder.{what} returned NaN or infinite values in {bad} rows")
    return arr


def _call_encode(fn, texts, batch_size):
    if batch_size is not None:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "batch_size" in params:
            return fn(texts, batch_size=batch_size)
    return fn(texts)


class RetrievalEvaluator:
    """Evaluate any encoder (encode_queries / encode_passages -> [n, D]) on a RetrievalBenchmark.

    settings: subset of ("mono", "cross", "multi"). k: depth of the top-k lists for
    approximate (IVF) search; exact search counts ranks and needs no lists.
    search: "auto" | "torch" | "faiss" (see hybridfast.evaluation.search). device: for the search.
    batch_size: passed to the encoder's encode_* when they accept it. languages:
    evaluate only these (queries and candidates); ivf_lists / nprobe: approximate faiss IVF.
    keep_per_query: also return every query's metric values (EvaluationResult.per_query).
    """

    def __init__(self, benchmark, settings=SETTINGS, k=100, search="auto", device="auto", batch_size=None,
                 show_progress=True, languages=None, chunk_size=None, ivf_lists=None, nprobe=16,
                 keep_per_query=False):
        for attr in ("queries", "candidates", "qrels"):
            if not isinstance(getattr(benchmark, attr, None), dict):
                raise TypeError(f"benchmark must be a RetrievalBenchmark (dict attributes queries, candidates, "
                                f"qrels), got {type(benchmark).__name__}")
        if isinstance(settings, str):
            settings = (settings,)
        settings = tuple(settings)
        if not settings or any(s not in SETTINGS for s in settings):
            raise ValueError(f"settings must be a non-empty subset of {SETTINGS}, got {settings!r}")
        k = rules.check_int("k", k, 1)
        if search not in BACKENDS:
            raise ValueError(f"search must be one of {BACKENDS}, got {search!r}")
        resolve_backend(search, ivf_lists)  # checks the combination early
        # one rule for ints everywhere (hybridfast.rules): True is not a batch size
        batch_size = rules.check_int("batch_size", batch_size, 1, optional=True)
        chunk_size = rules.check_int("chunk_size", chunk_size, 1, optional=True)
        ivf_lists = rules.check_int("ivf_lists", ivf_lists, 1, optional=True)
        nprobe = rules.check_int("nprobe", nprobe, 1)
        show_progress = rules.check_bool("show_progress", show_progress)
        keep_per_query = rules.check_bool("keep_per_query", keep_per_query)
        if languages is not None:
            if isinstance(languages, str):
                languages = [languages]
            have = sorted(set(benchmark.queries) | set(benchmark.candidates))
            unknown = sorted(set(languages) - set(have))
            if unknown:
                raise ValueError(f"languages: {unknown} not in the benchmark (it has {have})")
            benchmark = benchmark.subset(list(languages))
        self.benchmark = benchmark
        # A benchmark whose query ids are per language (BEIR / MIRACL folders read without
        # shared ids, hybridfast.data.beir) has no cross-lingual qrels: mono only, and say so.
        self.notes = list(getattr(benchmark, "notes", []) or [])
        if getattr(benchmark, "shared_query_ids", True) is False:
            dropped = [s for s in settings if s != "mono"]
            settings = tuple(s for s in settings if s == "mono")
            if not settings:
                raise ValueError(f"settings {dropped} need query ids shared across languages, which "
                                 f"{getattr(benchmark, 'name', 'this benchmark')!r} does not have; use 'mono'")
        self.settings = settings
        self.k = int(k)
        self.search = search
        self.device = device
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.chunk_size = chunk_size
        self.ivf_lists = ivf_lists
        self.nprobe = nprobe
        self.keep_per_query = bool(keep_per_query)
        self._prepare()

    # ------------------------------------------------------------ layout
    def _prepare(self):
        b = self.benchmark
        self.candidate_languages = sorted(l for l, c in b.candidates.items() if c)
        cand_ids, cand_texts, offsets = [], [], [0]
        for lang in self.candidate_languages:
            for cid, value in b.candidates[lang].items():
                if not (isinstance(value, (tuple, list)) and len(value) == 2):
                    raise ValueError(f"benchmark.candidates[{lang!r}][{cid!r}] must be (sentence, context)")
                cand_ids.append(str(cid))
                cand_texts.append(candidate_text(*value))
            offsets.append(len(cand_ids))
        if not cand_ids:
            raise ValueError("benchmark has no candidates")
        column = {cid: i for i, cid in enumerate(cand_ids)}
        # only queries whose id has relevant candidates (in any language) are evaluated
        q_lang, q_ids, q_texts, rel_rows = [], [], [], []
        for lang in sorted(b.queries):
            for qid, text in b.queries[lang].items():
                cols = sorted(column[str(c)] for c in b.qrels.get(qid, ()) if str(c) in column)
                if cols:
                    q_lang.append(lang)
                    q_ids.append(qid)
                    q_texts.append(text)
                    rel_rows.append(cols)
        if not q_ids:
            raise ValueError("benchmark has no query with a relevant candidate (check qrels and languages)")
        # a language with neither candidates nor a scorable query (an empty file) vanishes: say so
        empty = sorted(l for l in set(b.queries) | set(b.candidates)
                       if not b.candidates.get(l) and l not in set(q_lang))
        if empty:
            self._warn_left_out(empty, "no candidates and no query with a relevant candidate")
        width = max(len(r) for r in rel_rows)
        relevant = np.full((len(rel_rows), width), -1, dtype=np.int64)
        for i, cols in enumerate(rel_rows):
            relevant[i, :len(cols)] = cols
        self._gains = None
        grades = getattr(b, "grades", None) or {}
        if any(g != 1 for rel in grades.values() for g in rel.values()):
            # graded relevance: the gain of each relevant slot (nDCG uses grades as gains)
            self._gains = np.zeros(relevant.shape, dtype=np.float64)
            for i, (qid, cols) in enumerate(zip(q_ids, rel_rows)):
                g = grades.get(qid, {})
                self._gains[i, :len(cols)] = [float(g.get(cand_ids[c], 1)) for c in cols]
        self.query_languages = sorted(set(q_lang))
        self._q_lang = np.array([self.query_languages.index(l) for l in q_lang], dtype=np.int64)
        self._q_texts, self._q_ids = q_texts, q_ids
        self._cand_ids, self._cand_texts = cand_ids, cand_texts
        self._offsets = np.array(offsets, dtype=np.int64)
        self._relevant = relevant
        self._prio = tie_priority(cand_ids)

    def _check_save_run(self, save_run, run_depth):
        from hybridfast.evaluation.trec import DEPTHS, check_run_folder

        if run_depth not in DEPTHS:
            raise ValueError(f"run_depth must be one of {DEPTHS}, got {run_depth!r}")
        if self.ivf_lists is not None:
            raise ValueError("save_run needs exact search: approximate IVF search (ivf_lists) has no full ranking")
        check_run_folder(save_run)

    def _warn_left_out(self, langs, why):
        msg = (f"benchmark {getattr(self.benchmark, 'name', '')!r}: language(s) {langs} have {why} and are "
               "left out of the evaluation (an empty or unmatched data file?)")
        warnings.warn(msg, UserWarning, stacklevel=4)
        self.notes.append(msg)

    @property
    def query_rows(self):
        """(language, query id) of each row of the query embeddings, in order."""
        return [(self.query_languages[l], q) for l, q in zip(self._q_lang, self._q_ids)]

    @property
    def candidate_ids(self):
        """Candidate id of each row of the candidate embeddings, in order (languages sorted)."""
        return list(self._cand_ids)

    @property
    def candidate_texts(self):
        """The encoder inputs of the candidates: candidate_text(sentence, context)."""
        return list(self._cand_texts)

    # ------------------------------------------------------------ evaluation
    def encode(self, encoder):
        """One pass over all queries and all candidates -> (query, candidate) float32 arrays."""
        for attr in ("encode_queries", "encode_passages"):
            if not callable(getattr(encoder, attr, None)):
                raise TypeError(f"encoder must have a callable {attr}(list[str]), "
                                f"got {type(encoder).__name__}")
        q = _embeddings(_call_encode(encoder.encode_queries, list(self._q_texts), self.batch_size),
                        len(self._q_texts), "encode_queries")
        c = _embeddings(_call_encode(encoder.encode_passages, list(self._cand_texts), self.batch_size),
                        len(self._cand_texts), "encode_passages")
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"encoder: query embeddings have dimension {q.shape[1]}, "
                             f"candidate embeddings {c.shape[1]}")
        return q, c

    def unk_rates(self, encoder) -> Dict[str, float]:
        """{lang: [UNK] rate over that language's queries and candidate texts}, if the encoder can tell."""
        fn = getattr(encoder, "unk_rate", None)
        if not callable(fn):
            return {}
        out = {}
        block = {l: (self._offsets[i], self._offsets[i + 1]) for i, l in enumerate(self.candidate_languages)}
        for lang in sorted(set(self.query_languages) | set(self.candidate_languages)):
            texts = [t for t, l in zip(self._q_texts, self._q_lang) if self.query_languages[l] == lang] \
                if lang in self.query_languages else []
            if lang in block:
                texts += self._cand_texts[block[lang][0]:block[lang][1]]
            out[lang] = float(fn(texts))
        return out

    def evaluate(self, encoder, save_run=None, run_depth="full") -> EvaluationResult:
        """Encode, search, score. save_run: a folder for TREC run and qrels files of this
        evaluation (hybridfast.evaluation.trec; run_depth "full" or "k")."""
        if save_run is not None:  # before the encoding, not after
            self._check_save_run(save_run, run_depth)
        t0 = time.perf_counter()
        q, c = self.encode(encoder)
        t1 = time.perf_counter()
        result = self.evaluate_embeddings(q, c, save_run=save_run, run_depth=run_depth)
        result.unk_rates = self.unk_rates(encoder)
        result.timings["encode_s"] = t1 - t0
        result.timings["encode_texts_per_s"] = (len(self._q_texts) + len(self._cand_texts)) / max(t1 - t0, 1e-9)
        return result

    def evaluate_embeddings(self, query_embeddings, candidate_embeddings, save_run=None,
                            run_depth="full") -> EvaluationResult:
        """Metrics from precomputed embeddings, rows in the evaluator's order: `query_rows`
        (languages sorted, then benchmark order, only queries with qrels) and
        `candidate_ids` (languages sorted, then benchmark order). save_run / run_depth: see evaluate."""
        if save_run is not None:
            self._check_save_run(save_run, run_depth)
        q = _embeddings(query_embeddings, len(self._q_texts), "encode_queries")
        c = _embeddings(candidate_embeddings, len(self._cand_texts), "encode_passages")
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"query embeddings have dimension {q.shape[1]}, candidate embeddings {c.shape[1]}")
        t0 = time.perf_counter()
        found = search(q, c, self._relevant, offsets=self._offsets, tie_priority=self._prio,
                       k=self.k if self.ivf_lists is not None else 0, backend=self.search, device=self.device,
                       chunk_size=self.chunk_size, ivf_lists=self.ivf_lists, nprobe=self.nprobe,
                       show_progress=self.show_progress)
        t1 = time.perf_counter()
        result = self._metrics(found)
        result.timings.update(search_s=t1 - t0, metrics_s=time.perf_counter() - t1)
        if save_run is not None:
            from hybridfast.evaluation.trec import write_runs

            write_runs(self, q, c, found, save_run, depth=run_depth)
            result.config.update(run_dir=str(save_run), run_depth=run_depth)
        return result

    def _summary(self, per_pair, per_language, n_queries):
        """Macro averages per setting, and the config (with notes) of one evaluation."""
        notes = list(self.notes)
        if "cross" in self.settings and per_pair and not any(
                n_queries.get(f"{x}->{y}") for (x, y) in per_pair if x != y):
            notes.append("cross: no query has a relevant candidate in another language (no query id is "
                         "shared across languages), so every cross-lingual pair is empty")
        summary = {}
        if "mono" in self.settings:
            summary["mono"] = macro_average(m for (x, y), m in per_pair.items() if x == y)
        if "cross" in self.settings:
            summary["cross"] = macro_average(m for (x, y), m in per_pair.items() if x != y)
        if "multi" in self.settings:
            summary["multi"] = macro_average(per_language.values())
        config = {"search": resolve_backend(self.search, self.ivf_lists),
                  "device": str(resolve_device(self.device)),
                  "k": self.k, "ivf_lists": self.ivf_lists, "nprobe": self.nprobe if self.ivf_lists else None,
                  "settings": list(self.settings), "queries": len(self._q_ids), "candidates": len(self._cand_ids),
                  "graded": self._gains is not None, "notes": notes}
        return summary, config

    def _metrics(self, found) -> EvaluationResult:
        rel = self._relevant
        valid = rel >= 0
        block_of = np.repeat(np.arange(len(self.candidate_languages)), np.diff(self._offsets))
        rel_block = np.where(valid, block_of[np.maximum(rel, 0)], -1)
        per_pair, n_queries, per_query = {}, {}, {}
        q_ids = np.array(self._q_ids, dtype=object)

        def keep_values(key, ids, values):
            if self.keep_per_query:
                per_query[key] = {str(q): {m: float(v[i]) for m, v in values.items()} for i, q in enumerate(ids)}

        want_pairs = "mono" in self.settings or "cross" in self.settings
        n_lang = len(self.query_languages)
        for yi, y in enumerate(self.candidate_languages if want_pairs else []):
            # all queries against candidate language y at once, then grouped by query language
            mask = rel_block == yi
            keep = mask.any(1)  # queries with a relevant candidate in y
            groups = self._q_lang[keep]
            count = np.bincount(groups, minlength=n_lang)
            if keep.any():
                gains = None if self._gains is None else np.where(mask, self._gains, 0.0)[keep]
                values = per_query_metrics(np.where(mask, found.block_ranks, 0)[keep], mask[keep].sum(1),
                                           gains=gains, ideal_gains=gains)
            else:
                values = {m: np.zeros(0) for m in METRICS}
            sums = {m: np.bincount(groups, v, minlength=n_lang) for m, v in values.items()}
            for xi, x in enumerate(self.query_languages):
                if (x == y and "mono" not in self.settings) or (x != y and "cross" not in self.settings):
                    continue
                n_queries[f"{x}->{y}"] = int(count[xi])
                per_pair[(x, y)] = {m: float(sums[m][xi] / count[xi]) if count[xi] else float("nan")
                                    for m in METRICS}
                sel = groups == xi
                keep_values(f"{x}->{y}", q_ids[keep][sel], {m: v[sel] for m, v in values.items()})
        per_language = {}
        if "multi" in self.settings:
            for xi, x in enumerate(self.query_languages):
                rows = self._q_lang == xi
                ranks = np.where(valid[rows], found.ranks[rows], 0)
                n_rel = valid[rows].sum(1)
                n_queries[f"{x}->multi"] = int(rows.sum())
                gains = None if self._gains is None else np.where(valid[rows], self._gains[rows], 0.0)
                values = per_query_metrics(ranks, n_rel, with_rank_distance=found.exact, gains=gains,
                                           ideal_gains=gains)
                if not found.exact:  # needs every relevant candidate's rank
                    values["rank_distance"] = np.full(len(ranks), np.nan)
                per_language[x] = mean_metrics(values)
                keep_values(f"{x}->multi", q_ids[rows], values)
        summary, config = self._summary(per_pair, per_language, n_queries)
        return EvaluationResult(summary=summary, per_pair=per_pair, per_language=per_language,
                                query_languages=list(self.query_languages),
                                candidate_languages=list(self.candidate_languages), n_queries=n_queries,
                                benchmark=getattr(self.benchmark, "name", "benchmark"), exact=found.exact,
                                config=config, timings={}, per_query=per_query)
