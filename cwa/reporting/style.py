"""Shared look of every report figure: a colour-blind-safe palette, column-width sizes, saving.

matplotlib is imported inside functions only (with the Agg backend), so importing the reporting
package costs nothing until a figure is drawn.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """Keep the layout the figure has now for every later save (no layout engine any more).

    Constrained layout otherwise re-measures every text on every save, which dominated the
    report's run time. Call it after a first save (``render_formats`` does: the PNG save runs
    the layout on the renderer that draws it, sharing its text metrics) or after
    ``fig.draw_without_rendering()``.
    """
    fig.set_layout_engine("none")


# OpenType layout tables (glyph substitution/positioning, maths, baselines, justification): a
# PDF viewer draws an embedded Type 42 font by glyph id through the CIDToGIDMap and never runs
# OpenType layout (matplotlib has already placed every glyph), so they are dead weight there,
# and decompiling them to subset them was most of the PDF's cost. The outlines (glyf/loca),
# metrics (hmtx), cmap, name, post and hinting tables are kept: the font stays a complete,
# embedded, subset TrueType font that journals accept.
# The legacy 'kern' table is likewise unused in a PDF (fontTools drops it itself while GPOS is
# present; with GPOS gone it would otherwise be decompiled and subset).
_PDF_UNUSED_TABLES = ("GSUB", "GPOS", "GDEF", "MATH", "BASE", "JSTF", "kern")
# Characters every subset carries, so that one subset per font serves all the report's PDFs
# (labels, numbers, mathtext tick labels such as 10^-3) instead of one subset per PDF.
_PDF_BASE_CHARS = frozenset(range(0x20, 0x7F)) | frozenset(map(ord, "−×±·µ°≤≥≈–—…²³⁻⁰¹₀"))
# (font file, face index) -> (subset font bytes, original -> subset glyph ids).
_SUBSET_CACHE: dict[tuple[str, int], tuple[bytes, dict[int, int]]] = {}


class _LeanSubsetModule:
    """``fontTools.subset`` as matplotlib's PDF backend uses it, minus the layout tables."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def load_font(self, *args: Any, **kwargs: Any) -> Any:
        font = self._module.load_font(*args, **kwargs)
        for tag in _PDF_UNUSED_TABLES:
            if tag in font:
                del font[tag]  # never decompiled: the font is loaded lazily
        return font

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _cached_glyphs_subset(pdf_ps: Any) -> Callable[..., Any]:
    """A ``get_glyphs_subset`` (matplotlib >= 3.11 API) that subsets each font once.

    The subset holds the requested glyphs plus ``_PDF_BASE_CHARS``; later requests covered by
    it reuse its bytes, others make a larger one. Each PDF still embeds a subset (tens of kB,
    not the whole font), the same for every figure.
    """
    from fontTools.ttLib import TTFont

    lean = _LeanSubsetModule(pdf_ps.subset)

    def get_glyphs_subset(fontfile: Any, glyphs: Iterable[int]) -> Any:
        wanted = set(glyphs)
        key = (str(fontfile), int(getattr(fontfile, "face_index", 0)))
        cached = _SUBSET_CACHE.get(key)
        if cached is None or not wanted <= cached[1].keys():
            have = set(cached[1]) if cached is not None else set()
            options = lean.Options(glyph_names=True, recommended_glyphs=True)
            options.drop_tables += ["FFTM", "PfEd", "BDF", "meta"]
            options.font_number = key[1]
            font = lean.load_font(str(fontfile), options)
            subsetter = lean.Subsetter(options=options)
            subsetter.populate(gids=wanted | have, unicodes=_PDF_BASE_CHARS)
            subsetter.subset(font)
            cached = (pdf_ps.font_as_file(font).getvalue(), dict(subsetter.glyph_index_map))
            font.close()
            _SUBSET_CACHE[key] = cached
        data, index_map = cached
        return pdf_ps.SubsetResults(TTFont(io.BytesIO(data)), index_map)._as_cm()

    return get_glyphs_subset


