"""Shared look of every report figure: a colour-blind-safe palette, column-width sizes, saving.

matplotlib is imported inside functions only (with the Agg backend), so importing the reporting
package costs nothing until a figure is drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision
# deficiencies. Black is kept last, for reference lines.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
# The treatment is always vermillion, controls keep fixed colours, so figures read alike.
SELECTION_COLOURS: dict[str, str] = {
    "top_k": "#D55E00",
    "random_k": "#0072B2",
    "bottom_k": "#009E73",
    "all_k": "#CC79A7",
}
SEQUENTIAL_CMAP = "viridis"  # perceptually uniform and colour-blind safe
DIVERGING_CMAP = "RdBu_r"

COLUMN_WIDTH_IN = 3.5  # one column of a two-column paper
FULL_WIDTH_IN = 7.0
PNG_DPI = 200
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")

_RC = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (never a GUI), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def styled(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the house style (sizes, fonts, spines) without touching global rcParams."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with pyplot().rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


def legend(ax: Any, *, outside: bool = False, **kwargs: Any) -> Any:
    """A small frameless legend; ``outside`` puts it right of the axes, clear of the data."""
    if outside:
        kwargs.setdefault("loc", "upper left")
        kwargs.setdefault("bbox_to_anchor", (1.02, 1.0))
    return ax.legend(fontsize=_RC["legend.fontsize"], frameon=False, **kwargs)


def integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    width: float = COLUMN_WIDTH_IN,
    height: float | None = None,
    **kwargs: Any,
) -> tuple[Figure, Any]:
    """A figure sized for a paper column, with the house style applied to it."""
    fig, axes = pyplot().subplots(
        nrows, ncols, figsize=(width, height or width * 0.72), layout="constrained", **kwargs
    )
    return fig, axes


def colour(i: int) -> str:
    return OKABE_ITO[i % (len(OKABE_ITO) - 1)]  # skip black for data series


def selection_colour(selection: str, fallback: int = 0) -> str:
    return SELECTION_COLOURS.get(selection, colour(fallback + 4))


def component_label(component: str | None) -> str:
    """Short label: fused GPT-2 c_attn 'attn_q,attn_k,attn_v' -> 'attn_qkv'."""
    if component is None:
        return "none"
    parts = component.split(",")
    if len(parts) > 1 and all(p.startswith("attn_") for p in parts):
        return "attn_" + "".join(p.removeprefix("attn_") for p in parts)
    if len(parts) > 1 and all(p.startswith("mlp_") for p in parts):
        return "mlp_" + "_".join(p.removeprefix("mlp_") for p in parts)
    return component


def layer_label(layer: int | None) -> str:
    return "—" if layer is None or layer < 0 else str(layer)


def spans_decades(values: Iterable[float], decades: float = 2.0) -> bool:
    """True when the positive values span at least ``decades`` orders of magnitude."""
    positive = [v for v in values if v is not None and v > 0]
    if len(positive) < 2:
        return False
    return max(positive) / min(positive) >= 10**decades


def finish(fig: Figure, ax: Any, *, title: str, xlabel: str, ylabel: str) -> Figure:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def freeze_layout(fig: Figure) -> None:
    """Lay the figure out once, then keep that layout for every format it is saved in.

    Constrained layout otherwise re-measures every text on every save, which dominated the
    report's run time; the positions it found are kept as they are.
    """
    fig.draw_without_rendering()  # runs the layout engine without rasterising anything
    fig.set_layout_engine("none")


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure in one format (PNG at PNG_DPI; PDF/SVG as vectors with fixed metadata)."""
    import io

    kwargs: dict[str, Any] = {"format": fmt}
    if fmt == "png":
        kwargs["dpi"] = PNG_DPI
    elif fmt == "pdf":
        kwargs["metadata"] = {"Creator": "cwa report", "CreationDate": None}
    elif fmt == "svg":
        kwargs["metadata"] = {"Creator": "cwa report", "Date": None}
    buffer = io.BytesIO()
    # Font handling is read when saving, not when drawing: TrueType (Type 42) fonts in PDF, as
    # journals ask (no Type 3), and SVG text kept as text (searchable, smaller, faster).
    with pyplot().rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}):
        fig.savefig(buffer, **kwargs)
    return buffer.getvalue()


def save_figure(
    fig: Figure, stem: Path, formats: Sequence[str] = FORMATS, *, png: bytes | None = None
) -> dict[str, Path]:
    """Write ``stem.<fmt>`` for each format; ``png`` reuses PNG bytes already rendered."""
    written: dict[str, Path] = {}
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        data = png if fmt == "png" and png is not None else figure_bytes(fig, fmt)
        path.write_bytes(data)
        written[fmt] = path
    return written


def close(fig: Figure) -> None:
    pyplot().close(fig)
