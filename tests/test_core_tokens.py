"""Token layout and Prompt-to-Prompt token alignment (replace and refine)."""
import pytest
import torch

from customedit_core import align
from customedit_core.errors import InputError
from customedit_core.tokens import split_words, tokenize


@pytest.fixture(scope="module")
def tok(backend):
    return backend.tokenizer


def test_words_follow_clip_pretokens():
    assert split_words("A  cat, sitting on the sofa!") == ["a", "cat", ",", "sitting", "on", "the", "sofa", "!"]


def test_multi_token_word_spans(tok):
    p = tokenize(tok, "a photo of a teapot, on grass")
    assert p.words == ("a", "photo", "of", "a", "teapot", ",", "on", "grass")
    assert p.spans[4] == (5, 6)                      # tea|pot is two tokens
    assert p.ids[0] == tok.bos and p.ids[p.length - 1] == tok.eos
    assert len(p.ids) == tok.max_length
    assert p.positions("teapot") == [5, 6]
    assert p.positions("a") == [1, 4]                # every occurrence
    assert p.positions("a teapot") == [4, 5, 6]      # multi-word selection
    assert p.positions(1) == [2]


def test_bad_prompts(tok):
    with pytest.raises(InputError, match="source_prompt.*empty"):
        tokenize(tok, "   ", "source_prompt")
    with pytest.raises(InputError, match="at most 75"):
        tokenize(tok, " ".join(["cat"] * 80))
    p = tokenize(tok, "a cat")
    with pytest.raises(InputError, match="'dog' does not occur"):
        p.positions("dog", "blend_words")


def _apply_replace(m, probs):
    return torch.einsum("w,wm->m", probs, m)


def test_replace_identity_for_equal_prompts(tok):
    a = tokenize(tok, "a photo of a cat")
    m = align.replace_mapper(a, a)
    assert torch.equal(m, torch.eye(len(a.ids)))


def test_replace_single_to_multi_token_is_mass_preserving(tok):
    a = tokenize(tok, "a photo of a cat")
    b = tokenize(tok, "a photo of a teapot")
    m = align.replace_mapper(a, b)
    # cat (position 5) spreads over tea|pot (5, 6) half each
    assert m[5, 5] == 0.5 and m[5, 6] == 0.5
    # words before map one to one, end token and padding shift by one
    for i in range(5):
        assert m[i, i] == 1
    assert m[a.length - 1, b.length - 1] == 1
    probs = torch.rand(len(a.ids))
    probs = probs / probs.sum()
    moved = _apply_replace(m, probs)
    # mass of the swapped word is kept; only the clipped padding tail may lose a little
    assert moved[5] + moved[6] == pytest.approx(probs[5].item())
    assert torch.allclose(moved[:5], probs[:5])


def test_replace_multi_to_single_token(tok):
    a = tokenize(tok, "a teapot on grass")
    b = tokenize(tok, "a cat on grass")
    m = align.replace_mapper(a, b)
    assert m[2, 2] == 1 and m[3, 2] == 1          # tea + pot -> cat
    assert m[4, 3] == 1 and m[5, 4] == 1          # on, grass shift back by one


def test_replace_word_count_mismatch_suggests_refine(tok):
    a = tokenize(tok, "a cat")
    b = tokenize(tok, "a striped cat")
    with pytest.raises(InputError, match="refine"):
        align.replace_mapper(a, b)


def test_refine_added_words(tok):
    a = tokenize(tok, "a photo of a teapot")
    b = tokenize(tok, "a photo of a v* striped teapot")
    index, alpha = align.refine_mapper(a, b)
    # b: bos a photo of a v * striped tea pot eos
    assert b.spans[4] == (5,) and b.spans[5] == (6,) and b.spans[6] == (7,) and b.spans[7] == (8, 9)
    assert alpha[:5].tolist() == [1, 1, 1, 1, 1] and index[:5].tolist() == [0, 1, 2, 3, 4]
    assert alpha[5:8].tolist() == [0, 0, 0]        # v, *, striped are new
    assert index[8:10].tolist() == [5, 6] and alpha[8:10].tolist() == [1, 1]
    assert index[b.length - 1] == a.length - 1      # end token onto end token
    assert alpha[b.length:].eq(1).all()
    # past the target's end token, position j takes source column j (the reference's get_mapper),
    # not the source's padding shifted by the three inserted tokens
    assert index[b.length:].tolist() == list(range(b.length, len(b.ids)))


def test_refine_identity_and_punctuation(tok):
    a = tokenize(tok, "a cat, on grass")
    index, alpha = align.refine_mapper(a, a)
    assert torch.equal(index, torch.arange(len(a.ids))) and alpha.eq(1).all()
    b = tokenize(tok, "a red cat, on grass")
    index, alpha = align.refine_mapper(a, b)
    assert alpha[2] == 0 and index[3] == 2 and index[4] == 3  # red new; cat and "," realigned
