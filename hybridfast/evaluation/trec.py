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

Replacing an export: the files are written into a staging folder beside the destination
(``.<name>.tmp-*``) and swapped in only when all are complete, so a folder holds one
whole export: the earlier one (after a failure or an interrupt) or the new one, never a
mix of two (reliability probe 2, #12). A folder that holds anything else is refused.
"""
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from hybridfast import rules
from hybridfast.evaluation.search import chunk_scores, trec_topk

DEPTHS = ("full", "k")
MANIFEST = "manifest.json"


def check_run_folder(folder) -> Path:
    """Refuse a folder that holds anything but an earlier hybridfast run export (which will be
    replaced as a whole): never overwrite what a user wrote."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"save_run: {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        try:
            ours = {"runs", "depth", "tag"} <= set(json.loads((folder / MANIFEST).read_text()))
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


def _ranked(scores, rows, depth_rows, prio):
    """Per row of `scores` (float32 [b, C]): the first depth_rows[i] columns in trec order."""
    if not len(rows):
        return []
    sub = scores[rows]
    ids, vals = trec_topk(sub, int(min(max(depth_rows), sub.shape[1])), prio)
    return [(ids[i, :d], vals[i, :d]) for i, d in enumerate(np.minimum(depth_rows, sub.shape[1]))]


def _depths(layout, found, pairs, depth, k):
    """-> (list length per query and candidate language, whether the query is in that pair's
    run, list length per query in the pool): k, or down to the deepest relevant candidate."""
    rel_block, valid = layout.relevant_block, layout.relevant >= 0
    sizes = np.diff(layout.offsets)
    n_q = len(layout.query_ids)
    block_depth = np.zeros((n_q, len(sizes)), dtype=np.int64)
    for yi in range(len(sizes)):
        deepest = np.where(rel_block == yi, found.block_ranks, 0).max(1)
        d = np.maximum(k, deepest) if depth == "full" else np.full(n_q, k)
        block_depth[:, yi] = np.minimum(d, sizes[yi])
    in_pair = np.zeros(block_depth.shape, dtype=bool)
    for xi, yi in pairs:
        in_pair[:, yi] |= (layout.query_lang == xi) & (rel_block == yi).any(1)
    pool_depth = np.full(n_q, k) if depth == "k" else np.maximum(k, np.where(valid, found.ranks, 0).max(1))
    return block_depth, in_pair, np.minimum(pool_depth, layout.offsets[-1])


def _qrels_lines(layout, q_ids, c_ids):
    """{qrels file name: lines}: qrels/<lang>.qrels (relevant candidates in that language) and
    qrels/all.qrels, with grades."""
    rel, gains, block_of = layout.relevant, layout.gains, layout.block_of
    per_lang = {yi: {} for yi in range(len(layout.candidate_languages))}
    pool = {}
    for i, qid in enumerate(q_ids):
        for j in np.nonzero(rel[i] >= 0)[0]:
            c = int(rel[i, j])
            g = 1 if gains is None else int(gains[i, j])
            per_lang[block_of[c]].setdefault(qid, {})[c_ids[c]] = g
            pool.setdefault(qid, {})[c_ids[c]] = g
    files = {f"qrels/{layout.candidate_languages[yi]}.qrels": qrels for yi, qrels in per_lang.items()}
    files["qrels/all.qrels"] = pool
    return {name: [f"{q} 0 {c} {g}" for q, rel_q in qrels.items() for c, g in rel_q.items()]
            for name, qrels in files.items()}


def _run_lines(qid, cols, vals, c_ids, offset, tag):
    return (f"{qid} Q0 {c_ids[offset + c]} {r} {float(v)!r} {tag}\n"
            for r, (c, v) in enumerate(zip(cols.tolist(), vals.tolist()), 1))


def _stream_runs(layout, q, c, scoring, stage, names, lists, q_ids, c_ids, tag):
    """Score chunk by chunk and append each query's ranked list to its run file in `stage`."""
    handles = {key: open(stage / name, "w", encoding="utf-8") for key, name in names.items()}
    try:
        for s, e, scores in chunk_scores(q, c, n_relevant=layout.relevant.shape[1], **scoring):
            q_lang = layout.query_lang[s:e]
            for yi in range(len(layout.candidate_languages)):
                b = layout.block(yi)
                rows = np.nonzero(lists["in_pair"][s:e, yi])[0]
                ranked = _ranked(scores[:, b], rows, lists["block"][s:e, yi][rows], layout.priority[b])
                for i, (cols, vals) in zip(rows, ranked):
                    handles[(q_lang[i], yi)].writelines(_run_lines(q_ids[s + i], cols, vals, c_ids, b.start, tag))
            if lists["pool"] is not None:
                rows = np.arange(e - s)
                for i, (cols, vals) in zip(rows, _ranked(scores, rows, lists["pool"][s:e], layout.priority)):
                    handles[(q_lang[i], None)].writelines(_run_lines(q_ids[s + i], cols, vals, c_ids, 0, tag))
    finally:
        for h in handles.values():
            h.close()


def _swap_in(stage: Path, folder: Path) -> None:
    """Replace `folder` (absent, empty, or an earlier export) by the complete `stage` folder."""
    if folder.is_dir() and any(folder.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=str(folder.parent)))
        os.replace(folder, old)  # onto the empty placeholder: the earlier export moves aside whole
        try:
            os.replace(stage, folder)
        except BaseException:
            os.replace(old, folder)  # put the earlier export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, folder)  # a missing or empty folder is replaced in one rename
    rules.fsync_dir(folder.parent)


def _plan(layout, found, settings, k, depth):
    """Run file names and list lengths of one export -> (names, lists, line count)."""
    langs_q, langs_c = layout.query_languages, layout.candidate_languages
    pairs = layout.pairs(settings)
    multi = "multi" in settings
    block_depth, in_pair, pool_depth = _depths(layout, found, pairs, depth, k)
    n_lines = int((block_depth * in_pair).sum()) + (int(pool_depth.sum()) if multi else 0)
    names = {(xi, yi): f"runs/{langs_q[xi]}-{langs_c[yi]}.run" for xi, yi in pairs}
    if multi:
        names.update({(xi, None): f"runs/{langs_q[xi]}-multi.run" for xi in range(len(langs_q))})
    lists = {"block": block_depth, "in_pair": in_pair, "pool": pool_depth if multi else None}
    return names, lists, n_lines


def write_runs(layout, query_embeddings, candidate_embeddings, found, folder, *, settings=("mono", "cross", "multi"),
               k=100, device="auto", chunk_size=None, depth="full", tag="hybridfast", warn_lines=20_000_000):
    """Write the runs and qrels of one evaluation (see the module docstring) -> the folder.

    layout: the EvalLayout that produced `found` (a search.SearchResult) from these embeddings
    (float32 arrays in the layout's row order); settings, k, device, chunk_size: the evaluator's.
    Lines are streamed to the files chunk by chunk (memory stays bounded), into a staging
    folder swapped in whole at the end. A warning tells the size first when the files will
    exceed `warn_lines` lines in all (deep relevant candidates with depth="full").
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    if not found.exact:
        raise ValueError("run files need exact search (the approximate IVF search has no full ranking)")
    tag = _check_id(tag, "tag")
    folder = check_run_folder(folder)
    q_ids = [_check_id(q, "query id") for q in layout.query_ids]
    c_ids = [_check_id(c, "candidate id") for c in layout.candidate_ids]
    names, lists, n_lines = _plan(layout, found, settings, k, depth)
    if n_lines > warn_lines:
        warnings.warn(f"save_run: the run files will hold {n_lines:,} lines (about {n_lines * 60 / 1e9:.1f} GB) "
                      "because relevant candidates lie deep in the rankings; run_depth='k' writes only the "
                      f"top {k}", UserWarning, stacklevel=3)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=str(folder.parent)))
    try:
        (stage / "runs").mkdir()
        (stage / "qrels").mkdir()
        _stream_runs(layout, query_embeddings, candidate_embeddings, {"device": device, "chunk_size": chunk_size},
                     stage, names, lists, q_ids, c_ids, tag)
        for name, lines in _qrels_lines(layout, q_ids, c_ids).items():
            (stage / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        manifest = {"depth": depth, "k": k, "tag": tag, "lines": n_lines,
                    "runs": {name: (f"qrels/{layout.candidate_languages[key[1]]}.qrels" if key[1] is not None
                                    else "qrels/all.qrels") for key, name in names.items()}}
        rules.atomic_write_json(stage / MANIFEST, manifest)
        _follow_umask(stage)
        _swap_in(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _follow_umask(stage: Path) -> None:
    """mkdtemp makes a 0700 folder: give the export ordinary permissions (probe 2, #14)."""
    for path in [stage, *stage.rglob("*")]:
        rules.follow_umask(path, 0o777 if path.is_dir() else 0o666)


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
