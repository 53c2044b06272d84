from __future__ import annotations

import math

import pytest
import torch

from yoda.diffusion.schedule import (
    PREDICTIONS,
    SCHEDULES,
    make_schedule,
    predict_eps,
    predict_x0,
    q_sample,
    training_target,
    v_from,
)
from yoda.errors import ConfigError


def _cosine_f(t: float, T: int, s: float = 0.008) -> float:
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("T", [2, 20, 100, 1000])
def test_alpha_bar_float64_strictly_decreasing(kind: str, T: int) -> None:
    sched = make_schedule(kind, T)
    ab = sched.alpha_bar
    assert ab.dtype == torch.float64
    assert ab.shape == (T,)
    assert sched.T == T and sched.kind == kind
    assert bool((ab[1:] < ab[:-1]).all())
    assert 0.0 < float(ab[-1]) and float(ab[0]) < 1.0


def test_linear_endpoints_T1000() -> None:
    ab = make_schedule("linear", 1000).alpha_bar
    betas = 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
    assert float(ab[0]) == pytest.approx(1.0 - 1e-4, abs=1e-15)
    assert float(betas[-1]) == pytest.approx(0.02, abs=1e-10)
    assert float(betas[500]) == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, abs=1e-10)
    # prod(1 - beta) for the DDPM schedule
    assert float(ab[-1]) == pytest.approx(4.0358e-5, rel=1e-4)


@pytest.mark.parametrize("T", [20, 100, 1000])
def test_linear_other_T_spans_same_noise_range(T: int) -> None:
    ab = make_schedule("linear", T).alpha_bar
    betas = 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
    expected = (torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * 1000 / T).clamp(max=0.999)
    torch.testing.assert_close(betas, expected, rtol=1e-9, atol=1e-12)
    assert float(ab[0]) > 0.99
    assert float(ab[-1]) < 1e-4


@pytest.mark.parametrize("T", [20, 1000])
def test_cosine_matches_closed_form(T: int) -> None:
    ab = make_schedule("cosine", T).alpha_bar
    closed = torch.tensor(
        [_cosine_f(t + 1, T) / _cosine_f(0, T) for t in range(T)], dtype=torch.float64
    )
    # all but the last step are unclipped: alpha_bar_t = f(t + 1) / f(0)
    torch.testing.assert_close(ab[:-1], closed[:-1], rtol=1e-9, atol=1e-15)
    # f(T) ~ 0 makes the last beta ~1, clipped at 0.999
    assert float(ab[-1] / ab[-2]) == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_T1_is_pure_noise(kind: str) -> None:
    sched = make_schedule(kind, 1)
    assert sched.alpha_bar.dtype == torch.float64
    assert sched.alpha_bar.tolist() == [0.0]
    x0 = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    assert torch.equal(q_sample(sched, x0, 0, noise), noise)


@pytest.mark.parametrize(
    ("kind", "T"), [("quadratic", 10), ("linear", 0), ("cosine", -3), ("linear", 2.5)]
)
def test_bad_schedule_raises(kind: str, T: object) -> None:
    with pytest.raises(ConfigError):
        make_schedule(kind, T)  # type: ignore[arg-type]


def _manual(sched, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = sched.alpha_bar[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return ab.sqrt(), (1 - ab).sqrt()


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("T", [20, 1000])
def test_forward_noising_and_velocity(kind: str, T: int) -> None:
    sched = make_schedule(kind, T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 2, 5, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 2, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (6,), generator=g)
    t[0], t[1] = 0, T - 1
    a, b = _manual(sched, t, x0)
    x_t = q_sample(sched, x0, t, eps)
    torch.testing.assert_close(x_t, a * x0 + b * eps, rtol=0, atol=1e-14)
    v = training_target(sched, "v", x0, eps, t)
    torch.testing.assert_close(v, a * eps - b * x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(v_from(sched, x0, eps, t), v, rtol=0, atol=0)
    assert torch.equal(training_target(sched, "eps", x0, eps, t), eps)
    assert torch.equal(training_target(sched, "x0", x0, eps, t), x0)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_predict_x0_and_eps_invert_targets(kind: str, prediction: str) -> None:
    T = 1000
    sched = make_schedule(kind, T)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 249, 500, 998, 999, 700])
    x_t = q_sample(sched, x0, t, eps)
    target = training_target(sched, prediction, x0, eps, t)
    # eps -> x0 divides by sqrt(alpha_bar), ~5e-5 at the last cosine step
    torch.testing.assert_close(predict_x0(sched, prediction, target, x_t, t), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(
        predict_eps(sched, prediction, target, x_t, t), eps, rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_predict_x0_float32_int_timestep(kind: str, prediction: str) -> None:
    sched = make_schedule(kind, 100)
    x0 = torch.rand(2, 7, 5) * 2 - 1
    eps = torch.randn(2, 7, 5)
    for t in (0, 50, 99):
        x_t = q_sample(sched, x0, t, eps)
        target = training_target(sched, prediction, x0, eps, t)
        out = predict_x0(sched, prediction, target, x_t, t)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_v_prediction_x0_formula() -> None:
    # x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v, independent of how v was produced
    sched = make_schedule("linear", 1000)
    x_t = torch.randn(3, 4, dtype=torch.float64)
    v = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    a, b = _manual(sched, t, x_t)
    torch.testing.assert_close(predict_x0(sched, "v", v, x_t, t), a * x_t - b * v)


def test_T1_regression_model_conversions() -> None:
    sched = make_schedule("linear", 1)
    x_t = torch.randn(2, 4)
    v = torch.randn(2, 4)
    # alpha_bar = 0: x0 = -v for a v-model, x0 passes through for an x0-model
    torch.testing.assert_close(predict_x0(sched, "v", v, x_t, 0), -v)
    assert torch.equal(predict_x0(sched, "x0", v, x_t, 0), v)
    with pytest.raises(ConfigError, match="eps"):
        predict_x0(sched, "eps", v, x_t, 0)


def test_errors() -> None:
    sched = make_schedule("linear", 10)
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError):
        predict_x0(sched, "score", x, x, 0)
    with pytest.raises(ConfigError):
        training_target(sched, "velocity", x, x, 0)
    with pytest.raises(ConfigError):
        q_sample(sched, x, 10, x)
    with pytest.raises(ConfigError):
        q_sample(sched, x, torch.tensor([0, 10]), x)
    with pytest.raises(ConfigError):
        q_sample(sched, x, torch.tensor([0.5, 1.0]), x)


def test_coefficients_cached_per_dtype() -> None:
    sched = make_schedule("cosine", 50)
    a32, b32 = sched.coefficients("cpu", torch.float32)
    assert a32.dtype == torch.float32
    assert sched.coefficients("cpu", torch.float32)[0] is a32
    torch.testing.assert_close(
        a32.double() ** 2 + b32.double() ** 2, torch.ones(50, dtype=torch.float64)
    )


def test_tables_first_built_in_inference_mode_still_serve_training():
    sched = make_schedule("linear", 10)
    x0 = torch.randn(2, 3)
    with torch.inference_mode():
        q_sample(sched, x0, 5, torch.randn(2, 3))
    w = torch.ones(2, 3, requires_grad=True)
    out = predict_x0(sched, "v", w * 2.0, x0, 5)
    out.sum().backward()  # raises if the cached tables were inference tensors
    assert w.grad is not None and torch.isfinite(w.grad).all()
