"""How jobs report errors: any FlowrayError (config, data, registry, a job's own checks) is one
line plus its own hint, also when Ray wrapped it; it exits 2 (usage or config error) unless it
says it is a runtime failure (exit_code 1: a service down); anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import pytest

from flowmodel import FlowConfig
from flowmodel.errors import FlowrayError
from jobs import cli
from jobs.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UserError,
    exit_code_of,
    run_main,
)
from pipeline.config import load_config
from pipeline.data.streams import TransientReadError
from pipeline.data.tally import CorruptDataError
from pipeline.storage import StorageError, fsspec_filesystem
from pipeline.submission import SubmitError
from pipeline.tracking.connection import TrackingError
from pipeline.tracking.registry import ModelNotFound, RegistrationError


def stderr_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def bad_config() -> int:
    load_config(FlowConfig, None, ["levels=two"])
    return 0


def test_a_config_error_is_one_line_and_its_hint(capsys: pytest.CaptureFixture) -> None:
    assert run_main("flowray train", bad_config) == EXIT_USAGE == 2
    assert stderr_lines(capsys) == [
        "flowray train: error: levels: expected an integer, found 'two'",
        "hint: see the job's --help; config keys are the dataclass fields of the job's config",
    ]


def test_an_error_wrapped_by_ray_is_reported_as_the_user_error_inside(
    capsys: pytest.CaptureFixture,
) -> None:
    def body() -> int:
        try:
            raise CorruptDataError("shard-000001.tar", "img-7", "image size 0x0")
        except CorruptDataError as err:  # as Ray Train's TrainingFailedError wraps a worker's
            raise RuntimeError("training failed") from err

    assert run_main("flowray train", body) == EXIT_FAILURE  # broken data mid-run: runtime
    error, hint = stderr_lines(capsys)
    assert error == "flowray train: error: shard shard-000001.tar, key img-7: image size 0x0"
    assert hint.startswith("hint: pass --on-error skip (score) or --set data.on_error=skip")


def test_each_user_error_brings_its_own_hint(capsys: pytest.CaptureFixture) -> None:
    def missing_model() -> int:
        raise ModelNotFound("model 'models:/m@best' not found: 'm' has aliases none")

    def own_check() -> int:
        raise UserError("m has no version 9 (versions: 1)", hint="see `flowray models list`")

    assert run_main("flowray score", missing_model) == EXIT_USAGE
    assert stderr_lines(capsys)[1] == "hint: check the name and alias with `flowray models list`"
    assert run_main("flowray models", own_check) == EXIT_USAGE
    assert stderr_lines(capsys) == [
        "flowray models: error: m has no version 9 (versions: 1)",
        "hint: see `flowray models list`",
    ]


def test_a_missing_file_is_one_line_without_a_hint(capsys: pytest.CaptureFixture) -> None:
    def body() -> int:
        raise FileNotFoundError("not a flowray model directory: /tmp/x (missing model.safetensors)")

    assert run_main("flowray sample", body) == EXIT_USAGE
    assert stderr_lines(capsys) == [
        "flowray sample: error: not a flowray model directory: /tmp/x (missing model.safetensors)"
    ]


def test_a_bug_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    def body() -> int:
        raise KeyError("image")

    with pytest.raises(KeyError):
        run_main("flowray score", body)
    assert capsys.readouterr().err == ""


def test_an_unknown_command_exits_with_the_usage_code(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["trian"]) == EXIT_USAGE
    assert "flowray: unknown command 'trian'" in capsys.readouterr().err


def test_a_service_that_is_down_is_a_runtime_failure_not_a_usage_error(
    capsys: pytest.CaptureFixture,
) -> None:
    def tracking_down() -> int:
        raise TrackingError(
            "MLflow tracking server at http://127.0.0.1:9 is not reachable", hint="start it"
        )

    assert run_main("flowray score", tracking_down) == EXIT_FAILURE == 1
    assert stderr_lines(capsys) == [
        "flowray score: error: MLflow tracking server at http://127.0.0.1:9 is not reachable",
        "hint: start it",
    ]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ModelNotFound("no registered model 'x'"), EXIT_USAGE),
        (UserError("x has no version 9"), EXIT_USAGE),
        (UserError("promotion failed", exit_code=EXIT_FAILURE), EXIT_FAILURE),
        (TrackingError("down"), EXIT_FAILURE),
        (RegistrationError("val bits/dim nan"), EXIT_FAILURE),
        # Storage: down or refusing is runtime; the user's own URL or setup is usage.
        (StorageError("S3 endpoint http://x:9 is unreachable"), EXIT_FAILURE),
        (TransientReadError("storage kept failing"), EXIT_FAILURE),
        (StorageError("'s3://' names no bucket", exit_code=EXIT_USAGE), EXIT_USAGE),
        (CorruptDataError("shard-000001.tar", "img-7", "truncated"), EXIT_FAILURE),
        (SubmitError("cannot reach the Ray GCS"), EXIT_FAILURE),
        (SubmitError("no Ray cluster address", exit_code=EXIT_USAGE), EXIT_USAGE),
        (FileNotFoundError("/nowhere"), EXIT_USAGE),
        (FlowrayError("anything a user can fix"), EXIT_USAGE),
    ],
)
def test_each_error_kind_has_its_exit_code(error: BaseException, code: int) -> None:
    assert exit_code_of(error) == code


@pytest.mark.parametrize(("url", "code"), [("gs://bucket/x", EXIT_USAGE), ("s3://", EXIT_USAGE)])
def test_a_malformed_storage_url_is_a_usage_error(url: str, code: int) -> None:
    with pytest.raises(StorageError) as info:
        fsspec_filesystem(url)
    assert exit_code_of(info.value) == code


def test_storage_and_corrupt_data_errors_keep_their_exit_code_through_pickling() -> None:
    import pickle

    for error in (
        StorageError("unreachable"),
        StorageError("no bucket", exit_code=EXIT_USAGE),
        TransientReadError("kept failing", "rerun"),
        CorruptDataError("s.tar", "k", "bad"),
    ):
        copy = pickle.loads(pickle.dumps(error))  # as Ray ships a task's error
        assert exit_code_of(copy) == exit_code_of(error)


def test_a_runtime_failure_wrapped_by_ray_keeps_its_exit_code(
    capsys: pytest.CaptureFixture,
) -> None:
    class ServiceDown(FlowrayError, RuntimeError):
        exit_code = EXIT_FAILURE

    def body() -> int:
        try:
            raise ServiceDown("S3 endpoint unreachable")
        except ServiceDown as err:  # as Ray Train's TrainingFailedError wraps a worker's
            raise RuntimeError("training failed") from err

    assert run_main("flowray train", body) == EXIT_FAILURE
    assert stderr_lines(capsys) == ["flowray train: error: S3 endpoint unreachable"]
