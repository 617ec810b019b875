"""--activation-checkpointing: blocks are recomputed in backward, scores equal the plain run
(and an exact Hessian), the model is restored, the run config records it, bad uses are refused
before a run is registered."""

from __future__ import annotations

import json

import pytest
import torch
from _cli_checks import assert_one_line_error

from cwa.errors import InvalidInput, UnsupportedArchitecture
from cwa.metrics import score_model
from cwa.metrics.checkpointing import activation_checkpointing, decoder_blocks
from cwa.models.architecture import build_architecture_map
from cwa.scorefile import load_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                    max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    ).eval()  # fmt: skip
    with torch.no_grad():  # larger weights: gradients and curvature with real structure
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
                   eos_token_id=0, attn_implementation="eager")
    ).eval()  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def _batches(vocab: int, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (4, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[3, :2] = 0  # left padding
    return [
        {"input_ids": ids[:3], "attention_mask": mask[:3]},
        {"input_ids": ids[3:], "attention_mask": mask[3:]},
    ]


def _score(model, metric, path, *, checkpointing, **kwargs):
    arch = build_architecture_map(model)
    vocab = int(model.config.vocab_size)
    outcome = score_model(
        model, _batches(vocab), metric, arch=arch, out_path=path,
        activation_checkpointing=checkpointing, **kwargs,
    )  # fmt: skip
    return outcome, load_scores(path)


def _count_block_forwards(model) -> tuple[list[int], list]:
    """Calls of each block's MLP (a recomputed block calls it again; a pre-hook, because the
    recomputation stops as soon as the last saved tensor is rebuilt, before forward hooks)."""
    calls = [0]
    handles = []
    for block in decoder_blocks(model):
        def hook(*_args, **_kwargs):
            calls[0] += 1

        handles.append(block.mlp.register_forward_pre_hook(hook))
    return calls, handles


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize(
    ("metric", "kwargs"),
    [("hutchinson_diag", {"probes": 3}), ("obd", {"probes": 2}), ("grad_x_weight", {}),
     ("grad_squared", {})],
)  # fmt: skip
def test_checkpointed_scores_equal_the_plain_run(tmp_path, build, metric, kwargs) -> None:
    model = build()
    plain_outcome, plain = _score(model, metric, tmp_path / "a", checkpointing=False, **kwargs)
    calls, handles = _count_block_forwards(model)
    outcome, checked = _score(model, metric, tmp_path / "b", checkpointing=True, **kwargs)
    for handle in handles:
        handle.remove()
    # Each block ran forward once per pass and was recomputed by every backward through it:
    # once for first-order metrics, and for Hessian metrics by the first backward and again by
    # each probe's second backward (the double-backward graph reads the saved activations).
    n_blocks = len(decoder_blocks(model))
    passes = 4 if metric == "grad_squared" else 2  # one pass per sequence there, else per batch
    per_pass = 2 + kwargs["probes"] if "probes" in kwargs else 2
    assert calls[0] == n_blocks * passes * per_pass
    assert list(plain) == list(checked)
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7)
        assert float(plain[name].abs().max()) > 0 or "bias" in name
    assert outcome.config["activation_checkpointing"] is True
    assert "activation_checkpointing" not in plain_outcome.config
    assert outcome.loss == pytest.approx(plain_outcome.loss, rel=1e-6)
    # Restored: no instance forward left behind, blocks run once per call again.
    assert all("forward" not in block.__dict__ for block in decoder_blocks(model))


def _exact_hessian(model, batches) -> torch.Tensor:
    """The full Hessian of the mean next-token NLL over the batches, one row at a time, from
    the model's own logits (no chunked head, no checkpointing)."""
    params = list(model.parameters())
    total, count = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        pairs = mask[:, :-1].bool() & mask[:, 1:].bool()
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        total = total + nll[pairs].sum()
        count += int(pairs.sum())
    grads = torch.autograd.grad(total / count, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1)
                       for r, p in zip(row, params, strict=True)])
        )  # fmt: skip
    return torch.stack(rows)


