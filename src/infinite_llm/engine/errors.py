"""A request too large for this engine, with what would make it fit, named as the caller
knows the options: Python's keyword arguments and the API's fields by default, the
command line's flags where the CLI renders it."""

from __future__ import annotations

from collections.abc import Mapping

# How each remedy's option is named where it is set: the API's and LLM's arguments.
PYTHON_NAMES: Mapping[str, str] = {
    "max_tokens": "max_tokens",
    "kv_cache_memory": "kv_cache_memory",
    "instances": "the number of instances",
    "kv_pooling": "kv_pooling=True",
}


class RequestTooLarge(ValueError):
    """``reason`` says what does not fit; ``remedies`` are templates whose ``{option}``
    fields are filled with the option names of ``render``'s caller."""

    def __init__(self, reason: str, remedies: tuple[str, ...]) -> None:
        self.reason = reason
        self.remedies = remedies
        super().__init__(self.render(PYTHON_NAMES))

    def render(self, names: Mapping[str, str]) -> str:
        if not self.remedies:
            return self.reason
        fixes = [r.format_map(names) for r in self.remedies]
        joined = fixes[0] if len(fixes) == 1 else ", ".join(fixes[:-1]) + " or " + fixes[-1]
        return f"{self.reason}; {joined}"
