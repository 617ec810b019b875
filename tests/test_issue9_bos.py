"""Issue 9, defect 4: BOS follows the tokenizer's convention (lm-eval rolling log-likelihood).

With a tokenizer that prepends BOS, every calibration block and every perplexity window starts
with BOS, which is context only; with one that does not (GPT-2 style), nothing changes. Both
are checked against hand computations with the same weights; the run records the choice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cwa.store import Store

BOS = 1  # "<eos>" doubles as BOS in the tiny world's tokenizer


@pytest.fixture(scope="module")
def bos_folder(tiny_world, tmp_path_factory) -> Path:
    from test_issue9_eval import bos_variant

    return bos_variant(tiny_world["model"], tmp_path_factory.mktemp("bos") / "model")


def _stream_by_hand(tok, path: Path) -> list[int]:
    ids: list[int] = []
    for i, line in enumerate(x for x in path.read_text().splitlines() if x.strip()):
        if i:
            ids.append(tok.eos_token_id)
        ids.extend(tok(line.strip(), add_special_tokens=False)["input_ids"])
    return ids


def _nll(model, tokens: list[int], first_scored: int) -> tuple[float, int]:
    """Summed NLL of tokens[first_scored:] given everything before them, by log-softmax."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1)
    total = -sum(float(logp[t - 1, tokens[t]]) for t in range(first_scored, len(tokens)))
    return total, len(tokens) - first_scored


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


@pytest.mark.parametrize("stride", [None, 8])
def test_perplexity_windows_start_with_bos_as_context_only(tiny_world, bos_folder, stride) -> None:
    from cwa.evaluation.runner import evaluate_model

    model, tok = _load(bos_folder)
    stream = _stream_by_hand(tok, tiny_world["text"])
    seq_len = 24
    span = seq_len - 1
    total, count, prev_end = 0.0, 0, 0
    starts = range(0, len(stream), span if stride is None else stride)
    for begin in starts:
        end = min(begin + span, len(stream))
        new = end - prev_end
        piece = stream[begin:end]
        s, c = _nll(model, [BOS, *piece], 1 + len(piece) - new)
        total, count, prev_end = total + s, count + c, end
        if end == len(stream):
            break
    assert count == len(stream)  # every token scored exactly once, the first one from BOS
    rows = evaluate_model(
        model, tok, f"perplexity:{tiny_world['text']}", seq_len=seq_len, stride=stride
    )
    got = {r["metric"]: r["value"] for r in rows}
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, abs=1e-5)


def test_perplexity_without_bos_is_unchanged(tiny_world) -> None:
    from cwa.evaluation.runner import evaluate_model

    model, tok = _load(tiny_world["model"])
    stream = _stream_by_hand(tok, tiny_world["text"])
    total, count = 0.0, 0
    for begin in range(0, len(stream), 24):
        window = stream[begin : begin + 24]
        if len(window) >= 2:
            s, c = _nll(model, window, 1)
            total, count = total + s, count + c
    rows = evaluate_model(model, tok, f"perplexity:{tiny_world['text']}", seq_len=24)
    got = {r["metric"]: r["value"] for r in rows}
    assert got["tokens"] == count == len(stream) - math.ceil(len(stream) / 24)
    assert got["nll"] == pytest.approx(total / count, abs=1e-5)


def _score(cli, folder: Path, text: Path) -> str:
    result = cli(
        "--json", "score", "--model", str(folder), "--data", str(text),
        "--n-samples", "6", "--seq-len", "12", "--batch-size", "4", "--seed", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["runs"][0]["run_id"]


def _calibration_loss_by_hand(folder: Path, text: Path, bos: bool) -> float:
    model, tok = _load(folder)
    stream = _stream_by_hand(tok, text)
    calib = stream[: math.floor(len(stream) * 0.9)]
    body = 11 if bos else 12
    blocks = [calib[i : i + body] for i in range(0, len(calib) - body + 1, body)]
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(3))[:6]
    total, count = 0.0, 0
    for index in order.tolist():
        tokens = [BOS, *blocks[index]] if bos else blocks[index]
        s, c = _nll(model, tokens, 1)
        total, count = total + s, count + c
    return total / count


@pytest.mark.parametrize("with_bos", [True, False])
def test_calibration_blocks_follow_the_tokenizer(
    cli, tiny_world, bos_folder, store_path, with_bos
) -> None:
    folder = bos_folder if with_bos else tiny_world["model"]
    run_id = _score(cli, folder, tiny_world["text"])
    with Store(store_path).read() as con:
        config = json.loads(
            con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        )
        (loss,) = con.execute(
            "SELECT value FROM run_metrics WHERE run_id = ? AND name = 'calibration_loss'",
            [run_id],
        ).fetchone()
        (tokens,) = con.execute(
            "SELECT value FROM run_metrics WHERE run_id = ? AND name = 'calibration_tokens'",
            [run_id],
        ).fetchone()
    assert config["calibration"]["bos"] is with_bos
    assert tokens == 6 * 11  # BOS is never a target: 11 targets per 12-token block either way
    expected = _calibration_loss_by_hand(folder, tiny_world["text"], with_bos)
    assert loss == pytest.approx(expected, abs=1e-5)


def test_bos_blocks_unit(tiny_world, bos_folder) -> None:
    from cwa.data.calibration import adds_bos, bos_for
    from cwa.data.text import load_text_file, token_blocks

    _, tok = _load(bos_folder)
    _, plain_tok = _load(tiny_world["model"])
    assert adds_bos(tok) and not adds_bos(plain_tok)
    assert bos_for(tok) == BOS and bos_for(plain_tok) is None
    assert bos_for(tok, add_bos_token=False) is None and bos_for(plain_tok, True) == BOS
    texts = load_text_file(tiny_world["text"])
    blocks = token_blocks(tok, texts, seq_len=10, n_samples=5, seed=0, bos_token_id=BOS)
    body = token_blocks(tok, texts, seq_len=9, n_samples=5, seed=0)
    assert blocks.shape == (5, 10)
    assert torch.equal(blocks[:, 0], torch.full((5,), BOS)) and torch.equal(blocks[:, 1:], body)
