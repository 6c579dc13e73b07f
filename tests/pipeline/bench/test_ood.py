"""The OOD suite: AUROC and FPR at 95% TPR against hand-computed values, the foreign sets, and the
smoke run on the untrained preset model (no Ray, no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowmodel import FlowConfig
from pipeline.bench import ood
from pipeline.bench.harness import Run, preset_flow
from pipeline.model.scores import score_images


def test_auroc_and_fpr95_match_hand_computed_values() -> None:
    inliers, outliers = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.5, 5.0])
    # Outlier above inlier in 2 + 4 of 8 pairs; 95% of 4 inliers: threshold 4, 2.5 passes.
    assert ood.auroc(inliers, outliers) == 0.75
    assert ood.fpr_at_95_tpr(inliers, outliers) == 0.5
    # A tie counts one half: (1 + 0.5 + 2) / 4.
    assert ood.auroc(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == 0.875
    same = np.random.default_rng(0).normal(size=100)
    assert ood.auroc(same, same) == 0.5
    assert ood.auroc(same, same + 100) == 1.0 and ood.fpr_at_95_tpr(same, same + 100) == 0.0
    assert ood.auroc(same, same - 100) == 0.0 and ood.fpr_at_95_tpr(same, same - 100) == 1.0


def test_foreign_sets_are_seeded_images_of_the_model_shape() -> None:
    held = np.random.default_rng(1).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    for name, (build, _) in ood.SETS.items():
        first = build(10, np.random.default_rng(5), held)
        again = build(10, np.random.default_rng(5), held)
        assert first.shape == (10, 28, 28) and first.dtype == np.uint8, name
        assert np.array_equal(first, again), name
    smooth = ood.SETS["smooth"][0](3, np.random.default_rng(5), held)
    assert smooth[0].min() == smooth[0].max()  # the first of each three is a constant
    assert np.array_equal(ood.SETS["inverted"][0](10, None, held), 255 - held[10:20])


@pytest.mark.usefixtures("fashion_mnist_dir")
def test_smoke_run_tells_noise_from_fashion_and_not_fashion_from_itself(tmp_path: Path) -> None:
    settings = ood.Settings(**ood.SMOKE)
    report = ood.measure(settings, Run(tmp_path, tmp_path, log=lambda _: None)).report()
    sets = report["sets"]
    assert list(sets) == list(ood.SETS)
    assert all(set(scores) == set(ood.SCORES) for scores in sets.values())
    # Uniform noise costs ~8.7 bits/dim even untrained, Fashion-MNIST ~5: perfectly separated.
    assert sets["noise"]["bits/dim"] == {"auroc": 1.0, "fpr95": 0.0}
    # Held-out Fashion-MNIST is not told apart by any score (48 against 24 images).
    assert all(0.3 < s["auroc"] < 0.7 for s in sets["fashion (control)"].values())
    assert report["worst_auroc"]["bits/dim"] == min(
        sets[name]["bits/dim"]["auroc"] for name in ood.SETS if name != "fashion (control)"
    )
    assert "| worst foreign set |" in report["markdown"]


def test_the_suites_default_score_is_score_images_ood_score() -> None:
    images = np.random.default_rng(2).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    config = FlowConfig(levels=2, steps_per_level=1, hidden_channels=8)
    flow = preset_flow(config, torch.from_numpy(images)).eval()
    keys = [f"k{i}" for i in range(6)]
    parts = ood._parts(flow, images, keys, ood.Settings(seed=3))
    served = score_images(flow, images, keys, seed=3, draws=1)["ood_score"]
    np.testing.assert_array_equal(ood.SCORES["ood_score"][0](parts, parts), served)
