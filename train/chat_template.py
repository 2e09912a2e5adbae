"""Chat templates for SFT: keep earlier turns' `<think>` text, and mark assistant tokens for the loss.

A navigator trajectory is one conversation with many assistant turns, each
``<think>...</think>`` plus one action. Training must see the reasoning of every
earlier turn, and the model at inference must be shown the same context it was
trained on. Qwen3's stock chat template drops the reasoning of assistant turns
that come before the last user message: in our protocol tool results are user
turns, so every turn but the last would lose its `<think>` (a known trap).

`ensure_think_preserving_template` detects that by rendering a probe
conversation, and installs a template that keeps the reasoning and wraps
assistant turns in ``{% generation %}`` blocks, which TRL's
``assistant_only_loss`` needs (transformers' ``return_assistant_tokens_mask``).
The fixed template is saved with the checkpoint, so `lvr ask` renders
conversations exactly as training did.

Where the template comes from, in order:

1. a file the user names (`--chat-template FILE`), checked like any other;
2. the model's own, when it already keeps `<think>` and marks assistant tokens;
3. TRL's training variant of the model's template, when TRL recognises it
   (stock Qwen3 -> TRL's ``qwen3_training.jinja``, which always renders the
   reasoning block) and that variant keeps `<think>`;
4. our own ChatML template below, for any ChatML-family model (Qwen and others
   that use ``<|im_start|>``/``<|im_end|>``).

Otherwise `TemplateError` says what is wrong and how to supply a template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import re

# A string no real conversation holds, so finding it proves the reasoning survived.
THINK_PROBE = "lvr-think-probe-q7x2"
_ANSWER_PROBE = "<answer>lvr-answer-probe</answer>"
_USER_PROBE = "lvr-user-probe"
_SYSTEM_PROBE = "lvr-system-probe"
_RESULT_PROBE = "lvr-result-probe"

# ChatML with every assistant turn rendered verbatim (its <think> included) inside a
# {% generation %} block that ends with <|im_end|>, so the model learns to stop. The
# newline after <|im_end|> belongs to the template, not to the answer. A message's
# `reasoning_content` (TRL's field for separated reasoning) is put back in front of
# content that has no <think> of its own. String content renders byte-identically to
# plain ChatML, so swapping this in for a ChatML template changes nothing but the masks.
LVR_CHATML_TEMPLATE = """\
{#- lvr ChatML training template: keeps the <think> text of every assistant turn and marks
    assistant tokens with generation blocks for assistant-only loss. -#}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- elif message.content is none or message.content is undefined %}
        {%- set content = '' %}
    {%- else %}
        {%- set parts = namespace(text='') %}
        {%- for part in message.content %}
            {%- if part.type == 'text' %}
                {%- set parts.text = parts.text + part.text %}
            {%- endif %}
        {%- endfor %}
        {%- set content = parts.text %}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if message.reasoning_content is string and message.reasoning_content and '<think>' not in content %}
                {{- '<think>' + message.reasoning_content + '</think>\\n' }}
            {%- endif %}
            {{- content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """No chat template that keeps earlier <think> text and marks assistant tokens could be set up."""


@dataclass
class TemplateFix:
    """What `ensure_think_preserving_template` did."""

    changed: bool          # the tokenizer's template was replaced
    source: str            # "model", "file:<path>", "trl:<name>" or "lvr-chatml"
    reason: str            # one line for the user
    template: str          # the template now installed

    def to_record(self) -> dict:
        return {"changed": self.changed, "source": self.source, "reason": self.reason}


def _template_text(tokenizer, chat_template: str | None = None) -> str | None:
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named variants: the default one is used for chat
        template = template.get("default")
    return template


def has_generation_markers(template: str | None) -> bool:
    """Whether the template wraps assistant output in {% generation %} blocks."""
    return bool(template) and _GENERATION_RE.search(template) is not None


def _probe_messages(final_assistant: bool) -> list[dict]:
    """Two assistant turns; only the FIRST holds the probe reasoning, as in a navigator trajectory."""
    messages = [
        {"role": "system", "content": _SYSTEM_PROBE},
        {"role": "user", "content": _USER_PROBE},
        {"role": "assistant", "content": f"<think>{THINK_PROBE}</think>\n<tool>get_caption((1, 2))</tool>"},
        {"role": "user", "content": _RESULT_PROBE},
    ]
    if final_assistant:
        messages.append({"role": "assistant", "content": f"<think>last</think>\n{_ANSWER_PROBE}"})
    return messages


def _render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def template_keeps_think(tokenizer, chat_template: str | None = None) -> bool:
    """Whether an earlier assistant turn's `<think>` content survives rendering.

    Renders a conversation whose first assistant turn holds `<think>PROBE</think>`,
    both as a training sample (a final assistant turn follows) and as an inference
    prompt (a generation prompt follows), and checks PROBE is in both. A template
    that cannot render the conversation at all counts as not keeping it.
    """
    template = _template_text(tokenizer, chat_template)
    if not template:
        return False
    try:
        sample = _render(tokenizer, template, _probe_messages(True))
        prompt = _render(tokenizer, template, _probe_messages(False), add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template error means the template is unusable here
        return False
    return THINK_PROBE in sample and THINK_PROBE in prompt


def _masked_ids(tokenizer, template: str | None, messages: list[dict] | None = None) -> tuple[list, list]:
    out = tokenizer.apply_chat_template(messages or _probe_messages(True), chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    return [t for t, m in zip(ids, mask) if m], [t for t, m in zip(ids, mask) if not m]


def assistant_mask_text(tokenizer, chat_template: str | None = None,
                        messages: list[dict] | None = None) -> tuple[str, str]:
    """(masked text, unmasked text) of a rendered conversation under return_assistant_tokens_mask."""
    masked, unmasked = _masked_ids(tokenizer, _template_text(tokenizer, chat_template), messages)
    return (tokenizer.decode(masked, skip_special_tokens=False),
            tokenizer.decode(unmasked, skip_special_tokens=False))


def template_masks_assistant(tokenizer, chat_template: str | None = None) -> bool:
    """Whether assistant-only masking works: the assistant turns are marked, nothing else is,
    and each marked turn ends on its end-of-turn token (an added token such as <|im_end|>),
    so the model learns to stop."""
    template = _template_text(tokenizer, chat_template)
    if not has_generation_markers(template):
        return False
    try:
        masked_ids, _ = _masked_ids(tokenizer, template)
    except Exception:  # noqa: BLE001
        return False
    masked = tokenizer.decode(masked_ids, skip_special_tokens=False)
    added = set(tokenizer.get_added_vocab().values())
    last = next((t for t in reversed(masked_ids) if tokenizer.decode([t]).strip()), None)
    return (THINK_PROBE in masked and _ANSWER_PROBE in masked
            and not any(p in masked for p in (_USER_PROBE, _SYSTEM_PROBE, _RESULT_PROBE))
            and last in added)


def _usable(tokenizer, template: str | None) -> bool:
    return bool(template) and template_keeps_think(tokenizer, template) and template_masks_assistant(tokenizer, template)


def _trl_training_template(tokenizer) -> tuple[str, str] | None:
    """TRL's training variant of the tokenizer's template, with its file name, when TRL knows the template."""
    try:
        from trl import chat_template_utils as ctu
    except ImportError:
        return None
    try:
        patched = ctu.get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL raises ValueError for templates it does not know
        return None
    if not patched:
        return None
    name = next((n[: -len("_chat_template")] for n, v in vars(ctu).items()
                 if n.endswith("_training_chat_template") and v == patched), "training")
    return patched, name


def _is_chatml(tokenizer, template: str | None) -> bool:
    vocab = tokenizer.get_vocab()
    return ((template is None or "<|im_start|>" in template)
            and "<|im_start|>" in vocab and "<|im_end|>" in vocab)


def ensure_think_preserving_template(tokenizer, template_file: "str | Path | None" = None) -> TemplateFix:
    """Install (when needed) a chat template that keeps earlier `<think>` text and marks assistant tokens.

    Sets `tokenizer.chat_template` and returns what was done. Raises TemplateError
    when no suitable template can be found or the named file does not qualify.
    """
    current = _template_text(tokenizer)
    if template_file is not None:
        path = Path(template_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise TemplateError(f"{path}: cannot read the chat template ({e.strerror})") from None
        if not template_keeps_think(tokenizer, text):
            raise TemplateError(f"{path}: this chat template drops the <think> text of earlier assistant turns")
        if not template_masks_assistant(tokenizer, text):
            raise TemplateError(f"{path}: this chat template does not mark assistant turns with "
                                "{% generation %}...{% endgeneration %} (needed for assistant-only loss)")
        tokenizer.chat_template = text
        return TemplateFix(text != current, f"file:{path}", f"chat template from {path}", text)

    keeps = template_keeps_think(tokenizer, current)
    if current and keeps and template_masks_assistant(tokenizer, current):
        return TemplateFix(False, "model", "the model's chat template keeps <think> and marks assistant turns",
                           current)
    problem = ("the model has no chat template" if not current else
               "the model's chat template drops the <think> text of earlier turns" if not keeps else
               "the model's chat template has no {% generation %} marks for assistant-only loss")
    if current:
        trl = _trl_training_template(tokenizer)
        if trl and _usable(tokenizer, trl[0]):
            tokenizer.chat_template = trl[0]
            return TemplateFix(True, f"trl:{trl[1]}", f"{problem}; using TRL's {trl[1]} template", trl[0])
    if _is_chatml(tokenizer, current) and _usable(tokenizer, LVR_CHATML_TEMPLATE):
        tokenizer.chat_template = LVR_CHATML_TEMPLATE
        return TemplateFix(True, "lvr-chatml", f"{problem}; using lvr's ChatML template", LVR_CHATML_TEMPLATE)
    raise TemplateError(f"{problem}, and lvr has no replacement for it: pass --chat-template FILE with a Jinja "
                        "template that keeps every turn's <think> text and wraps assistant output in "
                        "{% generation %}...{% endgeneration %}")
