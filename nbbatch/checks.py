"""Input checks shared by the library's modules (the lowest layer: it imports nothing from nbbatch).

Each raises an error whose message names the parameter and the bad value.
"""

from __future__ import annotations

__all__ = ["is_int", "check_positive_int"]


def is_int(value) -> bool:
    """True for an int that is not a bool (``True`` is an int to Python, never a count here).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """``value`` when it is an int >= 1, else a ValueError naming ``name``.

    Example:
        >>> check_positive_int("draws", 0)
        Traceback (most recent call last):
        ...
        ValueError: draws must be a positive int, got 0
    """
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value
