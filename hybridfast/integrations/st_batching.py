"""Hybrid batches over a ``datasets.Dataset`` for sentence-transformers training (see docs/architecture.md).

:class:`HybridPairIndex` maps (example, language) to dataset rows, :class:`HybridSTBatchSampler` drives the
C++ :class:`hybridfast.HybridBatchSampler` over it, :class:`HybridPairDataset` serves (anchor row, positive
row) keys, :func:`parallel_pairs_dataset` turns hybridfast's training data into such a dataset. The dataset
layouts are described in :mod:`hybridfast.integrations.sentence_transformers`, which re-exports every name.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

try:
    import datasets
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hybridfast.integrations.st_batching needs datasets: pip install 'hybridfast[st]'") from exc

from hybridfast.rules import MODES as _MODES  # noqa: E402
from hybridfast.sampler import HybridBatchSampler  # noqa: E402
from hybridfast.rules import check_languages, check_number, is_language_code, language_weights  # noqa: E402

# --------------------------------------------------------------------------------------------------------
# Hybrid batches over a datasets.Dataset
# --------------------------------------------------------------------------------------------------------

_LABEL_COLUMNS = ("label", "labels", "score", "scores")  # what ST's collator treats as labels, not text


@dataclasses.dataclass
class HybridBatching:
    """How :class:`HybridSentenceTransformerTrainer` batches its train dataset.

    mode, mono_prob, lang_weights: as :class:`hybridfast.HybridBatchSampler` (``lang_weights``: "size" (default, the paper), None (uniform), "size^TAU",
        a sequence in ``languages`` order or a dict keyed by language code, missing languages weigh 0).
    id_column: rows sharing this value are translations of one example.
    lang_columns: None (auto: ``{column}_lang`` for the anchor and positive columns if present, else a
        ``lang``/``language`` column), one column name (the language of the whole row), or a dict
        ``{text_column: lang_column}`` naming at least the anchor and positive columns.
    text_columns: the ST input columns in order (anchor, positive, negatives...); default: every other column.
    group_column: optional; examples of one group (e.g. an article) never share a global batch.
    languages: restrict to / order these languages (default: every language found, sorted).
    seed: None -> the trainer's ``args.seed``. drop_last: keep only full batches (required with several
        processes, so each step has one batch per rank).
    """

    mode: str = "hybrid"
    mono_prob: float = 0.5
    lang_weights: str | Mapping[str, float] | Sequence[float] | None = "size"
    id_column: str = "id"
    lang_columns: str | Mapping[str, str] | None = None
    text_columns: Sequence[str] | None = None
    group_column: str | None = None
    languages: Sequence[str] | None = None
    seed: int | None = None
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        check_number("mono_prob", self.mono_prob, 0.0, 1.0)
        if not isinstance(self.id_column, str):
            raise TypeError(f"id_column must be a column name (str), got {type(self.id_column).__name__}")


_LANG_NAMES = ("lang", "language", "locale")  # one column naming the language of the whole row


def _is_lang_column(name: str) -> bool:
    return name in _LANG_NAMES or name.endswith("_lang")


def _is_negative_column(name: str) -> bool:
    return name.lower().startswith(("neg", "hard_neg"))


def _holds_language_codes(dataset: Any, column: str, sample: int = 100) -> bool:
    values = dataset[column][:sample]
    return bool(values) and all(isinstance(v, str) and is_language_code(v) for v in values)


def _warn_extra_negatives(text_columns: list[str]) -> None:
    """sentence-transformers' convention: every input column after anchor and positive is a hard
    negative. Said out loud when such a column is not named like one (a `title`, say)."""
    odd = [c for c in text_columns[2:] if not _is_negative_column(c)]
    if odd:
        warnings.warn(f"columns {odd} are used as hard negatives (every text column after the anchor "
                      f"{text_columns[0]!r} and the positive {text_columns[1]!r} is one, as in sentence-transformers); "
                      "pass HybridBatching(text_columns=[...]) or remove the columns if they are not negatives",
                      UserWarning, stacklevel=4)


class HybridPairIndex:
    """Maps (example, language) to dataset rows for the anchor and for the positive side.

    Attributes: ``languages`` (list[str]), ``ids`` (example id per example index), ``availability``
    (bool [E, L]), ``anchor_row`` / ``positive_row`` (int64 [E, L], -1 where absent), ``groups``
    (int64 [E] or None), ``text_columns`` and ``meta_columns`` (what the collator must not see).
    """

    def __init__(self, dataset: Any, config: HybridBatching | None = None) -> None:
        config = config or HybridBatching()
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        names = list(dataset.column_names)
        if config.id_column not in names:
            raise ValueError(
                f"id_column={config.id_column!r} is not a column of the dataset (columns: {names}); "
                "hybrid batches need an id shared by the rows that are translations of one example"
            )
        if config.group_column is not None and config.group_column not in names:
            raise ValueError(f"group_column={config.group_column!r} is not a column of the dataset (columns: {names})")

        text_columns = self._text_columns(names, config)
        anchor_col, positive_col = text_columns[0], text_columns[1]
        lang_of = self._lang_columns(names, text_columns, config, dataset)
        if config.text_columns is None:
            _warn_extra_negatives(text_columns)
        for column in text_columns:
            self._check_string_column(dataset, column, "text_columns")
        self.text_columns = text_columns
        self.meta_columns = [c for c in names if c not in text_columns]

        ids = dataset[config.id_column]
        anchor_langs = self._langs(dataset, lang_of[anchor_col])
        positive_langs = self._langs(dataset, lang_of[positive_col])
        if config.languages is not None:
            languages = check_languages(list(config.languages) if not isinstance(config.languages, str)
                                        else config.languages)
        else:
            languages = sorted(set(anchor_langs) | set(positive_langs))
        lang_code = {lang: i for i, lang in enumerate(languages)}

        example_of: dict[Any, int] = {}
        example = np.fromiter((example_of.setdefault(i, len(example_of)) for i in ids), np.int64, len(ids))
        self.ids = list(example_of)
        n_examples = len(self.ids)
        self.languages = languages
        self.anchor_row = self._first_rows(example, anchor_langs, lang_code, n_examples)
        self.positive_row = self._first_rows(example, positive_langs, lang_code, n_examples)
        self.availability = (self.anchor_row >= 0) & (self.positive_row >= 0)
        if not self.availability.any():
            raise ValueError(
                f"no example has both its {anchor_col!r} and its {positive_col!r} in one of the languages "
                f"{languages} (language columns {lang_of[anchor_col]!r}, {lang_of[positive_col]!r})"
            )
        empty = [lang for lang, has in zip(languages, self.availability.any(axis=0)) if not has]
        if empty:  # as hybridfast.data.pairs: a language needs data
            message = (f"languages: {empty} have no example with both its {anchor_col!r} and its {positive_col!r} "
                       f"in that language; leave them out (languages={[l for l in languages if l not in empty]})")
            if config.languages is not None:  # named by the user: refused
                raise ValueError(message)
            warnings.warn(message + "; they are never sampled", stacklevel=3)  # found in a column only
        self.groups = None
        if config.group_column is not None:
            self.groups = self._groups(dataset[config.group_column], example, n_examples, config.group_column)
        self.lang_of = lang_of

    @staticmethod
    def _text_columns(names: list[str], config: HybridBatching) -> list[str]:
        if config.text_columns is not None:
            text_columns = list(config.text_columns)
            missing = [c for c in text_columns if c not in names]
            if missing:
                raise ValueError(f"text_columns {missing} are not columns of the dataset (columns: {names})")
        else:
            skip = {config.id_column, config.group_column, *_LABEL_COLUMNS, "dataset_name"}
            if isinstance(config.lang_columns, str):
                skip.add(config.lang_columns)
            elif isinstance(config.lang_columns, Mapping):
                skip.update(config.lang_columns.values())
            text_columns = [c for c in names if c not in skip and not _is_lang_column(c)]
        if len(text_columns) < 2:
            raise ValueError(
                f"text_columns must name at least an anchor and a positive column, got {text_columns} "
                f"(dataset columns: {names})"
            )
        return text_columns

    @staticmethod
    def _lang_columns(names: list[str], text_columns: list[str], config: HybridBatching,
                      dataset: Any) -> dict[str, str]:
        anchor_col, positive_col = text_columns[:2]
        spec = config.lang_columns
        if spec is None:
            if all(f"{c}_lang" in names for c in (anchor_col, positive_col)):
                spec = {c: f"{c}_lang" for c in text_columns if f"{c}_lang" in names}
            elif any(n in names for n in _LANG_NAMES):
                spec = next(n for n in _LANG_NAMES if n in names)
            else:
                # a language column under another name was taken for text: name it in the hint
                codes = [c for c in text_columns if _holds_language_codes(dataset, c)]
                hint = (f"; column(s) {codes} hold language codes, not text: pass lang_columns={codes[0]!r}"
                        if codes else "; pass lang_columns=...")
                raise ValueError(
                    f"no language column found: expected {anchor_col + '_lang'!r} and {positive_col + '_lang'!r}, "
                    f"or one of the columns {list(_LANG_NAMES)} (dataset columns: {names}){hint}"
                )
        if isinstance(spec, str):
            if spec not in names:
                raise ValueError(f"lang_columns={spec!r} is not a column of the dataset (columns: {names})")
            return {c: spec for c in text_columns}
        if not isinstance(spec, Mapping):
            raise TypeError(f"lang_columns must be None, a column name or a dict, got {type(spec).__name__}")
        for column in (anchor_col, positive_col):
            if column not in spec:
                raise ValueError(f"lang_columns has no entry for text column {column!r} (got {dict(spec)})")
        for text, lang in spec.items():
            if lang not in names:
                raise ValueError(
                    f"lang_columns[{text!r}]={lang!r} is not a column of the dataset (columns: {names})"
                )
        return {c: spec.get(c, spec[positive_col]) for c in text_columns}

    @staticmethod
    def _check_string_column(dataset: Any, column: str, what: str) -> None:
        feature = getattr(dataset, "features", {}).get(column)
        dtype = getattr(feature, "dtype", None)
        if dtype is not None and dtype not in ("string", "large_string"):
            raise ValueError(f"{what}: column {column!r} must hold text, but its type is {dtype}")

    @staticmethod
    def _langs(dataset: Any, column: str) -> list[str]:
        values = dataset[column]
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise ValueError(
                f"language column {column!r} must hold non-empty language codes (str); row {bad} has {values[bad]!r}"
            )
        return values

    @staticmethod
    def _first_rows(example: np.ndarray, langs: list[str], lang_code: dict[str, int], n_examples: int) -> np.ndarray:
        n_langs = len(lang_code)
        code = np.fromiter((lang_code.get(lang, -1) for lang in langs), np.int64, len(langs))
        keep = np.flatnonzero(code >= 0)  # languages outside `languages` are ignored
        table = np.full(n_examples * n_langs, -1, dtype=np.int64)
        flat, first = np.unique(example[keep] * n_langs + code[keep], return_index=True)
        table[flat] = keep[first]  # the first row holding (example, language) serves it
        return table.reshape(n_examples, n_langs)

    @staticmethod
    def _groups(values: list[Any], example: np.ndarray, n_examples: int, column: str) -> np.ndarray:
        group_of: dict[Any, int] = {}
        codes = np.fromiter((group_of.setdefault(v, len(group_of)) for v in values), np.int64, len(values))
        groups = np.full(n_examples, -1, dtype=np.int64)
        groups[example[::-1]] = codes[::-1]  # reversed so the first row of each example wins
        if np.any(groups[example] != codes):
            bad = int(np.flatnonzero(groups[example] != codes)[0])
            raise ValueError(f"group_column={column!r}: rows of one example disagree on the group (row {bad})")
        return groups

    def rows(self, plan: np.ndarray) -> list[tuple[int, int]]:
        """(example, query_lang, passage_lang) tuples -> (anchor row, positive row) keys."""
        plan = np.asarray(plan, dtype=np.int64).reshape(-1, 3)
        anchors = self.anchor_row[plan[:, 0], plan[:, 1]]
        positives = self.positive_row[plan[:, 0], plan[:, 2]]
        if (anchors < 0).any() or (positives < 0).any():
            raise RuntimeError("the sampler chose a language an example does not have (availability mismatch)")
        return list(zip(anchors.tolist(), positives.tolist()))


def parallel_pairs_dataset(pairs: Any, hard_negatives: int = 0) -> "datasets.Dataset":
    """hybridfast training data (``hybridfast.data.pairs.ParallelPairs``, e.g. from
    ``load_training_pairs("xquad-r")``) as a per-language-rows ``datasets.Dataset`` for
    :class:`HybridSentenceTransformerTrainer`: columns ``id, lang, group, anchor, positive[, negative_1..k]``.

    ``group`` joins examples that share a positive text (``pairs.groups``; else each example is its own);
    pass ``HybridBatching(group_column="group")`` so such false negatives never meet in a batch.
    ``hard_negatives=k`` keeps each row's first k negatives; every row must have at least k.
    """
    for name in ("example_ids", "languages", "availability", "query", "positive", "negatives"):
        if not hasattr(pairs, name):
            raise TypeError(f"pairs must be a hybridfast.data.pairs.ParallelPairs, got {type(pairs).__name__}")
    if isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 0:
        raise ValueError(f"hard_negatives must be an int >= 0, got {hard_negatives!r}")
    columns: dict[str, list] = {"id": [], "lang": [], "group": [], "anchor": [], "positive": []}
    groups = getattr(pairs, "groups", None)
    if groups is None:  # no duplicates: every example is its own group
        groups = np.arange(len(pairs.example_ids))
    negative_columns = [f"negative_{k + 1}" for k in range(hard_negatives)]
    for name in negative_columns:
        columns[name] = []
    for e, l in zip(*np.nonzero(np.asarray(pairs.availability))):
        e, l = int(e), int(l)
        columns["id"].append(str(pairs.example_ids[e]))
        columns["lang"].append(pairs.languages[l])
        columns["anchor"].append(pairs.query(e, l))
        columns["positive"].append(pairs.positive(e, l))
        columns["group"].append(int(groups[e]))
        if negative_columns:
            negatives = pairs.negatives(e, l)
            if len(negatives) < hard_negatives:
                raise ValueError(
                    f"hard_negatives={hard_negatives}: example {pairs.example_ids[e]!r} in {pairs.languages[l]!r} "
                    f"has only {len(negatives)} negatives"
                )
            for name, text in zip(negative_columns, negatives):
                columns[name].append(text)
    return datasets.Dataset.from_dict(columns)


class HybridPairDataset(torch.utils.data.Dataset):
    """Map-style view: key (anchor_row, positive_row) -> {anchor column: text, positive/negative columns: text}
    with the anchor from the first row and the other text columns from the second. Only text columns are
    returned, in order, so ST's collator builds (anchor, positive, negatives...) features from it."""

    def __init__(self, dataset: Any, index: HybridPairIndex) -> None:
        self.index = index
        self.anchor_column = index.text_columns[0]
        self.other_columns = index.text_columns[1:]
        self._anchors = dataset.select_columns([self.anchor_column])
        self._others = dataset.select_columns(self.other_columns)
        self._rows = len(dataset)

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        anchor_rows = [int(a) for a, _ in keys]
        positive_rows = [int(p) for _, p in keys]
        anchors = self._anchors[anchor_rows][self.anchor_column]
        others = self._others[positive_rows]
        return [
            {self.anchor_column: anchors[i], **{c: others[c][i] for c in self.other_columns}}
            for i in range(len(keys))
        ]


