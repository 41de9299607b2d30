"""The answer's first token with content (``LocatedPrompt.answer_start``): leading
whitespace-only tokens (a bare space before a Chinese answer) are set apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mlake_core.editing.base import LocatedPrompt

VOCAB = {0: " ", 1: "康", 2: "奈尔", 3: " Cornell", 4: "  ", 5: " University"}
ENCODE = {
    " 康奈尔": [0, 1, 2],
    " Cornell University": [3, 5],
    "   康": [4, 0, 1],
    " ": [0],
}


class _Tokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": ENCODE[text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids)


@pytest.mark.parametrize(
    ("answer", "prefix", "lead", "token"),
    [
        ("康奈尔", " ", (0,), 1),
        ("Cornell University", " ", (), 3),
        ("康", "   ", (4, 0), 1),
        ("", " ", (0,), None),
    ],
)
def test_leading_whitespace_tokens_are_set_apart(answer, prefix, lead, token) -> None:
    adapter = SimpleNamespace(tokenizer=_Tokenizer())
    located = LocatedPrompt(
        where="fact 0 [zh] question form",
        prompt="Q: ?\nA:",
        answer_prefix=prefix,
        prompt_ids=(9, 9),
        subject="s",
        subject_positions=(0,),
    )
    assert located.answer_start(adapter, answer) == (lead, token)  # type: ignore[arg-type]
