"""The built-in offline task: short movie reviews from a small probabilistic grammar.

- `sample_review(rng)` draws a review (one or two sentences);
- `build_tokenizer(folder)` saves a word-level tokenizer that `transformers.AutoTokenizer` loads;
- `is_valid(text)` says whether a text is a review of the grammar;
- `sentiment_reward(prompts, responses)` scores the sentiment of prompt + response
  from a word lexicon. It is hackable on purpose: repeating positive words scores
  high, and the KL penalty is what keeps the policy writing valid reviews.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from rlhf_jax.tasks.words import save_word_tokenizer

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

SUBJECTS = ["the movie", "the film", "the plot", "the acting", "the ending", "the story", "the cast",
            "the music", "this film", "the script"]
COPULAS = ["is", "was"]
ADVERBS = ["very", "really", "truly", "quite", "rather", "somewhat"]
POSITIVE_ADJ = ["great", "wonderful", "brilliant", "moving", "fun", "beautiful", "superb", "charming"]
NEGATIVE_ADJ = ["boring", "awful", "terrible", "dull", "bad", "weak", "messy", "painful"]
NEUTRAL_ADJ = ["long", "short", "loud", "quiet", "slow", "simple", "strange", "familiar"]
POSITIVE_VERBS = ["loved", "enjoyed", "adored", "liked"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted"]
NEUTRAL_VERBS = ["watched", "saw", "remember"]
PUNCTUATION = [".", "!"]

POSITIVE = set(POSITIVE_ADJ + POSITIVE_VERBS)
NEGATIVE = set(NEGATIVE_ADJ + NEGATIVE_VERBS)
ADJECTIVES = POSITIVE_ADJ + NEGATIVE_ADJ + NEUTRAL_ADJ
VERBS = POSITIVE_VERBS + NEGATIVE_VERBS + NEUTRAL_VERBS


def vocabulary() -> list[str]:
    """Every token of the task, specials first (pad = 0, eos = 1, unk = 2)."""
    words = [PAD, EOS, UNK, "i", "and", ",", "but"]
    for group in (SUBJECTS, COPULAS, ADVERBS, ADJECTIVES, VERBS, PUNCTUATION):
        for phrase in group:
            for word in phrase.split():
                if word not in words:
                    words.append(word)
    return words


def _adjective_phrase(rng) -> str:
    def one():
        adverb = f"{rng.choice(ADVERBS)} " if rng.random() < 0.4 else ""
        return adverb + rng.choice(ADJECTIVES)
    return one() + (f" and {one()}" if rng.random() < 0.3 else "")


def _sentence(rng) -> str:
    form = rng.random()
    if form < 0.55:
        body = f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {_adjective_phrase(rng)}"
    elif form < 0.8:
        body = f"i {rng.choice(VERBS)} {rng.choice(SUBJECTS)}"
    else:
        body = (f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {_adjective_phrase(rng)} , but "
                f"{rng.choice(SUBJECTS)} {rng.choice(COPULAS)} {_adjective_phrase(rng)}")
    return f"{body} {rng.choice(PUNCTUATION, p=[0.8, 0.2])}"


def sample_review(rng: np.random.Generator) -> str:
    """One review: one sentence, sometimes two (words separated by single spaces)."""
    review = _sentence(rng)
    if rng.random() < 0.35:
        review += " " + _sentence(rng)
    return review


def _alternatives(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_ADJP = f"(?:{_alternatives(ADVERBS)} )?{_alternatives(ADJECTIVES)}"
_ADJP = f"{_ADJP}(?: and {_ADJP})?"
_CLAUSE = f"{_alternatives(SUBJECTS)} {_alternatives(COPULAS)} {_ADJP}"
_SENTENCE = (f"(?:{_CLAUSE}(?: , but {_CLAUSE})?|i {_alternatives(VERBS)} {_alternatives(SUBJECTS)}) "
             f"{_alternatives(PUNCTUATION)}")
_REVIEW = re.compile(f"{_SENTENCE}(?: {_SENTENCE})?")


def normalize(text: str) -> str:
    return " ".join(text.replace(EOS, " ").split())


def is_valid(text: str) -> bool:
    """Whether `text` (prompt + response, EOS marker optional) is a review of the grammar."""
    return _REVIEW.fullmatch(normalize(text)) is not None


def sentiment(text: str) -> float:
    """Positive words minus negative words."""
    words = normalize(text).split()
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def sentiment_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The demo reward: lexicon sentiment of each full review (prompt + response)."""
    return [sentiment(p + " " + r) for p, r in zip(prompts, responses)]


def target_word_reward(prompts: list[str], responses: list[str], word: str = "great") -> list[float]:
    """A simple reward for smoke runs: the fraction of response words equal to `word`."""
    scores = []
    for response in responses:
        words = normalize(response).split()
        scores.append(sum(w == word for w in words) / max(len(words), 1))
    return scores


def sample_prompts(n: int, seed: int = 0, max_words: int = 3) -> list[str]:
    """Openings of grammar reviews (1 to `max_words` words) to continue."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        words = sample_review(rng).split()
        prompts.append(" ".join(words[: rng.integers(1, max_words + 1)]))
    return prompts


def build_tokenizer(folder: str) -> str:
    """Save a word-level tokenizer (pad != eos) that AutoTokenizer loads; returns the folder."""
    return save_word_tokenizer(folder, vocabulary(), PAD, EOS, UNK)


def write_prompts(path: str, n: int = 512, seed: int = 0) -> str:
    """Write `n` review openings as JSONL ({"prompt": ...}); returns the path."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            for prompt in sample_prompts(n, seed):
                f.write(json.dumps({"prompt": prompt}) + "\n")
    return path


def preference_pairs(n: int, seed: int = 0, max_prompt_words: int = 3) -> list[dict]:
    """Synthetic preferences: two grammar continuations of one opening; chosen = the more positive.

    Ties (equal sentiment) are skipped, so every pair has a clear winner.
    """
    rng = np.random.default_rng([seed, 7])
    buckets: dict[tuple, list[list[str]]] = {}
    for _ in range(8 * n):
        words = sample_review(rng).split()
        cut = int(rng.integers(1, max_prompt_words + 1))
        if len(words) > cut:
            buckets.setdefault(tuple(words[:cut]), []).append(words[cut:])
    pairs = []
    keys = list(buckets)
    while len(pairs) < n:
        prompt = keys[int(rng.integers(len(keys)))]
        options = buckets[prompt]
        if len(options) < 2:
            continue
        i, j = rng.choice(len(options), 2, replace=False)
        a, b = options[i], options[j]
        sa, sb = sentiment(" ".join(list(prompt) + a)), sentiment(" ".join(list(prompt) + b))
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        pairs.append({"prompt": " ".join(prompt), "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return pairs
