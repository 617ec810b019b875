"""The toy language's lexicon: activities, names, keepsakes, towns and animals.

Kept apart from the generator (:mod:`cwa.toy.language`) so that the grammar reads without the
word lists. Every content word belongs to exactly one activity; :func:`_check_lexicon` verifies
that at import. Changing anything here changes the generated text: bump
:data:`cwa.toy.language.GENERATOR_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One step of an activity: ``<subject> <verb> the <obj>``."""

    verb_s: str  # third person singular ("kneads")
    verb_base: str  # plural / base form ("knead")
    obj: str


@dataclass(frozen=True)
class Activity:
    label: str  # HellaSwag-style activity label, also used as an optional story title
    profession: str
    workplace: str
    actions: tuple[Action, ...]
    tools: tuple[str, ...]


def _acts(*triples: tuple[str, str, str]) -> tuple[Action, ...]:
    return tuple(Action(*t) for t in triples)


# Every content word belongs to exactly one activity (checked in ``_check_lexicon``) so that an
# ending borrowed from another activity is recognisably out of place.
ACTIVITIES: tuple[Activity, ...] = (
    Activity("Baking bread", "baker", "bakery", _acts(
        ("kneads", "knead", "dough"), ("heats", "heat", "oven"), ("slices", "slice", "loaf"),
        ("sifts", "sift", "flour"), ("shapes", "shape", "rolls")), ("spatula", "whisk")),
    Activity("Fixing a bicycle", "mechanic", "garage", _acts(
        ("tightens", "tighten", "bolt"), ("oils", "oil", "chain"), ("pumps", "pump", "tire"),
        ("adjusts", "adjust", "brake"), ("replaces", "replace", "spoke")), ("wrench", "pliers")),
    Activity("Painting a fence", "painter", "yard", _acts(
        ("stirs", "stir", "paint"), ("sands", "sand", "board"), ("coats", "coat", "fence"),
        ("primes", "prime", "post"), ("tapes", "tape", "edge")), ("roller", "tray")),
    Activity("Catching fish", "angler", "pier", _acts(
        ("baits", "bait", "hook"), ("casts", "cast", "line"), ("mends", "mend", "net"),
        ("guts", "gut", "fish"), ("ties", "tie", "lure")), ("rod", "bucket")),
    Activity("Playing the violin", "violinist", "hall", _acts(
        ("tunes", "tune", "string"), ("rosins", "rosin", "bow"), ("plays", "play", "melody"),
        ("practices", "practice", "scale"), ("lifts", "lift", "violin")),
        ("metronome", "stand")),
    Activity("Planting a garden", "gardener", "garden", _acts(
        ("digs", "dig", "soil"), ("plants", "plant", "seed"), ("waters", "water", "sprout"),
        ("pulls", "pull", "weed"), ("trims", "trim", "hedge")), ("shovel", "hose")),
    Activity("Washing a car", "driver", "driveway", _acts(
        ("soaps", "soap", "hood"), ("rinses", "rinse", "bumper"), ("polishes", "polish", "mirror"),
        ("vacuums", "vacuum", "seat"), ("dries", "dry", "trunk")), ("towel", "cloth")),
    Activity("Cooking soup", "cook", "kitchen", _acts(
        ("chops", "chop", "onion"), ("boils", "boil", "pasta"), ("peels", "peel", "carrot"),
        ("seasons", "season", "broth"), ("tastes", "taste", "stew")), ("ladle", "pan")),
    Activity("Building a shelf", "carpenter", "workshop", _acts(
        ("measures", "measure", "plank"), ("saws", "saw", "timber"), ("drills", "drill", "hole"),
        ("glues", "glue", "joint"), ("varnishes", "varnish", "shelf")), ("hammer", "chisel")),
    Activity("Knitting a scarf", "knitter", "cottage", _acts(
        ("knits", "knit", "row"), ("purls", "purl", "stitch"), ("winds", "wind", "yarn"),
        ("threads", "thread", "needle"), ("folds", "fold", "scarf")), ("bobbin", "basket")),
    Activity("Teaching a class", "teacher", "school", _acts(
        ("grades", "grade", "essay"), ("writes", "write", "lesson"), ("reads", "read", "poem"),
        ("collects", "collect", "homework"), ("answers", "answer", "question")),
        ("chalk", "pointer")),
    Activity("Grooming a horse", "rider", "stable", _acts(
        ("brushes", "brush", "mane"), ("combs", "comb", "tail"), ("feeds", "feed", "horse"),
        ("picks", "pick", "hoof"), ("saddles", "saddle", "pony")), ("currycomb", "bridle")),
    Activity("Repairing a roof", "roofer", "attic", _acts(
        ("lays", "lay", "shingle"), ("seals", "seal", "gap"), ("fits", "fit", "tile"),
        ("patches", "patch", "leak"), ("clears", "clear", "gutter")), ("ladder", "harness")),
    Activity("Making pottery", "potter", "studio", _acts(
        ("wedges", "wedge", "clay"), ("spins", "spin", "wheel"), ("glazes", "glaze", "vase"),
        ("fires", "fire", "kiln"), ("smooths", "smooth", "bowl")), ("wire", "sponge")),
    Activity("Climbing a mountain", "climber", "camp", _acts(
        ("packs", "pack", "tent"), ("checks", "check", "anchor"), ("coils", "coil", "rope"),
        ("clips", "clip", "carabiner"), ("fills", "fill", "canteen")), ("axe", "helmet")),
    Activity("Sailing a boat", "sailor", "harbor", _acts(
        ("hoists", "hoist", "sail"), ("steers", "steer", "rudder"), ("scrubs", "scrub", "deck"),
        ("raises", "raise", "mast"), ("lowers", "lower", "keel")), ("compass", "chart")),
)

