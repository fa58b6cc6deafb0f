import pytest

from nbbatch.checks import check_positive_int, is_int


@pytest.mark.parametrize("value, expected", [(0, True), (-3, True), (7, True), (True, False), (False, False),
                                             (2.0, False), ("2", False), (None, False)])
def test_is_int_refuses_bools_floats_and_strings(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "3", None])
def test_check_positive_int_names_the_parameter_and_the_value(bad):
    with pytest.raises(ValueError, match=rf"^draws must be a positive int, got {bad!r}$".replace("(", r"\(").replace(")", r"\)")):
        check_positive_int("draws", bad)


def test_check_positive_int_returns_a_good_value():
    assert check_positive_int("draws", 1) == 1 and check_positive_int("draws", 4096) == 4096
