"""Input checks shared by the library's modules (the lowest layer: it imports nothing from nbbatch).

Each raises an error whose message names the parameter and the bad value.
"""

from __future__ import annotations

import numbers

__all__ = ["check_int", "check_positive_int", "check_sizes", "check_smoothing", "is_int"]


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


def check_int(name: str, value, minimum: int = 1) -> int:
    """``int(value)`` for an integer >= ``minimum``: a TypeError for what is no integer (a bool, a
    float), a ValueError for one below ``minimum``, each naming ``name``. Numpy integers pass.

    Example:
        >>> check_int("groups", 4), check_int("restarts", 0, minimum=0)
        (4, 0)
        >>> check_int("hidden", 2.0)
        Traceback (most recent call last):
        ...
        TypeError: hidden must be a positive int, got 2.0 (float)
        >>> check_int("virtual_batch_size", 1, minimum=2)
        Traceback (most recent call last):
        ...
        ValueError: virtual_batch_size must be an int >= 2, got 1
    """
    must = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be {must}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {must}, got {value!r}")
    return int(value)


def check_smoothing(value, name: str = "smoothing") -> float:
    """An EMA's weight on the past, a number in [0, 1), as a float.

    Example:
        >>> check_smoothing(0.9)
        0.9
        >>> check_smoothing(1.0)
        Traceback (most recent call last):
        ...
        ValueError: smoothing must be a number in [0, 1) (the EMA's weight on the past), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) (the EMA's weight on the past), got {value!r}")
    return float(value)


def check_sizes(name: str, values) -> list[int]:
    """A non-empty sequence of positive ints (batch sizes) as a list, in the order given.

    Example:
        >>> check_sizes("batch_sizes", (64, 32))
        [64, 32]
        >>> check_sizes("batch_sizes", [])
        Traceback (most recent call last):
        ...
        ValueError: batch_sizes is empty: give at least one batch size, e.g. [32, 64, 128]
    """
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}")
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not values:
        raise ValueError(f"{name} is empty: give at least one batch size, e.g. [32, 64, 128]")
    bad = [v for v in values if not is_int(v) or v < 1]
    if bad:
        raise ValueError(f"{name} must hold positive ints, got {values!r} (bad: {bad!r})")
    return [int(v) for v in values]
