"""The pretraining scripts' pieces that a GPU run cannot check cheaply: DINO's view geometry, the DINO
loss, the frozen-feature evaluations, the guard that skips and diagnoses non-finite updates, calibration."""

import copy
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
from common import (
    Images,
    Recipe,
    Trainer,
    attention_extremes,
    build_model,
    calibrate,
    knn_accuracy,
    linear_probe,
    locate_non_finite,
    normalize,
    seed_everything,
)
from pretrain_tin import DinoRecipe, DinoTrainer, apply_views, dino_loss, frozen_quality, rotate_hue


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


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()


class _SafeSqrt(nn.Module):
    """Finite forward, NaN backward where x < 0 (the classic `where` trap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.clamp_min(-1).sqrt(), 0.0)


def test_locate_non_finite_names_the_module_or_backward_function() -> None:
    x = torch.ones(8, 4)
    net = nn.Sequential(nn.Linear(4, 4), _Log(), nn.Linear(4, 1))
    nn.init.constant_(net[0].weight, -1.0)  # every input to the log is negative
    finite, where = locate_non_finite({"net": net}, lambda: net(x).sum())
    assert not finite and where == "output of net.1 (_Log; inputs finite)"
    net = nn.Sequential(nn.Linear(4, 4), _SafeSqrt())
    nn.init.constant_(net[0].weight, -1.0)
    finite, where = locate_non_finite({"net": net}, lambda: net(x).sum())
    assert not finite and where.startswith("backward: Function 'SqrtBackward0' returned nan")
    nn.init.constant_(net[0].weight, 1.0)
    assert locate_non_finite({"net": net}, lambda: net(x).sum()) == (True, "finite when re-run eagerly")
    net[0].bias.data[0] = float("inf")
    finite, where = locate_non_finite({"net": net}, lambda: net(x).sum())
    assert not finite and where == "non-finite parameters before the step: net.0.bias"


def _images(n: int = 8, classes: int = 3) -> Images:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(n) % classes
    return Images(x, y, x, y, tuple(map(str, range(classes))), "", None)


def test_a_compiled_step_that_goes_non_finite_is_skipped_and_training_continues_eagerly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    data, stats = _images(), (torch.full((3,), 0.5), torch.full((3,), 0.25))
    model = build_model(3, 0.0)
    trainer = Trainer(model, data, Recipe(batch_size=4), stats, compile_=False)
    trainer.forward, trainer.compiled = lambda x: model(x) * float("nan"), True  # a broken compiled graph
    gen, rng = seed_everything(0, torch.device("cpu"))
    opt = trainer.make_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.step(opt, torch.arange(4), 0, 10, gen, rng) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the update was skipped
    assert trainer.skipped == [0] and trainer.diagnoses[0]["eager_rerun_finite"] and trainer.diagnoses[0]["compiled"]
    assert not trainer.compiled and trainer.forward is model and "training eagerly" in capsys.readouterr().out
    assert trainer.step(opt, torch.arange(4, 8), 1, 10, gen, rng).isfinite()
    assert not torch.equal(before["head.weight"], model.head.weight) and trainer.skipped == [0]


def test_a_dino_step_with_a_non_finite_centre_leaves_student_teacher_and_centre_alone() -> None:
    torch.manual_seed(0)
    r = DinoRecipe(batch_size=2, hidden_dim=16, bottleneck_dim=8, out_dim=16, local_crops=2)
    trainer = DinoTrainer(_images(), r, (torch.full((3,), 0.5), torch.full((3,), 0.25)), compile_=False)
    trainer.center[3] = float("nan")  # nothing a module computes: eager mode fails the same way
    gen, rng = seed_everything(0, torch.device("cpu"))
    opt = trainer.make_optimizer()
    before = copy.deepcopy((trainer.student.state_dict(), trainer.teacher.state_dict()))
    assert trainer.step(opt, torch.arange(2), 5, 10, gen, rng) == 0
    (diagnosis,) = trainer.diagnoses
    assert not diagnosis["eager_rerun_finite"] and diagnosis["where"].startswith("the loss (nan)")
    assert all(torch.equal(before[0][k], v) for k, v in trainer.student.state_dict().items())
    assert all(torch.equal(before[1][k], v) for k, v in trainer.teacher.state_dict().items())
    assert trainer.center[:3].eq(0).all() and trainer.center[3].isnan()


def test_calibration_times_steps_for_at_least_the_minimum() -> None:
    def step(*_: object) -> torch.Tensor:
        time.sleep(0.001)
        return torch.zeros(())

    def make_optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)

    trainer = SimpleNamespace(
        device=torch.device("cpu"), n_train=100, skipped=[], step=step, make_optimizer=make_optimizer
    )
    t0 = time.perf_counter()
    epochs, step_s = calibrate(trainer, Recipe(batch_size=10, time_budget_s=1.0), 0, min_timed_s=0.3)
    assert time.perf_counter() - t0 >= 0.3 and step_s >= 0.001 and epochs >= 1


def test_attention_extremes_see_a_row_offset_that_the_model_output_ignores() -> None:
    torch.manual_seed(0)
    model = build_model(0, 0.0).eval()
    x, stats = _images(4).train_x, (torch.full((3,), 0.5), torch.full((3,), 0.25))
    before, out = attention_extremes(model, x, *stats), model(normalize(x, *stats))
    assert 0 < before["attn_lse_min"] < math.log(64) + 1 and before["attn_logit_absmax"] < 5
    attn = model.blocks[0].attn
    with torch.no_grad():  # a key bias adds q . b to every logit of a row: softmax cannot see it
        attn.qkv.bias[192 : 192 + 64] += 1e4 * torch.randn(64)
    after = attention_extremes(model, x, *stats)
    assert after["attn_lse_min"] < -88 and after["attn_logit_absmax"] > 88
    torch.testing.assert_close(model(normalize(x, *stats)), out, atol=1e-3, rtol=0)


def test_frozen_quality_reports_non_finite_features_instead_of_probing() -> None:
    data = _images(40, classes=4)
    model = build_model(0, 0.0).eval()
    model.fc_norm.bias.data[0] = float("nan")
    quality = frozen_quality(model, data, (torch.full((3,), 0.5), torch.full((3,), 0.25)), seed=0)
    assert quality == {"non_finite_feature_images": 80}
