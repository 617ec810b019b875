"""Calibration/evaluation text loading and token blocks (cwa.data.text)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from cwa.data.text import (
    batches_from_blocks,
    load_texts,
    split_txt_documents,
    token_blocks,
    token_stream,
)
from cwa.errors import DataError, InvalidInput


class WordIdTokenizer:
    """Maps the word ``t<k>`` to token id k: every token id says where it came from."""

    eos_token_id = -1

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[int(w[1:]) for w in t.split()] for t in texts]}


def numbered_docs(n_docs: int, words_per_doc: int) -> list[str]:
    return [
        " ".join(f"t{d * words_per_doc + k}" for k in range(words_per_doc)) for d in range(n_docs)
    ]


# -- loading ----------------------------------------------------------------------------------


def test_txt_one_document_per_line(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("alpha\n  beta gamma  \n", encoding="utf-8")
    assert load_texts(str(plain)) == ["alpha", "beta gamma"]
    # a blank line between non-empty lines switches to paragraph mode
    paras = tmp_path / "paras.txt"
    paras.write_text("first doc\n\n  \nsecond doc  \nthird\n", encoding="utf-8")
    assert load_texts(str(paras)) == ["first doc", "second doc\nthird"]


def test_txt_paragraph_mode_keeps_inner_lines():
    text = "\n\nline one\nline two\n\n\npara two\n\n"
    assert split_txt_documents(text) == ["line one\nline two", "para two"]
    assert split_txt_documents("a\nb\n\n") == ["a", "b"]  # trailing blank lines only


def test_jsonl_with_text_column(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"body": "one", "id": 1}, {"body": "two", "id": 2}, {"body": "  ", "id": 3}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(f), text_column="body") == ["one", "two"]
    with pytest.raises(DataError) as err:
        load_texts(str(f))  # default column "text" is missing
    msg = str(err.value)
    assert "'text'" in msg and "'body'" in msg and "'id'" in msg and "line 1" in msg


def test_jsonl_bad_json_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_texts(str(f))


def test_parquet_with_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x y", None, "z"], "n": [1, 2, 3]}), f)
    assert load_texts(str(f), text_column="content") == ["x y", "z"]
    with pytest.raises(DataError) as err:
        load_texts(str(f), text_column="missing")
    assert "'content'" in str(err.value) and "'n'" in str(err.value)


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no text"):
        load_texts(str(empty))
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no text"):
        load_texts(str(empty_jsonl))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported"):
        load_texts(str(other))


def test_hub_spec_offline_is_one_line_data_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # (datasets < 2.19 has no HF_HUB_OFFLINE; it reads HF_DATASETS_OFFLINE, set in conftest)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_texts("hf:cwa-test/definitely-not-a-dataset:train:text")
    msg = str(err.value)
    assert "\n" not in msg and "offline" in msg and "local" in msg
    with pytest.raises(DataError, match="malformed"):
        load_texts("hf:only-a-name")


def test_toy_source_reads_the_file_of_its_role(tmp_path, monkeypatch):
    import cwa.toy

    (tmp_path / "cal.txt").write_text("calibration text\n", encoding="utf-8")
    (tmp_path / "held.txt").write_text("held out text\n", encoding="utf-8")
    files = {"calibration": tmp_path / "cal.txt", "heldout": tmp_path / "held.txt"}
    monkeypatch.setattr(cwa.toy, "toy_data_path", lambda name, **kw: files[name], raising=False)
    assert load_texts("toy") == ["calibration text"]
    assert load_texts("toy", role="heldout") == ["held out text"]
    with pytest.raises(InvalidInput):
        load_texts("toy", role="training")


# -- token blocks ------------------------------------------------------------------------------


def test_token_stream_separates_documents_with_eos():
    stream = token_stream(WordIdTokenizer(), ["t0 t1", "t2", "t3 t4"])
    assert stream.tolist() == [0, 1, -1, 2, -1, 3, 4]


def test_heldout_blocks_never_overlap_calibration():
    tok = WordIdTokenizer()
    docs = numbered_docs(20, 10)  # 200 words + 19 EOS = 219 tokens
    n_tokens = 219
    cut = int(n_tokens * 0.9)  # floor(219 * 0.9) = 197
    stream = token_stream(tok, docs)
    calib = token_blocks(tok, docs, seq_len=8, n_samples=None, seed=0)
    held = token_blocks(tok, docs, seq_len=8, n_samples=None, seed=0, role="heldout")
    # every calibration block comes from stream[:cut], every held-out block from stream[cut:]
    assert torch.equal(calib, stream[: (cut // 8) * 8].view(-1, 8))
    n_held = (n_tokens - cut) // 8
    assert torch.equal(held, stream[cut : cut + n_held * 8].view(-1, 8))
    words = lambda t: {int(v) for v in t.flatten() if v >= 0}  # noqa: E731
    assert not words(calib) & words(held)
    # allow_overlap: both roles read the whole stream
    both = token_blocks(
        tok, docs, seq_len=8, n_samples=None, seed=0, role="heldout", allow_overlap=True
    )
    assert both.shape[0] == n_tokens // 8 and words(both) & words(calib)


def test_sampled_blocks_are_deterministic_and_nested():
    tok = WordIdTokenizer()
    docs = numbered_docs(50, 20)
    a = token_blocks(tok, docs, seq_len=16, n_samples=10, seed=3)
    b = token_blocks(tok, docs, seq_len=16, n_samples=10, seed=3)
    c = token_blocks(tok, docs, seq_len=16, n_samples=10, seed=4)
    small = token_blocks(tok, docs, seq_len=16, n_samples=4, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(small, a[:4])
    assert a.dtype == torch.long and a.shape == (10, 16)
    # distinct blocks, each a non-overlapping aligned block of the calibration part
    starts = sorted(int(row[row >= 0][0]) for row in a)
    assert len(set(starts)) == 10
    all_blocks = token_blocks(tok, docs, seq_len=16, n_samples=None, seed=0)
    assert {tuple(r.tolist()) for r in a} <= {tuple(r.tolist()) for r in all_blocks}


def test_block_errors():
    tok = WordIdTokenizer()
    docs = numbered_docs(2, 10)
    with pytest.raises(DataError, match="n-samples"):
        token_blocks(tok, docs, seq_len=4, n_samples=100, seed=0)
    with pytest.raises(DataError, match="seq-len"):
        token_blocks(tok, docs, seq_len=64, n_samples=None, seed=0)
    with pytest.raises(InvalidInput):
        token_blocks(tok, docs, seq_len=4, n_samples=0, seed=0)
    with pytest.raises(InvalidInput):
        token_blocks(tok, docs, seq_len=4, n_samples=1, seed=0, heldout_fraction=1.0)
    with pytest.raises(DataError):
        token_blocks(tok, [], seq_len=4, n_samples=1, seed=0)


def test_batches_from_blocks():
    blocks = torch.arange(30).view(10, 3)
    batches = batches_from_blocks(blocks, 4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)
    assert all(bool(b["attention_mask"].all()) for b in batches)
    with pytest.raises(InvalidInput):
        batches_from_blocks(blocks, 0)
