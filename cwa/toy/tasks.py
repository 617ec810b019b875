"""Toy evaluation sets: LAMBADA and HellaSwag items, calibration and held-out documents.

Every set comes from its own seeded stream of the toy language, and the sets are made
disjoint by construction: each accepted story reserves its text (and a HellaSwag item its
context), later sets skip stories that repeat or start with a reserved text, and the training
stream skips all of them. The items follow the real datasets' schemas exactly:

* LAMBADA (OpenAI version): ``{"text": ...}``; the target is the last space-separated word,
  recoverable only from the earlier context (a person, keepsake, town or workplace named
  before). lm-eval scores ``" " + last word`` after ``text.rsplit(" ", 1)[0]``.
* HellaSwag (``Rowan/hellaswag``): ``ind, activity_label, ctx_a, ctx_b, ctx, endings,
  source_id, split, split_type, label`` with ``label`` a string digit, ``ctx == ctx_a + " " +
  ctx_b``, ``ctx_b`` lower-case (lm-eval capitalises it). Of the four endings, one continues
  the story; the others break it in one way each: a wrong entity (a stranger's name or the
  wrong possessive pronoun), broken grammar (verb agreement or word order) or vocabulary of
  another activity. All four have the same number of words and tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from cwa.toy.language import (
    ACTIVITIES,
    FEMALE_NAMES,
    MALE_NAMES,
    Step,
    Story,
    iter_stories,
    story_keys,
    stream_rng,
)

N_LAMBADA = 1000
N_HELLASWAG = 1000
N_HELDOUT = 1000
N_CALIBRATION = 2000

HELLASWAG_FIELDS = (
    "ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
    "split_type", "label",
)
ENDING_KINDS = ("correct", "wrong_entity", "broken_grammar", "wrong_activity")


@dataclass
class ToyEvalSets:
    lambada: list[dict]
    hellaswag: list[dict]
    heldout: list[str]
    calibration: list[str]
    # texts the training stream must avoid (whole stories and HellaSwag contexts)
    reserved: frozenset[str]


def _with_title(story: Story, body: str) -> set[str]:
    return {body, f"{story.activity.label}: {body}"}


def _hellaswag_endings(story: Story, step: Step, pos: str, rng: random.Random) -> list[str]:
    """[correct, wrong entity, broken grammar, wrong activity] continuations of ``step``."""
    correct = step.rest(possessive=pos)
    if step.tail_kind == "tool":
        wrong_entity = step.rest(possessive="his" if pos == "her" else "her")
    else:
        present = {story.hero.name} | ({story.friend.name} if story.friend else set())
        stranger = rng.choice([n for n in FEMALE_NAMES + MALE_NAMES if n not in present])
        wrong_entity = replace(step, tail_word=stranger).rest(possessive=pos)
    if rng.random() < 0.5:
        broken = step.rest(verb_form=step.action.verb_base, possessive=pos)
    else:  # "kneads the dough ..." -> "kneads dough the ..."
        words = correct.split(" ")
        words[1], words[2] = words[2], words[1]
        broken = " ".join(words)
    other = rng.choice([a for a in ACTIVITIES if a is not story.activity])
    tail = rng.choice(other.tools) if step.tail_kind == "tool" else step.tail_word
    wrong_activity = replace(step, action=rng.choice(other.actions), tail_word=tail).rest(
        possessive=pos
    )
    return [correct, wrong_entity, broken, wrong_activity]


def _hellaswag_cut(story: Story, rng: random.Random) -> tuple[int, Step, str] | None:
    """A step whose subject survives ``str.capitalize`` and that has an entity in its tail."""
    eligible = [
        (i, step, pos)
        for i, (step, pos) in sorted(story.steps.items())
        if step.tail_kind != "none" and step.subject_kind in ("pron", "profession")
    ]
    return rng.choice(eligible) if eligible else None


def build_eval_sets(
    n_lambada: int = N_LAMBADA,
    n_hellaswag: int = N_HELLASWAG,
    n_heldout: int = N_HELDOUT,
    n_calibration: int = N_CALIBRATION,
) -> ToyEvalSets:
    """Generate all evaluation sets (deterministic; about a second)."""
    reserved: set[str] = set()  # whole stories and HellaSwag contexts (as texts)
    taken_prefixes: set[str] = set()  # every sentence-complete beginning of an accepted story

    def accept(story: Story) -> None:
        reserved.update(story_keys(story))
        taken_prefixes.update(story.prefixes())

    lambada: list[dict] = []
    for story in iter_stories("lambada", frozenset()):
        if len(lambada) == n_lambada:
            break
        accept(story)
        assert story.text.endswith(".")
        lambada.append({"text": story.text[:-1]})

    hellaswag: list[dict] = []
    item_rng = stream_rng("hellaswag", offset=1)  # choices about items, apart from the stories
    for k, story in enumerate(iter_stories("hellaswag", frozenset(reserved))):
        if len(hellaswag) == n_hellaswag:
            break
        cut = _hellaswag_cut(story, item_rng)
        if cut is None:
            continue
        i, step, pos = cut
        ctx_a = " ".join(story.sentences[:i])
        if any(p in taken_prefixes or p in reserved for p in story.prefixes()):
            continue
        if _with_title(story, ctx_a) & taken_prefixes:
            continue
        endings = _hellaswag_endings(story, step, pos, item_rng)
        if len(set(endings)) != 4:
            continue
        order = list(range(4))
        item_rng.shuffle(order)
        ctx_b = step.lead[0].lower() + step.lead[1:]
        hellaswag.append({
            "ind": len(hellaswag),
            "activity_label": story.activity.label,
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}",
            "endings": [endings[j] for j in order],
            "source_id": f"toy~story-{k}",
            "split": "val",
            "split_type": "indomain",
            "label": str(order.index(0)),
        })
        accept(story)
        reserved.update(_with_title(story, ctx_a))

    def documents(stream: str, n: int) -> list[str]:
        out: list[str] = []
        for story in iter_stories(stream, frozenset(reserved)):
            if len(out) == n:
                break
            out.append(story.text)
            accept(story)
        return out

    heldout = documents("heldout", n_heldout)
    calibration = documents("calibration", n_calibration)
    return ToyEvalSets(lambada, hellaswag, heldout, calibration, frozenset(reserved))


def ending_kinds(item: dict) -> list[str]:
    """Which of ``ENDING_KINDS`` each ending of a toy HellaSwag item is (for diagnostics).

    Recomputed from the text: the correct ending is ``label``; the others are told apart by
    how they differ from it.
    """
    correct = item["endings"][int(item["label"])]
    kinds = []
    for ending in item["endings"]:
        if ending == correct:
            kinds.append("correct")
            continue
        a, b = correct.split(" "), ending.split(" ")
        diff = [j for j in range(len(a)) if a[j] != b[j]]
        if sorted(a) == sorted(b) or diff == [0]:
            kinds.append("broken_grammar")
        elif len(diff) == 1:
            kinds.append("wrong_entity")
        else:
            kinds.append("wrong_activity")
    return kinds
