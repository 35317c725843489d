"""From records to conditional examples (context -> target): one per record, one per response, one per sentence.

A `Record` (stm.data.fieldmap) is what a source gives; an `Example` is what a model reads: the context
(read segment by segment under the memory), the target (in the final segment, taking the loss), and
what scoring and sample tables need. How records become examples is the data config's `examples:` key:

- `record`:    context -> target, one example per record (summarization, QA, probes);
- `turns`:     dialogue. Every turn of the `respond_as` speaker (default: the second speaker of the dialogue)
               after the first becomes a target; its context is every earlier turn, across sessions. Turns
               are rendered as `speaker: text` lines, or with the tokenizer's chat template (the responding
               speaker as `assistant`, everyone else as `user`), which is what an instruct model expects;
- `sentences`: document-level translation. Sentence i of a document (aligned lists in the record's meta,
               `source_key` / `target_key`) is a target; its context is the previous `n_previous` sentence
               pairs (source line, then target line; all earlier ones when null), then source sentence i.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stm.data.fieldmap import Record

EXPANSIONS = ("record", "turns", "sentences")


@dataclass
class Example:
    context: str
    target: str
    origin: str
    meta: dict = field(default_factory=dict)


def render_turns(turns: list[dict], respond_as: str, chat_template=None, add_generation_prompt: bool = False) -> str:
    """Dialogue turns as text: `speaker: text` lines, or through a chat template (a callable taking
    [{"role", "content"}] messages, like `HFTokenizer.apply_chat_template`)."""
    if chat_template is None:
        text = "".join(f"{t['speaker']}: {t['text']}\n" for t in turns)
        return text + (f"{respond_as}: " if add_generation_prompt else "")
    messages = [{"role": "assistant" if t["speaker"] == respond_as else "user", "content": t["text"]} for t in turns]
    return chat_template(messages, add_generation_prompt=add_generation_prompt)


def dialogue_examples(record: Record, respond_as: str | None = None, chat_template=None,
                      min_context_turns: int = 1) -> list[Example]:
    """One example per response of `respond_as` with at least `min_context_turns` turns before it."""
    turns = record.turns or []
    if not turns:
        raise ValueError(f"{record.origin}: examples=turns needs a record with turns (the source gives none)")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "speaker" not in t or "text" not in t:
            raise ValueError(f"{record.origin}: turn {i} must have 'speaker' and 'text', got {t!r}")
    speakers = list(dict.fromkeys(t["speaker"] for t in turns))
    responder = respond_as if respond_as is not None else (speakers[1] if len(speakers) > 1 else speakers[0])
    examples = []
    for i, turn in enumerate(turns):
        if turn["speaker"] != responder or i < min_context_turns:
            continue
        context = render_turns(turns[:i], responder, chat_template, add_generation_prompt=True)
        examples.append(Example(context, turn["text"], f"{record.origin} (turn {i})",
                                {**record.meta, "turn": i, "id": record.id}))
    return examples


def translation_examples(record: Record, source_key: str, target_key: str, n_previous: int | None = None,
                         separator: str = "\n") -> list[Example]:
    """One example per aligned sentence pair; the context is the document so far (pairs) and the source."""
    sources, targets = record.meta.get(source_key), record.meta.get(target_key)
    for key, value in ((source_key, sources), (target_key, targets)):
        if not isinstance(value, list):
            raise ValueError(f"{record.origin}: examples=sentences needs a list in meta field '{key}' "
                             f"(map it in the source's fields.meta), got {type(value).__name__}")
    if len(sources) != len(targets):
        raise ValueError(f"{record.origin}: meta '{source_key}' has {len(sources)} sentences but '{target_key}' "
                         f"has {len(targets)}; they must be aligned")
    examples = []
    for i, (src, tgt) in enumerate(zip(sources, targets)):
        first = 0 if n_previous is None else max(0, i - n_previous)
        history = "".join(f"{s}{separator}{t}{separator}" for s, t in zip(sources[first:i], targets[first:i]))
        examples.append(Example(history + src + separator, tgt, f"{record.origin} (sentence {i})",
                                {"id": record.id, "sentence": i, "source": src}))
    return examples


def record_example(record: Record, separator: str = "\n") -> Example:
    return Example(record.context + separator, record.target, record.origin, {**record.meta, "id": record.id})


def expand(records, how: str = "record", *, separator: str = "\n", respond_as: str | None = None,
           chat_template=None, source_key: str = "en", target_key: str = "es",
           n_previous: int | None = None) -> list[Example]:
    """All examples of `records` under the expansion `how` (see the module docstring)."""
    if how not in EXPANSIONS:
        raise ValueError(f"data.examples must be one of {EXPANSIONS}, got {how!r}")
    examples: list[Example] = []
    for record in records:
        if how == "record":
            examples.append(record_example(record, separator))
        elif how == "turns":
            examples.extend(dialogue_examples(record, respond_as, chat_template))
        else:
            examples.extend(translation_examples(record, source_key, target_key, n_previous, separator))
    return examples