@pytest.mark.slow
def test_checkpointed_single_probe_is_z_times_exact_hessian_z(tmp_path) -> None:
    from cwa.metrics.base import cpu_generator, rademacher

    model = _gpt2()
    hessian = _exact_hessian(model, _batches(16))
    _, scores = _score(model, "hutchinson_diag", tmp_path / "s", checkpointing=True, probes=1)
    names = [n for n, _ in model.named_parameters()]
    z = torch.cat([
        rademacher(p.shape, cpu_generator(0, "hutchinson", 0, n)).reshape(-1)
        for n, p in model.named_parameters()
    ])  # fmt: skip
    expected = z.double() * (hessian.double() @ z.double())
    got = torch.cat([scores[n].reshape(-1) for n in names]).double()
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_context_restores_an_existing_instance_forward() -> None:
    model = _llama()
    blocks = decoder_blocks(model)
    assert len(blocks) == 2 and blocks is model.model.layers

    def custom(*args, **kwargs):  # e.g. accelerate's device-map hook wrapper
        return type(blocks[0]).forward(blocks[0], *args, **kwargs)

    blocks[0].forward = custom
    with activation_checkpointing(model):
        assert blocks[0].forward is not custom and "forward" in blocks[1].__dict__
    assert blocks[0].forward is custom and "forward" not in blocks[1].__dict__


def test_refusals(tmp_path) -> None:
    model = _llama()
    arch = build_architecture_map(model)
    with pytest.raises(InvalidInput, match="not 'magnitude'"):
        score_model(model, _batches(64), "magnitude", arch=arch, out_path=tmp_path / "m",
                    activation_checkpointing=True)  # fmt: skip
    assert not (tmp_path / "m").exists()

    class NoBlocks(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 3})()

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UnsupportedArchitecture, match="--activation-checkpointing"):
        decoder_blocks(NoBlocks())


def _runs(store) -> list:
    with store.read() as con:
        return con.execute("SELECT run_id, config FROM runs ORDER BY run_id").fetchall()


def test_cli_records_the_option_and_refuses_bad_use(cli, tiny_world, store) -> None:
    base = ("--model", str(tiny_world["model"]), "--data", str(tiny_world["text"]),
            "--n-samples", "4", "--seq-len", "16", "--batch-size", "2")  # fmt: skip
    before = _runs(store)
    result = cli("score", *base, "--metric", "wanda", "--activation-checkpointing")
    assert_one_line_error(result, "--activation-checkpointing applies to metrics")
    assert _runs(store) == before  # refused before any run was registered
    result = cli("--json", "score", *base, "--metric", "grad_x_weight",
                 "--activation-checkpointing")  # fmt: skip
    assert result.exit_code == 0, result.output
    (run,) = [r for r in _runs(store) if r not in before]
    config = json.loads(run[1])
    assert config["activation_checkpointing"] is True
    assert config["metric_config"]["activation_checkpointing"] is True


def test_under_accelerate_hooks_equal_plain_and_hooks_survive(tmp_path) -> None:
    """Blocks wrapped by accelerate's device-aligning hooks (as a device map does; one device,
    hooks forced): checkpointing wraps their hooked forward and gives it back afterwards."""
    from accelerate import dispatch_model

    plain = _llama()
    hooked = _llama()
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
             "model.rotary_emb", "lm_head"]  # fmt: skip
    dispatch_model(hooked, device_map=dict.fromkeys(names, "cpu"), main_device="cpu",
                   force_hooks=True)  # fmt: skip
    blocks = decoder_blocks(hooked)
    hooked_forwards = [block.__dict__["forward"] for block in blocks]
    assert all(hasattr(block, "_hf_hook") for block in blocks)
    _, a = _score(plain, "hutchinson_diag", tmp_path / "a", checkpointing=False, probes=2)
    _, b = _score(hooked, "hutchinson_diag", tmp_path / "b", checkpointing=True, probes=2)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    assert [block.__dict__["forward"] for block in blocks] == hooked_forwards
