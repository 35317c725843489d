"""Faithful BABILong QA1-QA5 (Kuratov et al. 2024): the questions of the bAbI files hidden in long text.

Each sample is one question of a bAbI task file with its whole story up to it (supporting facts and the
distractor lines, as bAbI has them), the story lines inserted in order at random sentence boundaries of the
shipped Austen novels up to `target_length` (characters, or tokens of `tokenizer`), then the question; the target
is bAbI's answer (`stm.data.probes.hide_in_background` does the hiding; the record meta has the task, the target
length, the fact and question offsets that task=probe turns into distances, and the story's `file:line`).

The tasks are mixed deterministically: sample i asks task tasks[i % len(tasks)], namely that task's
(i // len(tasks))-th question in an order drawn from (seed, split, task); the placement in the text is drawn
from (seed, split, i). So the same seed asks the same questions at every target length.

Which file, by split (BABILong trains on bAbI's training stories and scores on its test stories):

    split=train         `<task>_*_train.txt` from the first folder of `babi_dirs` that has one (bAbI en-10k;
                        QA3 from en-1k, the en-10k QA3 training file not being available)
    split=val / test    `<task>_*_test.txt` only: no training story is ever scored

target_length 0 is the story alone, without background (BABILong's "0k").

A prompt for a pretrained LM (`instruction`, `stm.data.babilong_prompt`): the instruction, the context in
<context> tags, the question, through the tokenizer's chat template where it has one (`chat_template`: auto, true,
false), plain text ending in "Answer:" otherwise (the target then starts with a space: " kitchen"). The prompt
counts in target_length: with `tokenizer`, a sample is at most target_length tokens of that tokenizer as the model
reads it, template tokens included.

A story with its question longer than target_length cannot be hidden: `too_long: error` (the default) says so,
naming target_length and the story; `too_long: skip` uses only the questions whose story fits `story_length`
(default: target_length), in the same drawn order. Give story_length the shortest length a run evaluates at, and
every length asks the same questions (at 512 characters about 56% of QA2, 12% of QA3 and 47% of QA5 stories fit,
all of QA1 and QA4).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from stm.data.babi import BabiFile
from stm.data.babilong_prompt import QUESTION, Frame, make_frame
from stm.data.fieldmap import Record
from stm.data.probes.hidden_story import QUESTION_FORMAT, _cost, hide_in_background
from stm.data.probes.seeding import sample_rng
from stm.data.probes.sources import ProbeSource

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
BABI_DIRS = ("probes/babi_en10k", "probes/babi_en1k")
FILE_OF_SPLIT = {"train": "train", "val": "test", "validation": "test", "test": "test"}
TOO_LONG = ("error", "skip")
_TASK = re.compile(r"qa([1-9]|1[0-9]|20)")


def babi_file_path(task: str, split: str, root: str | Path | None = None,
                   babi_dirs=BABI_DIRS) -> Path:
    """The bAbI file of `task` for `split`: `<task>_*_train.txt` for train, `<task>_*_test.txt` for val / test,
    from the first of `babi_dirs` (relative to `root`) that has one. Errors name the key to change."""
    if split not in FILE_OF_SPLIT:
        raise ValueError(f"babilong_qa.split must be one of {list(FILE_OF_SPLIT)} (train reads *_train.txt, the "
                         f"others *_test.txt), got {split!r}")
    kind = FILE_OF_SPLIT[split]
    base = Path(str(root)).expanduser() if root is not None else Path(".")
    if root is not None and not base.is_dir():
        raise FileNotFoundError(f"babilong_qa.root: {base} is not a folder (the shared data: set STM_SHARED_DATA, "
                                f"or run next to ../shared/data)")
    tried = []
    for folder in [base / d for d in babi_dirs]:
        found = sorted(folder.glob(f"{task}_*_{kind}.txt"))
        if len(found) > 1:
            raise ValueError(f"babilong_qa.babi_dirs: {folder} has several {kind} files of {task}: "
                             f"{[f.name for f in found]}")
        if found:
            return found[0]
        tried.append(str(folder / f"{task}_*_{kind}.txt"))
    raise FileNotFoundError(f"babilong_qa.tasks: no bAbI {kind} file of {task} for split={split}: tried "
                            f"{tried} (babilong_qa.root / babilong_qa.babi_dirs)")


@lru_cache(maxsize=32)
def read_babi_file(path: str) -> BabiFile:
    """A bAbI file, parsed once per process."""
    return BabiFile(path)


class BabiLongQASource(ProbeSource):
    """BABILong QA samples of several bAbI tasks, mixed (see the module docstring).

    tasks:         bAbI task names, e.g. [qa1, qa2, qa3, qa4, qa5]; sample i asks tasks[i % len(tasks)].
    root:          the shared data folder; babi_dirs are relative to it.
    target_length: context length in tokens of `tokenizer`, else characters (at most this; short of it by at
                   most about a background sentence); 0: the story alone.
    too_long:      error | skip: a story that does not fit (see the module docstring); story_length the length
                   stories must fit with skip (null: target_length).
    depth, background, question_format: as `stm.data.probes.hide_in_background`.
    instruction:   null (the context and question_format as they are), or the prompt's instruction: the
                   context then goes in tags, with question_format after them (default: "\n\nQuestion:
                   {question}"), through the chat template (`chat_template`: auto | true | false) or plain text.
    The files are read when the first records are made (not at construction).
    """

    length_key = "target_length"

    def __init__(self, tasks=TASKS, root: str | None = None, babi_dirs=BABI_DIRS, target_length: int = 4096,
                 tokenizer=None, too_long: str = "error", story_length: int | None = None,
                 depth: float | None = None, background: str = "austen", question_format: str | None = None,
                 instruction: str | None = None, chat_template="auto", **kwargs):
        super().__init__(tasks=tasks, root=root, babi_dirs=babi_dirs, target_length=target_length,
                         tokenizer=tokenizer, too_long=too_long, story_length=story_length, depth=depth,
                         background=background, question_format=question_format, instruction=instruction,
                         chat_template=chat_template, **kwargs)
        self.check()
        self._costs: dict[tuple, np.ndarray] = {}  # shared by copies (with_params): one tokenizer, one format
        self._frames: dict[tuple, Frame] = {}

    def check(self) -> None:
        """The parameters that need no file: tasks, split, too_long, the lengths."""
        p = self.params
        tasks = p["tasks"]
        if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
            raise ValueError(f"babilong_qa.tasks must be a non-empty list of bAbI tasks, e.g. {list(TASKS)}, "
                             f"got {tasks!r}")
        unknown = [t for t in tasks if not isinstance(t, str) or not _TASK.fullmatch(t)]
        if unknown or len(set(tasks)) < len(tasks):
            raise ValueError(f"babilong_qa.tasks: bAbI tasks are qa1 ... qa20, each once; got {list(tasks)}")
        if self.split not in FILE_OF_SPLIT:
            raise ValueError(f"babilong_qa.split must be one of {list(FILE_OF_SPLIT)} (train reads *_train.txt, "
                             f"the others *_test.txt), got {self.split!r}")
        if p["too_long"] not in TOO_LONG:
            raise ValueError(f"babilong_qa.too_long must be one of {list(TOO_LONG)}, got {p['too_long']!r}")
        length = p["target_length"]
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"babilong_qa.target_length must be a positive integer (or 0: the story alone), "
                             f"got {length!r}")
        story = p["story_length"]
        if story is not None and (not isinstance(story, int) or isinstance(story, bool) or story <= 0):
            raise ValueError(f"babilong_qa.story_length must be a positive integer, got {story!r}")
        if story is not None and length and story > length:
            raise ValueError(f"babilong_qa.story_length ({p['story_length']}) exceeds target_length "
                             f"({p['target_length']}): a story of that length cannot be hidden in it")

    def files(self) -> dict[str, BabiFile]:
        p = self.params
        return {t: read_babi_file(str(babi_file_path(t, self.split, p["root"], p["babi_dirs"]))) for t in p["tasks"]}

    def frame(self) -> Frame:
        """What surrounds the context: the prompt of `instruction` (`stm.data.babilong_prompt`), or without one
        nothing before it and question_format after it."""
        p = self.params
        key = (id(p["tokenizer"]), p["instruction"], p["chat_template"], p["question_format"])
        if key not in self._frames:
            if p["instruction"] is None:
                self._frames[key] = Frame("", p["question_format"] or QUESTION_FORMAT, chat=False)
            else:
                self._frames[key] = make_frame(p["instruction"], p["tokenizer"], p["chat_template"],
                                               p["question_format"] or QUESTION)
        return self._frames[key]

    def story_costs(self, babi: BabiFile) -> np.ndarray:
        """The length of each question's story lines, question and prompt (what `hide_in_background` must fit),
        in the unit of target_length; each distinct line is measured once."""
        p = self.params
        frame = self.frame()
        key = (str(babi.path), id(p["tokenizer"]), frame)
        if key not in self._costs:
            lines = sorted({line for q in babi.questions for line in q.story})
            tails = sorted({frame.tail.format(question=q.question) for q in babi.questions})
            measured = _cost(p["tokenizer"], [line + " " for line in lines] + tails + [frame.head])
            cost = dict(zip(lines, measured[:len(lines)]))
            tail_cost = dict(zip(tails, measured[len(lines):-1]))
            self._costs[key] = np.array([sum(cost[line] for line in q.story) + measured[-1]
                                         + tail_cost[frame.tail.format(question=q.question)]
                                         for q in babi.questions], dtype=np.int64)
        return self._costs[key]

    def order(self, number: int, task: str, babi: BabiFile) -> np.ndarray:
        """The questions of one task in the order its samples ask them: a permutation drawn from (seed, split,
        task), with too_long=skip only those whose story fits story_length (or a target_length other than 0)."""
        p = self.params
        order = sample_rng(self.seed, self.split, number, stream=1).permutation(len(babi))
        limit = p["story_length"] or p["target_length"]
        if p["too_long"] == "skip" and limit:
            order = order[self.story_costs(babi)[order] <= limit]
            if not len(order):
                raise ValueError(f"babilong_qa.story_length / target_length: no story of {task} ({babi.path}) fits "
                                 f"in {limit} {self.unit()} with its question (the shortest needs "
                                 f"{int(self.story_costs(babi).min())})")
        return order

    def unit(self) -> str:
        return "characters" if self.params["tokenizer"] is None else "tokens"

    def generate(self, n: int) -> list[Record]:
        self.check()
        p = self.params
        tasks, files, frame = list(p["tasks"]), self.files(), self.frame()
        orders = {t: self.order(int(t[2:]), t, files[t]) for t in tasks}
        answer_space = " " if p["instruction"] is not None and not frame.chat else ""  # after "Answer:"
        records = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            order = orders[task]
            position = int(order[(i // len(tasks)) % len(order)])
            question = files[task].questions[position]
            need = int(self.story_costs(files[task])[position])
            if p["target_length"] and need > p["target_length"]:
                raise ValueError(
                    f"babilong_qa.target_length: {p['target_length']} {self.unit()} cannot hold the story of "
                    f"{question.origin} ({task}, {len(question.story)} lines) with its question: {need} "
                    f"{self.unit()}. Raise target_length, or set too_long: skip to use only the stories that fit")
            context, meta = hide_in_background(sample_rng(self.seed, self.split, i), question,
                                               p["target_length"] or need, p["tokenizer"], p["depth"], True,
                                               p["background"], frame.tail, frame.head)
            meta.update(task=task, seed=self.seed, split=self.split, index=i, n_facts=len(question.story),
                        babi_file=files[task].path.name, babi_question=position, story_cost=need,
                        questions_used=len(order), questions_in_file=len(files[task]),
                        target_length=p["target_length"], chat_template=frame.chat)
            records.append(Record(id=f"babilong_qa-{task}-{self.split}-{self.seed}-{i}", context=context,
                                  target=answer_space + question.answer,
                                  origin=f"probe:babilong_qa:{self.split}:{self.seed}#{i}", meta=meta))
        return records
