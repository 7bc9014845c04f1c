"""A self-contained ``report.html`` from the Markdown that :mod:`harness.report.build` writes.

One file to mail or attach: styles inline, every chart inlined as SVG (its sibling PNG,
base64, when no SVG exists), no script, no external asset. Only the Markdown the reports
use is understood — headings, paragraphs, ``-`` lists, pipe tables, images on their own
line, ``**bold**``, ``*italic*`` and ```code``` — which keeps this a page, not a parser.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font: 16px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222;
       max-width: 760px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e5e5e5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 0.2em; border-radius: 3px; }
figure { margin: 1.5em 0; } figure svg, figure img { width: 100%; height: auto; }
em { color: #444; }
"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
_EMPHASIS = [
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"\*([^*]+)\*"), r"<em>\1</em>"),
]


def inline(text: str) -> str:
    """Escape, then mark up code, bold and italics (code first: its content stays as is)."""
    out, codes = html.escape(text, quote=False), []

    def keep(match: re.Match[str]) -> str:
        codes.append(match.group(1))
        return f"\x00{len(codes) - 1}\x00"

    out = re.sub(r"`([^`]+)`", keep, out)
    for pattern, replacement in _EMPHASIS:
        out = pattern.sub(replacement, out)
    return re.sub(r"\x00(\d+)\x00", lambda m: f"<code>{codes[int(m.group(1))]}</code>", out)


def figure(alt: str, src: str, base: Path) -> str:
    path = base / src
    svg = path.with_suffix(".svg")
    if svg.is_file():
        body = inline_svg(svg.read_text(), prefix=re.sub(r"\W", "-", path.stem))
    elif path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
    else:
        body = f"<p>(chart {html.escape(src)} is missing)</p>"
    return f'<figure aria-label="{html.escape(alt)}">\n{body}\n</figure>'


def inline_svg(svg: str, prefix: str) -> str:
    """An SVG file's root element, fit for a page holding several: no XML prolog, ids
    prefixed (matplotlib reuses clip-path ids across files), width set by the page."""
    svg = re.sub(r"^.*?(?=<svg\b)", "", svg, flags=re.DOTALL)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)
    return re.sub(r'<svg\b([^>]*?)\swidth="[^"]*"\s+height="[^"]*"', r"<svg\1", svg, count=1)


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, align, body = rows[0], rows[1], rows[2:]
    numeric = [a.endswith(":") for a in align]

    def cells(row: list[str], tag: str) -> str:
        return "".join(
            f"<{tag}{' class=num' if n else ''}>{inline(c)}</{tag}>"
            for c, n in zip(row, numeric, strict=False)
        )

    parts = [f"<tr>{cells(head, 'th')}</tr>", *(f"<tr>{cells(r, 'td')}</tr>" for r in body)]
    return "<table>\n" + "\n".join(parts) + "\n</table>"


def to_html(markdown: str, base: Path) -> str:
    """The body of the page for ``markdown`` whose images are relative to ``base``."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", markdown.strip()):
        lines = block.splitlines()
        first = lines[0]
        heading = re.match(r"^(#{1,4}) (.*)$", first)
        image = _IMAGE.match(first.strip())
        if heading and len(lines) == 1:
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif image and len(lines) == 1:
            out.append(figure(image.group(1), image.group(2), base))
        elif all(line.startswith("|") for line in lines) and len(lines) >= 2:
            out.append(_table(lines))
        elif all(line.startswith("- ") for line in lines):
            items = "\n".join(f"<li>{inline(line[2:])}</li>" for line in lines)
            out.append(f"<ul>\n{items}\n</ul>")
        else:
            out.append(f"<p>{inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(out)


def write_html(markdown: str, base: Path, path: Path) -> Path:
    title = next((line[2:] for line in markdown.splitlines() if line.startswith("# ")), "")
    page = (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name=viewport content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{to_html(markdown, base)}\n</body>\n</html>\n"
    )
    path.write_text(page)
    return path
