"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning") over the 80 COCO
categories.

A caption mentions a category when one of its words or phrases is the category's name, one of
its `SYNONYMS` or a plural of either. Per set of captions, CHAIR_s is the fraction of captions
that mention at least one object missing from the image's ground truth, CHAIR_i the fraction of
mentioned objects that are missing; both are fractions in [0, 1], 0.0 when nothing is counted.

Choices that may make numbers differ slightly from the original ``chair.py``:

- `SYNONYMS` is mmlens' own rendering of the paper's synonym list: misspellings, brand names and
  a few ambiguous words ("bow", "container", "liner", "turkey") are left out, and a few plain
  words are added ("mug", "surfer", "umpire", "eagle", ...); rare words may differ.
- No lemmatiser is used: plurals are generated from the tables (the last word of a phrase takes
  "-s", "-es" or "-ies"; irregular ones such as "men", "children" and "knives" come from a
  table), so "two dogs" mentions a dog but a misspelt or unusual plural is missed.
- Words are the runs of letters of the lower-cased caption; the longest phrase wins, so "hot dog"
  is a hot dog and not a dog, and the phrases of `PHRASE_OVERRIDES` ("baby elephant",
  "passenger train", "toilet seat", "train tracks") stop their words from counting on their own.
- Each category counts once per caption (CHAIR_i counts distinct mentioned categories).
- Words are taken literally, as in the original: "an orange cat" mentions an orange.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# The 80 COCO detection categories (2017 names), in COCO's order.
COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Other words for each category (singular; plurals are generated). The category name itself
# always counts and is not repeated here.
# fmt: off
SYNONYMS: dict[str, list[str]] = {
    "person": [
        "man", "woman", "boy", "girl", "child", "kid", "people", "adult", "baby", "toddler",
        "teenager", "lady", "guy", "gentleman", "male", "female", "mother", "father", "mom", "dad",
        "son", "daughter", "brother", "sister", "bride", "groom", "player", "rider", "skier",
        "snowboarder", "skateboarder", "skater", "surfer", "pitcher", "batter", "catcher", "umpire",
        "chef", "cook", "baker", "worker", "passenger", "driver", "biker", "bicyclist", "cyclist",
        "pedestrian", "tourist", "traveler", "student", "policeman", "cop", "officer", "soldier",
        "doctor", "nurse", "cowboy",
    ],
    "bicycle": ["bike", "unicycle", "minibike", "trike", "tricycle"],
    "car": [
        "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "taxi", "taxicab",
        "jeep", "coupe", "limo", "limousine",
    ],
    "motorcycle": ["motorbike", "motor bike", "motor cycle", "dirt bike", "scooter", "moped"],
    "airplane": [
        "plane", "air plane", "aircraft", "airliner", "jet", "jetliner", "biplane", "monoplane",
        "seaplane",
    ],
    "bus": ["minibus", "trolley"],
    "train": ["locomotive", "tram", "tramway", "caboose"],
    "truck": ["pickup", "lorry", "hauler", "firetruck"],
    "boat": [
        "ship", "sailboat", "motorboat", "powerboat", "speedboat", "dinghy", "canoe", "kayak",
        "skiff", "yacht", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler",
        "ferry", "ferryboat", "watercraft", "tugboat", "schooner", "barge", "paddleboat",
        "lifeboat", "freighter", "steamboat", "riverboat", "battleship", "steamship",
    ],
    "traffic light": ["traffic signal", "stop light", "stoplight", "street light", "streetlight"],
    "fire hydrant": ["hydrant"],
    "stop sign": [],
    "parking meter": ["meter"],
    "bench": ["pew"],
    "bird": [
        "ostrich", "owl", "seagull", "gull", "goose", "duck", "mallard", "parakeet", "parrot",
        "falcon", "hawk", "eagle", "robin", "pelican", "heron", "egret", "hummingbird", "finch",
        "pigeon", "sparrow", "seabird", "shorebird", "waterfowl", "songbird", "osprey", "blackbird",
        "woodpecker", "quail", "bluebird", "kingfisher", "swan", "flamingo", "cormorant",
        "pheasant", "rooster", "sandpiper", "crow", "raven", "magpie", "peacock", "cockatoo",
        "macaw", "vulture",
    ],
    "cat": ["kitten", "kitty", "feline", "tabby"],
    "dog": [
        "puppy", "pup", "doggy", "doggie", "canine", "mutt", "beagle", "chihuahua", "schnauzer",
        "dachshund", "rottweiler", "pitbull", "collie", "pug", "terrier", "poodle", "labrador",
        "doberman", "spaniel", "bulldog", "sheepdog", "corgi", "greyhound", "retriever", "hound",
        "husky", "dalmatian",
    ],
    "horse": [
        "pony", "colt", "foal", "mare", "stallion", "racehorse", "equine", "palomino", "mustang",
        "bronco",
    ],
    # As in the paper's list, goats count as sheep (COCO has no goat category).
    "sheep": ["lamb", "ram", "ewe", "goat"],
    "cow": ["cattle", "calf", "ox", "bull", "heifer", "buffalo", "bison", "holstein"],
    "elephant": [],
    "bear": ["grizzly"],
    "zebra": [],
    "giraffe": [],
    "backpack": ["knapsack", "rucksack"],
    "umbrella": [],
    "handbag": ["purse", "wallet", "briefcase"],
    "tie": ["necktie", "bow tie"],
    "suitcase": ["suit case", "luggage"],
    "frisbee": [],
    "skis": ["ski"],
    "snowboard": [],
    "sports ball": ["ball"],
    "kite": [],
    "baseball bat": [],
    "baseball glove": [],
    "skateboard": [],
    "surfboard": ["longboard", "shortboard", "skimboard", "wakeboard"],
    "tennis racket": ["racket", "racquet"],
    "bottle": [],
    "wine glass": [],
    "cup": ["mug"],
    "fork": [],
    "knife": ["pocketknife"],
    "spoon": [],
    "bowl": [],
    "banana": [],
    "apple": [],
    "sandwich": ["burger", "hamburger", "cheeseburger", "sub"],
    "orange": [],
    "broccoli": [],
    "carrot": [],
    "hot dog": [],
    "pizza": [],
    "donut": ["doughnut", "bagel"],
    "cake": ["cupcake", "cheesecake", "shortcake", "coffeecake", "pancake"],
    "chair": ["seat", "stool", "armchair"],
    "couch": ["sofa", "recliner", "futon", "loveseat", "settee"],
    "potted plant": ["houseplant"],
    "bed": [],
    "dining table": ["table", "desk"],
    "toilet": ["urinal", "commode", "lavatory", "potty"],
    "tv": ["television", "monitor"],
    "laptop": ["computer", "notebook", "netbook"],
    "mouse": [],
    "remote": [],
    "keyboard": [],
    "cell phone": ["phone", "cellphone", "smartphone", "telephone", "mobile phone"],
    "microwave": [],
    "oven": ["stove", "stovetop", "stove top"],
    "toaster": [],
    "sink": [],
    "refrigerator": ["fridge", "freezer"],
    "book": ["novel"],
    "clock": [],
    "vase": [],
    "scissors": [],
    "teddy bear": ["teddybear"],
    "hair drier": ["hairdryer", "hair dryer", "blow dryer"],
    "toothbrush": [],
}
# fmt: on

