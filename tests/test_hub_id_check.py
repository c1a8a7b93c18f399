"""One Hub-id check: hf_fisher.artifacts.hub.repo_id_problem, used by every place that asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_fisher.artifacts import cards, hub
from hf_fisher.consumers.merge import io as merge_io
from hf_fisher.errors import InvalidInputError
from hf_fisher.integrations import trainer


@pytest.mark.parametrize(
    "value, with_namespace, bare_name_ok",
    [
        ("org/model", True, True),
        ("gpt2", False, True),
        ("org/model:sub", False, False),  # a reference, not an id
        ("a/b/c", False, False),
        ("org/mo..del", False, False),
        ("org/mo--del", False, False),
        ("org/model.git", False, False),
        ("-org/model", False, False),
        ("org/" + "m" * 97, False, False),
        ("org/" + "m" * 96, True, True),
        ("örg/model", False, False),
        ("", False, False),
        (None, False, False),
    ],
)
def test_one_rule_with_and_without_namespace(value, with_namespace, bare_name_ok):
    assert (hub.repo_id_problem(value) is None) == with_namespace
    assert hub.looks_like_hub_id(value) == bare_name_ok
    assert hub.looks_like_hub_id(value, namespace=True) == with_namespace


def test_every_caller_uses_the_same_function():
    assert cards.looks_like_hub_id is hub.looks_like_hub_id
    assert trainer.looks_like_hub_id is hub.looks_like_hub_id
    source = Path(merge_io.__file__).read_text(encoding="utf-8")
    assert "from hf_fisher.artifacts.hub import looks_like_hub_id" in source  # imported inside resolve_hub


def test_reference_checks_agree_with_the_id_check():
    for ok in ("org/model", "org/model:sub/folder"):
        assert hub.looks_like_hub_repo(ok) and hub.parse_hub_ref(ok)[0] == "org/model"
    for bad in ("org/mo..del", "gpt2", "a/b/c"):
        assert not hub.looks_like_hub_repo(bad)
        with pytest.raises(InvalidInputError, match=r"repository id .* is invalid"):
            hub.parse_hub_ref(bad)