class HybridSTBatchSampler:
    """Batch sampler over :class:`HybridPairDataset` keys, driven by :class:`hybridfast.HybridBatchSampler`.

    ``batch_size`` is per process. Every process builds the same plan (same seed); per step it yields the
    batches of ranks 0..world_size-1 in turn, so accelerate's ``BatchSamplerShard`` (process r keeps every
    world_size-th batch, starting at r) hands rank r exactly its share of the global batch, and all ranks
    share the step's batch kind and languages. With ``split_batches=True`` it yields one global batch per
    step instead, which accelerate slices rank by rank.
    """

    def __init__(
        self,
        index: HybridPairIndex,
        batch_size: int,
        mode: str = "hybrid",
        mono_prob: float = 0.5,
        lang_weights: Mapping[str, float] | Sequence[float] | None = None,
        seed: int = 0,
        world_size: int = 1,
        split_batches: bool = False,
        drop_last: bool = True,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last must be True with several processes (each step needs one full batch per rank)")
        if isinstance(lang_weights, Mapping):  # {language: weight} -> one weight per index language
            lang_weights = language_weights(lang_weights, index.languages)
        self.index = index
        self.world_size = world_size
        self.split_batches = split_batches
        self.drop_last = drop_last
        self.per_rank_batch_size = batch_size
        # what accelerate's BatchSamplerShard reads: the size of one yielded batch
        self.batch_size = batch_size * world_size if split_batches else batch_size
        # Every rank's share is a fixed slice of one global plan, so one sampler serves all ranks.
        self.sampler = HybridBatchSampler(
            index.availability, batch_size, mode=mode, mono_prob=mono_prob, lang_weights=lang_weights,
            groups=index.groups, seed=seed, rank=0, world_size=world_size, drop_last=drop_last,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        steps = self.sampler.epoch_length()
        return steps if self.split_batches else steps * self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.sampler.plan()
        size = self.per_rank_batch_size
        for step in plan:
            step = step[step[:, 0] >= 0]  # a final partial batch (drop_last=False, one process) is -1 padded
            if self.split_batches:
                yield self.index.rows(step)
            else:
                for rank in range(self.world_size):
                    yield self.index.rows(step[rank * size:(rank + 1) * size])
