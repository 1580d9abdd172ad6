"""Token heatmaps as HTML: one span per token, diverging colours, the exact value on hover.

Pure functions (no Streamlit), so escaping and colours are tested directly. Every piece of
text that reaches the page goes through :func:`html.escape`; the only markup is ours.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

# Diverging palette: blue = raises the answer's log-likelihood, red = lowers it.
POSITIVE = (33, 102, 172)
NEGATIVE = (178, 24, 43)
MAX_ALPHA = 0.85

STYLE = """<style>
.msif-heat {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.86rem;
  line-height: 1.7; white-space: pre-wrap; word-break: break-word; color: #111;
  background: #fbfbfb; border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.5rem 0.7rem;}
.msif-tok {border-radius: 3px; padding: 1px 0;}
.msif-tok:hover {outline: 1px solid #555;}
.msif-legend {display: flex; align-items: center; gap: 0.5rem; font-size: 0.78rem; color: #555;}
.msif-legend .bar {width: 160px; height: 10px; border-radius: 3px;
  background: linear-gradient(to right, rgba(178,24,43,0.85), rgba(255,255,255,0), rgba(33,102,172,0.85));}
</style>"""


def colour(score: float, scale: float) -> str:
    """CSS background for a score: hue by sign, opacity by |score| / scale (clipped to 1)."""
    if scale <= 0 or not math.isfinite(score) or score == 0:
        return "transparent"
    strength = min(abs(score) / scale, 1.0)
    r, g, b = POSITIVE if score > 0 else NEGATIVE
    return f"rgba({r},{g},{b},{MAX_ALPHA * strength:.3f})"


def symmetric_scale(scores: Sequence[float]) -> float:
    """max |score|: zero stays white and both signs share one scale."""
    finite = [abs(s) for s in scores if math.isfinite(s)]
    return max(finite, default=0.0)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def format_score(score: float, digits: int = 3, signed: bool = True) -> str:
    """A number people read at a glance: ``digits`` significant digits, positional with thousands
    separators from 0.001 to a million (+3,926, +12.4, -0.0123), else times a power of ten (+3.93×10⁷)."""
    score = float(score)
    sign = ("+" if score > 0 else "-" if score < 0 else "") if signed else ("-" if score < 0 else "")
    size = abs(score)
    if size == 0 or not math.isfinite(size):
        return sign + ("0" if size == 0 else str(size))
    exponent = math.floor(math.log10(size))
    mantissa = round(size / 10 ** exponent, digits - 1)
    if mantissa >= 10:  # 9.996 rounds up to the next power
        exponent, mantissa = exponent + 1, mantissa / 10
    if -3 <= exponent < 6:
        return sign + f"{size:,.{max(0, digits - 1 - exponent)}f}"
    return sign + f"{mantissa:.{digits - 1}f}×10" + str(exponent).translate(_SUPERSCRIPT)


def token_spans(tokens: Sequence[str], scores: Sequence[float], scale: float | None = None,
                label: str = "influence") -> str:
    """Spans for ``tokens`` coloured by ``scores``; hovering shows the token and its value."""
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    scale = symmetric_scale(scores) if scale is None else scale
    spans = []
    for i, (token, score) in enumerate(zip(tokens, scores)):
        tip = html.escape(f"#{i} {token!r}: {label} {format_score(score)}", quote=True)
        spans.append(f'<span class="msif-tok" style="background:{colour(score, scale)}" '
                     f'title="{tip}">{html.escape(token)}</span>')
    return "".join(spans)


def heatmap_html(tokens: Sequence[str], scores: Sequence[float], scale: float | None = None,
                 label: str = "influence") -> str:
    """A self-contained block (style included) for ``st.html``."""
    return f'{STYLE}<div class="msif-heat">{token_spans(tokens, scores, scale, label)}</div>'


def legend_html(scale: float, negative: str = "lowers the answer's log-likelihood",
                positive: str = "raises it") -> str:
    return (f'{STYLE}<div class="msif-legend"><span>{html.escape(negative)} '
            f'({format_score(-scale)})</span><span class="bar"></span>'
            f'<span>{html.escape(positive)} ({format_score(scale)})</span></div>')


def text_html(text: str) -> str:
    """Plain text (a model's answer, a title) shown verbatim, never interpreted as markup."""
    return f'{STYLE}<div class="msif-heat">{html.escape(text)}</div>'


def peak_window(scores: Sequence[float], width: int = 40) -> tuple[int, int]:
    """[start, end) of the ``width`` tokens centred on the largest |score| (for snippets)."""
    if not scores:
        return 0, 0
    peak = max(range(len(scores)), key=lambda i: abs(scores[i]))
    start = max(0, min(peak - width // 2, len(scores) - width))
    return start, min(len(scores), start + width)


def snippet(text: str, tokens: Sequence[str], scores: Sequence[float], width: int = 40,
            chars: int = 220) -> str:
    """Plain-text snippet: the tokens around the peak of the heatmap, else the text's start."""
    if tokens and scores:
        start, end = peak_window(scores, width)
        piece = "".join(tokens[start:end]).strip()
        return ("… " if start > 0 else "") + piece + (" …" if end < len(tokens) else "")
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rstrip() + " …"
