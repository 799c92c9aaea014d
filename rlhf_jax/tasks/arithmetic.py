"""A verifiable task: arithmetic word problems generated with their answers, scored by exact match.

- `problem(rng)` draws a word problem (addition, subtraction, multiplication, or two steps) and its
  answer; `write_problems(train_path, heldout_path, ...)` writes a training set and a held-out set
  that shares no question with it (JSONL; each prompt a conversation: one worked example, EXAMPLE,
  then the question + INSTRUCTION as the user's turn).
- `exact_match_reward(prompts, responses)`: 1.0 when the response's last line is exactly
  "Answer: N" (an optional final period; no units, commas or words) with N the problem's answer,
  else 0.0. The answer is re-derived from the last question found in the prompt (chat markup, the
  worked example and all), so the reward needs no side table; a prompt with no question of this task
  raises KeyError.
- The tiny version for tests and smoke runs (`data.builtin = "rlhf_jax.tasks.arithmetic"`): prompts
  "3 plus 4", a word-level tokenizer (`build_tokenizer`), the same reward.
"""

from __future__ import annotations

import json
import re

import numpy as np

from rlhf_jax.tasks.words import save_word_tokenizer

INSTRUCTION = "Give the result as the last line, in the form 'Answer: <number>'."
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kai", "Lena",
         "Maya", "Noah", "Olga", "Paul"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps", "eggs"]

# (template, answer from the numbers a, b, c); {name} and {items} are words, the rest whole numbers.
TEMPLATES = [
    ("{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", lambda a, b, c: a + b),
    ("{name} has {a} {items} and gives {b} of them away. How many {items} does {name} have left?",
     lambda a, b, c: a - b),
    ("There are {a} boxes with {b} {items} in each box. How many {items} are there in all?", lambda a, b, c: a * b),
    ("{name} has {a} {items}, buys {b} more and then gives {c} away. How many {items} does {name} have now?",
     lambda a, b, c: a + b - c),
    ("{a} plus {b}", lambda a, b, c: a + b),  # the tiny version's
]
_ANSWER = re.compile(r"Answer: (-?\d+)\.?")
# A worked example as a first exchange: SmolLM2-135M-Instruct, asked alone, wrote the format 2% of
# the time (greedy) and sampled no right answer in 192 tries; after this example, 77% and 17%.
EXAMPLE = [{"role": "user", "content": f"Maya has 4 shells and gets 3 more. How many shells does Maya have now? "
                                       f"{INSTRUCTION}"},
           {"role": "assistant", "content": "4 + 3 = 7\nAnswer: 7"}]


def _pattern(template: str) -> re.Pattern:
    text = re.escape(template)
    for field, group in (("name", r"(?P<name>[A-Z][a-z]+)"), ("items", r"(?P<items>[a-z]+)"),
                         ("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)"), ("c", r"(?P<c>\d+)")):
        # The first {field} captures; a repeat must equal it.
        text = text.replace(r"\{" + field + r"\}", group, 1).replace(r"\{" + field + r"\}", f"(?P={field})")
    return re.compile(text)


_PATTERNS = [(_pattern(t), solve) for t, solve in TEMPLATES]


def problem(rng: np.random.Generator, max_number: int = 10) -> tuple[str, int]:
    """One word problem of the four real-model kinds and its answer (never negative)."""
    kind = int(rng.integers(4))
    a, b = int(rng.integers(2, max_number + 1)), int(rng.integers(2, max_number + 1))
    if kind == 1:
        a, b = max(a, b), min(a, b)
    if kind == 2:
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
    c = int(rng.integers(1, a + b)) if kind == 3 else 0
    template, solve = TEMPLATES[kind]
    text = template.format(name=NAMES[int(rng.integers(len(NAMES)))], items=ITEMS[int(rng.integers(len(ITEMS)))],
                           a=a, b=b, c=c)
    return text, solve(a, b, c)


def solve(text: str) -> int:
    """The answer to the last problem of this task in `text` (after any worked example)."""
    found = [(m.start(), m, answer) for pattern, answer in _PATTERNS for m in pattern.finditer(text)]
    if not found:
        raise KeyError(f"no arithmetic problem in prompt {text[-120:]!r}")
    _, match, answer = max(found, key=lambda f: f[0])
    numbers = {k: int(v) for k, v in match.groupdict().items() if k in "abc" and v is not None}
    return answer(numbers.get("a", 0), numbers.get("b", 0), numbers.get("c", 0))


def parse_answer(response: str) -> int | None:
    """N when the response's last non-empty line is exactly "Answer: N" or "Answer: N.", else None."""
    lines = [line.strip() for line in response.strip().splitlines()]
    if not lines:
        return None
    found = _ANSWER.fullmatch(lines[-1])
    return int(found.group(1)) if found else None


def exact_match_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for a response whose strict final "Answer: N" line is the problem's answer, else 0.0."""
    return [float(parse_answer(r) == solve(p)) for p, r in zip(prompts, responses)]


def write_problems(train_path: str, heldout_path: str, n_train: int = 2000, n_heldout: int = 300,
                   seed: int = 0) -> None:
    """A training set and a held-out set with no question in common (each question once per set)."""
    rng = np.random.default_rng(seed)
    seen = {EXAMPLE[0]["content"].removesuffix(" " + INSTRUCTION)}
    sets: list[list[str]] = [[], []]
    for target, size in zip(sets, (n_train, n_heldout)):
        while len(target) < size:
            text, _ = problem(rng)
            if text not in seen:
                seen.add(text)
                target.append(text)
    for path, texts in ((train_path, sets[0]), (heldout_path, sets[1])):
        with open(path, "w") as f:
            for text in texts:
                prompt = EXAMPLE + [{"role": "user", "content": f"{text} {INSTRUCTION}"}]
                f.write(json.dumps({"prompt": prompt}) + "\n")


# The tiny version (data.builtin): "a plus b" over single digits, answered "Answer: N".
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def vocabulary() -> list[str]:
    return [PAD, EOS, UNK, "plus", "Answer:", "."] + [str(n) for n in range(19)]


def sample_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{int(rng.integers(10))} plus {int(rng.integers(10))}" for _ in range(n)]


def build_tokenizer(folder: str) -> str:
    """A word-level tokenizer over the tiny version's words (pad != eos); returns the folder."""
    return save_word_tokenizer(folder, vocabulary(), PAD, EOS, UNK)