@contextlib.contextmanager
def _lean_pdf_fonts() -> Iterator[None]:
    """While saving a PDF, subset its fonts once per process and without layout tables.

    matplotlib offers no option for its subsetter, so its helper module's function (or, on
    older versions, its reference to fontTools.subset) is swapped for the duration of the save
    (single-threaded) and restored after. Where neither is found, nothing changes: the fonts
    are then subset by matplotlib itself, which is correct, only slower.
    """
    try:
        from matplotlib.backends import _backend_pdf_ps as pdf_ps
    except ImportError:  # pragma: no cover - matplotlib moved its private helper
        yield
        return
    if hasattr(pdf_ps, "SubsetResults") and hasattr(pdf_ps, "get_glyphs_subset"):
        name, replacement = "get_glyphs_subset", _cached_glyphs_subset(pdf_ps)
    elif hasattr(getattr(pdf_ps, "subset", None), "load_font"):
        name, replacement = "subset", _LeanSubsetModule(pdf_ps.subset)
    else:  # pragma: no cover
        yield
        return
    original = getattr(pdf_ps, name)
    setattr(pdf_ps, name, replacement)
    try:
        yield
    finally:
        setattr(pdf_ps, name, original)


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure in one format (PNG at PNG_DPI; PDF/SVG as vectors with fixed metadata)."""
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
    lean = _lean_pdf_fonts() if fmt == "pdf" else contextlib.nullcontext()
    with pyplot().rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}), lean:
        fig.savefig(buffer, **kwargs)
    return buffer.getvalue()


_SUPERSCRIPT = str.maketrans("0123456789-−+.", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁻⁺·")
_MATH_POWER = re.compile(
    r"^\$\\mathdefault\{(?P<sign>[-−])?(?:(?P<mant>[0-9.]+)\\times)?(?P<base>[0-9.]+)"
    r"(?:\^\{?(?P<exp>[-−+0-9.]+)\}?)?\}\$$"
)


def plain_power_label(label: str) -> str:
    """'$\\mathdefault{10^{-3}}$' -> '10⁻³' (also '2×10⁻³', '−10²', '0'); others unchanged.

    matplotlib's log-axis labels are mathtext, parsed again by every renderer (PNG, PDF,
    SVG); the same number as plain text with Unicode superscripts reads the same, stays text
    in PDF/SVG and costs no parsing.
    """
    match = _MATH_POWER.match(label)
    if match is None:
        return label
    power = match["base"] + (match["exp"] or "").translate(_SUPERSCRIPT)
    sign = "−" if match["sign"] else ""
    return f"{sign}{match['mant']}×{power}" if match["mant"] else f"{sign}{power}"


def _plain_log_labels(fig: Figure) -> None:
    """Give every log/symlog axis of ``fig`` formatters that write plain-text powers."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainPowers(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return plain_power_label(super().__call__(x, pos))

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for formatter, setter in (
                (axis.get_major_formatter(), axis.set_major_formatter),
                (axis.get_minor_formatter(), axis.set_minor_formatter),
            ):
                if type(formatter) is LogFormatterSciNotation:
                    plain = PlainPowers.__new__(PlainPowers)
                    plain.__dict__.update(formatter.__dict__)  # same base, thresholds, axis
                    setter(plain)


def freeze_ticks(fig: Figure) -> None:
    """Fix every axis's tick positions and labels to those the last save drew.

    Each save re-runs every locator and formatter several times (for the axes' extents, the
    spines, the labels' placement); with the layout frozen and the limits settled, the answer
    cannot change between formats, so the vector saves reuse it. Output is unchanged (a test
    compares the SVG before and after).
    """
    from matplotlib.ticker import FixedFormatter, FixedLocator

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for ticker, set_locator, set_formatter in (
                (axis.major, axis.set_major_locator, axis.set_major_formatter),
                (axis.minor, axis.set_minor_locator, axis.set_minor_formatter),
            ):
                locations = list(ticker.locator())
                labels = ticker.formatter.format_ticks(locations)
                offset = ticker.formatter.get_offset()
                fixed = FixedFormatter(labels)
                fixed.set_offset_string(offset)
                set_locator(FixedLocator(locations))
                set_formatter(fixed)


def render_formats(fig: Figure, formats: Sequence[str]) -> dict[str, bytes]:
    """The figure in each format (always PNG, first), laid out once.

    The layout engine runs once, on the Agg renderer at the PNG's resolution that the PNG save
    then reuses (one text measurement for layout and raster: matplotlib caches text metrics per
    renderer); the layout is then frozen, so the PNG, PDF and SVG share those positions.
    (``savefig`` with a layout engine would lay out twice per save, and again per format.)
    """
    _plain_log_labels(fig)
    engine = fig.get_layout_engine()
    if engine is not None:
        fig.set_dpi(PNG_DPI)
        if hasattr(fig.canvas, "get_renderer"):
            engine.execute(fig)  # measures text on fig.canvas.get_renderer(), kept by the canvas
        else:  # pragma: no cover - a non-Agg canvas
            fig.draw_without_rendering()
        freeze_layout(fig)
    rendered = {"png": figure_bytes(fig, "png")}
    if any(fmt != "png" for fmt in formats):
        freeze_ticks(fig)
    for fmt in formats:
        if fmt not in rendered:
            rendered[fmt] = figure_bytes(fig, fmt)
    return rendered


def write_rendered(
    rendered: dict[str, bytes], stem: Path, formats: Sequence[str] = FORMATS
) -> dict[str, Path]:
    """Write ``stem.<fmt>`` for each of ``formats`` from bytes rendered by ``render_formats``."""
    written: dict[str, Path] = {}
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        path.write_bytes(rendered[fmt])
        written[fmt] = path
    return written


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """Write ``stem.<fmt>`` for each format (the figure laid out once, then frozen)."""
    return write_rendered(render_formats(fig, formats), stem, formats)


def close(fig: Figure) -> None:
    pyplot().close(fig)
