"""The served model: resolved by reference, scored with the score job's own scorer, and
reloaded when the registry alias it was asked for moves.

`ModelHolder` polls the registry every `reload_interval_s` in a background thread; when
`models:/<name>@<alias>` points at another version, it loads that version beside the old one and
swaps the reference, so requests in flight finish on their model and none waits for a load. A
failed check or load is logged and the old model keeps serving.

A replica serves one image shape for its whole life (its clients send that shape, and a batch
stacks them): an alias moved to a version of another shape is not loaded, logged once per version.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.batch.scoring.report import json_number
from pipeline.model.scores import SCORE_COLUMNS
from pipeline.serve.requests import ScoreItem

log = logging.getLogger("ray.serve")  # Ray Serve's logger: lines land in the replica's log


@dataclass(frozen=True)
class ServedModel:
    reference: str  # what the user asked for
    name: str
    version: str
    image_shape: tuple[int, int, int]
    scorer: Any  # pipeline.batch.scoring.actors.Scorer

    def score(self, items: list[ScoreItem]) -> list[dict[str, Any]]:
        """One forward pass: per item the score job's columns, the model version that answered
        and how many images shared the pass."""
        count = len(items)
        batch = {  # the reader's row layout, which the score job's Scorer takes
            "key": np.array([item.key for item in items], dtype=object),
            "shard": np.full(count, "", dtype=object),
            "label": np.full(count, -1, dtype=np.int64),
            "image": np.stack([item.image for item in items]),  # (B, C, H, W) uint8
        }
        out = self.scorer(batch)
        return [
            {
                "key": str(out["key"][i]),
                **{column: json_number(out[column][i]) for column in SCORE_COLUMNS},
                "model": self.name,
                "version": self.version,
                "batch_size": count,
            }
            for i in range(count)
        ]


def load_served_model(reference: str, seed: int, draws: int) -> ServedModel:
    """Resolve `reference` as the batch jobs do and build its scorer on the CPU."""
    from pipeline.batch.resolve import resolve_batch_model
    from pipeline.batch.scoring.actors import Scorer

    model = resolve_batch_model(reference)
    scorer = Scorer(model.payload, seed=seed, draws=draws)
    return ServedModel(reference, model.name, model.version, model.image_shape, scorer)


def alias_of(reference: str) -> tuple[str, str] | None:
    """(name, alias) of `models:/<name>@<alias>`; None for any other reference."""
    if not reference.startswith("models:/"):
        return None
    name, at, alias = reference[len("models:/") :].partition("@")
    return (name, alias) if at and name and alias else None


class ModelHolder:
    """The current `ServedModel` of a replica, reloaded when its alias moves."""

    def __init__(self, reference: str, seed: int, draws: int, reload_interval_s: float) -> None:
        self.reference, self.seed, self.draws = reference, seed, draws
        self.current = load_served_model(reference, seed, draws)
        self._stop = threading.Event()
        self._refused: set[str] = set()  # versions of another shape, said once each
        self._alias = alias_of(reference)
        if self._alias and reload_interval_s > 0:
            threading.Thread(
                target=self._watch,
                args=(reload_interval_s,),
                name="flowray-alias-watch",
                daemon=True,
            ).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception as err:  # the registry may be down for a while: keep serving
                log.warning("flowray: alias check of %s failed: %s", self.reference, err)

    def check(self) -> bool:
        """Load the alias's version if it moved and has the served image shape; True when the
        served model changed."""
        from mlflow.tracking import MlflowClient

        from pipeline.tracking.registry import SHAPE_TAG, shape_tag

        assert self._alias is not None
        name, alias = self._alias
        found = MlflowClient().get_model_version_by_alias(name, alias)
        version = str(found.version)
        if version == self.current.version or version in self._refused:
            return False
        served, tagged = shape_tag(self.current.image_shape), (found.tags or {}).get(SHAPE_TAG)
        if tagged and tagged != served:
            return self._refuse(version, tagged, served)  # before downloading the weights
        loaded = load_served_model(f"models:/{name}/{version}", self.seed, self.draws)
        if loaded.image_shape != self.current.image_shape:  # a version without the tag
            return self._refuse(version, shape_tag(loaded.image_shape), served)
        previous, self.current = self.current.version, replace(loaded, reference=self.reference)
        log.info(
            "flowray: %s moved from v%s to v%s; now serving v%s",
            self.reference,
            previous,
            version,
            version,
        )
        return True

    def _refuse(self, version: str, shape: str, served: str) -> bool:
        self._refused.add(version)
        log.warning(
            "flowray: %s moved to v%s of image shape %s; not reloading: this replica serves %s "
            "(v%s) and its clients send that shape; serve the new version as its own "
            "deployment, under a new registered name",
            self.reference,
            version,
            shape,
            served,
            self.current.version,
        )
        return False
