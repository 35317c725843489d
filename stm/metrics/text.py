"""Metrics for generated text that stay exact under DDP: ROUGE, BLEU, chrF, token F1, exact match, BABILong.

Every metric keeps sums as its state (`dist_reduce_fx="sum"`), so the value computed after a DDP sync is the
value a single process would get on all the examples:

- corpus metrics (BLEU, chrF) sum sacrebleu's own sufficient statistics (n-gram matches and totals, lengths)
  and score the summed statistics with sacrebleu, which is what `sacrebleu.corpus_bleu` / `corpus_chrf` do;
- per-example metrics (ROUGE, token F1, exact match, answer in first sentence) sum the per-example scores and
  count the examples; the mean is taken only in `compute`.

torchmetrics' own text metrics are not used for these: `ROUGEScore` splits rougeLsum sentences with nltk's punkt
model (not shipped with nltk, downloaded on first use) instead of on newlines as `rouge_score` does, and
`CHRFScore` / `SacreBLEUScore` differ from sacrebleu (chrF++ by default, float32 statistics, a different treatment
of empty hypotheses and of zero n-gram matches). Use `build_text_metrics(names)` to get them by name.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SENTENCE_END = re.compile(r"[.!?\n]")


# ---------------------------------------------------------------------------------------------------------------
# normalisation and per-example scores
# ---------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop ASCII punctuation and the articles a/an/the, collapse spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred: str, target: str) -> float:
    """SQuAD token F1 between the normalised prediction and reference (bags of words).

    When either side normalises to no tokens, the score is 1.0 if both do and 0.0 otherwise (SQuAD v2).
    """
    pred_tokens = normalize_answer(pred).split()
    target_tokens = normalize_answer(target).split()
    if not pred_tokens or not target_tokens:
        return float(pred_tokens == target_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(target_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, target: str) -> float:
    """1.0 when prediction and reference are equal after SQuAD normalisation, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(target))


def first_sentence(text: str) -> str:
    """The text up to (not including) the first `.`, `!`, `?` or newline, after leading whitespace."""
    return _SENTENCE_END.split(text.lstrip(), maxsplit=1)[0]


def answer_in_first_sentence(pred: str, target: str) -> float:
    """BABILong scoring: 1.0 when the normalised reference appears as whole words in the output's first sentence.

    "Whole words" means the reference's tokens occur as a contiguous run of the sentence's tokens (so "kitchen"
    is not found in "kitchens"). A reference that normalises to nothing matches only an empty first sentence.
    """
    sentence = normalize_answer(first_sentence(pred)).split()
    answer = normalize_answer(target).split()
    if not answer:
        return float(not sentence)
    width = len(answer)
    return float(any(sentence[i:i + width] == answer for i in range(len(sentence) - width + 1)))


