"""Prompt templates: literal text with exactly one `{}` that the class name replaces.

Templates come from users (the app, the API, configs), so they are never run through
`str.format`, whose format specs can ask for gigabytes (`{0:,>100000000}`) or reach attributes.
Any other brace is refused, so `{{}}`, `{x}` or `{0}` cannot silently drop the name.
"""
from __future__ import annotations

MAX_TEMPLATE_CHARS = 200
MAX_PROMPT_CHARS = 1000  # filled-in prompts are cut here; the text encoders' token limits cut earlier anyway
MAX_TEMPLATES = 16


class TemplateError(ValueError):
    """A prompt template that is not literal text with exactly one `{}` (one line, names the template)."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def check_template(template: str) -> str:
    """Return `template` unchanged when it is a valid template; raise TemplateError otherwise."""
    if not isinstance(template, str):
        raise TemplateError(f"a prompt template must be text, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"prompt template {_shown(template)} is longer than {MAX_TEMPLATE_CHARS} characters")
    rest = template.replace("{}", "", 1)
    if "{}" not in template or "{" in rest or "}" in rest:
        raise TemplateError(f"prompt template {_shown(template)} must contain exactly one '{{}}' (where the class "
                            f"name goes) and no other braces")
    return template


def check_templates(templates) -> tuple[str, ...]:
    """A non-empty sequence of valid templates -> tuple (at most MAX_TEMPLATES)."""
    if isinstance(templates, str) or not templates:
        raise TemplateError(f"give a list of prompt templates, got {templates!r:.80}")
    templates = tuple(templates)
    if len(templates) > MAX_TEMPLATES:
        raise TemplateError(f"{len(templates)} prompt templates given; at most {MAX_TEMPLATES} are supported")
    return tuple(check_template(t) for t in templates)


def fill(template: str, name: str) -> str:
    """The prompt for one class name: the template's `{}` replaced by `name`, nothing else interpreted,
    cut to MAX_PROMPT_CHARS."""
    return check_template(template).replace("{}", name, 1)[:MAX_PROMPT_CHARS]


def vocabulary_key(name: str) -> str:
    """How class names are compared with a training vocabulary: case and white space do not count."""
    return " ".join(name.split()).casefold()


def outside_vocabulary(names: list[str], vocabulary: list[str]) -> list[bool]:
    """For each name, whether it is outside `vocabulary` (and so gets the unseen bias gamma)."""
    known = {vocabulary_key(v) for v in vocabulary}
    return [vocabulary_key(n) not in known for n in names]
