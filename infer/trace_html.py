"""A trace as one self-contained HTML page: header, the caption tree as a timeline, the turns.

The page needs nothing outside itself: CSS and a few lines of JS are inline,
thumbnails are embedded as ``data:`` URIs read from the frame store, and a
Content-Security-Policy forbids every fetch, so it opens the same from a mail
attachment, a CI artifact or a laptop with no network.

Everything that comes from the trace (model output, captions, questions, paths,
settings) is untrusted and goes through ``html.escape``; the CSP (only our own
script, by hash) is a second line of defence, not the first.

Stable hooks for tests and scripts:
  tree box   <div class="node level-{high|medium|low}[ visited][ qa]" data-id="1-2-3" data-order="3 5">
  turn       <section class="turn" data-round="N">
  answer     <div id="answer">
  spans      <div class="span predicted" id="span-predicted" data-start="4" data-end="7.5">: a grounding
             trace's answered interval (or a ground-then-answer trace's grounded span) on the timeline; <div class="span target" id="span-target-N">
             for each target interval the trace carries ("targets": [[start, end], ...])
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from typing import Any, Iterable

from lvr.prep.frames import FrameStore
from lvr.prep.lettering import split_label
from lvr.prep.jsonl import write_atomic

from .ground_then_answer import GROUND_THEN_ANSWER
from .protocol import GROUNDING, format_interval

LEVELS = ("high", "medium", "low")
_THINK_SUMMARY_CHARS = 120
_TITLE_CAPTION_CHARS = 400

_CSS = """
*{box-sizing:border-box}
body{margin:0;padding:16px 24px 48px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif;color:#1f2328;background:#fafbfc}
h1{font-size:19px;margin:0 0 8px}
h2{font-size:15px;margin:22px 0 8px;color:#444}
.pre{white-space:pre-wrap;word-break:break-word;font:12.5px/1.45 ui-monospace,"DejaVu Sans Mono",
Menlo,Consolas,monospace}
header{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:14px 18px}
.q{font-size:16px;font-weight:600;white-space:pre-wrap;margin-bottom:6px}
ul.options{margin:4px 0 10px;padding-left:20px}
ul.options li.chosen{font-weight:700}
ul.options li.right{color:#116329}
ul.options li .tag{font-size:11px;font-weight:600;border-radius:9px;padding:0 7px;margin-left:6px;
background:#eaeef2;color:#444}
#answer{font-size:15px;margin:6px 0;padding:8px 12px;border-radius:6px;background:#eef4ff;
border:1px solid #c8d8f5}
#answer.correct{background:#e6f6ea;border-color:#9fd8ad}
#answer.incorrect{background:#fdecec;border-color:#f2b3b3}
.verdict{font-weight:700;margin-left:8px}
.correct .verdict{color:#116329}.incorrect .verdict{color:#b42318}
.meta{display:flex;flex-wrap:wrap;gap:6px 22px;margin:8px 0;color:#444}
.meta b{color:#1f2328}
table.acct{border-collapse:collapse;margin-top:8px;font-size:13px}
table.acct th,table.acct td{border:1px solid #d8dee4;padding:3px 9px;text-align:right}
table.acct th:first-child,table.acct td:first-child,table.acct td.model{text-align:left}
table.acct th{background:#f3f5f7}
details.settings{margin-top:8px}
button{font:inherit;font-size:12px;padding:2px 10px;border:1px solid #c5ccd3;border-radius:5px;
background:#fff;cursor:pointer}
.timeline{position:relative;background:#fff;border:1px solid #d8dee4;border-radius:8px;
padding:10px 14px 6px 84px}
.row{position:relative;margin:0 0 6px}
.row-high{height:46px}.row-medium{height:38px}.row-low{height:32px}
.row-label{position:absolute;left:-74px;top:50%;transform:translateY(-50%);width:66px;
font-size:11px;color:#666;text-align:right;line-height:1.15}
.node{position:absolute;top:0;bottom:0;border:1px solid #fff;border-radius:3px;background:#e9ecef;
overflow:visible;font-size:11px}
.node.level-high{background:#d3e2f4}
.node:hover{outline:2px solid #1f6feb;z-index:5}
.node.visited{background:#ff8c00;min-width:16px;z-index:2}
.node.qa{box-shadow:inset 0 0 0 3px #7b2ff7}
.node.hl{outline:3px solid #1f6feb;z-index:6}
.node .ords{position:absolute;left:2px;top:1px;display:flex;gap:2px;white-space:nowrap}
.ord{display:inline-block;min-width:15px;height:15px;padding:0 3px;border-radius:8px;
background:#fff;color:#9a4a00;font:700 10px/15px system-ui,"DejaVu Sans",sans-serif;
text-align:center;text-decoration:none}
.ord.qa{background:#7b2ff7;color:#fff}
.axis{position:relative;height:18px;font-size:10.5px;color:#777}
.axis span{position:absolute;top:2px;transform:translateX(-50%);white-space:nowrap}
.axis span.first{transform:none}.axis span.last{transform:translateX(-100%)}
.row-span{height:22px;margin-top:4px}
.span{position:absolute;top:0;bottom:0;min-width:2px;border-radius:3px;font-size:11px;line-height:22px;
color:#1f2328;white-space:nowrap;overflow:visible}
.span.predicted{background:#8fd19e}
.span.target{background:#f4a3b5}
.span .span-label{position:absolute;left:4px;top:0}
.legend{display:flex;gap:16px;font-size:12px;color:#555;margin:6px 0 0}
.sw{display:inline-block;width:14px;height:11px;border-radius:2px;vertical-align:-1px;margin-right:4px}
.turn{display:flex;gap:14px;background:#fff;border:1px solid #d8dee4;border-radius:8px;
padding:10px 14px;margin:0 0 10px}
.turn .body{flex:1;min-width:0}
.turn.kind-invalid{border-color:#f2b3b3;background:#fffafa}
.turn.kind-answer{border-color:#9fc2f5}
.turn h3{font-size:13.5px;margin:0 0 6px;font-weight:600}
.rnd{display:inline-block;background:#1f2328;color:#fff;border-radius:4px;padding:0 7px;margin-right:6px}
.badge{display:inline-block;font-size:11px;border-radius:9px;padding:0 8px;margin-left:6px;
background:#eaeef2;color:#444;font-weight:600}
.badge.get_caption{background:#ffe3c2;color:#8a4200}
.badge.video_qa{background:#e9dcff;color:#5a1bbf}
.badge.invalid{background:#fdd;color:#b42318}
.badge.answer{background:#dbe9ff;color:#0b4bb3}
.turn details{margin:4px 0}
.turn summary{cursor:pointer;color:#555;font-size:12.5px}
.turn summary .gist{color:#888;font-style:italic}
.action{margin:6px 0;padding:5px 9px;background:#f6f8fa;border-left:3px solid #8c959f;border-radius:3px}
.kind-tool .action{border-left-color:#ff8c00}
.kind-tool.tool-video_qa .action{border-left-color:#7b2ff7}
.kind-invalid .action{border-left-color:#d1242f}
.kind-answer .action{border-left-color:#1f6feb}
.result{margin:6px 0 0;padding:6px 9px;background:#fbfbf8;border:1px dashed #d0d7de;border-radius:4px;
max-height:340px;overflow:auto}
.lbl{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#888;margin-right:6px}
.thumb{width:176px;flex:none;align-self:flex-start}
.thumb img{display:block;width:176px;height:auto;border-radius:4px;border:1px solid #d0d7de}
.thumb .missing{width:176px;height:99px;border-radius:4px;background:#c8cbd0;color:#5b6068;
display:flex;align-items:center;justify-content:center;font-size:11px}
.thumb .cap{font-size:11px;color:#666;margin-top:3px;text-align:center}
.empty{color:#888;font-style:italic}
"""

# Kept free of anything from the trace: its hash goes into the CSP.
_JS = """
(function(){
  var boxes = {};
  document.querySelectorAll('.node[data-id]').forEach(function(n){ boxes[n.dataset.id] = n; });
  document.querySelectorAll('section.turn[data-node]').forEach(function(t){
    var n = boxes[t.dataset.node];
    if (!n) return;
    t.addEventListener('mouseenter', function(){ n.classList.add('hl'); });
    t.addEventListener('mouseleave', function(){ n.classList.remove('hl'); });
  });
  var b = document.getElementById('toggle-think');
  if (b) b.addEventListener('click', function(){
    var ds = document.querySelectorAll('details.think');
    var open = !Array.prototype.every.call(ds, function(d){ return d.open; });
    ds.forEach(function(d){ d.open = open; });
    b.textContent = open ? 'Collapse all thinking' : 'Expand all thinking';
  });
  document.body.dataset.ready = '1';
})();
"""


def _e(value: Any) -> str:
    """Escape anything for text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, default: float = 0.0) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return x if x == x and x not in (float("inf"), float("-inf")) else default


def _node_id(value: Any) -> tuple[int, ...] | None:
    """A node id as a tuple of ints, from a list/tuple (or None when unusable)."""
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 3:
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            return None
    return None


def _id_str(nid: tuple[int, ...]) -> str:
    return "-".join(str(i) for i in nid)


def _id_tuple_str(nid: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in nid) + ("," if len(nid) == 1 else "") + ")"


def _fmt_time(t: float) -> str:
    t = max(0.0, t)
    h, rem = divmod(t, 3600)
    m, s = divmod(rem, 60)
    if h >= 1:
        return f"{int(h)}:{int(m):02d}:{int(s):02d}"
    return f"{int(m)}:{s:04.1f}"


def _fmt_span(start: float, end: float) -> str:
    return f"{_fmt_time(start)}–{_fmt_time(end)}"


class _Thumbs:
    """Reads thumbnails once each and turns them into data: URIs (None when unavailable)."""

    def __init__(self, frames: FrameStore | None):
        self.frames = frames
        self._cache: dict[str, str | None] = {}

    def uri(self, key: Any) -> str | None:
        if not key or not isinstance(key, str) or self.frames is None:
            return None
        if key not in self._cache:
            try:
                data = self.frames.get(key)
            except Exception:  # bad key, missing file, unreadable store: placeholder
                data = None
            if not data:
                self._cache[key] = None
            else:
                mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
                self._cache[key] = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
        return self._cache[key]

    def html(self, key: Any, alt: str, caption: str = "") -> str:
        uri = self.uri(key)
        img = (f'<img src="{uri}" alt="{_e(alt)}" loading="lazy">' if uri
               else f'<div class="missing" title="{_e(alt)}">no frame</div>')
        cap = f'<div class="cap">{_e(caption)}</div>' if caption else ""
        return f'<div class="thumb">{img}{cap}</div>'


def _tree_nodes(trace: dict) -> list[dict]:
    """Tree nodes normalised to {id, level, start, end, thumb_key, caption}; falls back to visits."""
    out: dict[tuple[int, ...], dict] = {}
    tree = trace.get("tree")
    sources: Iterable = tree if isinstance(tree, list) else []
    visits = trace.get("visits") if isinstance(trace.get("visits"), list) else []
    for item in list(sources) + list(visits):
        if not isinstance(item, dict):
            continue
        nid = _node_id(item.get("id", item.get("node")))
        if nid is None or nid in out:
            continue
        level = item.get("level")
        if level not in LEVELS:
            level = LEVELS[len(nid) - 1]
        start = _num(item.get("start"))
        end = max(start, _num(item.get("end"), start))
        out[nid] = {"id": nid, "level": level, "start": start, "end": end,
                    "thumb_key": item.get("thumb_key"), "caption": item.get("caption")}
    return sorted(out.values(), key=lambda n: n["id"])


def _match_visits(turns: list[dict], visits: list[dict]) -> tuple[dict[int, dict], dict[int, int]]:
    """Pair tool turns with visits, in order: ({turn index: visit}, {visit order: round})."""
    by_turn: dict[int, dict] = {}
    order_round: dict[int, int] = {}
    p = 0
    for i, turn in enumerate(turns):
        action = turn.get("action") if isinstance(turn.get("action"), dict) else {}
        if action.get("kind") != "tool":
            continue
        nid = _node_id(action.get("node"))
        for j in range(p, len(visits)):
            v = visits[j]
            if _node_id(v.get("node")) == nid and v.get("tool") == action.get("tool"):
                by_turn[i] = v
                if isinstance(v.get("order"), int) and isinstance(turn.get("round"), int):
                    order_round.setdefault(v["order"], turn["round"])
                p = j + 1
                break
    return by_turn, order_round


def _header(trace: dict) -> str:
    video = trace.get("video") if isinstance(trace.get("video"), dict) else {}
    answer = trace.get("answer") if isinstance(trace.get("answer"), dict) else {}
    options = [o for o in (trace.get("options") or []) if o is not None] \
        if isinstance(trace.get("options"), list) else []
    choice = answer.get("choice")
    correct_answer = trace.get("correct_answer")
    correct = trace.get("correct")

    parts = ['<header>', '<h1>LongVideo-R1 trace</h1>',
             f'<div class="q">{_e(trace.get("question") or "(no question)")}</div>']
    if options:
        parts.append('<ul class="options">')
        for opt in options:
            text = str(opt)
            label = split_label(text)
            letter = label[0] if label else None
            chosen = choice is not None and (str(choice).strip().upper() == letter or str(choice) == text)
            right = correct_answer is not None and (
                str(correct_answer).strip().upper() == letter or str(correct_answer).strip() == text.strip())
            cls = " ".join(c for c, on in (("chosen", chosen), ("right", right)) if on)
            tags = ('<span class="tag">model</span>' if chosen else "") + \
                   ('<span class="tag">correct</span>' if right else "")
            parts.append(f'<li class="{cls}">{_e(text)}{tags}</li>' if cls else f"<li>{_e(text)}</li>")
        parts.append("</ul>")

    verdict_cls = {True: " correct", False: " incorrect"}.get(correct if isinstance(correct, bool) else None, "")
    shown = answer.get("text")
    if choice and shown and str(choice) not in str(shown):
        shown = f"{choice} ({shown})"
    shown = shown if shown not in (None, "") else choice
    ans = [f'<div id="answer" class="answer{verdict_cls}"><span class="lbl">answer</span>',
           f'<b>{_e(shown)}</b>' if shown not in (None, "") else '<span class="empty">no answer</span>']
    if correct_answer is not None:
        ans.append(f' <span class="lbl" style="margin-left:14px">correct answer</span>{_e(correct_answer)}')
    if isinstance(correct, bool):
        ans.append(f'<span class="verdict">{"✓ correct" if correct else "✗ incorrect"}</span>')
    ans.append("</div>")
    parts.append("".join(ans))

    duration = _num(video.get("duration"))
    meta = [("stopped", trace.get("stopped")), ("video", video.get("path")),
            ("video id", video.get("video_id")),
            ("duration", f"{_fmt_time(duration)} ({duration:.1f} s)" if video.get("duration") is not None else None),
            ("K", video.get("K"))]
    parts.append('<div class="meta">' + "".join(
        f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in meta if v not in (None, "")) + "</div>")

    acct = trace.get("accounting") if isinstance(trace.get("accounting"), dict) else {}
    calls = acct.get("caption_calls") if isinstance(acct.get("caption_calls"), dict) else {}
    nums = [("rounds", acct.get("rounds")), ("invalid turns", acct.get("invalid_turns")),
            ("caption calls made", calls.get("made")), ("caption calls cached", calls.get("cached")),
            ("video_qa calls", acct.get("video_qa_calls"))]
    if any(v is not None for _, v in nums):
        parts.append('<div class="meta acct-nums">' + "".join(
            f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in nums if v is not None) + "</div>")
    models = acct.get("models") if isinstance(acct.get("models"), dict) else {}
    if models:
        parts.append('<table class="acct"><tr><th>role</th><th>model</th><th>requests</th>'
                     '<th>prompt tokens</th><th>completion tokens</th><th>seconds</th></tr>')
        for role, m in models.items():
            m = m if isinstance(m, dict) else {}
            secs = m.get("seconds")
            secs = f"{_num(secs):.1f}" if secs is not None else ""
            parts.append(
                f'<tr><td>{_e(role)}</td><td class="model">{_e(m.get("model"))}</td>'
                f'<td>{_e(m.get("requests"))}</td><td>{_e(m.get("prompt_tokens"))}</td>'
                f'<td>{_e(m.get("completion_tokens"))}</td><td>{_e(secs)}</td></tr>')
        parts.append("</table>")
    settings = trace.get("settings")
    if settings:
        try:
            dumped = json.dumps(settings, indent=2, ensure_ascii=False, sort_keys=True, default=str)
        except Exception:
            dumped = repr(settings)
        parts.append(f'<details class="settings"><summary>settings</summary>'
                     f'<div class="pre">{_e(dumped)}</div></details>')
    parts.append("</header>")
    return "\n".join(parts)


def _interval(value: Any) -> tuple[float, float] | None:
    """[start, end] as two finite seconds with start <= end (None when unusable)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    start, end = _num(value[0], float("nan")), _num(value[1], float("nan"))
    return (start, end) if start == start and end == end and 0 <= start <= end else None


def _spans(trace: dict) -> list[tuple[str, str, float, float]]:
    """The intervals a grounding trace draws on the timeline: (kind, element id, start, end), the
    answered one ("predicted") first, then each target the trace carries. A question answered by
    ground-then-answer draws the span its grounding stage found."""
    if trace.get("task") != GROUNDING and trace.get("strategy") != GROUND_THEN_ANSWER:
        return []
    answer = trace.get("answer") if isinstance(trace.get("answer"), dict) else {}
    out = []
    predicted = _interval(answer.get("interval"))
    if predicted is not None:
        out.append(("predicted", "span-predicted", *predicted))
    targets = trace.get("targets") if isinstance(trace.get("targets"), list) else []
    for i, target in enumerate(filter(None, map(_interval, targets)), 1):
        out.append(("target", f"span-target-{i}", *target))
    return out


# The kinds of interval a grounding trace draws: (row label, legend text, colour as in _CSS).
_SPAN_KINDS = {"predicted": ("answer", "answered span", "#8fd19e"), "target": ("target", "target span", "#f4a3b5")}


def _span_rows(spans: list[tuple[str, str, float, float]], span: float) -> list[str]:
    """One timeline row per kind of interval, each band at its place and labelled with its times."""
    rows = []
    for kind, (name, _, _) in _SPAN_KINDS.items():
        bands = []
        for element_id, start, end in (s[1:] for s in spans if s[0] == kind):
            left = min(100.0, 100.0 * start / span)
            width = min(100.0 - left, 100.0 * (end - start) / span)
            times = _fmt_span(start, end)
            bands.append(f'<div class="span {kind}" id="{element_id}" data-start="{round(start, 6)}" '
                         f'data-end="{round(end, 6)}" style="left:{left:.4f}%;width:{width:.4f}%" '
                         f'title="{_e(f"{name} {format_interval(start, end)}: {times}")}">'
                         f'<span class="span-label">{_e(times)}</span></div>')
        if bands:
            rows.append(f'<div class="row row-span row-{kind}"><div class="row-label">{name}<br>span</div>'
                        f'{"".join(bands)}</div>')
    return rows


def _timeline(nodes: list[dict], visits: list[dict], order_round: dict[int, int], duration: float,
              spans: list[tuple[str, str, float, float]] = ()) -> str:
    orders: dict[tuple[int, ...], list[tuple[int, bool]]] = {}
    for v in visits:
        nid = _node_id(v.get("node"))
        order = v.get("order")
        if nid is None or not isinstance(order, int):
            continue
        orders.setdefault(nid, []).append((order, v.get("tool") == "video_qa"))

    span = duration if duration > 0 else max([n["end"] for n in nodes] + [1.0])
    rows = {level: [] for level in LEVELS}
    for n in nodes:
        nid = n["id"]
        left = min(100.0, max(0.0, 100.0 * n["start"] / span))
        width = min(100.0 - left, max(0.0, 100.0 * (n["end"] - n["start"]) / span))
        seen = sorted(orders.get(nid, []))
        cls = f"node level-{n['level']}"
        if seen:
            cls += " visited"
        if any(qa for _, qa in seen):
            cls += " qa"
        title = f"{_id_tuple_str(nid)}  {_fmt_span(n['start'], n['end'])}  ({n['start']:.1f}–{n['end']:.1f} s)"
        if seen:
            title += "\nvisits: " + ", ".join(f"#{o} {'video_qa' if qa else 'get_caption'}" for o, qa in seen)
        cap = n.get("caption")
        if isinstance(cap, str) and cap.strip():
            cap = cap.strip()
            title += "\n\n" + (cap[:_TITLE_CAPTION_CHARS] + "…" if len(cap) > _TITLE_CAPTION_CHARS else cap)
        badges = ""
        if seen:
            badges = '<span class="ords">' + "".join(
                (f'<a class="ord{" qa" if qa else ""}" href="#turn-{order_round[o]}">{o}</a>'
                 if o in order_round else f'<span class="ord{" qa" if qa else ""}">{o}</span>')
                for o, qa in seen) + "</span>"
        rows[n["level"]].append(
            f'<div class="{cls}" id="node-{_id_str(nid)}" data-id="{_id_str(nid)}" '
            f'data-order="{" ".join(str(o) for o, _ in seen)}" '
            f'style="left:{left:.4f}%;width:{width:.4f}%" title="{_e(title)}">{badges}</div>')

    labels = {"high": "high", "medium": "medium", "low": "low"}
    counts = {level: len(rows[level]) for level in LEVELS}
    out = ['<h2>Caption tree</h2>', '<div class="timeline">']
    for level in LEVELS:
        out.append(f'<div class="row row-{level}"><div class="row-label">{labels[level]}<br>'
                   f'{counts[level]} nodes</div>{"".join(rows[level])}</div>')
    out += _span_rows(spans, span)
    # Axis: ticks at the high-level boundaries (or quarters without a tree).
    highs = {n["start"] for n in nodes if n["level"] == "high"}
    ticks = sorted(highs | {span}) if len(highs) >= 2 else [span * i / 4 for i in range(5)]
    if len(ticks) > 13:
        step = -(-len(ticks) // 12)
        ticks = ticks[::step] + ([span] if ticks[::step][-1] != span else [])
    axis = []
    for i, t in enumerate(ticks):
        cls = "first" if i == 0 else ("last" if i == len(ticks) - 1 else "")
        axis.append(f'<span class="{cls}" style="left:{min(100.0, 100.0 * t / span):.4f}%">{_fmt_time(t)}</span>')
    out.append(f'<div class="axis">{"".join(axis)}</div>')
    out.append('<div class="legend">'
               '<span><i class="sw" style="background:#d3e2f4"></i>high: seen in the first prompt</span>'
               '<span><i class="sw" style="background:#ff8c00"></i>visited with get_caption (visit order)</span>'
               '<span><i class="sw" style="background:#ff8c00;box-shadow:inset 0 0 0 3px #7b2ff7"></i>'
               'video_qa</span><span><i class="sw" style="background:#e9ecef"></i>not visited</span>'
               + "".join(f'<span><i class="sw" style="background:{colour}"></i>{text}</span>'
                         for kind, (_, text, colour) in _SPAN_KINDS.items() if any(s[0] == kind for s in spans))
               + '</div>')
    out.append("</div>")
    return "\n".join(out)


def _turns(turns: list[dict], by_turn: dict[int, dict], nodes: dict[tuple[int, ...], dict],
           thumbs: _Thumbs) -> str:
    out = ['<h2>Turns <button id="toggle-think" type="button">Expand all thinking</button></h2>']
    if not turns:
        out.append('<p class="empty">no turns</p>')
    for i, turn in enumerate(turns):
        action = turn.get("action") if isinstance(turn.get("action"), dict) else {}
        kind = action.get("kind") if action.get("kind") in ("tool", "answer", "invalid") else "invalid"
        tool = action.get("tool") if action.get("tool") in ("get_caption", "video_qa") else None
        rnd = turn.get("round", i + 1)
        nid = _node_id(action.get("node"))
        node = nodes.get(nid) if nid else None
        visit = by_turn.get(i)

        cls = f"turn kind-{kind}" + (f" tool-{tool}" if kind == "tool" and tool else "")
        node_attr = f' data-node="{_id_str(nid)}"' if nid else ""
        head = [f'<span class="rnd">round {_e(rnd)}</span>']
        if kind == "tool":
            head.append(_e(tool or "tool"))
            if nid:
                head.append(f' <a href="#node-{_id_str(nid)}">{_id_tuple_str(nid)}</a>')
            if node:
                head.append(f' <span class="lbl">{_fmt_span(node["start"], node["end"])}</span>')
            head.append(f'<span class="badge {tool or ""}">{_e(tool or "tool")}</span>')
            if visit is not None:
                head.append(f'<span class="badge">visit #{_e(visit.get("order"))}</span>')
                if visit.get("cached"):
                    head.append('<span class="badge">cached</span>')
        elif kind == "answer":
            head.append('<span class="badge answer">answer</span>')
        else:
            head.append(f'<span class="badge invalid">invalid: {_e(action.get("error") or "unknown")}</span>')

        body = [f'<h3>{"".join(head)}</h3>']
        think = turn.get("think")
        if isinstance(think, str) and think.strip():
            gist = " ".join(think.split())
            gist = gist[:_THINK_SUMMARY_CHARS] + ("…" if len(gist) > _THINK_SUMMARY_CHARS else "")
            body.append(f'<details class="think"><summary>think <span class="gist">{_e(gist)}</span></summary>'
                        f'<div class="pre">{_e(think.strip())}</div></details>')
        if kind == "tool":
            call = action.get("call")
            if not call and tool and nid:
                q = action.get("query")
                call = f"{tool}({_id_tuple_str(nid)}" + (f", {json.dumps(q, ensure_ascii=False)})" if q else ")")
            body.append(f'<div class="action"><span class="lbl">tool</span><code class="pre">{_e(call)}</code></div>')
        elif kind == "answer":
            body.append(f'<div class="action"><span class="lbl">answer</span><b class="pre">'
                        f'{_e(action.get("answer"))}</b></div>')
        else:
            body.append(f'<div class="action"><span class="lbl">invalid</span>'
                        f'<b>{_e(action.get("error") or "unknown")}</b></div>')
        text = turn.get("text")
        if kind == "invalid" or not (isinstance(think, str) and think.strip()):
            if isinstance(text, str) and text.strip():
                body.append(f'<details class="raw"{" open" if kind == "invalid" else ""}><summary>raw model output'
                            f'</summary><div class="pre">{_e(text)}</div></details>')
        result = turn.get("result")
        if result not in (None, ""):
            label = "tool result" if kind == "tool" else "message to the model"
            body.append(f'<div class="result"><span class="lbl">{label}</span><div class="pre">{_e(result)}</div></div>')

        thumb = ""
        if kind == "tool" and nid:
            thumb = thumbs.html(node.get("thumb_key") if node else None, f"node {_id_tuple_str(nid)}",
                                _id_tuple_str(nid))
        out.append(f'<section class="{cls}" id="turn-{_e(rnd)}" data-round="{_e(rnd)}"{node_attr}>'
                   f'{thumb}<div class="body">{"".join(body)}</div></section>')
    return "\n".join(out)


def render_trace_html(trace: dict, frames: FrameStore | None) -> str:
    """The whole trace as one self-contained HTML page (no external URLs, thumbnails inline)."""
    trace = trace if isinstance(trace, dict) else {}
    video = trace.get("video") if isinstance(trace.get("video"), dict) else {}
    turns = [t for t in trace.get("turns") or [] if isinstance(t, dict)] \
        if isinstance(trace.get("turns"), list) else []
    visits = [v for v in trace.get("visits") or [] if isinstance(v, dict)] \
        if isinstance(trace.get("visits"), list) else []
    nodes = _tree_nodes(trace)
    by_turn, order_round = _match_visits(turns, visits)
    thumbs = _Thumbs(frames)

    js_hash = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{js_hash}'; base-uri 'none'; form-action 'none'")
    title = str(trace.get("question") or "trace")
    title = title if len(title) <= 80 else title[:80] + "…"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>lvr trace: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(trace),
        _timeline(nodes, visits, order_round, _num(video.get("duration")), _spans(trace)),
        _turns(turns, by_turn, {n["id"]: n for n in nodes}, thumbs),
        f"<script>{_JS}</script>",
        "</body></html>",
        "",
    ])


def write_trace_html(path: "str | os.PathLike", trace: dict, frames: FrameStore | None) -> None:
    """Render a trace and write the page atomically (temporary name, then rename)."""
    write_atomic(path, render_trace_html(trace, frames))