def _check_pairs(preds: Sequence[str], targets: Sequence[str]) -> None:
    """Raise a clear error unless preds and targets are equally long sequences of strings."""
    for name, value in (("preds", preds), ("targets", targets)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list of strings, one per example, not a single string")
        bad = next((item for item in value if not isinstance(item, str)), None)
        if bad is not None:
            raise TypeError(f"{name} must hold strings only; got a {type(bad).__name__}: {bad!r:.80}")
    if len(preds) != len(targets):
        raise ValueError(f"preds and targets differ in length: {len(preds)} predictions, {len(targets)} targets")


# ---------------------------------------------------------------------------------------------------------------
# metrics that average a per-example score
# ---------------------------------------------------------------------------------------------------------------


class ExampleMeanMetric(Metric):
    """Mean over examples of per-example scores, kept as one sum per result key plus an example count.

    Subclasses set `keys` and implement `score(pred, target) -> {key: float}`; `scale` multiplies the means
    (100 for ROUGE). State names carry the result keys, so no two metrics of a collection share state names.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    keys: tuple[str, ...] = ()
    scale: float = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key in self.keys:
            self.add_state(f"{key}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.count_state = f"{'_'.join(self.keys)}_count"
        self.add_state(self.count_state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, pred: str, target: str) -> dict[str, float]:
        raise NotImplementedError

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Add the scores of each (prediction, reference) pair."""
        _check_pairs(preds, targets)
        totals = dict.fromkeys(self.keys, 0.0)
        for pred, target in zip(preds, targets):
            for key, value in self.score(pred, target).items():
                totals[key] += value
        for key, total in totals.items():
            setattr(self, f"{key}_sum", getattr(self, f"{key}_sum") + total)
        setattr(self, self.count_state, getattr(self, self.count_state) + len(preds))

    def compute(self) -> dict[str, torch.Tensor]:
        """{key: mean score * scale}; 0 before any example was seen."""
        count = getattr(self, self.count_state).clamp(min=1)
        return {key: (getattr(self, f"{key}_sum") / count * self.scale).float() for key in self.keys}


class RougeMetric(ExampleMeanMetric):
    """ROUGE F-measures as `rouge_score` computes them, averaged over examples, on a 0-100 scale.

    rougeLsum splits sentences on newlines (rouge_score's default), so put one sentence per line in summaries.
    """

    keys = ROUGE_TYPES
    scale = 100.0

    def __init__(self, use_stemmer: bool = True, **kwargs: Any) -> None:
        from rouge_score import rouge_scorer

        super().__init__(**kwargs)
        self.use_stemmer = use_stemmer
        self._scorer = rouge_scorer.RougeScorer(list(self.keys), use_stemmer=use_stemmer)

    def score(self, pred: str, target: str) -> dict[str, float]:
        scores = self._scorer.score(target, pred)  # rouge_score takes the reference first
        return {key: scores[key].fmeasure for key in self.keys}


class TokenF1Metric(ExampleMeanMetric):
    """SQuAD token F1, mean over examples, 0-1."""

    keys = ("token_f1",)

    def score(self, pred: str, target: str) -> dict[str, float]:
        return {"token_f1": token_f1(pred, target)}


class ExactMatchMetric(ExampleMeanMetric):
    """Exact match after SQuAD normalisation, mean over examples, 0-1."""

    keys = ("exact_match",)

    def score(self, pred: str, target: str) -> dict[str, float]:
        return {"exact_match": exact_match(pred, target)}


class FirstSentenceMetric(ExampleMeanMetric):
    """BABILong accuracy: share of outputs whose first sentence contains the reference answer, 0-1."""

    keys = ("answer_in_first_sentence",)

    def score(self, pred: str, target: str) -> dict[str, float]:
        return {"answer_in_first_sentence": answer_in_first_sentence(pred, target)}


# ---------------------------------------------------------------------------------------------------------------
# corpus metrics on sacrebleu's statistics
# ---------------------------------------------------------------------------------------------------------------


class SacrebleuCorpusMetric(Metric):
    """A sacrebleu corpus metric (BLEU, chrF) whose state is the sum of sacrebleu's per-segment statistics.

    `compute` scores the summed statistics with the same sacrebleu object, so the result equals
    `scorer.corpus_score(all_preds, [all_targets]).score` however the examples were split over updates and ranks.
    This uses sacrebleu's `_extract_corpus_statistics` / `_compute_score_from_stats`, the methods its own
    significance tests are built on (sacrebleu >= 2.0).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, key: str, scorer: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = key
        self._scorer = scorer
        n_stats = len(self._segment_stats(["a"], ["a"])[0])
        self.add_state(f"{key}_stats", default=torch.zeros(n_stats, dtype=torch.long), dist_reduce_fx="sum")

    def _segment_stats(self, preds: Sequence[str], targets: Sequence[str]) -> list[list[int]]:
        return self._scorer._extract_corpus_statistics(list(preds), [list(targets)])

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Add the n-gram statistics of each (prediction, reference) pair."""
        _check_pairs(preds, targets)
        if not preds:
            return
        stats = torch.tensor(self._segment_stats(preds, targets), dtype=torch.long).sum(dim=0)
        name = f"{self.key}_stats"
        setattr(self, name, getattr(self, name) + stats)

    def compute(self) -> dict[str, torch.Tensor]:
        """{key: corpus score on sacrebleu's 0-100 scale}."""
        stats = getattr(self, f"{self.key}_stats").tolist()
        return {self.key: torch.tensor(self._scorer._compute_score_from_stats(stats).score, dtype=torch.float32)}


def sacrebleu_metric(tokenize: str = "13a", lowercase: bool = False, **kwargs: Any) -> SacrebleuCorpusMetric:
    """Corpus BLEU (0-100) equal to `sacrebleu.corpus_bleu(preds, [targets])` with its defaults (exp smoothing)."""
    from sacrebleu.metrics import BLEU

    return SacrebleuCorpusMetric("bleu", BLEU(tokenize=tokenize, lowercase=lowercase), **kwargs)


def chrf_metric(lowercase: bool = False, **kwargs: Any) -> SacrebleuCorpusMetric:
    """Corpus chrF (0-100) equal to `sacrebleu.corpus_chrf(preds, [targets])` (char order 6, no word n-grams)."""
    from sacrebleu.metrics import CHRF

    return SacrebleuCorpusMetric("chrf", CHRF(lowercase=lowercase), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., Metric]] = {
    "rouge": RougeMetric,
    "sacrebleu": sacrebleu_metric,
    "chrf": chrf_metric,
    "token_f1": TokenF1Metric,
    "exact_match": ExactMatchMetric,
    "first_sentence": FirstSentenceMetric,
}

# the options build_text_metrics passes on, and which metrics take them
_OPTIONS = {"use_stemmer": ("rouge",), "tokenize": ("sacrebleu",), "lowercase": ("sacrebleu", "chrf")}


def build_text_metrics(
    names: Sequence[str],
    *,
    use_stemmer: bool = True,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> MetricCollection:
    """A MetricCollection of the named text metrics: `update(preds, targets)`, `compute() -> {key: tensor}`.

    Names and result keys: rouge -> rouge1, rouge2, rougeL, rougeLsum (0-100); sacrebleu -> bleu (0-100);
    chrf -> chrf (0-100); token_f1 -> token_f1 (0-1); exact_match -> exact_match (0-1);
    first_sentence -> answer_in_first_sentence (0-1).
    `use_stemmer` is ROUGE's Porter stemmer, `tokenize` BLEU's sacrebleu tokenizer, `lowercase` BLEU's and chrF's.
    """
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    if not names:
        raise ValueError(f"no text metric named; choose from {sorted(METRICS)}")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; known: {sorted(METRICS)}")
    options = {"use_stemmer": use_stemmer, "tokenize": tokenize, "lowercase": lowercase}
    metrics = {}
    for name in names:
        kwargs = {option: options[option] for option, users in _OPTIONS.items() if name in users}
        metrics[name] = METRICS[name](**kwargs)
    # compute groups would let metrics whose states happen to be equal after the first update share one state
    return MetricCollection(metrics, compute_groups=False)
