"""Reasoning is stripped by one function, `lvr.prep.tags.strip_think`, wherever a reply is read.

Four readers take model replies apart: the navigator's protocol (`parse_turn`),
the captioner (`parse_caption`), the video_qa tool (`VideoQA.ask`) and the
question writer (`parse_json_reply`). Each is fed the same reasoning around its
own payload; an unclosed <think> must hide everything after it for all four.
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from lvr.infer import protocol, video_qa
from lvr.infer.protocol import Breach, parse_turn
from lvr.infer.video_qa import VideoQA
from lvr.prep import captioning, lettering, tags
from lvr.prep.captioning import parse_caption
from lvr.prep.frames import FrameStore, frame_key
from lvr.prep.models.base import probe_images
from lvr.prep.models.openai_backend import OpenAIChat
from lvr.train import questions
from lvr.train.questions import ReplyError, parse_json_reply

ROOT = Path(__file__).resolve().parent.parent
NO_QA_ANSWER = "(the vision model gave no answer)"


# Each reader: (its payload as a model writes it, the decoy a model might write while thinking,
# a function from reply text to what the reader takes out of it, None when it takes nothing).

def read_turn(reply: str) -> str | None:
    turn = parse_turn(reply, 4)
    assert turn.call is None
    return turn.answer


def read_caption(reply: str) -> str | None:
    return parse_caption(reply) or None


def read_json(reply: str) -> str | None:
    try:
        return parse_json_reply(reply)["answer"]
    except ReplyError as e:
        assert str(e) == "the reply is empty"
        return None


@pytest.fixture(scope="module")
def read_qa(tmp_path_factory):
    """The video_qa tool over a real HTTP client, a scripted server and a stored JPEG."""
    store = FrameStore(tmp_path_factory.mktemp("frames"))
    key = frame_key("0123abcd", 0, 32)
    store.put(key, probe_images(1)[0])
    node = {"video_id": "0123abcd", "id": [1, 1, 1], "start": 0.0, "end": 2.0,
            "qa_frame_keys": [key], "qa_frame_times": [0.0]}
    replies: list[str] = []
    with FakeOpenAI(reply=lambda body: replies[-1]) as server:
        def read(reply: str) -> str | None:
            replies.append(reply)

            async def ask() -> str:
                model = OpenAIChat("vlm", server.url, max_retries=0)
                try:
                    answer, _ = await VideoQA(model, store).ask(node, "What is shown?")
                finally:
                    await model.aclose()
                return answer

            answer = asyncio.run(ask())
            return None if answer == NO_QA_ANSWER else answer

        yield read


READERS = {
    "protocol": ("<answer>B</answer>", "<answer>D</answer>", "B"),
    "captioning": ("<caption>A red car.</caption>", "<caption>A blue car.</caption>", "A red car."),
    "video_qa": ("A red car.", "maybe a blue car", "A red car."),
    "questions": ('{"answer": "B"}', '{"answer": "D"}', "B"),
}


@pytest.fixture
def readers(read_qa):
    return {"protocol": read_turn, "captioning": read_caption, "video_qa": read_qa, "questions": read_json}


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_reader_strips_reasoning_the_same_way(readers, name):
    payload, decoy, value = READERS[name]
    read = readers[name]
    think = "<think>checking</think>\n"   # the protocol needs a reasoning block before its action
    # A closed block, in any case, is dropped; the payload after it is read.
    assert read(f"<think>I could say {decoy}</think>\n{payload}") == value
    assert read(f"<THINK>I could say {decoy}</Think>{payload}") == value
    # An unclosed <think> is reasoning to the end: nothing after it is read, decoy nor payload.
    assert read(f"<think>I could say {decoy} or {payload}") is None
    assert read(f"{think}{payload}\n<think>on second thought, {decoy}") == value
    # And every reader reads exactly what strip_think keeps (behind a plain reasoning block).
    for reply in (f"<think>{decoy}</think>{payload}", f"<think>{decoy} {payload}", f"{think}{payload}<think>{decoy}"):
        assert read(reply) == read(think + tags.strip_think(reply))


def test_the_unclosed_tag_is_decided_once():
    assert tags.strip_think("a <think>b") == "a "
    assert tags.strip_think("<think>b</think> c <think>d") == " c "
    assert tags.blank_think("x<think>y") == "x        "
    assert tags.blank_think("x<think>y</think>z") == "x" + " " * 16 + "z"
    # The protocol: an action inside an unclosed think is no action, whatever the tags around it say.
    turn = parse_turn("<think>I will call <tool>get_caption((1, 2))</tool>", 4)
    assert turn.breach == Breach.NO_ACTION and turn.call is None
    assert protocol.call_node_span("<think>x <tool>get_caption((1, 2))</tool>") is None
    # A truncated captioner reply gives no caption (the captioner then names the node as failed).
    assert parse_caption("<think>the frames show <caption>a car") == ""


def test_callers_use_the_tags_module():
    """The four readers hold no think pattern of their own: they call the one function."""
    assert questions.strip_think is tags.strip_think
    assert video_qa.strip_think is tags.strip_think
    assert captioning.caption_text is tags.caption_text
    assert protocol.tags is tags
    offenders = []
    for path in sorted(p for layer in ("cli", "prep", "infer", "train") for p in (ROOT / layer).rglob("*.py")):
        if path == ROOT / "prep" / "tags.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _think_pattern(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "think tags parsed outside lvr.prep.tags: " + ", ".join(offenders)


_STRING_OPS = {"find", "rfind", "index", "rindex", "split", "rsplit", "partition", "rpartition", "startswith",
               "endswith", "replace", "count", "removeprefix", "removesuffix"}


def _think_pattern(node: ast.AST) -> bool:
    """A regex over, a string search for, or an `in` test of a think tag."""
    def tagged(arg: ast.AST) -> bool:
        return isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.search(r"</?think", arg.value, re.I)

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        is_re = isinstance(node.func.value, ast.Name) and node.func.value.id == "re"
        return (is_re or node.func.attr in _STRING_OPS) and bool(tagged(node.args[0]))
    if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
        return bool(tagged(node.left))
    return False


def test_caption_reading_rules():
    assert tags.caption_text("x <caption> A cat. </caption> y") == "A cat."
    assert tags.caption_text("<caption>keeps </caption> inside</caption>") == "keeps </caption> inside"
    assert tags.caption_text("pre <caption>x</caption> post <caption>y</caption>") == "x"
    assert tags.caption_text("<CAPTION>cut off mid") == "cut off mid"
    assert tags.caption_text("  plain reply ") == "plain reply"
    assert tags.extract(tags.ANSWER, "<answer> B </answer><answer>C</answer>") == "B"
    assert tags.extract(tags.ANSWER, "<answer>B") is None


def test_option_letters_have_one_rule():
    assert lettering.split_label("(b) a dog") == ("B", "a dog")
    assert lettering.split_label("[C] x") == ("C", "x") and lettering.split_label("D： x") == ("D", "x")
    # Without a position, a label needs a space after it; at its own position it does not.
    assert lettering.split_label("U.S. troops") is None and lettering.split_label("e.g. a dog") is None
    assert lettering.split_label("A.x", "A") == ("A", "x") and lettering.split_label("A.x", "B") is None
    assert lettering.normalize_options(["(A) x", "(B) y"]) == ("A. x", "B. y")
    assert lettering.normalize_options(["x", "U.S. troops"]) == ("A. x", "B. U.S. troops")
    with pytest.raises(ValueError, match="only in part"):
        lettering.normalize_options(["x", "B. y"])
    assert lettering.normalize_options(["x", "(B) y"], fill=True) == ("A. x", "(B) y")
    with pytest.raises(ValueError, match="option B is empty"):
        lettering.normalize_options(["x", " "], fill=True)
    options = ("A. a phone", "B. a cup", "C. A cup holder")
    assert lettering.answer_key("(b)", options) == "B" and lettering.answer_key("B. a cup", options) == "B"
    assert lettering.answer_key("A CUP", options) == "B"
    with pytest.raises(ValueError, match="not one of the options A-C"):
        lettering.answer_key("B. a mug", options)
    assert [lettering.chosen_letter(a, options) for a in ("b", "c)", "A cup.", "The answer is C", "A or B")] == \
        ["B", "C", "B", "C", None]
