"""The jobs' one config loader: preset or file, then --set overrides, then a job's own options,
validated; the options themselves, read off each config dataclass; and the errors a user meets
while writing a config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from flowmodel.typed import ConfigError, field_docs
from jobs.config import config_from_args, config_parser
from pipeline.batch.sampling import SampleConfig
from pipeline.batch.scoring.config import ScoreConfig
from pipeline.config import PRESETS, load_config
from pipeline.tracking.connection import WORKDIR_VARIABLE, resolve_tracking_uri
from pipeline.train.config import TrainConfig


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_as_a_train_config(preset: str) -> None:
    config = load_config(TrainConfig, preset)
    assert config == load_config(TrainConfig, str(PRESETS / f"{preset}.yaml"))


def test_overrides_then_options_win_over_the_preset_and_unset_options_change_nothing() -> None:
    config = load_config(
        TrainConfig,
        "fashion-mnist",
        ["optim.lr=3e-4", "run.address=ray://head:10001", "model.image_shape=[1, 32, 32]"],
        {"run.address": "auto", "mlflow.tracking_uri": None},
    )
    assert config.optim.lr == 3e-4
    assert config.model.image_shape == (1, 32, 32)
    assert config.run.address == "auto"  # the option beats --set
    assert config.mlflow.tracking_uri is None  # None: the option was not given
    assert config.max_steps == 20000  # from the preset, not the dataclass default (2000)


def test_option_values_are_taken_as_given_while_overrides_parse_as_yaml() -> None:
    assert load_config(TrainConfig, None, [], {"run.name": "123"}).run.name == "123"
    with pytest.raises(ConfigError, match=r"^run\.name: expected a string, found 123$"):
        load_config(TrainConfig, None, ["run.name=123"])
    assert load_config(TrainConfig, None, ["run.name='123'"]).run.name == "123"


def test_a_job_without_a_config_file_takes_options_into_nested_sections() -> None:
    config = load_config(
        SampleConfig,
        None,
        ["grid_images=4"],
        {"model": "models:/m@champion", "output": "out", "storage.endpoint_url": "http://s3"},
    )
    assert (config.model, config.output, config.grid_images) == ("models:/m@champion", "out", 4)
    assert config.storage.endpoint_url == "http://s3"


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("no-such-preset", [], r"^config 'no-such-preset': no such file and no such preset "
         r"\(presets: fashion-mnist, fashion-mnist-gpu, fashion-mnist-long, "
         r"imagenet64-gpu, rgb32, rgb32-gpu\)$"),
        (None, ["max_steps"], r"^--set 'max_steps': expected key\.path=value$"),
        ("fashion-mnist", ["max_steps.limit=3"], r"^--set 'max_steps\.limit=3': expected "
         r"max_steps to be a section, found the value 20000$"),
        (None, ["optim.lrr=1"], r"^unknown key optim\.lrr \(known keys: optim\.optimizer, "),
        (None, ["batch_size=big"], r"^batch_size: expected an integer, found 'big'$"),
    ],
)  # fmt: skip
def test_config_mistakes_name_the_key_what_was_expected_and_what_was_found(
    path: str | None, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, path, overrides)


def test_a_config_file_must_hold_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "list.yaml"
    file.write_text("- model\n- data\n")
    with pytest.raises(
        ConfigError, match="list.yaml: expected a mapping at the top level, found list"
    ):
        load_config(TrainConfig, str(file))


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path: Path) -> None:
    # YAML 1.1 alone reads 3e-4 as a string, which the typed config would refuse for optim.lr.
    file = tmp_path / "lr.yaml"
    file.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(TrainConfig, str(file)).optim.lr == 3e-4
    assert load_config(TrainConfig, None, ["optim.lr=2E-3"]).optim.lr == 2e-3
    assert load_config(TrainConfig, None, ["run.name=3e"]).run.name == "3e"


# ----------------------------------------------------------------------------- options from fields


def job_parsers() -> dict[str, tuple[type, argparse.ArgumentParser]]:
    from jobs import prepare, sample, score, serve
    from pipeline.batch.scoring.config import ScoreConfig
    from pipeline.serve.config import ServeConfig

    return {
        "score": (ScoreConfig, score.parser()),
        "sample": (SampleConfig, sample.parser()),
        "serve": (ServeConfig, serve.parser()),
        "prepare": (prepare.PrepareConfig, prepare.build_parser()),
    }


@pytest.mark.parametrize("job", ["score", "sample", "serve", "prepare"])
def test_every_field_of_a_flat_config_is_documented_and_is_a_flag(job: str) -> None:
    cls, parser = job_parsers()[job]
    docs = field_docs(cls)
    keys = {a.dest.removeprefix("config:") for a in parser._actions if a.dest.startswith("config:")}
    for item in dataclasses.fields(cls):
        assert docs.get(item.name), f"{cls.__name__}.{item.name} has no Attributes entry"
        if item.name != "storage":  # a section: --set storage.<key>, and the two flags below
            assert item.name in keys, f"{job} has no flag for {item.name}"
    if any(item.name == "storage" for item in dataclasses.fields(cls)):  # serve has no storage
        assert {"storage.endpoint_url", "storage.region"} <= keys


def test_the_file_then_set_then_flags_and_a_flag_not_given_changes_nothing(
    tmp_path: Path,
) -> None:
    from jobs.score import parser

    file = tmp_path / "score.yaml"
    file.write_text("model: m\ninput: i\noutput: o\nbatch_size: 100\nlog_to_mlflow: false\n")
    base = ["--config", str(file)]

    def batch_size(*argv: str) -> int:
        return config_from_args(ScoreConfig, parser().parse_args([*base, *argv])).batch_size

    assert batch_size() == 100
    assert batch_size("--set", "batch_size=200") == 200
    assert batch_size("--batch-size", "300", "--set", "batch_size=200") == 300
    config = config_from_args(ScoreConfig, parser().parse_args(base))
    assert config.log_to_mlflow is False  # an on/off flag not given leaves the file's value
    assert config.on_error == "skip" and config.storage.endpoint_url is None


def test_flags_are_typed_by_the_field() -> None:
    from jobs.sample import parser

    argv = ["--model", "m", "--output", "o", "-n", "12", "--temperature", "0.5"]
    argv += ["--grid-temperatures", "0.5", "1", "--no-log-to-mlflow", "--region", "eu-north-1"]
    config = config_from_args(SampleConfig, parser().parse_args(argv))
    assert (config.n, config.temperature, config.grid_temperatures) == (12, 0.5, (0.5, 1.0))
    assert config.log_to_mlflow is False and config.storage.region == "eu-north-1"
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--num", "many"])
    assert done.value.code == 2


def test_help_takes_each_default_and_text_from_the_dataclass(
    capsys: pytest.CaptureFixture,
) -> None:
    from jobs.score import parser

    parser().print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size N images per forward pass in an actor (default: 256)" in text
    assert "--on-error {skip,fail} an unreadable image is logged" in text
    assert "--no-log-to-mlflow log the summary run" in text
    assert (
        "--model MODEL models:/<name>@<alias>" in text and "(required unless in --config)" in text
    )


def test_field_docs_reads_shared_and_continued_entries() -> None:
    @dataclasses.dataclass
    class Example:
        """An example.

        Attributes:
            host, port: where it listens,
                on one line.
            name: its name.

        Raises:
            nothing: a later section is not read.
        """

        host: str = ""
        port: int = 0
        name: str = ""

    docs = field_docs(Example)
    assert docs == {
        "host": "where it listens, on one line.",
        "port": "where it listens, on one line.",
        "name": "its name.",
    }


def test_a_field_without_a_docstring_entry_cannot_become_a_flag() -> None:
    @dataclasses.dataclass
    class Undocumented:
        """No attributes section."""

        size: int = 1

    with pytest.raises(TypeError, match=r"Undocumented\.size: expected an entry"):
        config_parser("flowray x", "", Undocumented)


def test_the_work_folder_moves_with_flowray_workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(WORKDIR_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    config = load_config(TrainConfig, "fashion-mnist")
    assert (config.workdir, config.data.train, config.run.storage_path) == (
        "flowray-work",
        "flowray-work/data/train",
        "flowray-work/runs",
    )
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/flowray-work/mlflow.db"
    monkeypatch.setenv(WORKDIR_VARIABLE, str(tmp_path / "elsewhere"))
    config = load_config(TrainConfig, "fashion-mnist")
    assert config.data.validation == f"{tmp_path}/elsewhere/data/test"
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
