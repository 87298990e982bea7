"""HADIS's eight prompt features, and a spaCy-free approximation of them for live prompts.

HADIS (`router/promptFeature.py`, MIT) computes per prompt, with spaCy's `en_core_web_sm`,
wordfreq and the Brysbaert concreteness norms: the number of non-punctuation tokens, of
tokens rarer than 1e-5 in English, of subjects and objects (nsubj/dobj/pobj), of tokens with
concreteness below 2.5, of adjectives and modifiers, of spatial terms, of verbs, and of
PERSON/ORG/GPE entities. None of those resources ship here, so `approximate_features` counts
the same things with rules of thumb; it is an approximation and is only ever reported as one:

- prompt_length: word tokens (letters, digits, apostrophes);
- token_rarity: tokens of 9 or more letters, or with digits mixed into letters (rare words are
  long; wordfreq is not consulted);
- num_objects: prepositions followed by a word (each opens a pobj), plus one subject when the
  prompt has a verb;
- abstractness: function words from a fixed list (the norms rate them below 2.5);
- attribute_density: colour, size, material and shape words from a fixed list, and words
  ending in -ful, -ous, -ive, -ic, -al, -y that are not nouns on that list;
- spatial_relations: HADIS's own term list, counted on the tokens as HADIS counts them (exact
  up to tokenisation);
- action_verbs: words ending in -ing or -ed of 5 letters or more, and verbs from a small list;
- named_entities: 0 (no entity recogniser; HADIS's weight on it is 0.01).
"""

from __future__ import annotations

import itertools
import re

FEATURE_NAMES: tuple[str, ...] = (
    "prompt_length",
    "token_rarity",
    "num_objects",
    "abstractness",
    "attribute_density",
    "spatial_relations",
    "action_verbs",
    "named_entities",
)

#: HADIS's `router/spatial_terms.txt` (MIT), one- and multi-word terms.
SPATIAL_TERMS: tuple[str, ...] = (
    "above", "across", "against", "along", "among", "around", "at", "behind", "below",
    "beneath", "beside", "between", "beyond", "by", "down", "from", "in", "in front of",
    "inside", "near", "next to", "off", "on", "on top of", "onto", "out", "outside", "over",
    "past", "through", "to", "toward", "under", "underneath", "up", "upon", "with", "within",
    "without",
)  # fmt: skip

_TOKEN = re.compile(r"[a-z0-9']+")
_PREPOSITIONS = frozenset(
    [
        "of",
        "in",
        "on",
        "at",
        "with",
        "by",
        "from",
        "to",
        "for",
        "into",
        "onto",
        "over",
        "under",
        "near",
        "behind",
        "above",
        "below",
        "between",
        "through",
        "across",
        "along",
        "around",
        "beside",
        "inside",
        "outside",
        "upon",
        "within",
        "without",
        "toward",
    ]
)
_FUNCTION_WORDS = frozenset(
    [
        "the",
        "of",
        "and",
        "or",
        "but",
        "if",
        "then",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "with",
        "on",
        "in",
        "at",
        "by",
        "for",
        "from",
        "to",
        "as",
        "into",
        "onto",
        "than",
        "there",
        "their",
        "they",
        "them",
        "he",
        "she",
        "his",
        "her",
        "who",
        "which",
        "what",
        "when",
        "where",
        "while",
        "very",
        "so",
        "such",
        "some",
        "any",
        "each",
        "every",
        "other",
        "another",
    ]
)
_ATTRIBUTES = frozenset(
    [
        "white",
        "black",
        "red",
        "green",
        "blue",
        "yellow",
        "orange",
        "purple",
        "pink",
        "brown",
        "gray",
        "grey",
        "silver",
        "golden",
        "gold",
        "large",
        "small",
        "big",
        "little",
        "tiny",
        "huge",
        "giant",
        "long",
        "short",
        "tall",
        "old",
        "young",
        "new",
        "wooden",
        "metal",
        "plastic",
        "glass",
        "stone",
        "round",
        "square",
        "dark",
        "bright",
        "light",
        "colorful",
        "beautiful",
        "cute",
        "wild",
        "dead",
        "fresh",
        "hot",
        "cold",
        "wet",
        "dry",
        "empty",
        "full",
        "open",
        "closed",
    ]
)
_VERBS = frozenset(
    ["sits", "stands", "holds", "eats", "plays", "rides", "walks", "runs", "flies", "lies", "looks"]
)
_ADJ_SUFFIXES = ("ful", "ous", "ive", "ic", "al")


def tokens(prompt: str) -> list[str]:
    return _TOKEN.findall(prompt.lower())


def spatial_relations(words: list[str]) -> int:
    """HADIS's count: single-word terms by exact token match, multi-word ones as substrings
    of the space-joined tokens."""
    joined = " ".join(words)
    count = 0
    for term in SPATIAL_TERMS:
        count += joined.count(term) if " " in term else words.count(term)
    return count


def approximate_features(prompt: str) -> tuple[int, ...]:
    """The eight features in `FEATURE_NAMES` order, approximated (see the module docstring)."""
    words = tokens(prompt)
    rare = sum(
        1
        for w in words
        if len(w) >= 9 or (any(c.isdigit() for c in w) and any(c.isalpha() for c in w))
    )
    verbs = sum(
        1 for w in words if (len(w) >= 5 and (w.endswith("ing") or w.endswith("ed"))) or w in _VERBS
    )
    objects = sum(1 for w, nxt in itertools.pairwise(words) if w in _PREPOSITIONS and nxt) + (
        1 if verbs else 0
    )
    abstract = sum(1 for w in words if w in _FUNCTION_WORDS)
    attributes = sum(
        1 for w in words if w in _ATTRIBUTES or (len(w) >= 5 and w.endswith(_ADJ_SUFFIXES))
    )
    return (len(words), rare, objects, abstract, attributes, spatial_relations(words), verbs, 0)
