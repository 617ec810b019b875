"""The toy language generator and tokenizer: determinism, grammar, copying, tokenization."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from cwa.toy.language import (
    ACTIVITIES,
    ANIMALS,
    FEMALE_NAMES,
    GENERATOR_VERSION,
    MALE_NAMES,
    TOWNS,
    generate_documents,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = generate_documents("train", 3000)
CONNECTIVES = ("First, ", "Then ", "After that, ", "Next, ")
PLURAL_ANIMALS = {p for _, p in ANIMALS}
SINGULAR_ANIMALS = {s for s, _ in ANIMALS}


def _sentences(doc: str) -> list[str]:
    body = doc.split(": ", 1)[1] if re.match(r"^[A-Z][a-z]+ [a-z ]+: ", doc) else doc
    return [s + "." for s in body[:-1].split(". ")]


def test_generator_is_deterministic_and_hash_seed_independent():
    assert generate_documents("train", 300) == DOCS[:300]
    digest = hashlib.sha256("\n".join(DOCS[:300]).encode()).hexdigest()
    code = (
        "import hashlib; from cwa.toy.language import generate_documents as g; "
        "print(hashlib.sha256('\\n'.join(g('train', 300)).encode()).hexdigest())"
    )
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == digest
    assert isinstance(GENERATOR_VERSION, int)


def test_streams_differ_and_documents_are_distinct():
    calibration = generate_documents("calibration", 3000)
    assert len(set(DOCS)) == len(DOCS)
    assert not set(DOCS) & set(calibration)


def test_vocabulary_is_a_few_hundred_words_and_documents_a_few_sentences():
    words = {w.strip(".,:") for d in DOCS for w in d.split()}
    assert 250 <= len(words) <= 1000
    n_sentences = [len(_sentences(d)) for d in DOCS]
    assert 4 <= sum(n_sentences) / len(n_sentences) <= 10
    assert min(n_sentences) >= 3


def test_article_agrees_with_next_word():
    pairs = re.findall(r"\b([Aa]n?) (\w+)", " ".join(DOCS))
    assert len(pairs) > 1000
    for det, word in pairs:
        assert (det.lower() == "an") == (word[0].lower() in "aeiou"), (det, word)


def test_subject_verb_agreement():
    checked = {"singular": 0, "plural": 0}
    for doc in DOCS:
        for sentence in _sentences(doc):
            words = sentence[:-1].replace(",", "").split()
            if sentence.startswith("Outside, "):
                noun, verb = words[2], words[3]
                plural = noun in PLURAL_ANIMALS
                assert plural or noun in SINGULAR_ANIMALS
            elif sentence.startswith(CONNECTIVES):
                rest = words[2:] if words[0] == "After" else words[1:]
                if rest[0] == "the":
                    plural, verb = False, rest[2]
                elif len(rest) > 2 and rest[1] == "and":
                    plural, verb = True, rest[3]
                else:
                    plural, verb = rest[0] == "they", rest[1]
            else:
                continue
            checked["plural" if plural else "singular"] += 1
            # every base form in the lexicon lacks the final "s" its 3rd-person form has
            assert verb.endswith("s") != plural, sentence
    assert checked["singular"] > 1000 and checked["plural"] > 100


def test_pronouns_agree_with_the_hero():
    names = set(FEMALE_NAMES) | set(MALE_NAMES)
    for doc in DOCS:
        words = re.findall(r"[A-Za-z]+", doc)
        hero = next(w for w in words if w in names)
        pronouns = {w.lower() for w in words if w.lower() in ("she", "he", "her", "his")}
        expected = {"she", "her"} if hero in FEMALE_NAMES else {"he", "his"}
        assert pronouns <= expected, doc


def test_each_story_keeps_to_one_activity():
    owner = {}
    for act in ACTIVITIES:
        for a in act.actions:
            owner[a.verb_s] = owner[a.obj] = act.label
    for doc in DOCS:
        labels = {owner[w] for w in re.findall(r"[a-z]+", doc) if w in owner}
        assert len(labels) == 1, doc


def test_final_word_is_recoverable_from_the_context():
    """LAMBADA property: the last word names something introduced earlier in the story."""
    workplaces = {a.workplace for a in ACTIVITIES}
    copied = 0
    for doc in DOCS:
        head, last = doc[:-1].rsplit(" ", 1)
        if re.search(rf"\b{last}\b", head):
            copied += 1
        else:
            # the one non-copy ending: the hero's workplace, implied by the activity
            assert last in workplaces, doc
            label = next(a for a in ACTIVITIES if a.workplace == last)
            assert label.profession in head
    assert copied / len(DOCS) > 0.7
    towns_last = sum(d[:-1].rsplit(" ", 1)[1] in TOWNS for d in DOCS)
    assert towns_last > 200


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from cwa.toy.tokenizer import save_toy_tokenizer

    folder = tmp_path_factory.mktemp("toy_tok")
    save_toy_tokenizer(folder, 128)
    return AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_loads_offline_with_special_tokens(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 128
    assert 500 < len(tokenizer) < 1500


def test_every_toy_word_is_one_token_with_a_leading_space(tokenizer):
    words = {w for d in DOCS for w in re.findall(r"[A-Za-z]+", d)}
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        assert tokenizer.convert_ids_to_tokens(ids) == ["Ġ" + word]
    ids = tokenizer("Mira", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Mira"]


def test_tokenizer_round_trips_toy_text_and_any_text(tokenizer):
    enc = tokenizer(DOCS[:500], add_special_tokens=False)["input_ids"]
    for ids, doc in zip(enc, DOCS[:500], strict=True):
        assert tokenizer.decode(ids) == doc
        # one token per word and one per punctuation mark
        assert len(ids) == len(re.findall(r"[A-Za-z]+|[.,:]", doc))
    odd = "Ünïcode — 42 tabs\tand\nnewlines! 日本"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_tokenizer_files_are_reproducible(tmp_path):
    from cwa.toy.tokenizer import save_toy_tokenizer

    save_toy_tokenizer(tmp_path / "a", 128)
    save_toy_tokenizer(tmp_path / "b", 128)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
