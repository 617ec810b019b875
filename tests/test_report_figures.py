"""Each figure function draws the values of a small known table (checked on the artists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cwa.reporting import figures_effects as fe
from cwa.reporting import figures_scores as fs
from cwa.reporting.style import OKABE_ITO, save_figure


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _labels(ax) -> tuple[str, str, str]:
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_score_distribution_places_each_quantile_on_a_log_axis() -> None:
    table = pl.DataFrame(
        {
            "component": ["attn_q,attn_k,attn_v", "mlp_down"],
            "p50": [1e-5, 2e-5],
            "p90": [1e-4, 3e-4],
            "p99": [1e-3, 4e-3],
            "p99_9": [5e-3, 6e-3],
            "max": [1e-2, 9e-2],
        }
    )
    fig = fs.score_distribution(table, metric="grad_x_weight")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    by_label = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label()}
    np.testing.assert_allclose(by_label["median"][:, 0], [1e-5, 2e-5])
    np.testing.assert_allclose(by_label["99.9th pct"][:, 0], [5e-3, 6e-3])
    np.testing.assert_allclose(by_label["max"][:, 1], [0, 1])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["attn_qkv", "mlp_down"]
    title, xlabel, ylabel = _labels(ax)
    assert title and "grad_x_weight" in xlabel and "log" in xlabel and ylabel == "component"


def test_score_distribution_uses_symlog_for_negative_scores() -> None:
    table = pl.DataFrame(
        {"component": ["mlp_up"], "p50": [-1e-4], "p90": [1e-4], "p99": [1e-3],
         "p99_9": [1e-2], "max": [1.0]}
    )
    assert fs.score_distribution(table).axes[0].get_xscale() == "symlog"


def test_sensitivity_heatmap_image_is_the_pivoted_mass_share() -> None:
    table = pl.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "component": ["attn_o", "mlp_down", "attn_o", "mlp_down"],
            "mass_share": [0.1, 0.2, 0.3, 0.4],
        }
    )
    ax = fs.sensitivity_heatmap(table).axes[0]
    image = ax.get_images()[0].get_array()
    np.testing.assert_allclose(np.asarray(image), [[10.0, 20.0], [30.0, 40.0]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["attn_o", "mlp_down"]


def test_sensitivity_heatmap_leaves_missing_cells_empty() -> None:
    table = pl.DataFrame({"layer": [0, 1], "component": ["a", "b"], "mass_share": [0.5, 0.5]})
    image = np.ma.filled(fs.sensitivity_heatmap(table).axes[0].get_images()[0].get_array(), -1)
    assert np.isnan(image[0, 1]) or image[0, 1] == -1


def test_depth_profile_points_and_least_squares_trend_on_log_scale() -> None:
    layers = np.arange(5)
    values = 10.0 ** (-3 + 0.5 * layers) * np.array([1.1, 0.9, 1.0, 1.2, 0.8])
    table = pl.DataFrame({"layer": layers, "mean_score": values})
    ax = fs.depth_profile(table).axes[0]
    points, trend = ax.get_lines()[:2]
    np.testing.assert_allclose(points.get_ydata(), values)
    slope, intercept = np.polyfit(layers, np.log10(values), 1)
    x = trend.get_xdata()
    np.testing.assert_allclose(trend.get_ydata(), 10 ** (slope * x + intercept))
    assert ax.get_yscale() == "log"
    assert f"×{10**slope:.3g} per layer" in ax.get_legend().get_texts()[1].get_text()


def test_depth_profile_uses_a_stored_fit_when_given() -> None:
    table = pl.DataFrame(
        {"layer": [0, 1, 2], "mean_score": [1.0, 2.0, 3.0], "slope": [2.0] * 3,
         "intercept": [1.0] * 3, "log_scale": [False] * 3}
    )
    trend = fs.depth_profile(table).axes[0].get_lines()[1]
    np.testing.assert_allclose(trend.get_ydata(), 2.0 * trend.get_xdata() + 1.0)


def test_topk_composition_stacks_counts_per_layer() -> None:
    table = pl.DataFrame(
        {
            "layer": [-1, 0, 0, 1],
            "component": ["embed", "attn_o", "norm", "norm"],
            "n": [5, 2, 3, 7],
        }
    )
    ax = fs.topk_composition(table).axes[0]
    heights = {}
    for container in ax.containers:
        heights[container.get_label()] = [r.get_height() for r in container]
    assert heights == {"attn_o": [0, 2, 0], "embed": [5, 0, 0], "norm": [0, 3, 7]}
    bottoms = [r.get_y() for r in ax.containers[2]]  # norm sits on attn_o + embed
    assert bottoms == [5, 2, 0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["—", "0", "1"]
    assert "17" in ax.get_title()


def test_head_heatmap_keeps_query_and_key_value_heads_apart() -> None:
    # GQA: 4 query heads, 2 key-value heads.
    table = pl.DataFrame(
        {
            "component": ["attn_q", "attn_q", "attn_k", "attn_k"],
            "layer": [0, 1, 0, 1],
            "head": [3, 0, 1, 0],
            "n": [5, 1, 2, 4],
            "n_heads": [4, 4, 2, 2],
        }
    )
    fig = fs.head_heatmap(table)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["attn_q (4 heads)", "attn_k (2 kv heads)"]
    q = np.asarray(panels[0].get_images()[0].get_array())
    k = np.asarray(panels[1].get_images()[0].get_array())
    np.testing.assert_array_equal(q, [[0, 0, 0, 5], [1, 0, 0, 0]])
    np.testing.assert_array_equal(k, [[0, 2], [4, 0]])


def _curve_table(x_column: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "selection": ["top_k", "top_k", "top_k", "random_k", "random_k", "random_k"],
            "method": ["sign_flip"] * 6,
            x_column: [10, 100, 1000, 10, 100, 1000],
            "n": [1, 1, 1, 3, 3, 3],
            "mean": [2.0, 50.0, 900.0, 1.0, 1.01, 1.1],
            "lo": [2.0, 50.0, 900.0, 0.99, 1.0, 1.05],
            "hi": [2.0, 50.0, 900.0, 1.01, 1.03, 1.2],
        }
    )


def test_damage_vs_k_draws_treatment_line_and_control_band_on_log_axes() -> None:
    ax = fe.damage_vs_k(_curve_table("k")).axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
    np.testing.assert_allclose(lines["line:sign_flip:top_k"].get_ydata(), [2.0, 50.0, 900.0])
    np.testing.assert_allclose(lines["line:sign_flip:random_k"].get_ydata(), [1.0, 1.01, 1.1])
    bands = [c for c in ax.collections if c.get_gid() == "band:sign_flip:random_k"]
    assert len(bands) == 1
    vertices = bands[0].get_paths()[0].vertices
    # The band spans the controls' min..max at each k.
    for k, lo, hi in [(10, 0.99, 1.01), (100, 1.0, 1.03), (1000, 1.05, 1.2)]:
        ys = vertices[np.isclose(vertices[:, 0], k), 1]
        assert np.isclose(ys.min(), lo) and np.isclose(ys.max(), hi)
    assert not [c for c in ax.collections if c.get_gid() == "band:sign_flip:top_k"]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert "(log)" in ax.get_ylabel() and "ratio" in ax.get_ylabel()
    colours = {lines["line:sign_flip:top_k"].get_color().upper()}
    assert colours <= {c.upper() for c in OKABE_ITO}


def test_damage_vs_scale_stays_linear_when_damage_is_small() -> None:
    table = _curve_table("scale").with_columns(
        pl.Series("mean", [1.0, 1.5, 2.0, 1.0, 1.0, 1.1]),
        pl.Series("hi", [1.0, 1.5, 2.0, 1.0, 1.1, 1.2]),
        pl.Series("lo", [1.0, 1.5, 2.0, 1.0, 0.9, 1.0]),
    )
    ax = fe.damage_vs_scale(table).axes[0]
    assert ax.get_yscale() == "linear"
    line = next(li for li in ax.get_lines() if li.get_gid() == "line:sign_flip:top_k")
    np.testing.assert_allclose(line.get_xdata(), [10, 100, 1000])


def test_task_deltas_bars_are_percentage_points_with_seed_errors() -> None:
    table = pl.DataFrame(
        {
            "task": ["hellaswag", "hellaswag", "lambada", "lambada"],
            "metric": ["acc", "acc", "acc", "acc"],
            "selection": ["top_k", "random_k", "top_k", "random_k"],
            "n": [1, 3, 1, 3],
            "mean_delta": [-0.5, -0.01, -0.9, 0.0],
            "std_delta": [0.0, 0.02, 0.0, 0.01],
        }
    )
    ax = fe.task_deltas(table).axes[0]
    bars = {c.get_label(): [r.get_height() for r in c] for c in ax.containers
            if hasattr(c, "patches")}
    np.testing.assert_allclose(bars["top_k"], [-50.0, -90.0])
    np.testing.assert_allclose(bars["random_k"], [-1.0, 0.0])
    assert "percentage points" in ax.get_ylabel()


def test_superweight_profile_lines_per_layer() -> None:
    table = pl.DataFrame(
        {"layer": [2, 0, 1], "max_input": [3.0, 1.0, 900.0], "max_output": [2.0, 1.5, 400.0]}
    )
    ax = fe.superweight_profile(table).axes[0]
    inp, out = ax.get_lines()[:2]
    np.testing.assert_allclose(inp.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(inp.get_ydata(), [1.0, 900.0, 3.0])
    np.testing.assert_allclose(out.get_ydata(), [1.5, 400.0, 2.0])
    assert ax.get_yscale() == "log"


def test_flipped_items_bars_and_intervals() -> None:
    table = pl.DataFrame(
        {
            "task": ["hellaswag", "hellaswag"],
            "selection": ["top_k", "random_k"],
            "n": [1, 3],
            "mean_flipped": [40.0, 2.0],
            "lo": [40.0, 1.0],
            "hi": [40.0, 4.0],
        }
    )
    ax = fe.flipped_items(table).axes[0]
    bars = {c.get_label(): [r.get_height() for r in c] for c in ax.containers
            if hasattr(c, "patches")}
    assert bars == {"top_k": [40.0], "random_k": [2.0]}


def test_save_figure_writes_vector_and_200dpi_png(tmp_path: Path) -> None:
    from PIL import Image

    table = pl.DataFrame({"layer": [0, 1], "mean_score": [1.0, 2.0]})
    fig = fs.depth_profile(table)
    written = save_figure(fig, tmp_path / "depth", ("png", "pdf", "svg"))
    pdf, svg = written["pdf"].read_bytes(), written["svg"].read_bytes()
    assert pdf.startswith(b"%PDF")
    assert b"/Type3" not in pdf and b"FontFile2" in pdf  # embedded TrueType, no Type 3 fonts
    assert b"<svg" in svg[:2000] and b"<text" in svg  # SVG text stays text
    with Image.open(written["png"]) as image:
        dpi = image.info.get("dpi", (0, 0))[0]
        assert round(dpi) >= 200
        assert image.width >= 3.0 * 200  # a column-wide figure at 200 dpi


def test_stability_curves_lines_and_intervals_per_statistic() -> None:
    from cwa.reporting import figures_analysis as fa

    table = pl.DataFrame(
        {
            "statistic": ["jaccard"] * 3 + ["rbo"] * 3,
            "k": [1000, 10, 100] * 2,
            "n_pairs": [3] * 6,
            "mean": [0.8, 0.5, 0.7, 0.9, 0.6, 0.85],
            "ci_low": [0.75, 0.4, 0.6, 0.88, 0.5, 0.8],
            "ci_high": [0.85, 0.6, 0.8, 0.92, 0.7, 0.9],
        }
    )
    ax = fa.stability_curves(table).axes[0]
    lines = {li.get_gid(): li for li in ax.get_lines()}
    np.testing.assert_allclose(lines["line:jaccard"].get_xdata(), [10, 100, 1000])
    np.testing.assert_allclose(lines["line:jaccard"].get_ydata(), [0.5, 0.7, 0.8])
    np.testing.assert_allclose(lines["line:rbo"].get_ydata(), [0.6, 0.85, 0.9])
    band = next(c for c in ax.collections if c.get_gid() == "band:jaccard")
    vertices = band.get_paths()[0].vertices
    at_100 = vertices[np.isclose(vertices[:, 0], 100), 1]
    assert np.isclose(at_100.min(), 0.6) and np.isclose(at_100.max(), 0.8)
    assert ax.get_xscale() == "log"
    assert ax.get_legend().get_title().get_text() == "mean over 3 pair(s) of runs"


def test_correlation_heatmap_mirrors_a_triangle_and_annotates() -> None:
    from cwa.reporting import figures_analysis as fa

    table = pl.DataFrame(
        {
            "row_key": ["layer=0", "layer=0", "layer=1", "layer=0", "layer=1", "layer=2"],
            "col_key": ["layer=1", "layer=2", "layer=2", "layer=0", "layer=1", "layer=2"],
            "value": [0.5, -0.2, 0.9, 1.0, 1.0, 1.0],
        }
    )
    ax = fa.layer_correlation(table).axes[0]
    image = np.asarray(ax.get_images()[0].get_array())
    expected = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.9], [-0.2, 0.9, 1.0]])
    np.testing.assert_allclose(image, expected)
    assert ax.get_images()[0].get_clim() == (-1, 1)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in expected.ravel())


def test_clusters_projection_keeps_centre_distances_and_sizes() -> None:
    from cwa.reporting import figures_analysis as fa

    centres = {0: (0.0, 1.0), 1: (3.0, -1.0), 2: (-2.0, 2.0)}  # two features: PCA = rotation
    sizes = {0: 100, 1: 400, 2: 50}
    rows = [
        {"cluster": c, "size": sizes[c], "label": f"c{c}", "feature": f, "value_scaled": v}
        for c, (a, b) in centres.items()
        for f, v in (("log_score_0", a), ("depth", b))
    ]
    ax = fa.clusters(pl.DataFrame(rows)).axes[0]
    points = next(c for c in ax.collections if c.get_gid() == "clusters")
    xy = np.asarray(points.get_offsets())
    original = np.array([centres[c] for c in (0, 1, 2)])
    from scipy.spatial.distance import pdist

    np.testing.assert_allclose(pdist(xy), pdist(original), atol=1e-9)
    areas = points.get_sizes()
    np.testing.assert_allclose(areas, 30.0 + 600.0 * np.array([100, 400, 50]) / 400)
    assert [t.get_text() for t in ax.texts] == ["c0 (100)", "c1 (400)", "c2 (50)"]


def test_head_heatmap_draws_profile_means_when_given() -> None:
    table = pl.DataFrame(
        {
            "component": ["attn_q", "attn_q", "attn_v"],
            "layer": [0, 0, 0],
            "head": [0, 1, 0],
            "mean_score": [0.5, 0.25, 1.0],
            "n_heads": [2, 2, 1],
        }
    )
    fig = fs.head_heatmap(table, metric="grad_x_weight")
    panels = [ax for ax in fig.axes if ax.get_images()]
    np.testing.assert_allclose(np.asarray(panels[0].get_images()[0].get_array()), [[0.5, 0.25]])
    np.testing.assert_allclose(np.asarray(panels[1].get_images()[0].get_array()), [[1.0]])
    assert fig.get_suptitle() == "Sensitivity per attention head"


def test_log_tick_labels_become_plain_text_powers() -> None:
    from matplotlib.ticker import LogFormatterSciNotation

    from cwa.reporting.style import new_figure, plain_power_label, render_formats

    assert plain_power_label(r"$\mathdefault{10^{-3}}$") == "10⁻³"
    assert plain_power_label(r"$\mathdefault{2\times10^{4}}$") == "2×10⁴"
    assert plain_power_label(r"$\mathdefault{-10^{1}}$") == "−10¹"
    assert plain_power_label("attn_q") == "attn_q"
    assert plain_power_label(r"$x^2$") == r"$x^2$"  # not a power label: left to mathtext
    fig, ax = new_figure()
    ax.plot([1e-3, 1e2], [1.0, 2.0])
    ax.set_xscale("log")
    render_formats(fig, ["png", "svg"])
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    # The same ticks matplotlib's own formatter labels, written without mathtext.
    reference = LogFormatterSciNotation(base=10)
    reference.set_axis(ax.xaxis)
    expected = [plain_power_label(reference(x)) for x in ax.get_xticks()]
    assert "10⁻³" in shown and "10²" in shown
    assert not any("$" in label for label in shown)
    assert set(shown) <= set(expected)


def test_frozen_ticks_leave_the_vector_output_unchanged() -> None:
    import numpy as np

    from cwa.reporting.style import figure_bytes, freeze_ticks, new_figure, pyplot, render_formats

    fig, (left, right) = new_figure(1, 2)
    left.plot([1e-3, 1e2], [0.5, 3000.0])
    left.set_xscale("log")
    image = right.imshow(np.arange(12.0).reshape(3, 4))
    fig.colorbar(image, ax=right)
    right.set_xticks(range(4), ["a", "b", "c", "d"])
    render_formats(fig, [])  # laid out and drawn once, as in the report
    with pyplot().rc_context({"svg.hashsalt": "cwa-test"}):
        before = figure_bytes(fig, "svg")
        freeze_ticks(fig)
        after = figure_bytes(fig, "svg")
    assert b"<text" in before and before == after
