"""Retrieval benchmarks: the in-memory form (RetrievalBenchmark), LAReQA readers, where data lives, downloads.

The `hybridfast data` command line is hybridfast/cli/data.py.

LAReQA (Roy et al. 2020) turns extractive QA sets into answer retrieval: a folder
holds one SQuAD-format JSON per language (`<lang>.json`), every paragraph carries
`sentence_breaks` ([start, end) character spans). Candidates are the sentences of
every paragraph, each kept with its paragraph; a question's relevant candidates
are the sentences holding an answer start, in every language that has that
question id. XQuAD-R is fully parallel (11 x 1190 questions); MLQA-R is partly
parallel (7 languages, a question exists in 2-4 of them).

Train/test split. Whole articles go to one side. Articles are linked across
languages through shared question ids (XQuAD-R: the same article in 11
languages; MLQA-R: an English article and its counterparts), and each linked
group goes wholly to train or test, so no article, paragraph or question id is
on both sides. Groups are ranked by sha256 of their key (the smallest article
title in the group) and the first round(TEST_FRACTION * groups) are the test
side: the split is a pure function of the folder's files, identical on every
machine and for every `languages` selection.
"""
import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Set, Tuple

from hybridfast.data.benchmark import RetrievalBenchmark, check_languages, check_split, language_files

TEST_FRACTION = 0.5  # share of article groups in the "test" split (XQuAD-R: 24 of 48 articles)


def lareqa_article(candidate_id: str) -> int:
    """The article index of a LAReQA candidate id "<lang>:<article>:<paragraph>:<sentence>"
    (load_lareqa's format; an article keeps its index across the translations of XQuAD-R)."""
    parts = str(candidate_id).split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        raise ValueError(f"candidate id {candidate_id!r} is not a LAReQA id <lang>:<article>:<paragraph>:<sentence>")
    return int(parts[1])


# ----------------------------------------------------------------------------- file reading

class LAReQAFormatError(ValueError):
    """A LAReQA JSON file does not have the expected structure (the message names file and place)."""


class LAReQAWarning(UserWarning):
    """Answers skipped while loading (an answer start outside every sentence)."""


class _Question(NamedTuple):
    id: str
    text: str
    answer_starts: Tuple[int, ...]


class _Paragraph(NamedTuple):
    context: str
    sentences: Tuple[str, ...]
    breaks: Tuple[Tuple[int, int], ...]
    questions: Tuple[_Question, ...]


class _Article(NamedTuple):
    title: str
    paragraphs: Tuple[_Paragraph, ...]


def _fail(path, where, problem):
    raise LAReQAFormatError(f"{path}: {where}: {problem}")


