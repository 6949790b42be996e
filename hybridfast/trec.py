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
matmul as its search: `hybridfast.search.chunk_scores`), written as the exact decimal
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
from pathlib import Path

import numpy as np

from hybridfast.search import _trec_topk, chunk_scores

DEPTHS = ("full", "k")


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


def write_runs(evaluator, query_embeddings, candidate_embeddings, found, folder, depth="full",
               tag="hybridfast"):
    """Write the runs and qrels of one evaluation (see the module docstring) -> the folder.

    evaluator: the RetrievalEvaluator that produced `found` (its SearchResult) from these
    embeddings (float32 arrays in its row order)."""
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    if not found.exact:
        raise ValueError("run files need exact search (the approximate IVF search has no full ranking)")
    tag = _check_id(tag, "tag")
    ev = evaluator
    folder = Path(folder)
    q_ids = [_check_id(q, "query id") for q in ev._q_ids]
    c_ids = [_check_id(c, "candidate id") for c in ev._cand_ids]
    langs_q, langs_c = ev.query_languages, ev.candidate_languages
    offsets, prio, rel = ev._offsets, ev._prio, ev._relevant
    valid = rel >= 0
    block_of = np.repeat(np.arange(len(langs_c)), np.diff(offsets))
    rel_block = np.where(valid, block_of[np.maximum(rel, 0)], -1)
    k = ev.k
    pairs = [(xi, yi) for xi, x in enumerate(langs_q) for yi, y in enumerate(langs_c)
             if (x == y and "mono" in ev.settings) or (x != y and "cross" in ev.settings)]
    multi = "multi" in ev.settings
    # depth per query and pair / pool: k, or down to the deepest relevant candidate
    if depth == "full":
        pool_depth = np.maximum(k, np.where(valid, found.ranks, 0).max(1))
    else:
        pool_depth = np.full(len(q_ids), k)
    lines = {(xi, yi): [] for xi, yi in pairs}
    multi_lines = {xi: [] for xi in range(len(langs_q))} if multi else {}
    for s, e, scores in chunk_scores(query_embeddings, candidate_embeddings, device=ev.device,
                                     n_relevant=rel.shape[1], chunk_size=ev.chunk_size):
        q_lang = ev._q_lang[s:e]
        for yi in range(len(langs_c)):
            b0, b1 = offsets[yi], offsets[yi + 1]
            in_pair = (rel_block[s:e] == yi).any(1) & np.isin(q_lang, [x for x, y in pairs if y == yi])
            rows = np.nonzero(in_pair)[0]
            if depth == "full":
                deepest = np.where(rel_block[s:e][rows] == yi, found.block_ranks[s:e][rows], 0).max(1)
                d = np.maximum(k, deepest)
            else:
                d = np.full(len(rows), k)
            for i, (cols, vals) in zip(rows, _ranked(scores[:, b0:b1], rows, d, prio[b0:b1])):
                qid, out = q_ids[s + i], lines[(q_lang[i], yi)]
                out.extend(f"{qid} Q0 {c_ids[b0 + c]} {r} {float(v)!r} {tag}\n"
                           for r, (c, v) in enumerate(zip(cols.tolist(), vals.tolist()), 1))
        if multi:
            rows = np.arange(e - s)
            for i, (cols, vals) in zip(rows, _ranked(scores, rows, pool_depth[s:e], prio)):
                qid = q_ids[s + i]
                multi_lines[q_lang[i]].extend(f"{qid} Q0 {c_ids[c]} {r} {float(v)!r} {tag}\n"
                                              for r, (c, v) in enumerate(zip(cols.tolist(), vals.tolist()), 1))
    # qrels: grades (1 without grades) of every relevant candidate, per candidate language and all
    gains = ev._gains
    per_lang_qrels = {yi: {} for yi in range(len(langs_c))}
    all_qrels = {}
    for i, qid in enumerate(q_ids):
        for j in np.nonzero(valid[i])[0]:
            c = int(rel[i, j])
            g = 1 if gains is None else int(gains[i, j])
            per_lang_qrels[block_of[c]].setdefault(qid, {})[c_ids[c]] = g
            all_qrels.setdefault(qid, {})[c_ids[c]] = g
    manifest = {"depth": depth, "k": k, "tag": tag, "runs": {}}
    for (xi, yi), out in lines.items():
        name = f"runs/{langs_q[xi]}-{langs_c[yi]}.run"
        _write_lines(folder / name, out)
        manifest["runs"][name] = f"qrels/{langs_c[yi]}.qrels"
    for xi, out in multi_lines.items():
        name = f"runs/{langs_q[xi]}-multi.run"
        _write_lines(folder / name, out)
        manifest["runs"][name] = "qrels/all.qrels"
    for yi, qrels in per_lang_qrels.items():
        _write_lines(folder / f"qrels/{langs_c[yi]}.qrels",
                     [f"{q} 0 {c} {g}\n" for q, rel_q in qrels.items() for c, g in rel_q.items()])
    _write_lines(folder / "qrels/all.qrels",
                 [f"{q} 0 {c} {g}\n" for q, rel_q in all_qrels.items() for c, g in rel_q.items()])
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return folder


def read_run(path):
    """{qid: {docid: score}} from a TREC run file (for checks; pytrec_eval.parse_run does the same)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 6:
                raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rank score tag'")
            out.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return out


def read_qrels(path):
    """{qid: {docid: grade}} from a TREC qrels file."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: expected 'qid 0 docid grade'")
            out.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return out
