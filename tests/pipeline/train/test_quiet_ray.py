"""Ray's lines a user cannot act on are off unless verbose, through the switches Ray offers:
Ray Data's logging config file (RAY_DATA_LOGGING_CONFIG: console at ERROR, its file log kept),
and the token-auth setup logger."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pipeline.local_ray import quiet_local_ray

TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    logger = logging.getLogger(TOKEN_LOGGER)
    level = logger.level
    yield
    logger.setLevel(level)


def test_ray_data_console_is_quiet_but_its_file_log_stays(clean: None) -> None:
    quiet_local_ray(verbose=False)
    path = os.environ["RAY_DATA_LOGGING_CONFIG"]
    config = json.loads(Path(path).read_text())
    assert config["handlers"]["console"]["level"] == "ERROR"
    assert config["loggers"]["ray.data"] == {
        "level": "DEBUG",
        "handlers": ["file", "console"],
        "propagate": False,
    }
    assert logging.getLogger(TOKEN_LOGGER).level == logging.ERROR
    # Ray Data accepts it: the ray.data logger's console handler shows errors only.
    from ray.data._internal.logging import configure_logging

    configure_logging()
    handlers = logging.getLogger("ray.data").handlers
    console = [h for h in handlers if type(h).__name__ == "PlainRayHandler"]
    assert [h.level for h in console] == [logging.ERROR]
    os.environ.pop("RAY_DATA_LOGGING_CONFIG")
    configure_logging()  # back to Ray's default for the other tests of this process


def test_verbose_keeps_rays_lines_and_a_users_own_setting_wins(
    clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet_local_ray(verbose=True)
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ

    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/users/own.yaml")
    quiet_local_ray(verbose=False)
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == "/users/own.yaml"
