"""`task=probe`: memory probes scored by how far back the fact was: accuracy overall, by distance, near and far.

A probe example (`stm.data.probes`: associative recall, copy, BABILong-style QA) knows, once laid out in
segments, how many segment borders lie between its earliest supporting fact and the question
(`info.meta["distance_segments"]`, see `stm.data.probes.probe_distances`). Every generated answer is scored
(exact match; answer-in-first-sentence for BABILong) and counted in

- the bucket of its distance: `edges` [0, 1, 2, 4, 8] give the buckets 0, 1, 2-3, 4-7 and 8+ segments,
  logged as `val/acc_seg0`, `val/acc_seg1`, `val/acc_seg2-3`, `val/acc_seg4-7`, `val/acc_seg8+`;
- `near` and `far`: inclusive ranges of distance in segments (hi null: unbounded), logged as
  `val/acc_near` and `val/acc_far`;
- `truncated`: examples whose fact (or question) the data module's truncation cut away. They cannot be
  answered from the context, so they are in no distance bucket, nor near or far; they are logged as
  `val/acc_truncated` and counted in `val/n_truncated` (0 when there are none), and a warning names them;
- overall (`val/acc`): every generated example, truncated ones included (so it equals `val/exact_match`).

Multi-query probes (`stm.data.probes.mqar`: examples whose info has `answer_labels`) are scored teacher-forced
instead, without generation: the validation batch is read once with its logits, and a query is correct when
the argmax equals the label at every token of its answer. The unit is then the query: each one is counted in
the bucket of its own distance (`query_distance_segments`: from its pair to the position that predicts its
answer), `val/acc` is the accuracy per query, `val/n_queries` the number of queries scored, and
`val/exact_match` the share of examples with every query right. horizon.json says `unit: query` and records
n_pairs (K) and n_queries; `stm.analysis.horizon --capacity` tabulates accuracy against K.

The sums are torchmetrics states reduced by summing, so the accuracies are exact under DDP. After every
validation, rank zero writes `horizon.json` (mechanism, bucket edges, counts, correct, accuracy, baselines)
into the run's output folder (`trainer.default_root_dir`); at the end of fit the task logs a one-line table
(mechanism, accuracy near, accuracy far, overall). `stm.analysis.horizon` gathers the files of a sweep into curves.

By length and task: where the validation holds several sets (`data.val_lengths`: each example's meta says its
`val_set`, e.g. "2048") or BABILong examples (meta `task`: qa1, ...), every scored example is also counted by
(set, task): logged as `val/<set>/acc` (the first score; the others as `val/<set>/<score>`), `val/<set>/n` and,
with several tasks, `val/<set>/acc_<task>`; and `lengths_file` (babilong.json) in the run folder holds the
counts, accuracy and binomial standard error per set and task (plus all tasks pooled and their mean), with
the outputs of every example; a table of it is logged after each validation. `stm.analysis.lengthgen` gathers the files
of a sweep into one table (mechanism x task x length).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import SumMetric

from stm.constants import IGNORE_INDEX
from stm.metrics.distance_accuracy import DistanceAccuracy, bucket_names
from stm.metrics.text import answer_in_first_sentence, exact_match
from stm.tasks.horizon_report import HORIZON_FILE, _finite, _one_or_all, horizon_table, mechanism_name, training_record
from stm.tasks.qa import QuestionAnsweringTask
from stm.tasks.scores_by_length import ExampleScores, accuracy_by_length, lengths_table, set_and_task

log = logging.getLogger("stm")

SCORES = {"exact_match": exact_match, "first_sentence": answer_in_first_sentence}

# moved to their own modules; imported from here as before
__all__ = ["HORIZON_FILE", "SCORES", "DistanceAccuracy", "ProbeTask", "bucket_names", "horizon_table",
           "mechanism_name"]


class ProbeTask(QuestionAnsweringTask):
    """QA over memory probes, scored by the distance in segments between the fact and the question.

    scores:     per-example scores counted by distance: exact_match and/or first_sentence (BABILong); the
                first is the accuracy logged as `val/acc*`, the others as `val/<score>*`.
    edges:      bucket edges in segments, strictly increasing from 0; the last bucket is open-ended.
    near, far:  inclusive [lo, hi] ranges of distance in segments (hi null: no upper end) for the summary
                numbers `val/acc_near` and `val/acc_far` and the table printed at the end of fit.
    horizon_file: the file written into the run's output folder after each validation (null: none).
    lengths_file: the file of accuracy by set and task (babilong.json), written after each validation of
                several sets or of BABILong examples (null: none).
    target_loss: false: validation only generates and scores, without the teacher-forced read of context and
                target for val/loss, ppl and bpb (which are then not logged): an evaluation at half the cost.
    Everything else as in `ConditionalLMTask` (`n_generate: null` scores every validation example). The values
    a run uses are set in conf/task/probe.yaml; without a file name, no file is written.
    """

    def __init__(self, *args, scores: Sequence[str], edges: Sequence[int], near: Sequence, far: Sequence,
                 horizon_file: str | None = None, lengths_file: str | None = None, target_loss: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.target_loss = bool(target_loss)
        scores = list(scores)
        unknown = [s for s in scores if s not in SCORES]
        if not scores or unknown:
            raise ValueError(f"task.scores: choose one or more of {sorted(SCORES)}, got {scores}")
        self.distance_accuracy = DistanceAccuracy(list(edges), list(near), list(far), scores)
        self.horizon_file, self.lengths_file = horizon_file, lengths_file
        self.example_scores = ExampleScores(len(scores))  # every scored unit, for the numbers by set and task
        self.example_outputs: list[dict] = []  # this rank's generated outputs, for the results file
        self.by_length: dict | None = None
        self.references: Counter[str] = Counter()
        self.value_vocabs: set = set()
        self.n_pairs: set = set()
        self.n_queries: set = set()
        self.queries_scored = SumMetric()  # teacher-forced queries and their examples (summed across ranks)
        self.query_examples = SumMetric()
        self.horizon: dict | None = None

    # ------------------------------------------------------------------------------------------ scoring

    def on_generation(self, index: int, info, output: str) -> None:
        meta = info.meta or {}
        if "distance_segments" not in meta:
            raise ValueError(f"task=probe: validation example {index} ({info.origin}) has no distance in its meta; "
                             f"the probe task needs probe data (data=probe_recall, probe_babilong, qa_sample)")
        kept = bool(meta.get("facts_kept", True)) and bool(meta.get("question_kept", True))
        scores = {name: SCORES[name](output, info.reference) for name in self.distance_accuracy.scores}
        self.distance_accuracy.update(meta["distance_segments"], kept, scores)
        self.example_scores.update(index, [scores[name] for name in self.distance_accuracy.scores])
        length, task = set_and_task(meta)
        self.example_outputs.append({"index": index, "length": length, "task": task, "origin": info.origin,
                                     "story": meta.get("story_origin"), "reference": info.reference,
                                     "context_tokens": int(len(info.context_ids)), "output": output,
                                     "scores": scores})
        self.references[info.reference] += 1
        self._note_probe(meta)

    def _note_probe(self, meta: dict) -> None:
        if "value_vocab" in meta:
            self.value_vocabs.add(int(meta["value_vocab"]))
        if "n_pairs" in meta:
            self.n_pairs.add(int(meta["n_pairs"]))
        if "n_queries" in meta:
            self.n_queries.add(int(meta["n_queries"]))

    def validation_step(self, batch, batch_idx):
        """Examples with answer spans (multi-query probes) are scored teacher-forced from one read of the batch
        with its logits; any others in the batch are generated and scored as usual."""
        _, examples = self._val_examples()
        indices = batch["index"].tolist()
        if not any(examples.infos[i].answer_labels is not None for i in indices):
            if self.target_loss:
                return super().validation_step(batch, batch_idx)
            for index in indices:  # task.target_loss=false: generated and scored only
                if self.n_generate is None or index < self.n_generate:
                    self._generate_and_score(index)
            return None
        run = self(batch, return_logits=True)
        target = batch["target_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
        self.val_metrics.update((run.token_nll * target).sum(), target.sum(), (batch["label_bytes"] * target).sum())
        predicted = run.logits.argmax(dim=-1)
        for row, index in enumerate(indices):
            info = examples.infos[index]
            if info.answer_labels is not None:
                self.score_answers(index, info, predicted[row], batch["labels"][row])
            elif self.n_generate is None or index < self.n_generate:
                self._generate_and_score(index)

    def score_answers(self, index: int, info, predicted: torch.Tensor, labels: torch.Tensor) -> list[bool]:
        """Score one example's queries teacher-forced: query q is right when `predicted` (the argmax token at
        each label position) equals `labels` over all of its answer's label range `info.answer_labels[q]`.
        Counts each query in its distance bucket, the example in the text metrics (the target with the
        predicted answers in it against the reference) and the sample table. Returns the queries' results."""
        meta = info.meta or {}
        if "query_distance_segments" not in meta:
            raise ValueError(f"task=probe: validation example {index} ({info.origin}) has answer spans but no "
                             f"per-query distances; its meta needs query_fact_chars (stm.data.probes.mqar)")
        tokenizer = self.trainer.datamodule.tokenizer
        spans = meta.get("answer_chars") or [None] * len(info.answer_labels)
        results, pieces, at = [], [], 0
        for q, (lo, hi) in enumerate(info.answer_labels):
            ok = bool((predicted[lo:hi] == labels[lo:hi]).all())
            results.append(ok)
            kept = bool(meta["query_facts_kept"][q])
            self.distance_accuracy.update(meta["query_distance_segments"][q], kept,
                                          dict.fromkeys(self.distance_accuracy.scores, float(ok)))
            self.example_scores.update(index, [float(ok)] * len(self.distance_accuracy.scores))
            if spans[q] is not None:
                start, end = spans[q]
                self.references[info.reference[start:end]] += 1
                pieces += [info.reference[at:start],
                           info.reference[start:end] if ok else tokenizer.decode(predicted[lo:hi].tolist())]
                at = end
        output = "".join(pieces) + info.reference[at:]
        self.queries_scored.update(float(len(results)))
        self.query_examples.update(1.0)
        self._note_probe(meta)
        self.text_metrics.update([output], [info.reference])
        if len(self.samples) < self.n_samples:
            self.samples.append({"index": index, "origin": info.origin, "source": info.context,
                                 "reference": info.reference, "output": output})
        return results

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.references.clear()
        self.value_vocabs.clear()
        self.n_pairs.clear()
        self.n_queries.clear()
        for metric in (self.queries_scored, self.query_examples):  # zero, and updated on every rank (compute
            metric.reset()                                           # syncs on all of them, with no warning)
            metric.update(0.0)
        self.example_scores.reset()
        self.example_scores.update(-1, [0.0] * self.example_scores.n_scores)  # a placeholder row, as above
        self.example_outputs = []

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        metric = self.distance_accuracy
        result = metric.compute()
        metric.reset()
        counts = result["count"]
        n_queries, n_query_examples = float(self.queries_scored.compute()), float(self.query_examples.compute())
        self.queries_scored.reset()
        self.query_examples.reset()
        if counts["all"] == 0:
            log.warning("task=probe: no validation example was generated (task.n_generate=0?): no accuracy")
            return
        for s, score in enumerate(metric.scores):
            prefix = "acc" if s == 0 else score
            for group in metric.groups:
                if counts[group] > 0:
                    name = prefix if group == "all" else f"{prefix}_{group}"
                    self.log(f"val/{name}", result[score][group])
                    self.last_val[f"val/{name}"] = result[score][group]
        self.log("val/n_truncated", float(counts["truncated"]))
        self.last_val["val/n_truncated"] = float(counts["truncated"])
        if n_queries:
            self.log("val/n_queries", n_queries)
            self.last_val["val/n_queries"] = n_queries
        if counts["truncated"] and not self.trainer.sanity_checking:
            log.warning("task=probe: %d of %d validation %s lost their fact to truncation (data.max_segments):"
                        " counted as `truncated`, not in any distance bucket", counts["truncated"], counts["all"],
                        "queries" if n_queries else "examples")
        self.horizon = self._horizon_record(result, n_queries, n_query_examples)
        if self.horizon_file and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / self.horizon_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.horizon, indent=2) + "\n")
        self._report_by_length()

    def _report_by_length(self) -> None:
        """Accuracy by set and task (see the module docstring): logged, tabulated and written to lengths_file,
        where the validation holds several sets or BABILong examples."""
        index, values = self.example_scores.compute()
        self.example_scores.reset()
        metas = [info.meta or {} for info in self._val_examples()[1].infos]
        scored = [metas[int(i)] for i in index]
        if not scored or not any("val_set" in m or m.get("probe") == "babilong" for m in scored):
            self.by_length = None
            return
        scores = self.distance_accuracy.scores
        result = accuracy_by_length(metas, index.tolist(), values.tolist(), scores)
        several = any("val_set" in m for m in scored)
        logged = {}
        for c in result["cells"]:
            prefix = f"val/{c['length']}/" if several else "val/"
            if c["task"] == "all" and several:  # one set: val/acc, val/<score> are its overall numbers already
                logged.update({prefix + ("acc" if k == 0 else s): c["accuracy"][s] for k, s in enumerate(scores)})
                logged[prefix + "n"] = float(c["n"])
            elif c["task"] != "all" and len(result["tasks"]) > 1:  # per task (and their mean): the first score
                logged[f"{prefix}acc_{c['task']}"] = c["accuracy"][scores[0]]
        for name, value in logged.items():
            self.log(name, value)
            self.last_val[name] = value
        first = {}
        for m in scored:
            first.setdefault(set_and_task(m)[0], m)
        cfg = self.run_config or {}
        self.by_length = {
            "mechanism": mechanism_name(cfg, self.memory), "memory": cfg.get("memory"),
            "val_source": (cfg.get("data") or {}).get("val_source"),
            "val_lengths": (cfg.get("data") or {}).get("val_lengths"), "segment_len": self.segment_len,
            "step": self.trained_steps, "seed": cfg.get("seed"), "task_name": cfg.get("task_name"),
            "training": training_record(cfg), "score": scores[0], "scores": list(scores),
            "length_unit": next(iter(first.values())).get("length_unit"),
            "target_lengths": {name: m.get("target_length") for name, m in first.items()},
            **result,
            "examples": sorted(self.example_outputs, key=lambda e: e["index"]) if self.trainer.world_size == 1
            else None,  # the outputs are rank-local: left out under DDP rather than incomplete
        }
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        log.info("\n%s", lengths_table(self.by_length, title=f"{self.by_length['mechanism']}: accuracy % "
                 f"({scores[0]}) by task and length ({self.by_length['length_unit']}), ± binomial standard error, "
                 "(examples)"))
        if self.lengths_file:
            path = Path(self.trainer.default_root_dir) / self.lengths_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.by_length, indent=2) + "\n")

    def _horizon_record(self, result: dict, n_queries: float = 0.0, n_query_examples: float = 0.0) -> dict:
        """What horizon.json holds: the run, the buckets with counts, correct and accuracy, near/far, baselines;
        what was counted (`unit`: example, or query for teacher-forced multi-query probes, else mixed), how
        many examples, and the probe's n_pairs (K) and n_queries (an int; a sorted list if they vary)."""
        metric, counts = self.distance_accuracy, result["count"]
        n_generated = counts["all"] - int(n_queries)
        unit = "query" if n_queries and not n_generated else "example" if not n_queries else "mixed"
        cfg = self.run_config or {}
        memory_cfg = cfg.get("memory")

        def group(name: str, **extra) -> dict:
            return {"name": name, **extra, "count": counts[name],
                    "correct": {s: result["correct"][s][name] for s in metric.scores},
                    "accuracy": {s: _finite(result[s][name]) for s in metric.scores}}

        his = list(metric.edges[1:]) + [None]
        buckets = [group(name, lo=lo, hi=None if hi is None else hi - 1)
                   for name, lo, hi in zip(metric.buckets, metric.edges, his)]
        n = sum(self.references.values()) if self.trainer.world_size == 1 else 0
        baselines = {}
        if n:  # rank-local when sharded; left out under DDP rather than reported wrong
            baselines["majority_answer"] = self.references.most_common(1)[0][1] / n
        if len(self.value_vocabs) == 1:
            baselines["uniform_value"] = 1.0 / next(iter(self.value_vocabs))
        return {
            "mechanism": mechanism_name(cfg, self.memory),
            "memory": memory_cfg,
            "val_source": (cfg.get("data") or {}).get("val_source"),  # what was probed: length, vocabularies, ...
            "segment_len": self.segment_len,
            "step": self.trained_steps,
            "seed": cfg.get("seed"),
            "task_name": cfg.get("task_name"),
            "training": training_record(cfg),
            "score": metric.scores[0],
            "scores": metric.scores,
            "edges": metric.edges,
            "buckets": buckets,
            "near": group("near", lo=metric.near[0], hi=metric.near[1]),
            "far": group("far", lo=metric.far[0], hi=metric.far[1]),
            "truncated": group("truncated"),
            "overall": group("all"),
            "baselines": baselines,
            "unit": unit,
            "n_examples": n_generated + int(n_query_examples),
            "n_pairs": _one_or_all(self.n_pairs),
            "n_queries": _one_or_all(self.n_queries),
        }

    def on_fit_end(self):
        if self.horizon is not None and self.trainer.is_global_zero:
            log.info("\n%s", horizon_table([self.horizon]))
