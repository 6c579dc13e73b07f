"""Rank 0's reporting helpers without a Ray cluster: Ray Train's per-report chatter is silenced
unless verbose."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from ray.train.v2._internal.execution import context

from pipeline.train.config import TrainConfig
from pipeline.train.reporting import quiet_ray_train_reports


@pytest.fixture
def ray_train_logger() -> Iterator[logging.Logger]:
    level = context.logger.level
    context.logger.setLevel(logging.NOTSET)
    yield context.logger
    context.logger.setLevel(level)


def test_ray_train_report_lines_are_hidden_unless_verbose(
    ray_train_logger: logging.Logger,
) -> None:
    quiet_ray_train_reports(verbose=True)
    assert ray_train_logger.level == logging.NOTSET
    quiet_ray_train_reports(verbose=False)
    assert ray_train_logger.level == logging.WARNING
    assert not ray_train_logger.isEnabledFor(logging.INFO)


def test_verbose_is_off_by_default_and_settable() -> None:
    assert TrainConfig().verbose is False
    assert TrainConfig.from_dict({"verbose": True}).verbose is True
