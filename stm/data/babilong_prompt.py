"""The prompt around a BABILong sample, as BABILong prompts a pretrained LM: an instruction, the context in tags,
the question at the end; through the tokenizer's chat template (one user message, the assistant's turn opened)
where it has one, as plain text ending in an answer cue otherwise.

    plain text                                     with a chat template (SmolLM2's)
    ---------------------------------------------  ---------------------------------------------------
    <instruction>                                  <|im_start|>system ... <|im_end|>
                                                   <|im_start|>user
    <context>                                      <instruction>
    Mary went to the kitchen. ...                  <context>
    </context>                                     Mary went to the kitchen. ...
                                                   </context>
    Question: Where is Mary?
    Answer:                                        Question: Where is Mary?<|im_end|>
                                                   <|im_start|>assistant

A `Frame` is the text before the context (`head`) and after it (`tail`, with `{question}` in it), so that the
story can be hidden in its background first and measured with its frame (`stm.data.probes.hide_in_background`
counts head and tail in target_length). The template is rendered once, with markers where the context and the
question go, and cut there. The instruction's wording is configuration (conf/experiment/babilong.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

QUESTION = "\n\nQuestion: {question}"   # after the closing tag
ANSWER_CUE = "\nAnswer:"               # plain text only: where the answer begins (the target then starts with " ")
OPEN, CLOSE = "<context>\n", "\n</context>"
CHAT_TEMPLATE = ("auto", True, False)
_CONTEXT_MARK, _QUESTION_MARK = "\x1eSTM-CONTEXT\x1e", "\x1eSTM-QUESTION\x1e"


@dataclass(frozen=True)
class Frame:
    """head + context + tail.format(question=...) is the sample; `chat`: the chat template made it."""

    head: str
    tail: str
    chat: bool

    def render(self, context: str, question: str) -> str:
        return self.head + context + self.tail.format(question=question)


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` (an stm tokenizer, or None) renders chat messages with a template of its own."""
    return bool(getattr(tokenizer, "has_chat_template", False))


def make_frame(instruction: str, tokenizer=None, chat_template="auto", question_format: str = QUESTION) -> Frame:
    """The frame of `instruction` and `question_format` (text after the context holding `{question}`).

    chat_template: auto (the tokenizer's template where it has one, else plain text), true (the template; an
    error without one), false (plain text)."""
    if chat_template not in CHAT_TEMPLATE:
        raise ValueError(f"babilong_qa.chat_template must be one of auto, true, false; got {chat_template!r}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"babilong_qa.instruction must be a non-empty text (or null: no prompt), got {instruction!r}")
    if not isinstance(question_format, str) or question_format.count("{question}") != 1:
        raise ValueError(f"babilong_qa.question_format must hold {{question}} once, got {question_format!r}")
    chat = has_chat_template(tokenizer) if chat_template == "auto" else chat_template
    if chat and not has_chat_template(tokenizer):
        raise ValueError(f"babilong_qa.chat_template=true needs babilong_qa.tokenizer with a chat template; "
                         f"{tokenizer!r} has none (set chat_template: auto or false)")
    head = instruction.strip() + "\n\n" + OPEN
    if not chat:
        return Frame(head, _escape(CLOSE) + question_format + _escape(ANSWER_CUE), chat=False)
    message = head + _CONTEXT_MARK + CLOSE + question_format.format(question=_QUESTION_MARK)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    at = rendered.find(_CONTEXT_MARK)
    if rendered.count(_CONTEXT_MARK) != 1 or rendered.count(_QUESTION_MARK) != 1 or \
            rendered.find(_QUESTION_MARK) < at:
        raise ValueError(f"babilong_qa.chat_template: the chat template of {tokenizer!r} does not keep the user "
                         f"message as it is (its rendering: {rendered[:200]!r}); set chat_template: false")
    tail = _escape(rendered[at + len(_CONTEXT_MARK):]).replace(_QUESTION_MARK, "{question}")
    return Frame(rendered[:at], tail, chat=True)


def _escape(text: str) -> str:
    """`text` as a literal inside a str.format pattern."""
    return text.replace("{", "{{").replace("}", "}}")
