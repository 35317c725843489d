"""bAbI-style stories for BABILong probes: our own generators (qa1, qa2) and a reader for the bAbI files.

A story is a `BabiQuestion`: the story lines up to the question (facts and distractors, in order), which of
them support the answer, the question and its one-word answer. `stm.data.probes.babilong` hides the lines in
long background text.

Generated stories use bAbI's people, places and verbs:

    qa1 (single supporting fact)  "Mary went to the kitchen." ... "Where is Mary?" -> "kitchen"
                                  supporting: the last line about the asked person
    qa2 (two supporting facts)    "John picked up the apple there." "John went to the office." "Where is the apple?"
                                  -> "office"; supporting: the line that took (or dropped) the object and the
                                  holder's last move before the question (or before the drop)

bAbI files (Weston et al. 2015, e.g. `qa1_single-supporting-fact_train.txt`) have numbered lines; a line numbered
1 starts a new story; a question line is `N question<TAB>answer<TAB>supporting line numbers`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm.data.fieldmap import RecordError

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
OBJECTS = ("apple", "football", "milk")
MOVES = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
TAKES = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "put down", "discarded", "left")

# a background sentence that reads like a fact about a bAbI person and place is left out of the haystack
FACT_LIKE = re.compile(rf"\b(?:{'|'.join(PEOPLE)})\b[^.!?]*\bto the (?:{'|'.join(PLACES)})\b")


@dataclass
class BabiQuestion:
    """One question with its story: `story` lines in order, `supporting` indices into them (sorted)."""

    story: list[str]
    supporting: list[int]
    question: str
    answer: str
    origin: str = ""
    task: str = ""


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def generate_qa1(rng: np.random.Generator, n_facts: int = 1) -> BabiQuestion:
    """qa1: `n_facts` moves of random people; the question asks where one of them (uniformly drawn) is."""
    if n_facts < 1:
        raise ValueError(f"qa1 needs n_facts >= 1, got {n_facts}")
    story, last = [], {}
    for i in range(n_facts):
        person = _pick(rng, PEOPLE)
        place = _pick(rng, [p for p in PLACES if p != last.get(person, (None, None))[1]])
        story.append(f"{person} {_pick(rng, MOVES)} the {place}.")
        last[person] = (i, place)
    asked = _pick(rng, sorted(last))
    line, place = last[asked]
    return BabiQuestion(story, [line], f"Where is {asked}?", place, "generated", "qa1")


def generate_qa2(rng: np.random.Generator, n_facts: int = 4, max_tries: int = 1000) -> BabiQuestion:
    """qa2: `n_facts` lines of moves, takes and drops; the question asks where an object that was taken is.

    Each person's first line is a move; an object is taken only when free and dropped only by its holder.
    """
    if n_facts < 2:
        raise ValueError(f"qa2 needs n_facts >= 2 (a move and a take), got {n_facts}")
    for _ in range(max_tries):
        story: list[str] = []
        at: dict[str, tuple[int, str]] = {}  # person -> (line of their last move, place)
        holder: dict[str, tuple[str, int]] = {}  # object -> (person, line that took it)
        dropped: dict[str, tuple[int, int, str]] = {}  # object -> (drop line, holder's move line, place)
        for i in range(n_facts):
            located = sorted(at)
            free = [o for o in OBJECTS if o not in holder]
            actions = ["move"] + (["take"] if located and free else []) + (["drop"] if holder else [])
            action = _pick(rng, actions)
            if action == "move":
                person = _pick(rng, PEOPLE)
                place = _pick(rng, [p for p in PLACES if p != at.get(person, (None, None))[1]])
                story.append(f"{person} {_pick(rng, MOVES)} the {place}.")
                at[person] = (i, place)
            elif action == "take":
                person, obj = _pick(rng, located), _pick(rng, free)
                story.append(f"{person} {_pick(rng, TAKES)} the {obj} there.")
                holder[obj] = (person, i)
                dropped.pop(obj, None)
            else:
                obj = _pick(rng, sorted(holder))
                person, _ = holder.pop(obj)
                story.append(f"{person} {_pick(rng, DROPS)} the {obj}.")
                dropped[obj] = (i, at[person][0], at[person][1])
        candidates = sorted(set(holder) | set(dropped))
        if not candidates:
            continue
        obj = _pick(rng, candidates)
        if obj in holder:
            person, took = holder[obj]
            move, place = at[person]
            supporting = sorted({took, move})
        else:
            drop, move, place = dropped[obj]
            supporting = sorted({drop, move})
        return BabiQuestion(story, supporting, f"Where is the {obj}?", place, "generated", "qa2")
    raise RuntimeError(f"qa2: no story of {n_facts} lines with a taken object in {max_tries} tries")


GENERATORS = {"qa1": generate_qa1, "qa2": generate_qa2}

_LINE = re.compile(r"(\d+) (.*)")


class BabiFile:
    """The questions of a bAbI task file, each with its story up to it (`.questions`, in file order).

    A malformed line is a `RecordError` (a ValueError) naming `file:line`.
    """

    def __init__(self, path: str | Path, task: str | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"BabiFile: {self.path} does not exist or is not a file")
        self.task = task or self.path.name.split("_", 1)[0]
        self.questions = self._parse()

    def __repr__(self) -> str:
        return f"BabiFile({self.path}, {len(self.questions)} questions)"

    def __len__(self) -> int:
        return len(self.questions)

    def _parse(self) -> list[BabiQuestion]:
        questions: list[BabiQuestion] = []
        story: list[str] = []
        line_of: dict[int, int] = {}  # story line number -> index into story (statements only)
        previous = 0
        with open(self.path, encoding="utf-8") as lines:
            for lineno, raw in enumerate(lines, 1):
                where = f"{self.path}:{lineno}"
                text = raw.rstrip("\n")
                if not text.strip():
                    continue
                m = _LINE.fullmatch(text)
                if m is None:
                    raise RecordError(where, f"expected '<number> <text>', got {text[:60]!r}")
                number, body = int(m.group(1)), m.group(2)
                if number == 1:
                    story, line_of = [], {}
                elif number != previous + 1:
                    raise RecordError(where, f"line number {number} does not follow {previous} (a story starts at 1)")
                previous = number
                if "\t" not in body:
                    line_of[number] = len(story)
                    story.append(body.strip())
                    continue
                parts = body.split("\t")
                if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
                    raise RecordError(where, "a question line is '<number> <question>\\t<answer>\\t<supporting "
                                             f"line numbers>', got {len(parts)} tab-separated field(s)")
                try:
                    support = [int(s) for s in parts[2].split()]
                except ValueError:
                    raise RecordError(where, f"supporting line numbers must be integers, got {parts[2]!r}") from None
                missing = [s for s in support if s not in line_of]
                if not support or missing:
                    raise RecordError(where, f"supporting line(s) {missing or '(none)'} are not statements of "
                                             "this story before the question")
                questions.append(BabiQuestion(list(story), sorted(line_of[s] for s in support), parts[0].strip(),
                                              parts[1].strip(), where, self.task))
        if not questions:
            raise RecordError(str(self.path), "has no question lines")
        return questions
