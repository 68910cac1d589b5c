"""The HTML page: one file, inline CSS, figures as PNG files beside it (report/figures/).

No scripts and no external resources, so it opens offline from a laptop disk, a downloaded
S3 folder, or a static file server, and prints cleanly (figures never split across pages).
"""

from __future__ import annotations

from datetime import datetime, timezone
from string import Template

from pipeline.report._context import h

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1a1a1a; background: #fff; line-height: 1.45; }
header { background: #0b3d5c; color: #fff; padding: 1.2em 2em; }
header h1 { margin: 0 0 .2em 0; font-size: 1.6em; }
header p { margin: 0; opacity: .9; }
nav { background: #eef3f7; padding: .6em 2em; position: sticky; top: 0; z-index: 2;
      border-bottom: 1px solid #cfd9e1; }
nav a { margin-right: 1.2em; color: #0b3d5c; text-decoration: none; font-weight: 600; }
main { padding: 0 2em 3em 2em; max-width: 1200px; }
section { border-bottom: 1px solid #ddd; padding-bottom: 1em; }
h2 { margin-top: 1.6em; color: #0b3d5c; }
h3 { margin-top: 1.3em; } h4 { margin: 1em 0 .4em 0; color: #333; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #444; margin-top: .3em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
           gap: 1em; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .82em; margin: .6em 0; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: .8em; }
.note { padding: .5em .8em; border-left: 4px solid #0072B2; background: #f2f7fb; }
.note.notrun { border-left-color: #999; background: #f4f4f4; color: #333; }
.note.warn { border-left-color: #D55E00; background: #fdf1ea; }
.small { font-size: .8em; color: #555; }
@media print {
  nav { display: none; } header { background: none; color: #000; padding: 0; }
  figure, table { break-inside: avoid; } section { break-before: page; }
  a { color: #000; text-decoration: none; }
}
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
<header><h1>$title</h1><p>$subtitle</p></header>
<nav>$nav</nav>
<main>
$sections
</main>
</body>
</html>
""")


def render(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """``sections``: (id, title, body HTML)."""
    nav = "".join(f'<a href="#{sid}">{h(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{h(t)}</h2>\n{b}\n</section>'
                     for sid, t, b in sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.substitute(title=h(title), subtitle=h(subtitle) + f" · built {stamp}",
                           nav=nav, sections=body, css=CSS)
