"""The packed shared-context layout: one forward pass per batch, each context fed once.

The speed of the shared path comes from feeding fewer tokens in fewer passes; these tests
check the layout that gives it (counted at the decoder stack's input) and the numbers it
gives against an independent per-request forward with ``log_softmax``.
"""

from __future__ import annotations

import pytest
import torch

from cwa.evaluation.engine import TokenRequest, score_requests

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 60


def _gqa(kind: str, seed: int):
    """A 2-layer GQA decoder (4 query / 2 key-value heads) of a Llama-layout family."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


def _llama():
    return _gqa("Llama", 5)


def _qwen2():
    return _gqa("Qwen2", 6)


def _items() -> list[TokenRequest]:
    """Three items, 4/3/2 endings of 1..6 tokens, contexts of 5..12 tokens."""
    gen = torch.Generator().manual_seed(11)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, VOCAB, (n,), generator=gen).tolist())

    reqs = []
    for group, (n_ctx, ending_lens) in enumerate([(12, (1, 4, 6, 2)), (5, (3, 3, 5)), (8, (6, 1))]):
        ctx = ids(n_ctx)
        reqs += [TokenRequest(ctx, ids(n), group) for n in ending_lens]
    return reqs


def _reference(model, requests):
    lls, greedy = [], []
    with torch.no_grad():
        for req in requests:
            whole = list(req.context + req.continuation)
            logp = model(input_ids=torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            rows = logp[-len(req.continuation) :]
            target = torch.tensor(req.continuation)
            lls.append(float(rows.gather(1, target[:, None]).sum()))
            greedy.append(bool((rows.argmax(-1) == target).all()))
    return lls, greedy


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_one_pass_per_batch_each_context_once(build):
    model = build()
    requests = _items()
    seen: list[tuple[int, ...]] = []
    hook = model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        lls, greedy = score_requests(model, requests, batch_size=16)
    finally:
        hook.remove()
    # One decoder pass for the whole batch; a row per context holding the context once and
    # every ending but its last token (the context's last position predicts each first token).
    packed = {}
    for req in requests:
        packed[req.context] = packed.get(req.context, len(req.context)) + len(req.continuation) - 1
    assert seen == [(3, max(packed.values()))]
    assert sum(packed.values()) < sum(len(r.context) + len(r.continuation) - 1 for r in requests)
    ref_ll, ref_greedy = _reference(model, requests)
    assert lls.tolist() == pytest.approx(ref_ll, abs=2e-5)
    assert greedy.tolist() == ref_greedy


def test_ending_of_one_token_and_endings_do_not_see_each_other():
    """Changing one ending leaves the other endings' scores alone (block mask), up to the
    float rounding of a wider padded row."""
    model = _llama()
    requests = _items()
    base, _ = score_requests(model, requests, batch_size=16)
    changed = list(requests)
    changed[2] = TokenRequest(requests[2].context, tuple([7] * 9), requests[2].group)
    moved, _ = score_requests(model, changed, batch_size=16)
    others = [i for i in range(len(requests)) if i != 2]
    assert moved[others].tolist() == pytest.approx(base[others].tolist(), abs=1e-5)
    assert abs(float(moved[2] - base[2])) > 1e-3  # the changed ending itself is rescored


def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    gqa = dict(common, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    configs = {
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, gqa),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(gqa, head_dim=8)),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM,
                     dict(common, eos_token_id=1, bos_token_id=1)),  # fmt: skip
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, gqa),
        "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, gqa),
        "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, gqa),
    }
    config_cls, model_cls, kwargs = configs[kind]
    torch.manual_seed(7)
    return model_cls(config_cls(**kwargs)).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2"])
def test_every_supported_architecture_matches_per_request_forwards(kind):
    """The 4-D block mask and restarting position ids are honoured by each model type the
    packed layout is enabled for (against one plain forward per request)."""
    from cwa.evaluation.prefix_cache import supports_prefix_cache

    model = _tiny(kind)
    assert supports_prefix_cache(model)
    requests = _items()
    lls, greedy = score_requests(model, requests, batch_size=16)
    ref_ll, ref_greedy = _reference(model, requests)
    assert lls.tolist() == pytest.approx(ref_ll, abs=2e-5)
    assert greedy.tolist() == ref_greedy
