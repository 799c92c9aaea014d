"""Prompt data: read, tokenize, left-pad, and iterate with a resumable position."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.config import ConfigError


@dataclasses.dataclass
class PromptReport:
    """What happened to the raw prompts (reported, never silently dropped)."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    rejected_too_long: int = 0
    rejected_empty: int = 0


def read_prompts(path: str, field: str = "prompt") -> list:
    """Prompts from a JSONL file (one object per line, under `field`) or a HF datasets folder.

    A prompt is a string, or in a JSONL file also a conversation: a list of {"role", "content"}
    messages (for `data.chat_template`; e.g. a worked example before the question)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path: no such file or folder {path!r}")
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"data.path {path!r} is a folder: reading a HF datasets folder needs "
                              "`pip install datasets`") from e
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if field not in ds.column_names:
            raise ConfigError(f"data.field {field!r} is not a column of {path!r} (columns: {ds.column_names})")
        return [str(x) for x in ds[field]]
    prompts = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"data.path {path}:{line_no}: not UTF-8 text (byte {e.start}): expected JSON "
                                  "lines") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.path {path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"data.path {path}:{line_no}: a JSON {type(record).__name__}, not an object with "
                                  f"a {field!r} field")
            if field not in record:
                raise ConfigError(f"data.path {path}:{line_no}: no field {field!r} (data.field); fields: "
                                  f"{sorted(record)}")
            if not (isinstance(record[field], str) or _is_conversation(record[field])):
                raise ConfigError(f"data.path {path}:{line_no}: {field!r} is {json.dumps(record[field])[:40]}, "
                                  "not a string or a list of {\"role\": ..., \"content\": ...} messages")
            prompts.append(record[field])
    if not prompts:
        raise ConfigError(f"data.path {path}: no prompts in it (expected JSON lines with a {field!r} field)")
    return prompts


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; a conversation stays as it is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _is_conversation(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
        for m in value))


def tokenize_prompts(prompts: list[str], tokenizer, max_len: int, truncation: str = "left"):
    """Tokenize and left-pad to `max_len`.

    truncation: "left" keeps the last `max_len` tokens of a longer prompt, "reject" drops it.
    Empty prompts are always dropped. Returns (ids int32[n, max_len], mask int32[n, max_len],
    texts of the kept prompts, PromptReport).
    """
    if truncation not in ("left", "reject"):
        raise ValueError(f"data.truncation must be 'left' or 'reject', got {truncation!r}")
    report = PromptReport(total=len(prompts))
    rows, texts = [], []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            report.rejected_empty += 1
            continue
        if len(ids) > max_len:
            if truncation == "reject":
                report.rejected_too_long += 1
                continue
            report.truncated += 1
            ids = ids[-max_len:]
            text = tokenizer.decode(ids)
        rows.append(ids)
        texts.append(text)
    report.kept = len(rows)
    ids = np.full((len(rows), max_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for i, row in enumerate(rows):
        ids[i, max_len - len(row):] = row
        mask[i, max_len - len(row):] = 1
    return ids, mask, texts, report


def encode_preference_pairs(records: list[dict], tokenizer, max_prompt_len: int, max_response_len: int) -> dict:
    """Preference pairs (dicts with prompt, chosen and rejected text) as the arrays of
    `rlhf_jax.step.preference.make_preference_update`: prompt_ids and prompt_mask [n, max_prompt_len],
    left-padded (a longer prompt keeps its last tokens, as `tokenize_prompts` does); chosen_ids,
    chosen_mask, rejected_ids and rejected_mask [n, max_response_len], right-padded, each response cut
    to max_response_len - 1 tokens and ended with EOS, as a sampled response ends. Raises ValueError
    naming the pair whose prompt or response has no tokens."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n = len(records)
    out = {"prompt_ids": np.full((n, max_prompt_len), pad, np.int32),
           "prompt_mask": np.zeros((n, max_prompt_len), np.int32)}
    for name in ("chosen", "rejected"):
        out[f"{name}_ids"] = np.full((n, max_response_len), pad, np.int32)
        out[f"{name}_mask"] = np.zeros((n, max_response_len), np.int32)
    for i, record in enumerate(records):
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"][-max_prompt_len:]
        if not prompt:
            raise ValueError(f"preference pair {i}: its prompt has no tokens")
        out["prompt_ids"][i, max_prompt_len - len(prompt):] = prompt
        out["prompt_mask"][i, max_prompt_len - len(prompt):] = 1
        for name in ("chosen", "rejected"):
            response = tokenizer(record[name], add_special_tokens=False)["input_ids"]
            if not response:
                raise ValueError(f"preference pair {i}: its {name} response has no tokens")
            ids = response[:max_response_len - 1] + [eos]
            out[f"{name}_ids"][i, :len(ids)] = ids
            out[f"{name}_mask"][i, :len(ids)] = 1
    return out


class PromptIterator:
    """Batches of prompt indices in a fresh shuffled order each epoch.

    The order is a pure function of (seed, epoch), so the position
    (`epoch`, `offset`) is all a checkpoint needs to resume the same stream.
    With several hosts, each takes its own contiguous slice of every global batch.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if num_prompts < batch_size:
            raise ValueError(f"{num_prompts} prompts are fewer than one rollout batch ({batch_size})")
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.offset = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next(self) -> np.ndarray:
        """Indices of this host's part of the next global batch (a batch never spans two epochs)."""
        if self.offset + self.batch_size > self.num_prompts:
            self.epoch, self.offset = self.epoch + 1, 0
        batch = self._order(self.epoch)[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        per_host = self.batch_size // self.process_count
        return batch[self.process_index * per_host:(self.process_index + 1) * per_host]

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
