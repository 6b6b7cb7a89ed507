"""Clean/corrupted prompt-pair datasets: the IOI task and a researcher's own pairs.

A dataset holds aligned ``[batch, pos]`` clean and corrupted token ids, the answer token the clean
prompt should produce and the wrong token the corruption points to, and gives the matching metric.
Tokenizer-agnostic: anything with the Hugging Face call ``tokenizer(text, add_special_tokens=False)
["input_ids"]`` works (a ``PreTrainedTokenizerFast``, or a model's ``model.tokenizer``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Int
from torch import Tensor

from fastpatch.metrics import LogitDiff


@runtime_checkable
class PatchingDataset(Protocol):
    """What a sweep needs from a task."""

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, " batch"]
    wrong_tokens: Int[Tensor, " batch"]

    def metric(self, per_prompt: bool = False) -> LogitDiff: ...


@dataclass
class PromptPairs:
    """Tokenized prompt pairs (see :func:`from_pairs`), with the text they came from."""

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, " batch"]
    wrong_tokens: Int[Tensor, " batch"]
    clean_text: List[str]
    corrupted_text: List[str]

    def metric(self, per_prompt: bool = False) -> LogitDiff:
        """Logit difference answer - wrong at the last position (mean over prompts unless ``per_prompt``)."""
        return LogitDiff(self.answer_tokens, self.wrong_tokens, per_prompt=per_prompt)

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])


def _ids(tokenizer: Any, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_single(tokenizer: Any, ids: List[int]) -> bool:
    """One token, and not the unknown-token fallback (a word the vocabulary cannot represent)."""
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def single_token(tokenizer: Any, text: str, what: str = "token") -> int:
    """The id of ``text`` if the tokenizer makes it exactly one (known) token, else a ``ValueError``."""
    ids = _ids(tokenizer, text)
    if not _is_single(tokenizer, ids):
        raise ValueError(f"{what} {text!r} is {len(ids)} tokens{' (unknown)' if len(ids) == 1 else ''}, it must be exactly one known token")
    return ids[0]


def from_pairs(
    tokenizer: Any,
    clean: Sequence[str],
    corrupted: Sequence[str],
    answers: Sequence[str],
    wrongs: Sequence[str],
    bos_token_id: Optional[int] = None,
) -> PromptPairs:
    """Tokenize a researcher's own prompt pairs. Every clean prompt must have as many tokens as its
    corrupted twin (activations are patched position by position) and as every other prompt
    (one batch), and answers/wrongs must be single tokens; ``ValueError`` names the offending pair."""
    if not (len(clean) == len(corrupted) == len(answers) == len(wrongs)) or not clean:
        raise ValueError("give the same, non-zero number of clean prompts, corrupted prompts, answers and wrongs")
    prefix = [] if bos_token_id is None else [bos_token_id]
    rows_clean, rows_corrupted, answer_ids, wrong_ids = [], [], [], []
    for n, (c_text, k_text, a, w) in enumerate(zip(clean, corrupted, answers, wrongs), 1):
        c, k = prefix + _ids(tokenizer, c_text), prefix + _ids(tokenizer, k_text)
        if len(c) != len(k):
            raise ValueError(f"prompt pair {n}: clean is {len(c)} tokens but corrupted is {len(k)}; they must align position by position")
        if rows_clean and len(c) != len(rows_clean[0]):
            raise ValueError(f"prompt pair {n} is {len(c)} tokens but pair 1 is {len(rows_clean[0])}; all prompts must have the same length")
        rows_clean.append(c)
        rows_corrupted.append(k)
        answer_ids.append(single_token(tokenizer, a, f"prompt pair {n}: answer"))
        wrong_ids.append(single_token(tokenizer, w, f"prompt pair {n}: wrong"))
    return PromptPairs(torch.tensor(rows_clean), torch.tensor(rows_corrupted), torch.tensor(answer_ids),
                       torch.tensor(wrong_ids), list(clean), list(corrupted))


IOI_TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {A} and {B} went to the {PLACE}, {B} handed a {OBJECT} to",
    "Then, {A} and {B} had a long argument, and afterwards {B} said to",
    "After {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {B} gave a {OBJECT} to",
)
IOI_NAMES = ("Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Lisa", "Anna", "Paul", "Kate",
             "Mark", "Sarah", "David", "Laura", "Mike", "Emma", "Peter", "Alice")
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "station", "house")
IOI_OBJECTS = ("drink", "book", "ring", "bone", "kiss", "basketball", "computer", "snack")


def ioi_dataset(
    tokenizer: Any,
    n_prompts: int,
    *,
    order: str = "mixed",
    corruption: str = "third_name",
    template: str = IOI_TEMPLATES[0],
    names: Sequence[str] = IOI_NAMES,
    places: Sequence[str] = IOI_PLACES,
    objects: Sequence[str] = IOI_OBJECTS,
    seed: int = 0,
    bos_token_id: Optional[int] = None,
) -> PromptPairs:
    """Indirect-object-identification prompts (Wang et al. 2022): "When Mary and John went to the
    store, John gave a drink to" -> " Mary" (the indirect object), not " John" (the subject).

    ``order``: "ABBA" (IO first), "BABA" (subject first) or "mixed" (alternating). ``corruption``:
    "third_name" replaces the repeated subject with a third name (the ABC dataset: no name is
    repeated, so the model cannot tell the IO), "swap_subject" makes the IO the repeated name
    (the answer flips). ``template`` holds ``{A}``, ``{B}`` (twice) and optionally ``{PLACE}`` and
    ``{OBJECT}`` (see ``IOI_TEMPLATES``); one template per dataset keeps every prompt the same
    length. Names, places and objects are kept only if they are single tokens (with a leading
    space) for ``tokenizer``.
    """
    if order not in ("ABBA", "BABA", "mixed"):
        raise ValueError(f"order must be 'ABBA', 'BABA' or 'mixed', got {order!r}")
    if corruption not in ("third_name", "swap_subject"):
        raise ValueError(f"corruption must be 'third_name' or 'swap_subject', got {corruption!r}")
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be positive, got {n_prompts}")

    def single(words: Sequence[str], what: str) -> List[str]:
        kept = [w for w in words if _is_single(tokenizer, _ids(tokenizer, " " + w))]
        if len(kept) < (3 if what == "names" else 1):
            raise ValueError(f"too few {what} are single tokens for this tokenizer: {kept}")
        return kept

    names, places, objects = single(names, "names"), single(places, "places"), single(objects, "objects")
    if template.count("{B}") != 2 or "{A}" not in template:
        raise ValueError("an IOI template needs one {A} and two {B} (the repeated subject)")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n_prompts):
        io, subject, third = rng.sample(names, 3)
        fill = {"PLACE": rng.choice(places), "OBJECT": rng.choice(objects)}
        abba = order == "ABBA" or (order == "mixed" and i % 2 == 0)
        first, second = (io, subject) if abba else (subject, io)
        text = template.replace("{A}", first).replace("{B}", second, 1)
        head, tail = text.rsplit("{B}", 1)
        clean.append(head + subject + tail)
        corrupt_name = third if corruption == "third_name" else io
        corrupted.append(head + corrupt_name + tail)
        for key, value in fill.items():
            clean[-1] = clean[-1].replace("{" + key + "}", value)
            corrupted[-1] = corrupted[-1].replace("{" + key + "}", value)
        answers.append(" " + io)
        wrongs.append(" " + subject)
    return from_pairs(tokenizer, clean, corrupted, answers, wrongs, bos_token_id=bos_token_id)
