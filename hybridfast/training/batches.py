"""Sampler tuples -> tokenised training batches (see docs/architecture.md).

A batch of the HybridBatchSampler is a list of (example, query_lang, passage_lang).
The collator turns it into query texts q(e, x) and passages positive(e, y), plus k
hard negatives per query in the sentence-transformers layout
p = cat[positives, negs_1, ..., negs_k], and the loss groups (a translation or
duplicate of the positive is never a negative). Tokenisation is injected: any
`tokenize(texts, kind) -> dict of tensors` (the Encoder's by default).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import numpy as np
import torch


def encoder_tokenize(encoder, max_length=None):
    """The Encoder's tokenisation (prefixes, truncation) as a `tokenize(texts, kind)` callable."""
    return lambda texts, kind: encoder.tokenize(texts, kind=kind, max_length=max_length)


class Collator:
    """Sampler tuples -> (query inputs, passage inputs, query groups, passage groups).

    tokenize: `tokenize(texts, kind)` with kind "query" or "passage", or an object with a
    `.tokenize(texts, kind=, max_length=)` method (an Encoder). device: where the group
    tensors go (default: the encoder's device, else CPU).
    """

    def __init__(self, pairs, tokenize, hard_negatives: int = 0, seed: int = 0, max_length: Optional[int] = None,
                 device=None):
        self.pairs = pairs
        if hasattr(tokenize, "tokenize"):
            device = device if device is not None else getattr(tokenize, "device", None)
            tokenize = encoder_tokenize(tokenize, max_length)
        self.tokenize: Callable = tokenize
        self.hard_negatives, self.seed = hard_negatives, seed
        self.device = device if device is not None else torch.device("cpu")

    def texts(self, batch, step):
        """(queries, passages, query_groups, passage_groups) as Python lists."""
        pairs = self.pairs
        queries = [pairs.query(e, x) for e, x, _ in batch]
        passages = [pairs.positive(e, y) for e, _, y in batch]
        q_groups = [pairs.group_of(e) for e, _, _ in batch]
        p_groups = list(q_groups)
        k = self.hard_negatives
        if k:
            negs = [self._pick_negatives(e, y, step, batch) for e, _, y in batch]
            for j in range(k):  # layout: cat[positives, negs_1, ..., negs_k]
                for (e, _, y), chosen in zip(batch, negs):
                    text = chosen[j]
                    passages.append(text)
                    # a negative that is some example's positive carries its group: for that
                    # example's query it is a false negative
                    p_groups.append(pairs.positive_groups(y).get(text, -1))
        return queries, passages, q_groups, p_groups

    def _pick_negatives(self, e, y, step, batch) -> List[str]:
        k = self.hard_negatives
        # seeded by (seed, step, example): independent of rank layout and of saved RNG state
        rng = np.random.default_rng([self.seed, step, int(e)])
        pool = self.pairs.negatives(e, y)
        if len(pool) >= k:
            return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
        chosen = list(pool)
        # too few mined negatives: fill with positives of other examples in the same language,
        # not in this batch (those are negatives already) and not duplicates of e
        avail = np.flatnonzero(self.pairs.availability[:, y])
        own = self.pairs.group_of(e)
        taken = {int(b[0]) for b in batch}
        for _ in range(64 * k):
            if len(chosen) == k:
                break
            f = int(avail[rng.integers(len(avail))])
            if f not in taken and self.pairs.group_of(f) != own:
                chosen.append(self.pairs.positive(f, y))
        while len(chosen) < k:  # tiny data: repeat a negative (or, with none, the positive:
            # it carries e's group, so the loss masks it for e's own query)
            chosen.append(chosen[0] if chosen else self.pairs.positive(e, y))
        return chosen

    def __call__(self, batch, step):
        queries, passages, q_groups, p_groups = self.texts(batch, step)
        q_in = self.tokenize(queries, "query")
        p_in = self.tokenize(passages, "passage")
        return (q_in, p_in, torch.tensor(q_groups, dtype=torch.int64, device=self.device),
                torch.tensor(p_groups, dtype=torch.int64, device=self.device))


def prefetch(sampler, collate, first_step):
    """Yield (batch, collate(batch, step)) for the sampler's batches, collating batch
    i+1 in a background thread while the caller trains on batch i (tokenisers release
    the GIL; on a GPU this hides the collate time). Collate is a pure function of
    (batch, step), so results do not depend on the timing. If the caller stops early,
    one extra batch was drawn from the sampler: checkpoints therefore save the
    sampler position explicitly (state_dict(step=...))."""
    batches = iter(sampler)

    def draw():
        batch = next(batches, None)
        return None if batch is None else [tuple(int(v) for v in t) for t in batch]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridfast-collate") as pool:
        step, batch = first_step, draw()
        pending = pool.submit(collate, batch, step) if batch is not None else None
        while pending is not None:
            current, result = batch, pending.result()
            step, batch = step + 1, draw()
            pending = pool.submit(collate, batch, step) if batch is not None else None
            yield current, result


def batch_kind(batch) -> str:
    """'mono' when every tuple has query language == passage language, else 'cross'."""
    return "mono" if all(x == y for _, x, y in batch) else "cross"
