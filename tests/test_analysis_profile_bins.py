"""profile's fast binning (one pass per tensor, per component/head group) vs brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _analysis_world import gpt2_config, llama_gqa_config

from cwa.analysis.histogram import LogHistogram, batch_stats, bin_keys, tensor_bins
from cwa.analysis.profile_bins import tensor_fine_bins


def _arch(config):
    from transformers import AutoModelForCausalLM

    from cwa.models.architecture import build_architecture_map

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return build_architecture_map(model)


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("signed", [False, True])
def test_fine_bins_match_masked_brute_force(kind, signed):
    from cwa.models.architecture import COMPONENTS

    config = gpt2_config(n_layer=1, n_embd=16, n_head=4) if kind == "gpt2" else llama_gqa_config()
    arch = _arch(config)
    gen = torch.Generator().manual_seed(7)
    for name, info in arch.params.items():
        scores = torch.exp(torch.randn(info.shape, generator=gen) * 2)
        if signed:
            scores *= torch.where(torch.rand(info.shape, generator=gen) < 0.5, -1.0, 1.0)
        if name.endswith("c_attn.weight") or name.endswith("q_proj.weight"):
            scores.view(-1)[::7] = float("nan")  # out-of-scope markers take the masked path
        bins = tensor_fine_bins(arch, name, scores)
        comp_ids = arch.component_ids(name).reshape(-1).numpy()
        heads = arch.head_ids(name).reshape(-1).numpy()
        values = np.abs(scores.reshape(-1).numpy())
        finite = np.isfinite(values)
        assert bins.counts.sum() == finite.sum()
        for i, comp in enumerate(bins.comps):
            for head in [None, *range(bins.n_heads)]:
                member = finite & (comp_ids == COMPONENTS.index(comp))
                if head is not None:
                    member &= heads == head
                rows = bins.rows(i, head)
                part = values[member].astype(np.float32)
                counts = bins.counts[rows].sum(axis=0)
                assert counts.sum() == part.size
                if not part.size:
                    continue
                keys = bin_keys(part) - bins.lo
                np.testing.assert_array_equal(counts, np.bincount(keys, minlength=counts.size))
                assert bins.exact[rows].sum() == pytest.approx(part.astype(float).sum(), rel=1e-9)
                assert bins.vmin[rows].min() == part.min()
                assert bins.vmax[rows].max() == part.max()
                # midpoint masses: every value within half a bin (2**-8 relative)
                mass = bins.mass[rows].sum()
                assert mass == pytest.approx(part.astype(float).sum(), rel=2**-8)


def test_batch_stats_equal_histogram_methods():
    rng = np.random.default_rng(1)
    hists = []
    for i in range(120):
        n = int(rng.integers(1, 3000))
        if i % 3 == 0:
            x = np.exp(rng.normal(rng.normal(0, 3), rng.uniform(0.1, 3), n))
        elif i % 3 == 1:
            x = rng.uniform(0, 1, n)
        else:
            x = np.where(rng.uniform(size=n) < 0.5, 0.0, rng.exponential(1e-3, n))
        h = LogHistogram()
        lo, counts, mass, vmin, vmax = tensor_bins(x.astype(np.float32))
        h.add_bins(lo, counts[0], mass[0], float(vmin[0]), float(vmax[0]))
        hists.append(h)
    hists.append(LogHistogram())  # empty group
    stats = batch_stats(hists, batch=32)
    assert stats[-1]["p50"] is None and stats[-1]["gini"] is None
    for h, s in zip(hists[:-1], stats[:-1], strict=True):
        for q in (0.5, 0.9, 0.99):
            assert s[f"p{round(q * 100)}"] == pytest.approx(h.quantile(q), rel=1e-12, abs=1e-300)
        for exact, got in ((h.gini(), s["gini"]), (h.top_share(0.01), s["top1pct_share"])):
            assert (exact is None) == (got is None)
            if exact is not None:
                assert got == pytest.approx(exact, abs=1e-12)
