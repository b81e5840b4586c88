"""Errors the engine raises for bad user input.

Every message names the input (file, field or argument), the value that was found and what was expected, so a
ComfyUI user can fix the graph without reading a traceback.
"""


class MusubiInputError(ValueError):
    """A user-supplied file, field or value is unusable. Raised before any heavy work starts."""


def invalid(name: str, value, expected: str) -> MusubiInputError:
    """Build the standard message: `<name>: got <value>; expected <expected>`."""
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return MusubiInputError(f"{name}: got {shown}; expected {expected}")
