"""The toy language: a deterministic generator of short stories about people at work.

Pure Python (seeded :class:`random.Random`, no global state), so the same seed gives the same
text on every machine. The language is small (a few hundred words) but needs three skills that
the real benchmarks probe:

* local grammar: subject-verb agreement (``she kneads`` / ``they knead``), ``a`` / ``an`` before
  vowels, plural animals (``a goose sleeps`` / ``two geese sleep``), fixed phrase templates;
* long-range copying: a person, keepsake or town introduced early is named again in the final
  word of the story (LAMBADA-style), sometimes with a second person as a distractor, so the
  target is predictable only from the earlier context. The word before a copied keepsake or
  town is a cue reserved for it ("her lucky ...", "will never leave ..."): the class of the
  answer is local, its identity is not. (Without such cues a two-layer model needs several
  times the one-minute budget before it learns to copy; mid-story reminders add practice.)
  The one non-copy ending names the hero's workplace, implied by the activity;
* plausibility: every story is about one activity whose vocabulary (verbs, objects, tools) it
  never leaves, and its people and their pronouns stay consistent (HellaSwag-style endings).

Any change to the lexicon, templates or sampling must bump :data:`GENERATOR_VERSION`: the
cached toy model and task files are keyed by it and rebuilt when it changes (and, as a safety
net, when :func:`generator_fingerprint` changes).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

# Re-exported: the task builders and the tests import the lexicon from here.
from cwa.toy.lexicon import (  # noqa: F401
    ACTIVITIES,
    ANIMAL_VERBS,
    ANIMALS,
    COLORS,
    FEMALE_NAMES,
    KEEPSAKES,
    MALE_NAMES,
    TOWNS,
    Action,
    Activity,
    _cap,
    article,
)

GENERATOR_VERSION = 1

# Seeds of the independent text streams. Training text and every evaluation set come from
# different streams; on top of that, evaluation passages are reserved and the training stream
# skips any story that would repeat one (see ``reserved_keys``).
STREAM_SEEDS: dict[str, int] = {
    "train": 1_000,
    "calibration": 2_000,
    "heldout": 3_000,
    "hellaswag": 4_000,
    "lambada": 5_000,
}




@dataclass(frozen=True)
class Person:
    name: str
    female: bool

    @property
    def pron(self) -> str:
        return "she" if self.female else "he"

    @property
    def pos(self) -> str:
        return "her" if self.female else "his"


@dataclass
class Step:
    """A structured activity step, kept so a HellaSwag item can cut it after the subject."""

    lead: str  # connective + subject, sentence-initial, e.g. "Then the baker"
    plural: bool
    action: Action
    tail_kind: str  # "none" | "tool" | "for"
    tail_word: str  # the tool or the beneficiary's name ("" when none)
    subject_kind: str  # "pron" | "profession" | "name" | "plural"

    def rest(self, verb_form: str | None = None, possessive: str = "") -> str:
        """The sentence after ``lead``: ``kneads the dough with her spatula.``."""
        verb = verb_form or (self.action.verb_base if self.plural else self.action.verb_s)
        words = [verb, "the", self.action.obj]
        if self.tail_kind == "tool":
            words += ["with", possessive, self.tail_word]
        elif self.tail_kind == "for":
            words += ["for", self.tail_word]
        return " ".join(words) + "."


@dataclass
class Story:
    """One document: an optional title, then sentences; ``text`` renders it."""

    activity: Activity
    hero: Person
    friend: Person | None
    town: str
    keepsake: str | None
    title: bool
    sentences: list[str] = field(default_factory=list)
    # index in ``sentences`` -> structured step (for HellaSwag cuts)
    steps: dict[int, tuple[Step, str]] = field(default_factory=dict)
    ending_kind: str = ""

    @property
    def text(self) -> str:
        body = " ".join(self.sentences)
        return f"{self.activity.label}: {body}" if self.title else body

    def prefixes(self) -> Iterator[str]:
        """Texts of the story cut after each sentence, with and without the title."""
        for i in range(1, len(self.sentences) + 1):
            body = " ".join(self.sentences[:i])
            yield body
            yield f"{self.activity.label}: {body}"


def _people(rng: random.Random, n: int) -> list[Person]:
    pool = [Person(n_, True) for n_ in FEMALE_NAMES] + [Person(n_, False) for n_ in MALE_NAMES]
    return rng.sample(pool, n)


def _intro(rng: random.Random, s: Story) -> str:
    a = f"{article(s.activity.profession)} {s.activity.profession}"
    form = rng.randrange(3)
    if form == 0:
        return f"{s.hero.name} is {a} in {s.town}."
    if form == 1:
        return f"{s.hero.name} works as {a} in {s.town}."
    return f"In {s.town}, {s.hero.name} works as {a}."


def _keepsake_sentence(rng: random.Random, s: Story) -> str:
    assert s.keepsake is not None
    color = rng.choice(COLORS)
    verb = rng.choice(("has", "always carries", "keeps"))
    return f"{_cap(s.hero.pron)} {verb} {article(color)} {color} {s.keepsake}."


def _friend_sentence(rng: random.Random, s: Story) -> str:
    assert s.friend is not None
    if rng.random() < 0.5:
        return f"{_cap(s.hero.pos)} friend {s.friend.name} often visits the {s.activity.workplace}."
    return f"One day, {s.friend.name} comes to the {s.activity.workplace}."


def _animal_sentence(rng: random.Random) -> str:
    singular, plural = rng.choice(ANIMALS)
    verb_s, verb_base = rng.choice(ANIMAL_VERBS)
    if rng.random() < 0.5:
        det = rng.choice(("a", "the"))
        det = article(singular) if det == "a" else det
        return f"Outside, {det} {singular} {verb_s}."
    det = rng.choice(("the", "two", "three"))
    return f"Outside, {det} {plural} {verb_base}."


def _reminder_sentence(rng: random.Random, s: Story) -> str:
    """A mid-story mention of the keepsake or the town (more long-range copies to learn from)."""
    h = s.hero
    if s.keepsake is not None and rng.random() < 0.6:
        if rng.random() < 0.5:
            return f"Sometimes, {h.pron} looks at {h.pos} lucky {s.keepsake}."
        return f"{_cap(h.pron)} keeps {h.pos} lucky {s.keepsake} in the {s.activity.workplace}."
    if rng.random() < 0.5:
        return f"{_cap(h.pron)} loves {s.town}."
    return f"{_cap(h.pron)} praises {s.town}."


def _step(rng: random.Random, s: Story, action: Action, first: bool) -> Step:
    if first and rng.random() < 0.6:
        conn = "First,"
    else:
        conn = rng.choice(("Then", "After that,", "Next,"))
    plural = s.friend is not None and rng.random() < 0.2
    if plural:
        assert s.friend is not None
        subject_kind = "plural"
        subject = rng.choice(("they", f"{s.hero.name} and {s.friend.name}"))
    else:
        r = rng.random()
        subject_kind = "pron" if r < 0.5 else ("profession" if r < 0.8 else "name")
        subject = {
            "pron": s.hero.pron,
            "profession": f"the {s.activity.profession}",
            "name": s.hero.name,
        }[subject_kind]
    r = rng.random()
    if r < 0.4:
        tail_kind, tail_word = "none", ""
    elif r < 0.75 or s.friend is None or plural:
        tail_kind, tail_word = "tool", rng.choice(s.activity.tools)
    else:
        tail_kind, tail_word = "for", s.friend.name
    return Step(f"{conn} {subject}", plural, action, tail_kind, tail_word, subject_kind)


def _possessive(step: Step, hero: Person) -> str:
    return "their" if step.plural else hero.pos


def _ending(rng: random.Random, s: Story) -> tuple[str, str]:
    """The final sentence; its last word is recoverable only from the earlier context."""
    kinds = ["workplace", "town"]
    if s.keepsake is not None:
        kinds += ["keepsake", "keepsake"]
    kinds += ["friend", "friend"] if s.friend is not None else ["name"]
    kind = rng.choice(kinds)
    h = s.hero
    if kind == "keepsake":
        if rng.random() < 0.5:
            return kind, f"At night, {h.pron} looks at {h.pos} lucky {s.keepsake}."
        return kind, f"{_cap(h.pron)} never goes anywhere without {h.pos} lucky {s.keepsake}."
    if kind == "town":
        if rng.random() < 0.5:
            return kind, f"{_cap(h.pron)} will never leave {s.town}."
        return kind, f"{_cap(h.pron)} will always remember {s.town}."
    if kind == "name":
        return kind, f"Everyone in {s.town} knows {h.name}."
    if kind == "friend":
        assert s.friend is not None
        if rng.random() < 0.5:
            return kind, f"In the evening, {s.friend.name} thanks {h.name}."
        return kind, f"At last, {h.name} waves goodbye to {s.friend.name}."
    if rng.random() < 0.5:
        return kind, f"At last, {h.pron} closes the {s.activity.workplace}."
    return kind, f"Later, {h.pron} sweeps the {s.activity.workplace}."


def generate_story(rng: random.Random) -> Story:
    """Draw one story from ``rng`` (the only source of randomness)."""
    activity = rng.choice(ACTIVITIES)
    has_friend = rng.random() < 0.5
    people = _people(rng, 2 if has_friend else 1)
    s = Story(
        activity=activity,
        hero=people[0],
        friend=people[1] if has_friend else None,
        town=rng.choice(TOWNS),
        keepsake=rng.choice(KEEPSAKES) if rng.random() < 0.75 else None,
        title=rng.random() < 0.5,
    )
    s.sentences.append(_intro(rng, s))
    if s.keepsake is not None:
        s.sentences.append(_keepsake_sentence(rng, s))
    if s.friend is not None:
        s.sentences.append(_friend_sentence(rng, s))
    n_steps = rng.randint(2, 4)
    actions = rng.sample(activity.actions, n_steps)
    animal_at = rng.randrange(n_steps + 1) if rng.random() < 0.4 else -1
    reminder_at = rng.randrange(n_steps + 1) if rng.random() < 0.6 else -1
    for i, action in enumerate(actions):
        if i == animal_at:
            s.sentences.append(_animal_sentence(rng))
        if i == reminder_at:
            s.sentences.append(_reminder_sentence(rng, s))
        step = _step(rng, s, action, first=i == 0)
        pos = _possessive(step, s.hero)
        s.steps[len(s.sentences)] = (step, pos)
        s.sentences.append(f"{step.lead} {step.rest(possessive=pos)}")
    if animal_at == n_steps:
        s.sentences.append(_animal_sentence(rng))
    if reminder_at == n_steps:
        s.sentences.append(_reminder_sentence(rng, s))
    s.ending_kind, ending = _ending(rng, s)
    s.sentences.append(ending)
    return s


def stream_rng(stream: str, offset: int = 0) -> random.Random:
    """The seeded generator of one named text stream (``STREAM_SEEDS``)."""
    return random.Random(STREAM_SEEDS[stream] * 1_000_003 + GENERATOR_VERSION * 7919 + offset)


def lexicon() -> tuple[list[str], list[str]]:
    """Every word the generator can emit, without punctuation, for the tokenizer.

    Returns ``(inner, initial)``: words that can follow a space (lower-case words and proper
    nouns) and words that can also start a document or a sentence (capitalised).
    """
    words: set[str] = {
        "is", "in", "works", "as", "a", "an", "has", "always", "carries", "keeps", "friend",
        "often", "visits", "the", "day", "comes", "to", "two", "three", "then", "after", "that",
        "they", "and", "with", "their", "for", "at", "night", "looks", "never", "goes",
        "anywhere", "without", "will", "leave", "knows", "evening",
        "thanks", "last", "waves", "goodbye", "closes", "sweeps", "she", "he", "her", "his",
        "sometimes", "loves", "praises", "lucky", "remember",
    }
    for act in ACTIVITIES:
        words |= set(act.label.lower().split()) | {act.profession, act.workplace, *act.tools}
        words |= {w for a in act.actions for w in (a.verb_s, a.verb_base, a.obj)}
    words |= set(KEEPSAKES) | set(COLORS) | {w for pair in ANIMALS for w in pair}
    words |= {w for pair in ANIMAL_VERBS for w in pair}
    proper = set(FEMALE_NAMES) | set(MALE_NAMES) | set(TOWNS)
    starters = {
        "She", "He", "Her", "His", "In", "One", "Outside", "First", "Then", "After", "Next",
        "At", "Everyone", "Later", "Sometimes",
    } | {act.label.split()[0] for act in ACTIVITIES}
    return sorted(words | proper), sorted(starters | proper)


@functools.lru_cache(maxsize=1)
def generator_fingerprint() -> str:
    """A short hash of the lexicon and of sample output, stored with every cached build.

    A cache whose fingerprint differs is rebuilt even if someone changed the generator and
    forgot to bump :data:`GENERATOR_VERSION`.
    """
    import hashlib

    inner, initial = lexicon()
    sample = generate_documents("train", 64)
    payload = "\n".join([str(GENERATOR_VERSION), *inner, "|", *initial, "|", *sample])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def story_keys(story: Story) -> set[str]:
    """The texts that reserve a whole story: its body with and without the title."""
    body = " ".join(story.sentences)
    return {body, f"{story.activity.label}: {body}"}


def iter_stories(stream: str, reserved: set[str] | frozenset[str] = frozenset()) -> Iterator[Story]:
    """Distinct stories of ``stream`` that touch no reserved text, forever.

    ``reserved`` holds texts of other sets (whole stories, or sentence-complete beginnings of
    HellaSwag contexts); a story whose text or any sentence-complete beginning of it (with or
    without the title) is reserved is skipped, so no evaluation passage repeats elsewhere.
    """
    rng = stream_rng(stream)
    seen: set[str] = set()
    while True:
        story = generate_story(rng)
        text = story.text
        if text in seen:
            continue
        if reserved and any(p in reserved for p in story.prefixes()):
            continue
        seen.add(text)
        yield story


def generate_documents(
    stream: str, n: int, *, reserved: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """The first ``n`` distinct story texts of ``stream`` that avoid ``reserved``."""
    out: list[str] = []
    if n <= 0:
        return out
    for story in iter_stories(stream, reserved):
        out.append(story.text)
        if len(out) == n:
            break
    return out
