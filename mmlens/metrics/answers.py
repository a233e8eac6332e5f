"""Short-answer scoring: VQA normalisation, exact match, VQA accuracy and LLaVA's answer parsers.

`normalize_answer` follows the official VQA evaluation script (``vqaEval.py``:
``processPunctuation`` then ``processDigitArticle``, with its contractions table), quirks
included: "none" becomes "0"; punctuation is deleted (not replaced by a space) as soon as it
touches a space or the text holds a number with a comma; a period is removed wherever no digit
follows it ("3.5" stays, "3." loses its period). Unlike the official script, which applies only
the punctuation step to the references, and only when they disagree, `vqa_accuracy` normalises
references and prediction alike (as LLaVA's TextVQA evaluator, ``m4c_evaluator.py``, also does).

`parse_yes_no` and `parse_option_letter` reproduce LLaVA's ``eval_pope.py`` and
``eval_science_qa.py``, quirks included (see their docstrings); both strip the text first, as
LLaVA's generation scripts strip the outputs they save.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# Deleted or replaced by a space; the official list (no period, apostrophe or colon).
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)  # fmt: skip
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official pattern is r"(?!<=\d)(\.)(?!\d)": its mistyped look-behind is a look-ahead that
# always holds, so in effect it removes every period that no digit follows.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",  # official: "none" counts as the number zero
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official contractions table, without the entries that can never apply: keys with capitals
# ("Im", "Ive", "Id've", "I'dve"; words are lower-cased first) and identities ("let's", "she's").
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one the wrong way round
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
# A VQA answer counts as fully right once this many other annotators gave it.
_ANNOTATORS_FOR_FULL_CREDIT = 3
_NEGATION_WORDS = frozenset({"No", "not", "no"})
_LETTER_THEN_PERIOD = re.compile(r"([A-Z])\. ")
# LLaVA's pattern, unanchored and with an unescaped final "." (any character).
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
PARSE_FAILED = "FAILED"


def normalize_answer(text: str) -> str:
    """`text` as the official VQA evaluation compares answers.

    Lower-cased and stripped; punctuation deleted or replaced by a space (official rule); periods
    removed unless a digit follows; number words up to ten turned into digits; articles dropped;
    contractions written with their apostrophe.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("the Red-car")
        'red car'
        >>> normalize_answer("1,000 dont")
        "1000 don't"
    """
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    words = _strip_punctuation(text).split()
    words = [_NUMBER_WORDS.get(word, word) for word in words]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark touching a space, or any mark in a text that
    holds a number with a comma ("1,000"), is deleted; otherwise it becomes a space."""
    # The official script tests the conditions on the original text, not on the text so far.
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    stripped = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", stripped)


def exact_match(prediction: str, answer: str) -> bool:
    """Whether `prediction` and `answer` are equal after `normalize_answer` (GQA-style accuracy).

    Examples:
        >>> exact_match("The two cats.", "2 cats")
        True
    """
    return normalize_answer(prediction) == normalize_answer(answer)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA / TextVQA accuracy of `prediction` against the annotators' `answers` (usually ten).

    For each annotator, the answers of the others count: min(matches / 3, 1); the result is the
    mean over annotators. Both sides are normalised with `normalize_answer`.

    Raises:
        ValueError: `answers` is empty.

    Examples:
        >>> vqa_accuracy("Two", ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"])
        0.9
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    is_match = [normalize_answer(answer) == predicted for answer in answers]
    n_matches = sum(is_match)
    # Leaving out annotator i leaves n_matches - is_match[i] matching answers among the others.
    per_annotator = [
        min((n_matches - left_out) / _ANNOTATORS_FOR_FULL_CREDIT, 1.0) for left_out in is_match
    ]
    return sum(per_annotator) / len(per_annotator)


def parse_yes_no(text: str) -> str:
    """LLaVA's POPE rule: "no" if the first sentence holds the word "No", "not" or "no".

    The text up to the first period is split on single spaces after removing commas; anything
    without one of those three words, case-sensitive, is "yes" (so "NO" or "Not sure" count as
    "yes", as in LLaVA's ``eval_pope.py``).

    Examples:
        >>> parse_yes_no("No, there is not.")
        'no'
        >>> parse_yes_no("There is a dog in the image.")
        'yes'
    """
    first_sentence = text.strip().split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NEGATION_WORDS.intersection(words) else "yes"


def parse_option_letter(text: str, n_options: int) -> str:
    """LLaVA's ScienceQA rule: the option letter an answer names, or ``"FAILED"``.

    In order: the whole text is a letter; the text starts with a letter, a period and a space
    ("C. a cat"; as in LLaVA's ``eval_science_qa.py``, "C." alone does not count); the text holds
    exactly one "The answer is X." (any character after X). A letter past the `n_options`-th
    ("E" of three options) counts as unparsable.

    Raises:
        ValueError: `n_options` is not in 0..26.

    Examples:
        >>> parse_option_letter("The answer is B.", 3)
        'B'
        >>> parse_option_letter("E", 3)
        'FAILED'
    """
    if not 0 <= n_options <= len(string.ascii_uppercase):
        raise ValueError(f"n_options must be in 0..26 (one letter each), got {n_options}")
    valid_letters = tuple(string.ascii_uppercase[:n_options])
    text = text.strip()
    if text in valid_letters:
        return text
    leading = _LETTER_THEN_PERIOD.match(text)
    if leading is not None and leading[1] in valid_letters:
        return leading[1]
    stated = _THE_ANSWER_IS.findall(text)
    if len(stated) == 1 and stated[0] in valid_letters:
        return stated[0]
    return PARSE_FAILED
