"""Prompt templates are literal text with one `{}`; class names are compared with the vocabulary ignoring case."""
from __future__ import annotations

import pytest

from clipteacher.prompts import MAX_PROMPT_CHARS, TemplateError, check_template, check_templates, fill, outside_vocabulary


@pytest.mark.parametrize("template", [
    "{0:,>100000000}{{}}",  # str.format would pad to 10^8 characters
    "a photo of a {{}}",  # str.format turns it into a literal '{}' and drops the name
    "{x} {}", "%s {} {}", "{0} {}", "{} and {}", "{}}", "{{}", "no placeholder", "",
    "{.__class__} {}",
])
def test_templates_other_than_one_literal_placeholder_are_refused(template):
    with pytest.raises(TemplateError) as err:
        check_template(template)
    assert "\n" not in str(err.value)


def test_fill_is_literal_replacement():
    assert fill("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill("{}", "{0} {x} %s") == "{0} {x} %s"  # braces in a name are just text
    assert fill("photo: 50% {}", "dog") == "photo: 50% dog"
    assert fill("a {}", "x" * 10 * MAX_PROMPT_CHARS) == ("a " + "x" * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]


def test_template_lists():
    assert check_templates(["{}", "a photo of a {}."]) == ("{}", "a photo of a {}.")
    for bad in ("{}", [], None, ["{}"] * 17, ["{}", "{{}}"]):
        with pytest.raises(TemplateError):
            check_templates(bad)


def test_vocabulary_ignores_case_and_spaces():
    assert outside_vocabulary(["Cow", " cow ", "COW", "cows", "tv  monitor"], ["cow", "tv monitor"]) == [
        False, False, False, True, False]
