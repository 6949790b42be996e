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
import time
from typing import Dict

import numpy as np

from hybridfast import rules
from hybridfast._backends import resolve_device
from hybridfast.evaluation.layout import EvalLayout
from hybridfast.evaluation.metrics import METRICS, macro_average, mean_metrics, per_query_metrics
from hybridfast.evaluation.result import EvaluationResult
from hybridfast.evaluation.search import BACKENDS, is_tile_source, resolve_backend, search

SETTINGS = ("mono", "cross", "multi")
__all__ = ["RetrievalEvaluator", "EvaluationResult", "EvalLayout", "SETTINGS"]


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


def _check_device(device):
    """A device that exists here, checked before any work (reliability probe 2, #16)."""
    import torch

    try:
        dev = resolve_device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} but CUDA is not available here (use 'cpu' or 'auto')")


def _distributed():
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        _check_device(device)
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
        self.layout = EvalLayout.from_benchmark(self.benchmark)
        warning = self.layout.warn_left_out(getattr(self.benchmark, "name", ""))
        if warning:
            self.notes.append(warning)
        self.query_languages = list(self.layout.query_languages)
        self.candidate_languages = list(self.layout.candidate_languages)

    def _check_save_run(self, save_run, run_depth):
        from hybridfast.evaluation.trec import DEPTHS, check_run_folder

        if run_depth not in DEPTHS:
            raise ValueError(f"run_depth must be one of {DEPTHS}, got {run_depth!r}")
        if self.ivf_lists is not None:
            raise ValueError("save_run needs exact search: approximate IVF search (ivf_lists) has no full ranking")
        check_run_folder(save_run)

    @property
    def query_rows(self):
        """(language, query id) of each row of the query embeddings, in order."""
        return self.layout.query_rows()

    @property
    def candidate_ids(self):
        """Candidate id of each row of the candidate embeddings, in order (languages sorted)."""
        return list(self.layout.candidate_ids)

    @property
    def candidate_texts(self):
        """The encoder inputs of the candidates: candidate_text(sentence, context)."""
        return list(self.layout.candidate_texts)

    # ------------------------------------------------------------ evaluation
    def encode(self, encoder):
        """One pass over all queries and all candidates -> (query, candidate) float32 arrays."""
        for attr in ("encode_queries", "encode_passages"):
            if not callable(getattr(encoder, attr, None)):
                raise TypeError(f"encoder must have a callable {attr}(list[str]), "
                                f"got {type(encoder).__name__}")
        lay = self.layout
        q = _embeddings(_call_encode(encoder.encode_queries, list(lay.query_texts), self.batch_size),
                        len(lay.query_texts), "encode_queries")
        c = _embeddings(_call_encode(encoder.encode_passages, list(lay.candidate_texts), self.batch_size),
                        len(lay.candidate_texts), "encode_passages")
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"encoder: query embeddings have dimension {q.shape[1]}, "
                             f"candidate embeddings {c.shape[1]}")
        return q, c

    def unk_rates(self, encoder) -> Dict[str, float]:
        """{lang: [UNK] rate over that language's queries and candidate texts}, if the encoder can tell."""
        fn = getattr(encoder, "unk_rate", None)
        if not callable(fn):
            return {}
        return {lang: float(fn(self.layout.texts_of(lang))) for lang in self.layout.languages}

    def evaluate(self, encoder, save_run=None, run_depth="full", shards=None,
                 shard_precision="auto") -> EvaluationResult:
        """Encode, search, score. save_run: a folder for TREC run and qrels files of this
        evaluation (hybridfast.evaluation.trec; run_depth "full" or "k"). shards: a folder the
        candidate embeddings are written to as checksummed shards (resumed if a run stopped;
        hybridfast.evaluation.shards) and streamed from by the search, for corpora larger than
        memory; shard_precision "auto" (bf16 where the CPU computes it natively), "fp32", "bf16".
        Under torch.distributed (torchrun) with shards, every rank encodes its contiguous share of
        the candidates into the folder and rank 0 encodes the queries, searches all the shards and
        returns the result; the other ranks return None."""
        if save_run is not None:  # before the encoding, not after
            self._check_save_run(save_run, run_depth)
            if shards is not None:
                raise ValueError("save_run needs the candidate embeddings in memory (run files hold whole "
                                 "score rows); drop shards or save_run")
        t0 = time.perf_counter()
        q, c = self.encode(encoder) if shards is None else self._encode_to_shards(encoder, shards, shard_precision)
        if c is None:  # a data-parallel rank other than 0: its share of the shards is written
            return None
        t1 = time.perf_counter()
        result = self.evaluate_embeddings(q, c, save_run=save_run, run_depth=run_depth)
        result.unk_rates = self.unk_rates(encoder)
        result.timings["encode_s"] = t1 - t0
        n_texts = len(self.layout.query_texts) + len(self.layout.candidate_texts)
        result.timings["encode_texts_per_s"] = n_texts / max(t1 - t0, 1e-9)
        if shards is not None:
            result.config.update(shards=str(shards), shard_precision=c.precision)
        return result

    def _encode_to_shards(self, encoder, folder, precision):
        from hybridfast.evaluation.search import shard_precision
        from hybridfast.evaluation.shards import encode_to_shards

        precision = shard_precision(precision)
        texts = list(self.layout.candidate_texts)

        def encode(batch):
            return _embeddings(_call_encode(encoder.encode_passages, batch, self.batch_size), len(batch),
                               "encode_passages")

        lay = self.layout
        rank, world = _distributed()
        q = None
        if rank == 0:
            q = _embeddings(_call_encode(encoder.encode_queries, list(lay.query_texts), self.batch_size),
                            len(lay.query_texts), "encode_queries")
        if world > 1:
            import torch.distributed as dist

            from hybridfast.evaluation.shards import encode_to_shards_parallel

            return q, encode_to_shards_parallel(encode, texts, folder, rank, world, precision,
                                                barrier=dist.barrier)
        # one bar over the whole corpus (texts/s and ETA; resumed rows counted as done) instead of
        # the encoder's own bar restarting for every shard
        bar, inner = None, getattr(encoder, "show_progress", None)
        if self.show_progress:
            from hybridfast.encoder import TextProgress
            from hybridfast.evaluation.shards import read_manifest

            try:
                done = sum(s["rows"] for s in read_manifest(folder)["shards"])
            except ValueError:  # no folder yet (or not ours: the writer names that)
                done = 0
            bar = TextProgress(len(texts), "encode to shards", initial=min(done, len(texts)))
            if inner is not None:
                encoder.show_progress = False
        try:
            return q, encode_to_shards(encode, texts, folder, precision, progress=bar)
        finally:
            if bar is not None:
                bar.close()
                if inner is not None:
                    encoder.show_progress = inner

    def evaluate_embeddings(self, query_embeddings, candidate_embeddings, save_run=None,
                            run_depth="full") -> EvaluationResult:
        """Metrics from precomputed embeddings, rows in the evaluator's order: `query_rows`
        (languages sorted, then benchmark order, only queries with qrels) and
        `candidate_ids` (languages sorted, then benchmark order). save_run / run_depth: see evaluate."""
        if save_run is not None:
            self._check_save_run(save_run, run_depth)
        lay = self.layout
        q = _embeddings(query_embeddings, len(lay.query_texts), "encode_queries")
        if is_tile_source(candidate_embeddings):  # shards streamed by the search (hybridfast.evaluation.shards)
            c = candidate_embeddings
            if c.shape[0] != len(lay.candidate_texts):
                raise ValueError(f"candidate shards hold {c.shape[0]} rows for {len(lay.candidate_texts)} candidates")
        else:
            c = _embeddings(candidate_embeddings, len(lay.candidate_texts), "encode_passages")
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"query embeddings have dimension {q.shape[1]}, candidate embeddings {c.shape[1]}")
        t0 = time.perf_counter()
        found = search(q, c, lay.relevant, offsets=lay.offsets, tie_priority=lay.priority,
                       k=self.k if self.ivf_lists is not None else 0, backend=self.search, device=self.device,
                       chunk_size=self.chunk_size, ivf_lists=self.ivf_lists, nprobe=self.nprobe,
                       show_progress=self.show_progress)
        t1 = time.perf_counter()
        result = self._metrics(found)
        result.timings.update(search_s=t1 - t0, metrics_s=time.perf_counter() - t1)
        if save_run is not None:
            from hybridfast.evaluation.trec import write_runs

            write_runs(lay, q, c, found, save_run, settings=self.settings, k=self.k, device=self.device,
                       chunk_size=self.chunk_size, depth=run_depth)
            result.config.update(run_dir=str(save_run), run_depth=run_depth)
        return result

    def _summary(self, per_pair, per_language, n_queries):
        """Macro averages per setting, and the config (with notes) of one evaluation."""
        notes = list(self.notes)
        settings = self.settings
        langs = self.layout.languages
        if len(langs) == 1 and "mono" in settings and set(settings) != {"mono"}:
            # one language: no cross-lingual pair exists and the multilingual pool is that
            # language's candidates alone, so "multi" would repeat "mono" as if measured
            notes.append(f"only one language ({langs[0]}) was evaluated: the cross-lingual and multilingual "
                         f"settings need two or more languages, so only mono is reported")
            settings = ("mono",)
            per_language.clear()
        elif "cross" in settings and per_pair and not any(
                n_queries.get(f"{x}->{y}") for (x, y) in per_pair if x != y):
            notes.append("cross: no query has a relevant candidate in another language (no query id is "
                         "shared across languages), so every cross-lingual pair is empty")
        summary = {}
        if "mono" in settings:
            summary["mono"] = macro_average(m for (x, y), m in per_pair.items() if x == y)
        if "cross" in settings:
            summary["cross"] = macro_average(m for (x, y), m in per_pair.items() if x != y)
        if "multi" in settings:
            summary["multi"] = macro_average(per_language.values())
        config = {"search": resolve_backend(self.search, self.ivf_lists),
                  "device": str(resolve_device(self.device)),
                  "k": self.k, "ivf_lists": self.ivf_lists, "nprobe": self.nprobe if self.ivf_lists else None,
                  "settings": list(settings), "queries": len(self.layout.query_ids),
                  "candidates": len(self.layout.candidate_ids), "graded": self.layout.gains is not None,
                  "notes": notes}
        return summary, config

    def _pair_metrics(self, found, per_query):
        """Per (query language, candidate language) pair -> (per_pair, n_queries)."""
        lay = self.layout
        rel_block = lay.relevant_block
        per_pair, n_queries = {}, {}
        n_lang = len(lay.query_languages)
        for yi, y in enumerate(lay.candidate_languages):
            # all queries against candidate language y at once, then grouped by query language
            mask = rel_block == yi
            keep = mask.any(1)  # queries with a relevant candidate in y
            groups = lay.query_lang[keep]
            count = np.bincount(groups, minlength=n_lang)
            if keep.any():
                gains = None if lay.gains is None else np.where(mask, lay.gains, 0.0)[keep]
                values = per_query_metrics(np.where(mask, found.block_ranks, 0)[keep], mask[keep].sum(1),
                                           gains=gains, ideal_gains=gains)
            else:
                values = {m: np.zeros(0) for m in METRICS}
            sums = {m: np.bincount(groups, v, minlength=n_lang) for m, v in values.items()}
            for xi, x in enumerate(lay.query_languages):
                if (x == y and "mono" not in self.settings) or (x != y and "cross" not in self.settings):
                    continue
                n_queries[f"{x}->{y}"] = int(count[xi])
                per_pair[(x, y)] = {m: float(sums[m][xi] / count[xi]) if count[xi] else float("nan")
                                    for m in METRICS}
                sel = groups == xi
                self._keep_values(per_query, f"{x}->{y}", np.array(lay.query_ids, dtype=object)[keep][sel],
                                  {m: v[sel] for m, v in values.items()})
        return per_pair, n_queries

    def _pool_metrics(self, found, per_query, n_queries):
        """Per query language in the pool of all languages -> per_language."""
        lay = self.layout
        valid = lay.relevant >= 0
        per_language = {}
        for xi, x in enumerate(lay.query_languages):
            rows = lay.query_lang == xi
            ranks = np.where(valid[rows], found.ranks[rows], 0)
            n_queries[f"{x}->multi"] = int(rows.sum())
            gains = None if lay.gains is None else np.where(valid[rows], lay.gains[rows], 0.0)
            values = per_query_metrics(ranks, valid[rows].sum(1), with_rank_distance=found.exact, gains=gains,
                                       ideal_gains=gains)
            if not found.exact:  # needs every relevant candidate's rank
                values["rank_distance"] = np.full(len(ranks), np.nan)
            per_language[x] = mean_metrics(values)
            self._keep_values(per_query, f"{x}->multi", np.array(lay.query_ids, dtype=object)[rows], values)
        return per_language

    def _keep_values(self, per_query, key, ids, values):
        if self.keep_per_query:
            per_query[key] = {str(q): {m: float(v[i]) for m, v in values.items()} for i, q in enumerate(ids)}

    def _metrics(self, found) -> EvaluationResult:
        per_query = {}
        per_pair, n_queries = ({}, {}) if not {"mono", "cross"} & set(self.settings) else \
            self._pair_metrics(found, per_query)
        per_language = self._pool_metrics(found, per_query, n_queries) if "multi" in self.settings else {}
        summary, config = self._summary(per_pair, per_language, n_queries)
        return EvaluationResult(summary=summary, per_pair=per_pair, per_language=per_language,
                                query_languages=list(self.query_languages),
                                candidate_languages=list(self.candidate_languages), n_queries=n_queries,
                                benchmark=getattr(self.benchmark, "name", "benchmark"), exact=found.exact,
                                config=config, timings={}, per_query=per_query)
