"""Toy data files: exact HellaSwag / LAMBADA schemas, sizes, and disjointness of every set."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from cwa.toy import DATA_FILES, toy_data_path
from cwa.toy.language import ACTIVITIES, FEMALE_NAMES, MALE_NAMES, generate_documents
from cwa.toy.recipe import ToyTrainConfig
from cwa.toy.tasks import build_eval_sets, ending_kinds

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELLASWAG_KEYS = [
    "ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
    "split_type", "label",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("toy_data_cache")
    paths = {name: toy_data_path(name, cache_dir=cache) for name in DATA_FILES}
    return {
        "paths": paths,
        "calibration": paths["calibration"].read_text().splitlines(),
        "heldout": paths["heldout"].read_text().splitlines(),
        "hellaswag": [json.loads(x) for x in paths["hellaswag"].read_text().splitlines()],
        "lambada": [json.loads(x) for x in paths["lambada"].read_text().splitlines()],
    }


def _lm_eval_preprocess(text: str) -> str:
    """lm-evaluation-harness hellaswag ``preprocess`` (re-implemented from its definition)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def test_files_exist_with_expected_suffixes_and_sizes(data):
    assert data["paths"]["calibration"].suffix == ".txt"
    assert data["paths"]["hellaswag"].suffix == ".jsonl"
    for name in DATA_FILES:
        assert len(data[name]) >= 500, name
    assert all(line.strip() == line and line for line in data["calibration"] + data["heldout"])


def test_unknown_data_name_is_a_clear_error(tmp_path):
    from cwa.errors import InvalidInput

    with pytest.raises(InvalidInput, match="hellaswag"):
        toy_data_path("wikitext", cache_dir=tmp_path)


def test_hellaswag_schema_matches_the_dataset(data):
    labels = Counter()
    for k, item in enumerate(data["hellaswag"]):
        assert list(item) == HELLASWAG_KEYS
        assert item["ind"] == k and isinstance(item["ind"], int)
        assert isinstance(item["label"], str) and item["label"] in "0123"
        assert item["ctx"] == item["ctx_a"] + " " + item["ctx_b"]
        assert item["split"] == "val" and item["split_type"] == "indomain"
        assert item["source_id"].startswith("toy~")
        assert item["activity_label"] in {a.label for a in ACTIVITIES}
        endings = item["endings"]
        assert isinstance(endings, list) and len(endings) == 4 and len(set(endings)) == 4
        # lm-eval capitalises ctx_b: the rest of it must already be lower case
        assert item["ctx_b"] == item["ctx_b"].lower()
        query = item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize()
        assert _lm_eval_preprocess(query) == query
        assert all(_lm_eval_preprocess(e) == e and e.endswith(".") for e in endings)
        # equal length endings: summed log-likelihood compares like with like
        assert len({len(e.split()) for e in endings}) == 1
        labels[item["label"]] += 1
    n = len(data["hellaswag"])
    assert all(0.15 * n < labels[x] < 0.35 * n for x in "0123"), labels


def test_hellaswag_endings_are_one_right_and_three_wrong_in_distinct_ways(data):
    names = set(FEMALE_NAMES) | set(MALE_NAMES)
    by_label = {a.label: a for a in ACTIVITIES}
    for item in data["hellaswag"]:
        act = by_label[item["activity_label"]]
        verbs_s = {a.verb_s for a in act.actions}
        correct = item["endings"][int(item["label"])]
        words = correct[:-1].split()
        assert words[0] in verbs_s and words[1] == "the"
        # an entity in the correct ending is one the context already introduced
        if words[-2] == "for":
            assert words[-1] in names and words[-1] in item["ctx_a"]
        else:
            assert words[-3] == "with" and words[-1] in act.tools
        kinds = ending_kinds(item)
        assert sorted(kinds) == sorted(
            ["correct", "wrong_entity", "broken_grammar", "wrong_activity"]), item


def test_lambada_schema_and_targets(data):
    workplaces = {a.workplace for a in ACTIVITIES}
    copied = 0
    for item in data["lambada"]:
        assert list(item) == ["text"]
        context, target = item["text"].rsplit(" ", 1)
        assert re.fullmatch(r"[A-Za-z]+", target), item
        if re.search(rf"\b{target}\b", context):
            copied += 1
        else:
            assert target in workplaces
    assert copied / len(data["lambada"]) > 0.7


def _sentence_prefixes(doc: str) -> set[str]:
    """Every sentence-complete beginning of ``doc``, with and without a leading title."""
    out = set()
    bodies = [doc]
    m = re.match(r"^([A-Z][a-z]+(?: [a-z]+)+): (.*)$", doc)
    if m:
        bodies.append(m.group(2))
    for body in bodies:
        for end in [m_.end() for m_ in re.finditer(r"\.(?= |$)", body)]:
            out.add(body[:end])
    return out


def test_no_text_is_shared_between_training_calibration_heldout_and_tasks(data):
    cfg = ToyTrainConfig()
    # the training stream as the real build draws it, at least as many documents: one per
    # row, or for packed rows as many as fit (every story has more than 24 tokens)
    n_packed = sum(cfg.is_packed_step(s) for s in range(cfg.steps))
    n_train = cfg.batch_size * (cfg.steps + n_packed * (cfg.seq_len // 24))
    train = generate_documents("train", n_train, reserved=build_eval_sets().reserved)
    lambada_docs = [d["text"] + "." for d in data["lambada"]]
    doc_sets = {
        "train": train, "calibration": data["calibration"], "heldout": data["heldout"],
        "lambada": lambada_docs,
    }
    bodies = {}
    for name, docs in doc_sets.items():
        assert len(set(docs)) == len(docs), name
        bodies[name] = {re.sub(r"^[A-Z][a-z]+(?: [a-z]+)+: ", "", d) for d in docs}
    names = list(doc_sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not bodies[a] & bodies[b], (a, b)
    contexts = {item["ctx_a"] for item in data["hellaswag"]}
    contexts |= {item["activity_label"] + ": " + item["ctx_a"] for item in data["hellaswag"]}
    for name, docs in doc_sets.items():
        for doc in docs:
            assert not _sentence_prefixes(doc) & contexts, (name, doc)


def test_data_files_are_regenerated_identically(tmp_path, data):
    for name in ("hellaswag", "lambada"):
        again = toy_data_path(name, cache_dir=tmp_path)
        assert again.read_bytes() == data["paths"][name].read_bytes()
