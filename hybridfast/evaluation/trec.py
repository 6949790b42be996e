"""TREC interchange: the evaluator's runs and qrels as files trec_eval, pytrec_eval or ranx read.

`write_runs` writes, into a folder:

    runs/<x>-<y>.run     one per evaluated pair: queries of language x against the
                         candidates of language y (only the queries the pair counts:
                         those with a relevant candidate in y)
    runs/<x>-multi.run   queries of language x against the pool of all languages
    qrels/<y>.qrels      relevant candidates in language y, with their grades (pairs x -> y)
    qrels/all.qrels      all relevant candidates (the pool runs)
    manifest.json        which qrels file goes with which run, and the depth

Run lines are ``qid Q0 docid rank score tag``, best first, in trec_eval's own order
(score descending, ties by docid descending), so trec_eval ranks every line where the
file puts it. Scores are the evaluator's float32 scores (same device, chunking and
matmul as its search: `hybridfast.evaluation.search.chunk_scores`), written as the exact decimal
of the value. Qrels lines are ``qid 0 docid grade``.

Depth: ``depth="k"`` writes the top k of every ranking (k = the evaluator's k).
``depth="full"`` (the default) extends each query's list down to its deepest relevant
candidate when that lies beyond k: then trec_eval's map, recip_rank, ndcg_cut_10 and
recall_1/10/100 on the files equal the evaluator's numbers exactly (its mAP is over the
full ranking; a top-k file gives trec_eval's truncated AP instead). With ``"k"`` the
metrics cut at <= k (mrr@10, ndcg@10, recall@k) are still exact. Rank distance is not
a trec_eval measure; with ``"full"`` the ranks it needs are in the files.
"""
import json
import warnings
from pathlib import Path

import numpy as np

from hybridfast.evaluation.search import _trec_topk, chunk_scores

DEPTHS = ("full", "k")


