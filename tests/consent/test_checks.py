"""System checks refuse a bad configuration at start-up (consent/checks.py)."""

from consent.checks import countersign_config


def _ids(settings):
    return [p.id for p in countersign_config(None)]


def test_the_shipped_configuration_passes(settings):
    assert [p for p in countersign_config(None) if p.level >= 40] == []


def test_a_misspelt_setting_is_an_error_naming_it(settings):
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "MAX_PENDING_PER_USR": 3}
    problems = [p for p in countersign_config(None) if p.id == "countersign.E005"]
    assert len(problems) == 1 and "MAX_PENDING_PER_USR" in problems[0].msg


def test_too_much_leeway_is_an_error(settings):
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "LEEWAY_SECONDS": 120}
    assert "countersign.E003" in _ids(settings)


def test_an_unknown_signing_algorithm_is_an_error(settings):
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "SIGNING_ALG": "HS256"}
    assert "countersign.E002" in _ids(settings)
