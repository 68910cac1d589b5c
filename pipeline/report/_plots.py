"""Plot conventions shared by every section: Agg backend, colour-blind-safe colours, print sizes.

Categorical colours are Okabe & Ito's eight (distinguishable under the common colour-vision
deficiencies and in greyscale print when paired with markers); sequential heatmaps use cividis /
viridis; signed quantities (log lift, rank correlation) use the ColorBrewer PuOr diverging map,
which is colour-blind safe, centred on zero.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SEQUENTIAL = "cividis"
DIVERGING = "PuOr"  # orange = below zero, purple = above
NOISE_GREY = "#999999"

plt.rcParams.update({
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "figure.dpi": 100, "savefig.bbox": "tight",
})


def colour(i: int) -> str:
    """The i-th categorical colour; past eight, viridis samples (still colour-blind readable)."""
    if i < len(OKABE_ITO):
        return OKABE_ITO[i]
    return matplotlib.colormaps["viridis"]((i * 0.618) % 1.0)


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], cmap: str, vmin: float,
            vmax: float, cbar_label: str, annotate: bool | None = None, digits: int = 2,
            fig=None):
    """A labelled heatmap with a colour bar; cell values written in when the grid is small."""
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=90)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.spines[:].set_visible(False)
    if annotate is None:
        annotate = matrix.size <= 200
    if annotate:
        norm = im.norm
        for (r, c), v in np.ndenumerate(matrix):
            if np.isfinite(v):
                shade = norm(v)
                dark = shade < 0.5 if cmap in (SEQUENTIAL, "viridis") else abs(shade - 0.5) > 0.3
                ax.text(c, r, f"{v:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    cb = (fig or ax.figure).colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(cbar_label)
    return im


def wrap(label: str, width: int = 28) -> str:
    """Break a long label onto lines at spaces / middots."""
    import textwrap

    return "\n".join(textwrap.wrap(str(label), width)) or str(label)
