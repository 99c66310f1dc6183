"""The pretraining scripts' pieces that a GPU run cannot check cheaply: DINO's view geometry, the DINO
loss, the frozen-feature evaluations and the guard that skips non-finite updates."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
from common import knn_accuracy, linear_probe, update_is_finite
from pretrain_tin import DinoRecipe, apply_views, dino_loss, rotate_hue


def _draws(box: list[float], n: int) -> dict[str, torch.Tensor]:
    off = torch.zeros(n, dtype=torch.bool)
    return {
        "box": torch.tensor([box] * n, dtype=torch.float32),
        "jitter": off,
        "brightness": torch.ones(n),
        "contrast": torch.ones(n),
        "saturation": torch.ones(n),
        "hue": torch.zeros(n),
        "gray": off,
        "solarize": off,
    }


def test_views_crop_and_flip_exact_pixels() -> None:
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    stats = torch.zeros(3), torch.ones(3)
    pixels = x.float() / 255
    torch.testing.assert_close(apply_views(x, _draws([1, 1, 0, 0], 3), 32, *stats), pixels)
    torch.testing.assert_close(apply_views(x, _draws([-1, 1, 0, 0], 3), 32, *stats), pixels.flip(3))
    top_left = apply_views(x, _draws([0.5, 0.5, -0.5, -0.5], 3), 16, *stats)  # a quarter, at its own size
    torch.testing.assert_close(top_left, pixels[:, :, :16, :16])
    torch.testing.assert_close(rotate_hue(pixels, torch.ones(3)), pixels, atol=1e-5, rtol=0)  # a full turn


def test_dino_loss_skips_each_view_against_itself() -> None:
    r = DinoRecipe(out_dim=8)
    teacher = torch.randn(2, 4, 8)
    student = torch.cat([teacher * 10, torch.randn(3, 4, 8)])  # views 0, 1 equal the teacher's
    center = torch.zeros(8)
    loss = dino_loss(student, teacher, center, r, teacher_temp=0.04)
    q = torch.softmax(teacher / 0.04, -1)
    log_p = torch.log_softmax(student / r.student_temp, -1)
    pairs = [(g, v) for g in range(2) for v in range(5) if g != v]
    expected = sum(-(q[g] * log_p[v]).sum(-1).mean() for g, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)


def test_knn_and_linear_probe_separate_clusters_and_keep_groups_whole() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 4
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=gen)
    assert knn_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.95
    groups = torch.arange(200) // 10
    result = linear_probe(x[:200], y[:200], x[200:], y[200:], groups=groups)
    assert result["acc"] > 0.95 and result["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    shuffled = linear_probe(x[:200], y[torch.randperm(200, generator=gen)], x[200:], y[200:])
    assert shuffled["acc"] < 0.6  # labels that carry nothing give chance, not a leak


def test_non_finite_updates_are_skipped_and_counted(capsys: pytest.CaptureFixture[str]) -> None:
    skipped: list[int] = []
    assert update_is_finite(torch.tensor(1.0), torch.tensor(2.0), 0, skipped)
    assert not update_is_finite(torch.tensor(float("nan")), torch.tensor(2.0), 7, skipped)
    assert not update_is_finite(torch.tensor(1.0), torch.tensor(float("inf")), 9, skipped)
    assert skipped == [7, 9] and "step 7" in capsys.readouterr().out