def _expect(path, where, value, kind, what):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(path, where, f"{what} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _parse_paragraph(path, where, para, seen_ids):
    _expect(path, where, para, dict, "a paragraph")
    for key in ("context", "qas", "sentence_breaks"):
        if key not in para:
            _fail(path, where, f"missing field {key!r}" + (
                " (not a LAReQA file? SQuAD files lack sentence breaks)" if key == "sentence_breaks" else ""))
    context = _expect(path, f"{where}.context", para["context"], str, "context")
    breaks = []
    for j, span in enumerate(_expect(path, f"{where}.sentence_breaks", para["sentence_breaks"], list,
                                     "sentence_breaks")):
        w = f"{where}.sentence_breaks[{j}]"
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            _fail(path, w, f"expected a [start, end] pair of ints, got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(context):
            _fail(path, w, f"span {span} outside the context (length {len(context)}) or empty")
        if breaks and start < breaks[-1][1]:
            _fail(path, w, f"span {span} overlaps or precedes the previous one {list(breaks[-1])}")
        breaks.append((start, end))
    # The release's `sentences` field is the authors' text of each span; prefer it (it
    # survives the odd encoding slip in a context), else cut the spans out of the context.
    sentences = para.get("sentences")
    if sentences is None:
        sentences = [context[s:e].strip() for s, e in breaks]
    else:
        _expect(path, f"{where}.sentences", sentences, list, "sentences")
        if len(sentences) != len(breaks):
            _fail(path, f"{where}.sentences", f"{len(sentences)} sentences but {len(breaks)} sentence_breaks")
        for j, s in enumerate(sentences):
            _expect(path, f"{where}.sentences[{j}]", s, str, "a sentence")
    questions = []
    for k, qa in enumerate(_expect(path, f"{where}.qas", para["qas"], list, "qas")):
        w = f"{where}.qas[{k}]"
        _expect(path, w, qa, dict, "a question")
        for key in ("id", "question", "answers"):
            if key not in qa:
                _fail(path, w, f"missing field {key!r}")
        qid = _expect(path, f"{w}.id", qa["id"], str, "id")
        text = _expect(path, f"{w}.question", qa["question"], str, "question")
        # The same question asked again (same id and text) is merged by the readers;
        # one id for two different questions would silently mix their answers.
        if seen_ids.setdefault(qid, text) != text:
            _fail(path, f"{w}.id", f"question id {qid!r} appears twice with different questions")
        starts = []
        for m, ans in enumerate(_expect(path, f"{w}.answers", qa["answers"], list, "answers")):
            wa = f"{w}.answers[{m}]"
            if not isinstance(ans, dict) or "answer_start" not in ans:
                _fail(path, wa, "expected an object with 'answer_start'")
            starts.append(_expect(path, f"{wa}.answer_start", ans["answer_start"], int, "answer_start"))
        questions.append(_Question(qid, text, tuple(starts)))
    return _Paragraph(context, tuple(sentences), tuple(breaks), tuple(questions))


def _parse_file(path: Path) -> Tuple[_Article, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise LAReQAFormatError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise LAReQAFormatError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        _fail(path, "top level", "expected an object with a 'data' list (SQuAD format)")
    articles, seen_ids = [], {}
    for i, art in enumerate(raw["data"]):
        where = f"data[{i}]"
        _expect(path, where, art, dict, "an article")
        title = _expect(path, f"{where}.title", art.get("title", f"article-{i}"), str, "title")
        paragraphs = _expect(path, f"{where}.paragraphs", art.get("paragraphs"), list, "paragraphs")
        parsed = tuple(_parse_paragraph(path, f"{where}.paragraphs[{j}]", p, seen_ids)
                       for j, p in enumerate(paragraphs))
        articles.append(_Article(title, parsed))
    return tuple(articles)


def check_file(path) -> None:
    """Raise LAReQAFormatError (naming file and place) unless `path` is a LAReQA JSON file."""
    _parse_file(Path(path))


_parsed_cache: Dict[tuple, Tuple[_Article, ...]] = {}


def _read(path: Path) -> Tuple[_Article, ...]:
    """Parsed file, cached by (path, size, mtime): loaders re-read the same files often."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _parsed_cache:
        if len(_parsed_cache) > 64:
            _parsed_cache.clear()
        _parsed_cache[key] = _parse_file(path)
    return _parsed_cache[key]


# ----------------------------------------------------------------------------- split

def _test_articles(files: Dict[str, Path]) -> Set[Tuple[str, int]]:
    """(lang, article index) of the test side, from all of the folder's languages."""
    parent = {}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner = {}  # question id -> first article node holding it
    titles = {}
    for lang, p in sorted(files.items()):
        for a, art in enumerate(_read(p)):
            node = (lang, a)
            parent[node] = node
            titles[node] = art.title
            for para in art.paragraphs:
                for q in para.questions:
                    if q.id in owner:
                        parent[find(node)] = find(owner[q.id])
                    else:
                        owner[q.id] = node
    groups: Dict[tuple, list] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(node)
    keyed = sorted((hashlib.sha256(min(titles[n] for n in g).encode("utf-8")).hexdigest(),
                    min(titles[n] for n in g), sorted(g)) for g in groups.values())
    if len(keyed) < 2:
        raise ValueError(f"split: {next(iter(files.values())).parent} has {len(keyed)} article group(s); "
                         "a train/test split needs at least 2 (use split='all')")
    n_test = min(len(keyed) - 1, max(1, round(TEST_FRACTION * len(keyed))))  # both sides non-empty
    return {node for _, _, g in keyed[:n_test] for node in g}


def _selected(files, languages, split):
    """Yield (lang, article index, article) on the requested side of the split."""
    test = _test_articles(files) if split != "all" else None
    for lang in languages:
        for a, art in enumerate(_read(files[lang])):
            if test is None or ((lang, a) in test) == (split == "test"):
                yield lang, a, art


def _sentence_of(breaks, start):
    for s, (b, e) in enumerate(breaks):
        if b <= start < e:
            return s
    return None


def _warn_unmatched(path, unmatched, dropped):
    if unmatched:
        detail = ", ".join(f"{lang}: {n}" for lang, n in sorted(unmatched.items()))
        msg = (f"{path}: {sum(unmatched.values())} answer start(s) fell in no sentence and were "
               f"skipped ({detail})")
        if dropped:
            msg += f"; {dropped} question(s) left without a relevant sentence were dropped"
        warnings.warn(msg, LAReQAWarning, stacklevel=3)


# ----------------------------------------------------------------------------- public readers

def load_lareqa(path, languages=None, split="all") -> RetrievalBenchmark:
    """Read a LAReQA folder (XQuAD-R, MLQA-R layout) into a RetrievalBenchmark.

    Query ids are the files' question ids (shared across languages); candidate ids
    are "<lang>:<article>:<paragraph>:<sentence>" positions, unique over languages
    (`lareqa_article` reads the article back).
    Every sentence span is a candidate (no de-duplication: this reproduces the
    published XQuAD-R counts). qrels[q] holds, for every loaded language that has
    question q, the sentences holding one of its answer starts.
    """
    path = Path(path)
    check_split(split)
    files = language_files(path)
    languages = check_languages(languages, files, where=path)
    queries = {lang: {} for lang in languages}
    candidates = {lang: {} for lang in languages}
    qrels: Dict[str, Set[str]] = {}
    unmatched: Dict[str, int] = {}
    for lang, a, art in _selected(files, languages, split):
        for p, para in enumerate(art.paragraphs):
            ids = [f"{lang}:{a}:{p}:{s}" for s in range(len(para.breaks))]
            candidates[lang].update(zip(ids, ((s, para.context) for s in para.sentences)))
            for q in para.questions:
                queries[lang][q.id] = q.text
                rel = qrels.setdefault(q.id, set())
                for start in q.answer_starts:
                    s = _sentence_of(para.breaks, start)
                    if s is None:
                        unmatched[lang] = unmatched.get(lang, 0) + 1
                    else:
                        rel.add(ids[s])
    # A question none of whose answers landed in a sentence (in any language) cannot be scored.
    dead = {q for q, rel in qrels.items() if not rel}
    for lang in languages:
        for q in dead & queries[lang].keys():
            del queries[lang][q]
    for q in dead:
        del qrels[q]
    _warn_unmatched(path, unmatched, len(dead))
    name = path.name if split == "all" else f"{path.name}[{split}]"
    return RetrievalBenchmark(queries, candidates, qrels, name=name)


def lareqa_examples(path, languages=None, split="all") -> List[dict]:
    """Question/answer-sentence pairs for training readers.

    One dict per question per language, in language then file order:
    {"id", "lang", "question", "sentence" (the first matched answer's sentence),
    "context" (its paragraph), "article" (the article title)}. Questions whose
    answers all fall outside the sentences are skipped (one warning).
    """
    return examples_with_languages(path, languages, split)[1]


def examples_with_languages(path, languages=None, split="all") -> Tuple[List[str], List[dict]]:
    """(the languages selected, lareqa_examples): the folder is listed and the languages
    checked once, for readers that need both (hybridfast.data.pairs)."""
    path = Path(path)
    check_split(split)
    files = language_files(path)
    languages = check_languages(languages, files, where=path)
    out, unmatched, dropped, done = [], {}, 0, set()
    for lang, _, art in _selected(files, languages, split):
        for para in art.paragraphs:
            for q in para.questions:
                if (lang, q.id) in done:  # a repeated question: its first occurrence stands
                    continue
                hits = [_sentence_of(para.breaks, st) for st in q.answer_starts]
                misses = sum(h is None for h in hits)
                if misses:
                    unmatched[lang] = unmatched.get(lang, 0) + misses
                hit = next((h for h in hits if h is not None), None)
                if hit is None:
                    dropped += 1
                    continue
                done.add((lang, q.id))
                out.append({"id": q.id, "lang": lang, "question": q.text,
                            "sentence": para.sentences[hit], "context": para.context,
                            "article": art.title})
    _warn_unmatched(path, unmatched, dropped)
    return languages, out