_ANIMALS_WITH_AGE = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
)  # fmt: skip
# Phrases whose words would otherwise count on their own, with what they mention instead (None:
# nothing). As in the original: a "baby elephant" is no person, "train tracks" show no train.
PHRASE_OVERRIDES: dict[str, str | None] = {
    **{f"{age} {animal}": animal for age in ("baby", "adult") for animal in _ANIMALS_WITH_AGE},
    "passenger train": "train",
    "passenger jet": "airplane",
    "toilet seat": "toilet",
    "toilet bowl": "toilet",
    "train track": None,
}

# Plurals the suffix rules of `_plural` get wrong, for the words of the tables above.
_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "gentleman": "gentlemen",
    "policeman": "policemen",
    "child": "children",
    "knife": "knives",
    "pocketknife": "pocketknives",
    "mouse": "mice",
    "goose": "geese",
    "calf": "calves",
    "ox": "oxen",
}
_WORD = re.compile(r"[a-z]+")


def _plural(word: str) -> str:
    """The plural of one lower-case English noun: the irregular table, else suffix rules."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def _phrase_table() -> dict[tuple[str, ...], str | None]:
    """Every surface form (as a tuple of words, singular and plural) -> what it mentions."""
    meanings: list[tuple[str, str | None]] = [(name, name) for name in COCO_CATEGORIES]
    meanings += [(word, category) for category, words in SYNONYMS.items() for word in words]
    meanings += PHRASE_OVERRIDES.items()
    table: dict[tuple[str, ...], str | None] = {}
    for phrase, meaning in meanings:
        *head, last = phrase.split()
        for form in (tuple(head) + (last,), tuple(head) + (_plural(last),)):
            # A form claimed by two categories would make the result depend on table order.
            if table.get(form, meaning) != meaning:
                raise ValueError(f"{' '.join(form)!r} means both {table[form]!r} and {meaning!r}")
            table[form] = meaning
    return table


_PHRASES = _phrase_table()
_LONGEST_PHRASE = max(len(form) for form in _PHRASES)


def mentioned_objects(caption: str) -> list[str]:
    """The COCO categories `caption` mentions, each once, in order of first mention.

    Examples:
        >>> mentioned_objects("Two men eat a hot dog next to their bikes and a man.")
        ['person', 'hot dog', 'bicycle']
    """
    words = _WORD.findall(caption.lower())
    mentioned: list[str] = []
    start = 0
    while start < len(words):
        # Longest phrase first: "hot dog" before "dog". With no match the loop ends at length 1,
        # so an unknown word is skipped.
        for length in range(min(_LONGEST_PHRASE, len(words) - start), 0, -1):
            form = tuple(words[start : start + length])
            if form in _PHRASES:
                category = _PHRASES[form]
                if category is not None and category not in mentioned:
                    mentioned.append(category)
                break
        start += length
    return mentioned


def chair_rates(n_mentioned: Iterable[int], n_hallucinated: Iterable[int]) -> dict[str, float]:
    """CHAIR_s and CHAIR_i from per-caption counts of mentioned and hallucinated objects.

    Raises:
        ValueError: the two have different lengths.

    Examples:
        >>> chair_rates([3, 2, 0], [1, 0, 0])
        {'CHAIR_s': 0.3333333333333333, 'CHAIR_i': 0.2}
    """
    n_mentioned, n_hallucinated = list(n_mentioned), list(n_hallucinated)
    if len(n_mentioned) != len(n_hallucinated):
        raise ValueError(
            f"{len(n_mentioned)} mention counts but {len(n_hallucinated)} hallucination counts"
        )
    n_with_hallucination = sum(1 for count in n_hallucinated if count > 0)
    total_mentioned = sum(n_mentioned)
    return {
        "CHAIR_s": n_with_hallucination / len(n_mentioned) if n_mentioned else 0.0,
        "CHAIR_i": float(sum(n_hallucinated) / total_mentioned) if total_mentioned else 0.0,
    }


def chair_scores(captions: Sequence[str], ground_truth: Sequence[Iterable[str]]) -> dict[str, Any]:
    """CHAIR of `captions` against each image's ground-truth COCO categories.

    Returns ``CHAIR_s`` and ``CHAIR_i`` (floats), and per caption ``mentioned`` and
    ``hallucinated`` (lists of categories in order of mention).

    Raises:
        ValueError: the two have different lengths, or a ground truth holds a name that is not a
            COCO category (such as "people" for "person").

    Examples:
        >>> scores = chair_scores(["A man rides a horse past a car."], [["person", "horse"]])
        >>> scores["hallucinated"], scores["CHAIR_i"]
        ([['car']], 0.3333333333333333)
    """
    if len(captions) != len(ground_truth):
        raise ValueError(f"{len(captions)} captions but {len(ground_truth)} ground truths")
    mentioned, hallucinated = [], []
    for caption, objects in zip(captions, ground_truth, strict=True):
        present = set(objects)
        unknown = sorted(present.difference(COCO_CATEGORIES))
        if unknown:
            raise ValueError(f"not COCO categories: {unknown} (see COCO_CATEGORIES)")
        mentioned.append(mentioned_objects(caption))
        hallucinated.append([name for name in mentioned[-1] if name not in present])
    rates = chair_rates(map(len, mentioned), map(len, hallucinated))
    return {**rates, "mentioned": mentioned, "hallucinated": hallucinated}
