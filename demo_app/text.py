"""User-controlled text (class, file and folder names, paths, run names, and
messages quoting them) shown as itself: the one place the app escapes it.
A zip could otherwise plant a clickable link or a tag in the dataset summary
through a class folder named `[x](javascript:...)` or `<img ...>`."""
from __future__ import annotations

import html
import re
import string

# Every ASCII punctuation mark may be backslash-escaped in CommonMark (and in
# marked, Gradio's renderer): emphasis, links, tables, autolinks (www., http:,
# e-mail @), LaTeX $ all lose their meaning. & and ; stay: html.escape's
# entities use them.
_MD_PUNCT = re.compile("([" + re.escape("".join(c for c in string.punctuation if c not in "&;")) + "])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a newline in a folder name would end a table row


def html_text(text) -> str:
    """For HTML that is not Markdown: gr.Error's pop-up."""
    return html.escape(_CONTROL.sub("?", str(text)), quote=False)


def md_text(text) -> str:
    """For gr.Markdown (and its code-free parts of a line)."""
    return _MD_PUNCT.sub(r"\\\1", html_text(text))


def md_code(text) -> str:
    """`text` as a Markdown code span, whatever backticks it holds (inside one,
    HTML and Markdown are shown as they are; only backticks could end it)."""
    text = _CONTROL.sub("?", str(text))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


def md_block(lines: list[str]) -> str:
    """Lines as a fenced Markdown code block that no line can close early."""
    lines = [_CONTROL.sub("?", line) for line in lines]
    fence = "`" * max([3] + [len(m) + 1 for line in lines for m in re.findall("`+", line)])
    return "\n".join([fence, *lines, fence])
