"""The one token syntax of --tokens, -er and --ait-token-range, and its conversion to ATB_SAVE_TENSOR_RANGE."""
import pytest

from pytest_ait_llm.errors import AitLlmError
from pytest_ait_llm.token_range import ATB_ALL_TOKENS, atb_range, format_tokens, parse_tokens


@pytest.mark.parametrize("text, ids", [
    ("0", (0,)), ("0,3", (0, 3)), ("0-3", (0, 1, 2, 3)), ("0-1, 5", (0, 1, 5)), ("3,0,1-2", (0, 1, 2, 3)),
    ("all", None), (" ALL ", None),
])
def test_parse(text, ids):
    assert parse_tokens(text) == ids


@pytest.mark.parametrize("text, problem", [
    ("3-1", "range 3-1 runs backwards"), ("0..3", "expected token ids"), ("", "expected token ids"),
    ("0,,1", "expected token ids"), ("-1", "expected token ids"), ("1-", "expected token ids"),
    ("9999999999", "larger than ATB's token counter"),
])
def test_bad_text_names_the_option(text, problem):
    with pytest.raises(AitLlmError, match=problem) as info:
        parse_tokens(text, "--ait-token-range")
    assert str(info.value).startswith(f"--ait-token-range={text!r}: ")


@pytest.mark.parametrize("ids, atb, text", [
    ((0,), "0,0", "0"), ((0, 3), "0,0,3,3", "0,3"), ((0, 1, 2, 3), "0,3", "0-3"), ((5, 0, 1), "0,1,5,5", "0-1,5"),
    (None, ATB_ALL_TOKENS, "all"),
])
def test_atb_form_and_canonical_text(ids, atb, text):
    assert atb_range(ids) == atb and format_tokens(ids) == text
    assert parse_tokens(text) == (None if ids is None else tuple(sorted(ids)))