def check_run_folder(folder) -> Path:
    """Refuse a folder that holds anything but an earlier hybridfast run export (whose files
    may be replaced): never overwrite what a user wrote."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_run: {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        manifest = folder / "manifest.json"
        try:
            ours = {"runs", "depth", "tag"} <= set(json.loads(manifest.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise FileExistsError(f"save_run: {folder} is not empty and holds no earlier hybridfast run export "
                                  "(manifest.json); choose an empty or new folder")
    return folder


def _check_id(value, what):
    s = str(value)
    if not s or any(ch.isspace() for ch in s):
        raise ValueError(f"{what} {s!r} is empty or holds whitespace: it cannot be written to a TREC file")
    return s


def _write_lines(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    tmp.replace(path)


def _ranked(scores, rows, depth_rows, prio):
    """Per row of `scores` (float32 [b, C]): the first depth_rows[i] columns in trec order."""
    if not len(rows):
        return []
    sub = scores[rows]
    ids, vals = _trec_topk(sub, int(min(max(depth_rows), sub.shape[1])), prio)
    return [(ids[i, :d], vals[i, :d]) for i, d in enumerate(np.minimum(depth_rows, sub.shape[1]))]


def _depths(ev, found, pairs, depth, rel_block):
    """-> (list length per query and candidate language, whether the query is in that pair's
    run, list length per query in the pool): k, or down to the deepest relevant candidate."""
    k, offsets, valid = ev.k, ev._offsets, ev._relevant >= 0
    sizes = np.diff(offsets)
    n_q = len(ev._q_ids)
    block_depth = np.zeros((n_q, len(sizes)), dtype=np.int64)
    for yi in range(len(sizes)):
        deepest = np.where(rel_block == yi, found.block_ranks, 0).max(1)
        d = np.maximum(k, deepest) if depth == "full" else np.full(n_q, k)
        block_depth[:, yi] = np.minimum(d, sizes[yi])
    in_pair = np.zeros(block_depth.shape, dtype=bool)
    for xi, yi in pairs:
        in_pair[:, yi] |= (ev._q_lang == xi) & (rel_block == yi).any(1)
    pool_depth = np.full(n_q, k) if depth == "k" else np.maximum(k, np.where(valid, found.ranks, 0).max(1))
    return block_depth, in_pair, np.minimum(pool_depth, offsets[-1])


def _write_qrels(ev, folder, q_ids, c_ids, block_of):
    """qrels/<lang>.qrels (relevant candidates in that language) and qrels/all.qrels, with grades."""
    rel, gains = ev._relevant, ev._gains
    per_lang = {yi: {} for yi in range(len(ev.candidate_languages))}
    pool = {}
    for i, qid in enumerate(q_ids):
        for j in np.nonzero(rel[i] >= 0)[0]:
            c = int(rel[i, j])
            g = 1 if gains is None else int(gains[i, j])
            per_lang[block_of[c]].setdefault(qid, {})[c_ids[c]] = g
            pool.setdefault(qid, {})[c_ids[c]] = g
    for yi, qrels in per_lang.items():
        _write_lines(folder / f"qrels/{ev.candidate_languages[yi]}.qrels",
                     [f"{q} 0 {c} {g}\n" for q, rel_q in qrels.items() for c, g in rel_q.items()])
    _write_lines(folder / "qrels/all.qrels",
                 [f"{q} 0 {c} {g}\n" for q, rel_q in pool.items() for c, g in rel_q.items()])


def _stream_runs(ev, query_embeddings, candidate_embeddings, folder, names, lists, q_ids, c_ids, tag):
    """Score chunk by chunk and append each query's ranked list to its run file; a file gets
    its name only when complete (written as <name>.tmp, renamed at the end; removed on error)."""
    handles = {key: open(folder / f"{name}.tmp", "w", encoding="utf-8") for key, name in names.items()}
    try:
        for s, e, scores in chunk_scores(query_embeddings, candidate_embeddings, device=ev.device,
                                         n_relevant=ev._relevant.shape[1], chunk_size=ev.chunk_size):
            q_lang = ev._q_lang[s:e]
            for yi in range(len(ev.candidate_languages)):
                b0, b1 = ev._offsets[yi], ev._offsets[yi + 1]
                rows = np.nonzero(lists["in_pair"][s:e, yi])[0]
                ranked = _ranked(scores[:, b0:b1], rows, lists["block"][s:e, yi][rows], ev._prio[b0:b1])
                for i, (cols, vals) in zip(rows, ranked):
                    qid = q_ids[s + i]
                    handles[(q_lang[i], yi)].writelines(
                        f"{qid} Q0 {c_ids[b0 + c]} {r} {float(v)!r} {tag}\n"
                        for r, (c, v) in enumerate(zip(cols.tolist(), vals.tolist()), 1))
            if lists["pool"] is not None:
                rows = np.arange(e - s)
                for i, (cols, vals) in zip(rows, _ranked(scores, rows, lists["pool"][s:e], ev._prio)):
                    qid = q_ids[s + i]
                    handles[(q_lang[i], None)].writelines(
                        f"{qid} Q0 {c_ids[c]} {r} {float(v)!r} {tag}\n"
                        for r, (c, v) in enumerate(zip(cols.tolist(), vals.tolist()), 1))
    except BaseException:
        for h in handles.values():
            h.close()
            Path(h.name).unlink(missing_ok=True)
        raise
    for key, h in handles.items():
        h.close()
        Path(h.name).replace(folder / names[key])


def write_runs(evaluator, query_embeddings, candidate_embeddings, found, folder, depth="full",
               tag="hybridfast", warn_lines=20_000_000):
    """Write the runs and qrels of one evaluation (see the module docstring) -> the folder.

    evaluator: the RetrievalEvaluator that produced `found` (its SearchResult) from these
    embeddings (float32 arrays in its row order). Lines are streamed to the files chunk by
    chunk (memory stays bounded); each file appears under its name only when complete.
    A warning tells the size first when the files will exceed `warn_lines` lines in all
    (deep relevant candidates with depth="full").
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    if not found.exact:
        raise ValueError("run files need exact search (the approximate IVF search has no full ranking)")
    tag = _check_id(tag, "tag")
    ev = evaluator
    folder = check_run_folder(folder)
    q_ids = [_check_id(q, "query id") for q in ev._q_ids]
    c_ids = [_check_id(c, "candidate id") for c in ev._cand_ids]
    langs_q, langs_c = ev.query_languages, ev.candidate_languages
    offsets, rel = ev._offsets, ev._relevant
    valid = rel >= 0
    block_of = np.repeat(np.arange(len(langs_c)), np.diff(offsets))
    rel_block = np.where(valid, block_of[np.maximum(rel, 0)], -1)
    k = ev.k
    pairs = [(xi, yi) for xi, x in enumerate(langs_q) for yi, y in enumerate(langs_c)
             if (x == y and "mono" in ev.settings) or (x != y and "cross" in ev.settings)]
    multi = "multi" in ev.settings
    block_depth, in_pair, pool_depth = _depths(ev, found, pairs, depth, rel_block)
    n_lines = int((block_depth * in_pair).sum()) + (int(pool_depth.sum()) if multi else 0)
    if n_lines > warn_lines:
        warnings.warn(f"save_run: the run files will hold {n_lines:,} lines (about {n_lines * 60 / 1e9:.1f} GB) "
                      "because relevant candidates lie deep in the rankings; run_depth='k' writes only the "
                      f"top {k}", UserWarning, stacklevel=3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs").mkdir(exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    names = {(xi, yi): f"runs/{langs_q[xi]}-{langs_c[yi]}.run" for xi, yi in pairs}
    if multi:
        names.update({(xi, None): f"runs/{langs_q[xi]}-multi.run" for xi in range(len(langs_q))})
    lists = {"block": block_depth, "in_pair": in_pair, "pool": pool_depth if multi else None}
    _stream_runs(ev, query_embeddings, candidate_embeddings, folder, names, lists, q_ids, c_ids, tag)
    _write_qrels(ev, folder, q_ids, c_ids, block_of)
    manifest = {"depth": depth, "k": k, "tag": tag, "lines": n_lines,
                "runs": {name: (f"qrels/{langs_c[key[1]]}.qrels" if key[1] is not None else "qrels/all.qrels")
                         for key, name in names.items()}}
    _write_lines(folder / "manifest.json", [json.dumps(manifest, indent=2, sort_keys=True) + "\n"])
    return folder


def read_run(path):
    """{qid: {docid: score}} from a TREC run file (for checks; pytrec_eval.parse_run does the same)."""
    return _read_table(path, 6, "qid Q0 docid rank score tag", lambda p: (p[0], p[2], float(p[4])))


def read_qrels(path):
    """{qid: {docid: grade}} from a TREC qrels file."""
    return _read_table(path, 4, "qid 0 docid grade", lambda p: (p[0], p[2], int(p[3])))


def _read_table(path, n_columns, layout, pick):
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != n_columns:
                raise ValueError(f"{path}:{n}: expected '{layout}'")
            qid, docid, value = pick(parts)
            out.setdefault(qid, {})[docid] = value
    return out
