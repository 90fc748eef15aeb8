"""Template substitution (PROTOCOL §5).

One pass over every string of ``payload_template``: ``{{ a.b }}`` is looked up
in the variables and written in, and a value is never expanded again. A
string that is exactly one placeholder takes the variable's own JSON type.
"""

from __future__ import annotations

import re
from typing import Any

from common.errors import ApiError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)\s*\}\}")
_MISSING = object()


def _lookup(variables: dict[str, Any], path: str) -> Any:
    value: Any = variables
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    from common import jsoncodec

    return jsoncodec.dumps_str(value)


def missing_variable(name: str) -> ApiError:
    return ApiError(
        422,
        "TEMPLATE_VARIABLE_MISSING",
        f"template variable '{name}' has no value",
        {"field": f"variables.{name}", "variable": name},
    )


def _render_string(text: str, variables: dict[str, Any]) -> Any:
    whole = PLACEHOLDER.fullmatch(text)
    if whole:
        value = _lookup(variables, whole.group(1))
        if value is _MISSING:
            raise missing_variable(whole.group(1))
        return value

    def substitute(match: re.Match[str]) -> str:
        value = _lookup(variables, match.group(1))
        if value is _MISSING:
            raise missing_variable(match.group(1))
        return _as_text(value)

    return PLACEHOLDER.sub(substitute, text)


def render(template: Any, variables: dict[str, Any]) -> Any:
    """Render every string in a JSON value; keys are rendered too."""
    if isinstance(template, str):
        return _render_string(template, variables)
    if isinstance(template, list):
        return [render(item, variables) for item in template]
    if isinstance(template, dict):
        out: dict[str, Any] = {}
        for key, value in template.items():
            new_key = _render_string(key, variables) if "{{" in key else key
            out[str(new_key)] = render(value, variables)
        return out
    return template
