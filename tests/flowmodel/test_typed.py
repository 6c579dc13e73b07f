"""The typed-config loader: every bad value fails with a message that names the dotted key, what
was expected and what was found; good values come back typed; configs round-trip through JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from flowmodel.errors import FlowrayError
from flowmodel.typed import ConfigError, flatten, from_dict, to_dict


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, found {self.lr}")


@dataclass(frozen=True)
class Storage:
    endpoint_url: str | None = None


@dataclass(frozen=True)
class Job:
    name: str
    steps: int = 10
    verbose: bool = False
    mode: Literal["fast", "exact"] = "fast"
    shape: tuple[int, int, int] = (1, 28, 28)
    temperatures: tuple[float, ...] = (0.5, 1.0)
    limit: int | None = None
    seed: int | str = 0
    optim: Optim = field(default_factory=Optim)
    storage: Storage | None = None
    tags: dict[str, int] = field(default_factory=dict)


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as error:
        from_dict(Job, {"name": "job", **data})
    return str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"step": 3}, "unknown key step (known keys: name, steps, verbose, mode, shape, "),
        ({"optim": {"lrr": 1}}, "unknown key optim.lrr (known keys: optim.lr, optim.betas)"),
        ({"storage": {"secret": "x"}}, "unknown key storage.secret (known keys: storage.endpoint_url)"),
    ],
)  # fmt: skip
def test_unknown_keys_are_named_with_the_keys_that_exist(data: dict, message: str) -> None:
    assert error_of(data).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": "10"}, "steps: expected an integer, found '10'"),
        ({"steps": True}, "steps: expected an integer, found True"),
        ({"steps": 2.5}, "steps: expected an integer, found 2.5"),
        ({"verbose": "yes"}, "verbose: expected true or false, found 'yes'"),
        ({"name": 3}, "name: expected a string, found 3"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, found 'fast'"),
        ({"optim": {"lr": False}}, "optim.lr: expected a number, found False"),
        ({"tags": {"a": "x"}}, "tags.a: expected an integer, found 'x'"),
        ({"tags": ["a"]}, "tags: expected a mapping, found ['a']"),
    ],
)  # fmt: skip
def test_wrong_types_name_the_dotted_key_the_expected_type_and_the_value(
    data: dict, message: str
) -> None:
    assert error_of(data) == message


def test_nested_dataclasses_are_built_from_mappings_and_check_their_own_rules() -> None:
    job = from_dict(Job, {"name": "job", "optim": {"lr": 1}})
    assert job.optim == Optim(lr=1.0, betas=(0.9, 0.999)) and isinstance(job.optim.lr, float)
    assert error_of({"optim": 3}) == "optim: expected a mapping, found 3"
    # A rule of the nested class (__post_init__'s ValueError) comes back under the section's name.
    assert error_of({"optim": {"lr": -1}}) == "optim: lr: expected > 0, found -1.0"
    with pytest.raises(ConfigError, match="^missing required key name$"):
        from_dict(Job, {})
    with pytest.raises(ConfigError, match=r"^Job: expected a mapping, found \['name'\]$"):
        from_dict(Job, ["name"])


def test_literals_accept_only_their_values() -> None:
    assert from_dict(Job, {"name": "job", "mode": "exact"}).mode == "exact"
    assert error_of({"mode": "slow"}) == "mode: expected one of ['fast', 'exact'], found 'slow'"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"shape": [1, 28]}, "shape: expected 3 items, found 2: [1, 28]"),
        ({"shape": [1, "28", 28]}, "shape[1]: expected an integer, found '28'"),
        ({"shape": 28}, "shape: expected a list, found 28"),
        ({"temperatures": [0.5, None]}, "temperatures[1]: expected a number, found None"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected a number, found 'x'"),
    ],
)  # fmt: skip
def test_tuples_check_their_length_and_each_item(data: dict, message: str) -> None:
    assert error_of(data) == message


def test_tuples_come_back_as_tuples_of_the_item_type() -> None:
    job = from_dict(Job, {"name": "job", "shape": [3, 32, 32], "temperatures": [1, 0.7, 0.5]})
    assert job.shape == (3, 32, 32)
    assert job.temperatures == (1.0, 0.7, 0.5) and isinstance(job.temperatures[0], float)


def test_optional_values_take_null_or_the_type_and_name_the_exact_key_otherwise() -> None:
    job = from_dict(Job, {"name": "job", "limit": None, "storage": {"endpoint_url": "http://s3"}})
    assert job.limit is None and job.storage == Storage("http://s3")
    assert from_dict(Job, {"name": "job", "limit": 5, "storage": None}).storage is None
    assert error_of({"limit": "ten"}) == "limit: expected an integer, found 'ten'"
    assert error_of({"storage": {"endpoint_url": 9}}) == (
        "storage.endpoint_url: expected a string, found 9"
    )


def test_unions_of_two_types_take_either_and_name_both_otherwise() -> None:
    assert from_dict(Job, {"name": "job", "seed": 3}).seed == 3
    assert from_dict(Job, {"name": "job", "seed": "abc"}).seed == "abc"
    assert error_of({"seed": 1.5}) == "seed: expected int | str, found 1.5"


def test_a_config_round_trips_through_json() -> None:
    job = Job(
        name="job",
        steps=3,
        verbose=True,
        mode="exact",
        shape=(3, 32, 32),
        temperatures=(0.7,),
        limit=100,
        seed="s",
        optim=Optim(lr=3e-4, betas=(0.8, 0.9)),
        storage=Storage("http://s3"),
        tags={"a": 1},
    )
    plain = to_dict(job)
    assert plain["shape"] == [3, 32, 32] and plain["optim"] == {"lr": 3e-4, "betas": [0.8, 0.9]}
    assert from_dict(Job, json.loads(json.dumps(plain))) == job
    assert from_dict(Job, to_dict(Job(name="defaults"))) == Job(name="defaults")


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(to_dict(Job(name="job", tags={"a": 1})))
    assert flat["optim.lr"] == 1e-3 and flat["optim.betas"] == [0.9, 0.999]
    assert flat["storage"] is None and flat["tags.a"] == 1 and flat["name"] == "job"


def test_config_errors_are_user_errors_with_a_hint_and_value_errors() -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(Job, {"name": "job", "steps": "x"})
    assert isinstance(error.value, FlowrayError) and isinstance(error.value, ValueError)
    assert "--help" in error.value.hint
    assert ConfigError("x", hint="try y").hint == "try y"
