"""System checks refuse a bad configuration at start-up (consent/checks.py)."""

import os
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from pytest_django import Settings

from consent.checks import countersign_config
from consent.conf import validate

ROOT = Path(__file__).resolve().parents[2]


def _ids(settings: Settings) -> list[str | None]:
    return [p.id for p in countersign_config(None)]


def test_the_shipped_configuration_passes(settings: Settings) -> None:
    assert [p for p in countersign_config(None) if p.level >= 40] == []


def test_a_misspelt_setting_is_refused_naming_it(settings: Settings) -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown key.*MAX_PENDING_PER_USR"):
        validate({**settings.COUNTERSIGN, "MAX_PENDING_PER_USR": 3})


@pytest.mark.parametrize(
    ("name", "value"),
    [("LEEWAY_SECONDS", "10"), ("RATE_LIMITS", []), ("RATE_LIMITS_ENABLED", 1), ("ISSUER", 8000)],
)
def test_a_value_of_the_wrong_kind_is_refused_naming_it(settings: Settings, name: str, value: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"{name} must be"):
        validate({**settings.COUNTERSIGN, name: value})


def test_the_shipped_settings_and_a_whole_number_for_a_float_pass(settings: Settings) -> None:
    validate(settings.COUNTERSIGN)
    validate({"LEEWAY_SECONDS": 10.0, "RATE_LIMITS_ENABLED": False})


def test_a_bad_setting_stops_the_process_at_start_up(tmp_path: Path) -> None:
    # Every process runs ConsentConfig.ready: a web server, a worker, manage.py.
    import subprocess
    import sys

    (tmp_path / "bad_settings.py").write_text(
        "from config.settings import *  # noqa\nCOUNTERSIGN = {**COUNTERSIGN, 'LEEWAY_SECOND': 5}\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bad_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "LEEWAY_SECOND" in result.stderr


def test_too_much_leeway_is_an_error(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "LEEWAY_SECONDS": 120}
    assert "countersign.E003" in _ids(settings)


def test_an_unknown_signing_algorithm_is_an_error(settings: Settings) -> None:
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "SIGNING_ALG": "HS256"}
    assert "countersign.E002" in _ids(settings)


def test_settings_read_through_countersign_settings_follow_an_override(settings: Settings) -> None:
    from consent.conf import DEFAULTS, countersign_settings

    assert countersign_settings.LEEWAY_SECONDS == settings.COUNTERSIGN.get(
        "LEEWAY_SECONDS", DEFAULTS["LEEWAY_SECONDS"]
    )
    settings.COUNTERSIGN = {**settings.COUNTERSIGN, "LEEWAY_SECONDS": 7}
    assert countersign_settings.LEEWAY_SECONDS == 7  # the kept values went with the old dict
    settings.COUNTERSIGN = {k: v for k, v in settings.COUNTERSIGN.items() if k != "LEEWAY_SECONDS"}
    assert countersign_settings.LEEWAY_SECONDS == DEFAULTS["LEEWAY_SECONDS"]  # back to the default


def test_an_unknown_countersign_setting_is_an_attribute_error() -> None:
    from consent.conf import countersign_settings

    with pytest.raises(AttributeError, match="Unknown Countersign setting"):
        countersign_settings.NO_SUCH_SETTING  # noqa: B018
