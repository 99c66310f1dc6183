"""One self-contained HTML page: inline CSS, figures as base64 PNG, no script and no network access.

It opens from disk, survives being mailed or attached to an issue, and prints. Every figure is also
written as a PNG file beside the page, for papers and slides.
"""

from __future__ import annotations

import base64
import html
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from .. import rundir as rd
from .figures import png_bytes

DISPLAY_SCALE = 1.5  # PNG pixels per CSS pixel: 1200 px figures display 800 px wide

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fff; }
main { max-width: 1000px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 16px 0 6px; }
nav { font-size: 13px; color: #555; } nav a { margin-right: 12px; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f6f8; } .name { text-align: left; }
table.kv td { text-align: left; } table.kv td:first-child { color: #555; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12.5px; color: #555; margin-top: 4px; }
.note { color: #555; font-size: 13px; } .warn { background: #fff4d6; border: 1px solid #f0c36d; padding: 6px 10px; }
code { font-size: 12.5px; background: #f4f6f8; padding: 0 3px; }
details pre { font-size: 12px; background: #f7f7f7; padding: 8px; overflow-x: auto; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def num(value: float | None, digits: int = 3) -> str:
    """A number for a table cell: `digits` significant digits, an en dash for missing or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def pct(value: float | None, decimals: int = 2) -> str:
    """A fraction in [0, 1] as a percentage; accuracies read better as 64.86 than as 0.6486."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value:.{decimals}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", text_columns: int = 1) -> str:
    """A table from already formatted cells (escaped here); the first `text_columns` are names, set flush left."""

    def cells(row: Sequence[str], tag: str) -> str:
        return "".join(
            f'<{tag} class="name">{esc(c)}</{tag}>' if i < text_columns else f"<{tag}>{esc(c)}</{tag}>"
            for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def warning(text: str) -> str:
    return f'<p class="warn">{esc(text)}</p>'


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@dataclass
class Section:
    id: str
    title: str
    body: str


class Figures:
    """Writes each figure as `<folder>/<name>.png` and returns the <figure> element that embeds the same bytes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []

    def embed(self, name: str, fig: Figure, caption: str) -> str:
        data = png_bytes(fig)
        path = self.folder / f"{name}.png"
        rd.atomic_write(path, lambda p: p.write_bytes(data))
        self.written.append(path)
        width, height = png_size(data)
        w, h = round(width / DISPLAY_SCALE), round(height / DISPLAY_SCALE)
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (
            f'<figure id="fig-{esc(name)}"><img src="{src}" width="{w}" height="{h}" alt="{esc(caption)}" '
            f'data-file="{esc(path.name)}"><figcaption>{esc(caption)} '
            f"<code>{esc(self.folder.name)}/{esc(path.name)}</code></figcaption></figure>"
        )


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document: title, a table of contents and the sections in order."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><main><h1>{esc(title)}</h1><p class="note">{esc(subtitle)}</p><nav>{nav}</nav>{body}</main>'
        "</body></html>\n"
    )
