"""Data the project generates itself, for the default jobs of tasks whose real sets may not ship.

QMSum (summarization) and SGD / Topical-Chat (dialogue) may not ship inside the package (see
../shared/data/README.md), so `task=summarization` and `task=dialogue` default to these generated sets; the
real sets are one `data=` / `experiment=` away. Both are built so that the target depends on text far back
in the context: what a memory mechanism has to carry.

- `SyntheticMeetings`: a meeting transcript (speakers, small talk, and a few decisions spread through it);
  the summary lists the decisions in the order they were taken.
- `SyntheticSessions`: two chat sessions; in the first the user mentions facts about themselves among small
  talk, in the second they ask about them, and the assistant's answers need the first session.

Deterministic given `seed` and `split` (train and val draw different records).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

from stm.data.fieldmap import Record

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo"]
TOPICS = ["the budget", "the launch", "the website", "the hiring plan", "the office move", "the training",
          "the supplier contract", "the survey", "the newsletter", "the warehouse"]
ACTIONS = ["moves to next week", "goes to the design team", "is cut by ten percent", "starts on Monday",
           "waits for the board", "is handled by the interns", "doubles in size", "is cancelled",
           "gets a second review", "stays as it is"]
SMALL_TALK = ["I think we should look at the numbers again.", "Can everyone hear me?", "Sorry, I was on mute.",
              "That is a good point.", "Let me check my notes.", "We talked about this last time.",
              "I agree with that.", "Does anyone have questions?", "The coffee machine is broken again.",
              "Let us move on.", "I will send the slides later.", "Could you repeat that?"]

PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "horse"]
PET_NAMES = ["Tom", "Rex", "Luna", "Milo", "Coco", "Bella", "Max", "Nala", "Oscar", "Pip"]
CITIES = ["Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Quito", "Lima", "Turin", "Bergen"]
JOBS = ["teacher", "nurse", "baker", "pilot", "farmer", "painter", "lawyer", "chemist"]
CHAT = [("How was your day?", "It was fine, thank you for asking."),
        ("The weather is nice today.", "Yes, a good day for a walk."),
        ("I just had lunch.", "I hope it was tasty."),
        ("I am a bit tired.", "Rest is important, take it easy."),
        ("Do you like music?", "I enjoy many kinds of music."),
        ("I watched a film yesterday.", "That sounds like a relaxing evening.")]


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{split}/{index}".encode()))


class _Generated:
    """Base: a sized iterable of Records, like a `stm.data.sources.Source`."""

    def __init__(self, n_records: int = 200, seed: int = 0, split: str = "train", limit: int | None = None):
        if n_records <= 0:
            raise ValueError(f"{type(self).__name__}.n_records must be positive, got {n_records}")
        if limit is not None and limit <= 0:
            raise ValueError(f"{type(self).__name__}.limit must be positive or null, got {limit}")
        # `limit` as every source has it (conf/data/*: val_source.limit works whatever the source)
        self.n_records = n_records if limit is None else min(n_records, limit)
        self.seed, self.split = seed, split

    def make(self, rng: random.Random, index: int) -> Record:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        for i in range(self.n_records):
            yield self.make(_rng(self.seed, self.split, i), i)

    def __len__(self) -> int:
        return self.n_records

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_records={self.n_records}, seed={self.seed}, split={self.split!r})"


class SyntheticMeetings(_Generated):
    """Meetings of `n_turns` utterances with `n_decisions` decisions; summary = the decisions, in order."""

    def __init__(self, n_records: int = 200, seed: int = 0, split: str = "train", n_turns: int = 24,
                 n_decisions: int = 3, limit: int | None = None):
        super().__init__(n_records, seed, split, limit)
        if not 0 < n_decisions <= min(n_turns, len(TOPICS)):
            raise ValueError(f"SyntheticMeetings.n_decisions must be in 1..{min(n_turns, len(TOPICS))}, "
                             f"got {n_decisions}")
        self.n_turns, self.n_decisions = n_turns, n_decisions

    def make(self, rng: random.Random, index: int) -> Record:
        speakers = rng.sample(NAMES, 3)
        topics = rng.sample(TOPICS, self.n_decisions)
        actions = [rng.choice(ACTIONS) for _ in topics]
        at = sorted(rng.sample(range(self.n_turns), self.n_decisions))
        lines, decided = [], iter(zip(topics, actions))
        for t in range(self.n_turns):
            speaker = rng.choice(speakers)
            if t in at:
                topic, action = next(decided)
                lines.append(f"{speaker}: We decide that {topic} {action}.")
            else:
                lines.append(f"{speaker}: {rng.choice(SMALL_TALK)}")
        summary = " ".join(f"{topic[0].upper()}{topic[1:]} {action}." for topic, action in zip(topics, actions))
        return Record(id=f"meeting-{self.split}-{index}", context="\n".join(lines), target=summary,
                      origin=f"{self!r}#{index}", meta={"decision_turns": at})


class SyntheticSessions(_Generated):
    """Two sessions: facts in the first, questions about them in the second. Turns of USER / SYSTEM."""

    def __init__(self, n_records: int = 200, seed: int = 0, split: str = "train", small_talk: int = 3,
                 limit: int | None = None):
        super().__init__(n_records, seed, split, limit)
        self.small_talk = small_talk

    def make(self, rng: random.Random, index: int) -> Record:
        pet, pet_name, city, job = rng.choice(PETS), rng.choice(PET_NAMES), rng.choice(CITIES), rng.choice(JOBS)
        facts = [(f"I have a {pet} called {pet_name}.", f"{pet_name} is a lovely name for a {pet}."),
                 (f"I live in {city}.", f"{city} is a beautiful place."),
                 (f"I work as a {job}.", f"Being a {job} must be interesting.")]
        questions = [(f"What is my {pet} called?", f"Your {pet} is called {pet_name}."),
                     ("Where do I live?", f"You live in {city}."),
                     ("What is my job?", f"You work as a {job}.")]
        rng.shuffle(facts)
        rng.shuffle(questions)
        turns = [{"speaker": "USER", "text": "Hello!"}, {"speaker": "SYSTEM", "text": "Hello, how can I help?"}]
        for fact in facts:
            for said, answer in rng.sample(CHAT, self.small_talk):
                turns += [{"speaker": "USER", "text": said}, {"speaker": "SYSTEM", "text": answer}]
            turns += [{"speaker": "USER", "text": fact[0]}, {"speaker": "SYSTEM", "text": fact[1]}]
        turns += [{"speaker": "USER", "text": "-- a week later --"}, {"speaker": "SYSTEM", "text": "Welcome back!"}]
        for question, answer in questions:
            turns += [{"speaker": "USER", "text": question}, {"speaker": "SYSTEM", "text": answer}]
        return Record(id=f"sessions-{self.split}-{index}", context="", target="", turns=turns,
                      origin=f"{self!r}#{index}", meta={"pet": pet, "pet_name": pet_name, "city": city, "job": job})
