"""The jobs' one config loader: preset or file, then --set overrides, then a job's own options,
validated; and the errors a user meets while writing a config."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowmodel.typed import ConfigError
from pipeline.batch.sampling import SampleConfig
from pipeline.config import PRESETS, load_config
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
         r"\(presets: fashion-mnist, fashion-mnist-long, imagenet64-gpu, rgb32\)$"),
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
