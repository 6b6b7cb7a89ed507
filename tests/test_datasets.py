"""Datasets with a tokenizer built locally (no download): IOI prompts and a user's own pairs."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastpatch.datasets import IOI_NAMES, IOI_OBJECTS, IOI_PLACES, PatchingDataset, from_pairs, ioi_dataset

TEMPLATE_WORDS = "When and went to the , gave a to".replace(",", " ,").split()


@pytest.fixture(scope="module")
def tokenizer():
    # "Sarah" and "Laura" are left out: they are not single tokens for this tokenizer.
    words = ["<bos>", ",", "Then", "had", "long", "argument", "afterwards", "said"] + TEMPLATE_WORDS
    words += [n for n in IOI_NAMES if n not in ("Sarah", "Laura")] + list(IOI_PLACES) + list(IOI_OBJECTS)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<bos>")


def _decode(tokenizer, ids):
    return tokenizer.decode(ids.tolist())


@pytest.mark.parametrize("order", ["ABBA", "BABA", "mixed"])
@pytest.mark.parametrize("corruption", ["third_name", "swap_subject"])
def test_ioi_prompts(tokenizer, order, corruption):
    data = ioi_dataset(tokenizer, 12, order=order, corruption=corruption, seed=3)
    assert isinstance(data, PatchingDataset) and len(data) == 12
    assert data.clean_tokens.shape == data.corrupted_tokens.shape
    for i in range(12):
        words = data.clean_text[i].replace(",", " ,").split()
        io, subject = _decode(tokenizer, data.answer_tokens[i : i + 1]), _decode(tokenizer, data.wrong_tokens[i : i + 1])
        assert io != subject and words.count(subject) == 2 and words.count(io) == 1
        abba = order == "ABBA" or (order == "mixed" and i % 2 == 0)
        assert words[1] == (io if abba else subject)
        differs = (data.clean_tokens[i] != data.corrupted_tokens[i]).nonzero().flatten().tolist()
        assert len(differs) == 1  # only the repeated subject changes
        new = _decode(tokenizer, data.corrupted_tokens[i, differs])
        if corruption == "swap_subject":
            assert new == io
        else:
            assert new not in (io, subject)
    assert "Sarah" not in " ".join(data.clean_text)


def test_ioi_needs_single_token_names(tokenizer):
    with pytest.raises(ValueError, match="single tokens"):
        ioi_dataset(tokenizer, 4, names=["Sarah", "Laura", "Mary"])
    with pytest.raises(ValueError, match="order"):
        ioi_dataset(tokenizer, 4, order="AABB")


def test_own_pairs_and_their_errors(tokenizer):
    data = from_pairs(tokenizer, ["When Mary and John went to the store , John gave a drink to"],
                      ["When Mary and John went to the store , Tom gave a drink to"], [" Mary"], [" John"], bos_token_id=0)
    assert data.clean_tokens[0, 0] == 0 and data.clean_tokens.shape == (1, 15)  # BOS + 14 words
    logits = torch.zeros(1, 15, len(tokenizer))
    logits[0, -1, data.answer_tokens[0]] = 2.0
    assert float(data.metric()(logits)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="align position by position"):
        from_pairs(tokenizer, ["Mary gave"], ["Mary"], [" Mary"], [" John"])
    with pytest.raises(ValueError, match="exactly one"):
        from_pairs(tokenizer, ["Mary gave"], ["John gave"], [" Mary John"], [" John"])
