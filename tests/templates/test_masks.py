"""Exact label masks, token by token, for every template, on SmolLM2's real tokenizer."""

from __future__ import annotations

import pytest

from tuneforge.data.encode import IGNORE_INDEX, EncodeOptions, encode_supervised
from tuneforge.data.types import Message
from tuneforge.errors import TemplateError
from tuneforge.templates import get_template, template_names
from tuneforge.templates.base import Token

TURNS = [Message("user", "Hello there!"), Message("assistant", "Hi! How can I help?"),
         Message("user", "What is 2 + 2?"), Message("assistant", "2 + 2 = 4.")]


@pytest.fixture(scope="module")
def placing(tokenizer):
    """A copy of the tokenizer that also holds every token the named templates place by name (stop words, markers)."""
    named = set()
    for name in template_names()[1:]:
        template = get_template(name, tokenizer)
        named |= {p for pair in template.render_pieces(TURNS, "Be brief.", None) for side in pair for p in side
                  if isinstance(p, Token)} | set(template.stop_words)
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.add_tokens(sorted(named), special_tokens=True)
    return copy


@pytest.mark.parametrize("name", template_names())
def test_labels_are_exactly_the_response_tokens(name, tokenizer, placing):
    """Each text piece is tokenized on its own (as LLaMA-Factory does), named tokens by id; prompts are masked,
    responses trained; with efficient_eos one eos ends the row and later prompts start with an eos label."""
    tokenizer = placing if name != "auto" else tokenizer
    template = get_template(name, tokenizer)
    pieces = template.render_pieces(TURNS, "Be brief.", None)
    eos = template.efficient_eos_id
    row = encode_supervised(template.encode_pairs(TURNS, "Be brief.", None), EncodeOptions(cutoff_len=4096), eos)

    def ids(side):
        return [i for p in side for i in ([tokenizer.convert_tokens_to_ids(p)] if isinstance(p, Token)
                                           else tokenizer.encode(p, add_special_tokens=False))]

    expected_ids, expected_labels = [], []
    for turn, (prompt, response) in enumerate(pieces):
        p, r = ids(prompt), ids(response)
        expected_ids += p + r
        expected_labels += ([eos] if eos is not None and turn else [IGNORE_INDEX]) + [IGNORE_INDEX] * (len(p) - 1) + r
    if eos is not None:
        expected_ids, expected_labels = expected_ids + [eos], expected_labels + [eos]
    assert row["input_ids"] == expected_ids
    assert row["labels"] == expected_labels
    text = "".join(p + r for p, r in template.render_pairs(TURNS, "Be brief.", None))
    assert tokenizer.decode(row["input_ids"]).startswith(text)
    trained = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
    assert "Hi! How can I help?" in trained and "2 + 2 = 4." in trained
    assert "Hello there!" not in trained and "What is" not in trained


def test_chatml_masks_on_smollm2_token_by_token(tokenizer):
    template = get_template("chatml", tokenizer)
    row = encode_supervised(template.encode_pairs(TURNS[:2], None, None), EncodeOptions(cutoff_len=4096))
    marked = [(tokenizer.decode([i]), label != IGNORE_INDEX) for i, label in zip(row["input_ids"], row["labels"])]
    trained = [tok for tok, is_trained in marked if is_trained]
    assert "".join(trained) == "Hi! How can I help?<|im_end|>\n"
    assert marked[0] == ("<|im_start|>", False)
    assert "".join(tok for tok, _ in marked) == ("<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"
                                                "Hi! How can I help?<|im_end|>\n")


def test_auto_equals_the_named_template_it_mirrors(tokenizer):
    """SmolLM2's own template is chatml plus its default system prompt: identical ids and labels."""
    smol_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    auto = get_template("auto", tokenizer)
    chatml = get_template("chatml", tokenizer, default_system=smol_system)
    opts = EncodeOptions(cutoff_len=4096)
    assert encode_supervised(auto.encode_pairs(TURNS, None, None), opts) == \
        encode_supervised(chatml.encode_pairs(TURNS, None, None), opts)
    assert auto.encode_prompt(TURNS[:3], None, None) == chatml.encode_prompt(TURNS[:3], None, None)


def test_generation_prompt_ids_equal_training_prefix(tokenizer):
    template = get_template("auto", tokenizer)
    prompt_ids = template.encode_prompt(TURNS[:3], "Be brief.", None)
    row = encode_supervised(template.encode_pairs(TURNS, "Be brief.", None), EncodeOptions(cutoff_len=4096))
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in row["labels"][len(prompt_ids) - 3: len(prompt_ids)])


def test_auto_refuses_a_template_that_is_not_prefix_stable(tokenizer):
    unstable = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Counts the turns at the top, so adding a turn rewrites the start of the text.
    unstable.chat_template = ("turns={{ messages|length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                              "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TemplateError, match="not prefix-stable at turn 2"):
        get_template("auto", unstable).render_pairs(TURNS, None, None)


def test_auto_without_a_chat_template_names_the_fix(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(TemplateError, match="choose a named template"):
        get_template("auto", bare)


def test_unknown_template_suggests_the_closest_name(tokenizer):
    with pytest.raises(TemplateError, match="Did you mean 'llama3'"):
        get_template("llama-3", tokenizer)


def test_efficient_eos_ends_the_row_and_opens_later_prompts_hand_computed():
    """LLaMA-Factory's efficient_eos rule (glm4, chatglm3, falcon, ...): no eos between turns in the ids; the
    previous answer's stop is the label of the next prompt's first token, and one trained eos ends the row."""
    row = encode_supervised([([1, 2], [3]), ([4], [5, 6])], EncodeOptions(cutoff_len=100), efficient_eos=9)
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 9]
    assert row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 3, 9, 5, 6, 9]
