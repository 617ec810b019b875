"""Layer reuse in sweeps: replayed hidden states give exactly the numbers of a full forward.

Tiny GPT-2 and Llama (grouped-query attention) models built from configs, and the trained toy
model: for perturbations of layers >= L the replayed log-likelihoods, greedy flags and window
NLL equal (``torch.equal``) those of a full forward of the same perturbed model, through both
the plain path and the shared-context KV-cache path, while the real layers below L do not run.
A condition touching a layer below L runs in full; a forward call that does not match its
capture falls back to the real layers (or raises when it continues a replayed KV cache); a
capture over the memory budget is dropped.
"""

from __future__ import annotations

import pytest
import torch

from cwa.evaluation.engine import TokenRequest, Window, score_requests, score_windows
from cwa.evaluation.layer_reuse import LayerReuse, LayerReuseMismatch
from cwa.evaluation.reuse_plan import (
    BEFORE_BLOCKS,
    ReusePlan,
    decoder_stack,
    parameter_layer,
    plan_reuse,
)
from cwa.models.architecture import build_architecture_map


def _gpt2(n_layer: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=n_layer, n_head=4,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _llama(n_layer: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _requests(vocab: int, seed: int = 1) -> tuple[list[TokenRequest], list[Window]]:
    """Multiple-choice items (4 endings sharing a context), single requests, windows."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> tuple[int, ...]:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return tuple(torch.randint(1, vocab, (n,), generator=g).tolist())

    reqs = []
    for item in range(5):
        ctx = ids(3, 14)
        reqs += [TokenRequest(ctx, ids(1, 6), item) for _ in range(4)]
    reqs += [TokenRequest(ids(2, 20), ids(1, 3), 5 + i) for i in range(4)]
    windows = [Window(torch.randint(0, vocab, (n,), generator=g), 2) for n in (24, 17, 24, 9)]
    return reqs, windows


def _evaluate(model, reqs, windows):
    ll, greedy = score_requests(model, reqs, batch_size=8)
    nll, counts = score_windows(model, windows, batch_size=3)
    return ll, greedy, nll, counts


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class _Perturb:
    """Negate one parameter in place for the duration (restored exactly)."""

    def __init__(self, model, name: str) -> None:
        self.param = dict(model.named_parameters())[name]

    def __enter__(self):
        self.saved = self.param.detach().clone()
        with torch.no_grad():
            self.param.mul_(-1.5)

    def __exit__(self, *exc):
        with torch.no_grad():
            self.param.copy_(self.saved)


def _layer_calls(layers) -> list[int]:
    counts = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _check_replay_equals_full(model, from_layer: int, vocab: int) -> dict:
    arch = build_architecture_map(model)
    reqs, windows = _requests(vocab)
    names = [n for n, info in arch.params.items() if info.layer is not None
             and info.layer >= from_layer and n.endswith("weight")]  # fmt: skip
    picked = [names[0], names[len(names) // 2], names[-1]]
    baseline = _evaluate(model, reqs, windows)
    reuse = LayerReuse(model, arch, ReusePlan(from_layer, "test"))
    _owner, layers = decoder_stack(model, arch)
    calls = _layer_calls(layers)
    modes = []
    for name in picked:
        with _Perturb(model, name):
            before = list(calls)
            with reuse.condition([name]) as mode:
                got = _evaluate(model, reqs, windows)
            modes.append(mode)
            ran_below = [calls[i] - before[i] for i in range(from_layer)]
            if mode == "replay":  # the real layers below L never ran
                assert ran_below == [0] * from_layer
            full = _evaluate(model, reqs, windows)
        assert _equal(got, full), name
        assert not torch.equal(got[0], baseline[0]) or not torch.equal(got[2], baseline[2])
    assert modes == ["capture", "replay", "replay"]
    # the model is whole again: its layers, and its numbers
    assert all(type(layer).__name__ != "_StandIn" for layer in layers)
    assert _equal(_evaluate(model, reqs, windows), baseline)
    record = reuse.record()
    assert record["fallback_calls"] == 0
    assert record["replayed_calls"] == 2 * record["captured_calls"]
    return record


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama_gqa"])
@pytest.mark.parametrize("from_layer", [1, 3])
def test_replay_equals_full_forward(build, from_layer) -> None:
    record = _check_replay_equals_full(build(), from_layer, 101)
    # 3 request batches of 8 (each a prefix pass and an ending pass, or one plain pass) and
    # 2 window batches: the shared-context path was among the replayed calls.
    assert record["captured_calls"] >= 5
    assert record["conditions_captured"] == 1 and record["conditions_replayed"] == 2


def test_replay_uses_the_shared_context_path_too() -> None:
    from cwa.evaluation.prefix_cache import supports_prefix_cache

    model = _llama()
    assert supports_prefix_cache(model)
    arch = build_architecture_map(model)
    reqs = [TokenRequest((5, 6, 7, 8), (i + 9, 3), 0) for i in range(4)]
    reuse = LayerReuse(model, arch, ReusePlan(2, "test"))
    with reuse.condition(["model.layers.2.mlp.up_proj.weight"]):
        score_requests(model, reqs, batch_size=8)
    assert reuse.stats.captured_calls == 1  # one packed pass: the context, then the endings
    name = "model.layers.3.self_attn.k_proj.weight"
    with _Perturb(model, name):
        with reuse.condition([name]) as mode:
            got = score_requests(model, reqs, batch_size=8)
        full = score_requests(model, reqs, batch_size=8)
        plain = score_requests(model, reqs, batch_size=8, share_contexts=False)
    assert mode == "replay" and _equal(got, full)
    assert torch.allclose(got[0], plain[0], atol=1e-5)  # and the plain path agrees


def test_toy_model_replay_equals_full_forward(toy_model_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_path).eval()
    assert model.config.n_layer == 2
    record = _check_replay_equals_full(model, 1, int(model.config.vocab_size))
    assert record["from_layer"] == 1


def test_condition_below_the_reuse_layer_runs_in_full() -> None:
    model = _gpt2()
    arch = build_architecture_map(model)
    reqs, windows = _requests(101)
    reuse = LayerReuse(model, arch, ReusePlan(2, "test"))
    _owner, layers = decoder_stack(model, arch)
    calls = _layer_calls(layers)
    high, low = "transformer.h.3.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight"
    with _Perturb(model, high), reuse.condition([high]) as first:
        _evaluate(model, reqs, windows)
    for names in ([high, low], ["transformer.wte.weight"]):
        with _Perturb(model, names[-1]):
            before = calls[0]
            with reuse.condition(names) as mode:
                got = _evaluate(model, reqs, windows)
            assert mode == "full" and calls[0] > before  # layer 0 ran for real
            full = _evaluate(model, reqs, windows)
        assert _equal(got, full)
    assert first == "capture"
    assert reuse.record()["conditions_full"] == 2


def test_a_call_that_does_not_match_its_capture_runs_the_real_layers() -> None:
    model = _llama()
    arch = build_architecture_map(model)
    reqs, windows = _requests(101, seed=1)
    reuse = LayerReuse(model, arch, ReusePlan(2, "test"))
    with reuse.condition(["model.layers.2.mlp.up_proj.weight"]):
        _evaluate(model, reqs, windows)
    other = [Window(w.tokens.flip(0), w.score_from) for w in windows]  # same shapes
    name = "model.layers.3.mlp.down_proj.weight"
    with _Perturb(model, name):
        with reuse.condition([name]) as mode:
            got = score_windows(model, other, batch_size=3)
        full = score_windows(model, other, batch_size=3)
    assert mode == "replay" and _equal(got, full)
    record = reuse.record()
    assert record["replayed_calls"] == 0 and record["fallback_calls"] == 2
    assert "did not match" in record["notes"][0]


def test_a_mismatch_continuing_a_replayed_cache_raises() -> None:
    model = _llama()
    arch = build_architecture_map(model)
    from transformers import DynamicCache

    ctx = torch.tensor([[5, 6, 7, 8, 9]])

    def two_passes(ending: list[int]) -> None:  # a context, then an ending from its KV cache
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ctx, past_key_values=cache, use_cache=True)
            model(input_ids=torch.tensor([ending]), past_key_values=cache, use_cache=True)

    reuse = LayerReuse(model, arch, ReusePlan(2, "test"))
    with reuse.condition(["model.layers.3.mlp.up_proj.weight"]):
        two_passes([10, 3])
    # Same context (the first pass matches and is replayed), another ending: the second pass
    # reads a cache whose layers below 2 hold placeholders, so it must not run for real.
    with pytest.raises(LayerReuseMismatch, match="no-layer-reuse"):
        with reuse.condition(["model.layers.3.mlp.up_proj.weight"]):
            two_passes([20, 4])
    _owner, layers = decoder_stack(model, arch)
    assert all(type(layer).__name__ != "_StandIn" for layer in layers)  # put back


def test_a_capture_over_the_budget_is_dropped_and_reported() -> None:
    from cwa.progress import NULL_REPORTER

    warnings: list[str] = []

    class Reporter(type(NULL_REPORTER)):
        def warn(self, message: str) -> None:
            warnings.append(message)

    model = _gpt2()
    arch = build_architecture_map(model)
    reqs, windows = _requests(101)
    reuse = LayerReuse(model, arch, ReusePlan(2, "test"), budget_bytes=4096, reporter=Reporter())
    name = "transformer.h.3.mlp.c_fc.weight"
    modes = []
    for _ in range(2):
        with _Perturb(model, name):
            with reuse.condition([name]) as mode:
                got = _evaluate(model, reqs, windows)
            full = _evaluate(model, reqs, windows)
        modes.append(mode)
        assert _equal(got, full)
    assert modes == ["capture", "full"]
    record = reuse.record()
    assert "budget" in record["reason"] and record["state_bytes"] == 0
    assert record["conditions_full"] == 2 and not reuse.entries
    assert warnings and "budget" in warnings[0]


def test_parameter_layers_and_the_sweep_plan() -> None:
    gpt2, llama = _gpt2(), _llama()
    g_arch, l_arch = build_architecture_map(gpt2), build_architecture_map(llama)
    assert parameter_layer("transformer.h.2.attn.c_attn.weight", g_arch) == 2
    assert parameter_layer("transformer.wte.weight", g_arch) == BEFORE_BLOCKS
    assert parameter_layer("transformer.wpe.weight", g_arch) == BEFORE_BLOCKS
    assert parameter_layer("lm_head.weight", g_arch) == BEFORE_BLOCKS  # tied to wte
    assert parameter_layer("transformer.ln_f.weight", g_arch) == 4
    assert parameter_layer("lm_head.weight", l_arch) == 4  # untied
    assert parameter_layer("model.norm.weight", l_arch) == 4
    assert parameter_layer("model.embed_tokens.weight", l_arch) == BEFORE_BLOCKS
    upper = [n for n, i in l_arch.params.items() if i.layer in (2, 3)] + ["model.norm.weight"]
    assert plan_reuse(llama, l_arch, upper, 8).from_layer == 2
    assert plan_reuse(llama, l_arch, upper, 1).from_layer is None
    assert "disabled" in plan_reuse(llama, l_arch, upper, 8, enabled=False).reason
    everything = list(l_arch.params)
    assert "embeddings" in plan_reuse(llama, l_arch, everything, 8).reason
    layer0 = [n for n, i in l_arch.params.items() if i.layer in (0, 3)]
    assert "layer 0" in plan_reuse(llama, l_arch, layer0, 8).reason


@pytest.mark.parametrize("layer0", ["cpu", "disk"])
def test_replay_under_a_device_map(toy_env, one_thread, layer0) -> None:
    """A model loaded through a device map (layer 0 offloaded to disk, under accelerate's
    hooks, in one case): the replay skips layer 0, keeps the states on layer 1's device and
    equals the mapped full forward."""
    from cwa.models.loading import load_model

    mapping = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": layer0,
               "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
    plain = load_model("toy", device="cpu")
    mapped = load_model("toy", device="cpu", device_map=mapping)
    model, arch = mapped.model, mapped.arch
    offloaded = any(p.device.type == "meta" for p in model.transformer.h[0].parameters())
    assert offloaded == (layer0 == "disk")
    vocab = int(model.config.vocab_size)
    reqs, windows = _requests(vocab)
    reuse = LayerReuse(model, arch, ReusePlan(1, "test"))
    name = "transformer.h.1.mlp.c_fc.weight"
    results = []
    for target in (model, model, plain.model):  # capture, replay, then the plain model
        with _Perturb(target, name):
            if target is model:
                with reuse.condition([name]) as mode:
                    results.append(_evaluate(target, reqs, windows))
                assert _equal(results[-1], _evaluate(target, reqs, windows)), mode
            else:
                results.append(_evaluate(target, reqs, windows))
    assert reuse.record()["conditions_replayed"] == 1
    assert all(e.state.device.type == "cpu" for e in reuse.entries)
    assert _equal(results[0], results[1])
    for got, want in zip(results[1], results[2], strict=True):  # the plain load agrees
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_sweep_of_the_final_norm_replays_every_layer() -> None:
    model = _llama()
    arch = build_architecture_map(model)
    plan = plan_reuse(model, arch, ["model.norm.weight", "lm_head.weight"], 4)
    assert plan.from_layer == arch.n_layers == 4
    reqs, windows = _requests(101)
    reuse = LayerReuse(model, arch, plan)
    modes = []
    for name in ("model.norm.weight", "lm_head.weight", "model.norm.weight"):
        with _Perturb(model, name):
            with reuse.condition([name]) as mode:
                got = _evaluate(model, reqs, windows)
            assert _equal(got, _evaluate(model, reqs, windows)), name
        modes.append(mode)
    assert modes == ["capture", "replay", "replay"]