FEMALE_NAMES = (
    "Mira", "Lena", "Anya", "Clara", "Nora", "Ida", "Vera", "Rosa", "Elsa", "Greta", "Hanna",
    "Iris", "Jana", "Kira", "Lotte", "Maya", "Nina", "Olga", "Petra", "Rita", "Sara", "Tara",
    "Una", "Wanda",
)
MALE_NAMES = (
    "Tomas", "Ivo", "Marek", "Anton", "Bruno", "Carl", "Dario", "Emil", "Felix", "Gustav",
    "Hugo", "Igor", "Jonas", "Karl", "Leo", "Milan", "Niko", "Oskar", "Pavel", "Rudi",
    "Stefan", "Theo", "Viktor", "Yuri",
)
KEEPSAKES = (
    "lantern", "locket", "whistle", "medal", "ribbon", "feather", "pebble", "bracelet",
    "notebook", "umbrella", "marble", "kite", "harmonica", "thimble", "coin", "seashell",
)
COLORS = (
    "red", "blue", "green", "orange", "amber", "ivory", "silver", "golden", "yellow", "purple",
)
TOWNS = (
    "Dunmore", "Ashford", "Belcastle", "Corrin", "Elmbury", "Fenwick", "Glenrow", "Harlow",
    "Larkspur", "Millbrook", "Oakridge", "Redwater",
)
# (singular, plural)
ANIMALS = (
    ("cat", "cats"), ("dog", "dogs"), ("owl", "owls"), ("goose", "geese"), ("crow", "crows"),
    ("fox", "foxes"), ("mouse", "mice"), ("eagle", "eagles"), ("ox", "oxen"), ("lamb", "lambs"),
)
# (third person singular, base)
ANIMAL_VERBS = (
    ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"), ("runs", "run"),
    ("hides", "hide"), ("rests", "rest"), ("calls", "call"), ("wanders", "wander"),
)


def article(word: str) -> str:
    """``a`` or ``an`` by the first letter (the lexicon avoids the exceptions of English)."""
    return "an" if word[0].lower() in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_lexicon() -> None:
    owners: dict[str, str] = {}
    for act in ACTIVITIES:
        words = {act.profession, act.workplace, *act.tools}
        words |= {w for a in act.actions for w in (a.verb_s, a.verb_base, a.obj)}
        words |= set(act.label.lower().split()) - {"a", "the"}
        for w in words:
            if w in owners and owners[w] != act.label:
                raise AssertionError(f"toy lexicon: {w!r} in {owners[w]!r} and {act.label!r}")
            owners[w] = act.label
    assert not set(KEEPSAKES) & set(owners), "toy lexicon: keepsake reused by an activity"
    assert not set(FEMALE_NAMES) & set(MALE_NAMES)


_check_lexicon()
