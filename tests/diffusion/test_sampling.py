from __future__ import annotations

import numpy as np
import pytest
import torch

from yoda.diffusion.sampling import (
    COMBINES,
    check_regression_allowed,
    combine_views,
    diffusion,
    expa,
    regression,
    sample,
    timesteps_for,
    timesteps_full,
    timesteps_preview,
    timesteps_truncated,
)
from yoda.diffusion.schedule import make_schedule, q_sample
from yoda.errors import ConfigError, ModelError
from yoda.volume.views import VIEWS

SHAPE = (4, 5, 6)


def _truth(low: float = -0.9, high: float = 0.9, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g)


class Oracle:
    """Returns the true x0 (plus optional fresh noise of std sigma), recording every call."""

    def __init__(self, truth: torch.Tensor, sigma: float = 0.0, seed: int = 123) -> None:
        self.truth = truth
        self.sigma = sigma
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.evaluations = 0
        self.views: list[str] = []
        self.ts: list[int] = []
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: int, view: str) -> torch.Tensor:
        assert isinstance(t, int)
        self.calls += 1
        self.evaluations += x_t.shape[0]
        self.views.append(view)
        self.ts.append(t)
        self.inputs.append(x_t.clone())
        out = self.truth.expand_as(x_t)
        if self.sigma:
            out = out + self.sigma * torch.randn(x_t.shape, generator=self.gen)
        return out


def _mixing(truth: torch.Tensor):
    """A denoiser whose output depends on x_t, so the random draws show in the result."""

    def denoise(x_t: torch.Tensor, t: int, view: str) -> torch.Tensor:
        return 0.5 * truth + 0.3 * x_t

    return denoise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- timesteps


def test_timesteps_truncated_paper_default() -> None:
    ts = timesteps_truncated(1000)
    assert len(ts) == 251
    assert ts == [999, *range(249, -1, -1)]
    assert timesteps_truncated(1000, 999) == timesteps_full(1000)
    assert timesteps_truncated(1000, 0) == [999]
    assert timesteps_truncated(1) == [0]


def test_timesteps_full() -> None:
    assert timesteps_full(20) == list(range(19, -1, -1))
    assert timesteps_full(1) == [0]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(("T", "k"), [(1000, 2), (1000, 6), (1000, 50), (1000, 251), (20, 4)])
def test_timesteps_preview(kind: str, T: int, k: int) -> None:
    ts = timesteps_preview(make_schedule(kind, T), k)
    assert len(ts) == k
    assert ts[0] == T - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert set(ts) <= set(timesteps_truncated(T))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("k", [4, 5, 8])
def test_timesteps_preview_are_evenly_spaced_in_log_snr(kind: str, k: int) -> None:
    """Each step is the timestep whose log-SNR lies nearest to k-1 evenly spaced values from
    t = 249 to t = 0; so the steps crowd towards t = 0, unlike even strides."""
    sched = make_schedule(kind, 1000)
    ab = sched.alpha_bar[:250]
    log_snr = torch.log(ab / (1 - ab))
    ts = timesteps_preview(sched, k)[1:]
    targets = torch.linspace(float(log_snr[249]), float(log_snr[0]), k - 1, dtype=torch.float64)
    for t, target in zip(ts, targets, strict=True):
        assert abs(log_snr[t] - target) == (log_snr - target).abs().min()
    gaps = [a - b for a, b in zip(ts, ts[1:], strict=False)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 2 * gaps[-1]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [8, 20, 100, 1000])
def test_timesteps_preview_every_k_is_a_valid_subset(kind: str, T: int) -> None:
    sched = make_schedule(kind, T)
    for k in range(2, T // 4 + 2):
        ts = timesteps_preview(sched, k)
        assert len(ts) == k and ts[0] == T - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts[1:], ts[2:], strict=False))
        assert k == 2 or ts[1] == T // 4 - 1


def test_timesteps_preview_limits() -> None:
    sched = make_schedule("linear", 1000)
    assert timesteps_preview(sched, 1) == [999]
    assert timesteps_preview(sched, 2) == [999, 0]
    assert timesteps_preview(sched, 251) == timesteps_truncated(1000)
    # near t = 0 log-SNR jumps by more than the target spacing, so nearest timesteps repeat;
    # they are kept distinct
    assert timesteps_preview(make_schedule("linear", 20), 6) == [19, 4, 3, 2, 1, 0]
    with pytest.raises(ConfigError):
        timesteps_preview(sched, 252)
    with pytest.raises(ConfigError):
        timesteps_preview(sched, 0)
    with pytest.raises(ConfigError):
        timesteps_preview(make_schedule("linear", 3), 2)  # T // 4 = 0 leaves only t = T-1


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (None, timesteps_truncated(100)),
        ("truncated", timesteps_truncated(100)),
        ("full", timesteps_full(100)),
        (5, timesteps_preview(make_schedule("linear", 100), 5)),
        ("5", timesteps_preview(make_schedule("linear", 100), 5)),
        (1, [99]),
        ([99, 10, 0], [99, 10, 0]),
        (torch.tensor([99, 10, 0]), [99, 10, 0]),
        (np.array([99, 10, 0]), [99, 10, 0]),
    ],
)
def test_timesteps_for(steps, expected: list[int]) -> None:
    assert timesteps_for(make_schedule("linear", 100), steps) == expected


@pytest.mark.parametrize(
    "steps",
    ["fast", "²", 0, -2, True, [100], [], [3.5], torch.tensor(5), torch.tensor([100])],
)
def test_timesteps_for_errors(steps) -> None:
    with pytest.raises(ConfigError):
        timesteps_for(make_schedule("linear", 100), steps)


# ----------------------------------------------------------------------------- oracles


def _run(mode: str, denoise, sched, **kw):
    if mode == "regression":
        return regression(denoise, SHAPE, sched, **kw)
    if mode == "diffusion":
        return diffusion(denoise, SHAPE, sched, **kw)
    return expa(denoise, SHAPE, sched, n_ex=3, **kw)


ORACLE_CASES = [
    ("regression", 1000, {}),
    ("regression", 1000, {"views": ("axial",)}),
    ("regression", 1000, {"combine": "median"}),
    ("regression", 1000, {"combine": "rms"}),
    ("regression", 1, {"prediction": "x0"}),
    ("diffusion", 1000, {}),
    ("diffusion", 1000, {"timesteps": "full", "views": "sagittal"}),
    ("diffusion", 20, {"timesteps": "full"}),
    ("diffusion", 1000, {"timesteps": 6}),
    ("diffusion", 20, {"timesteps": [19, 7, 3, 0], "views": ("coronal",)}),
    ("expa", 1000, {}),
    ("expa", 20, {"timesteps": "full", "chunk": 2}),
    ("expa", 1000, {"timesteps": 4}),
]


@pytest.mark.parametrize(("mode", "T", "kw"), ORACLE_CASES)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(("low", "high"), [(-0.95, 0.95), (-1.6, 1.6)])
def test_oracle_returns_truth(mode: str, T: int, kw: dict, kind: str, low: float, high: float):
    truth = _truth(low, high)
    before = truth.clone()
    sched = make_schedule(kind, T)
    res = _run(mode, Oracle(truth), sched, generator=_gen(0), **kw)
    assert res.image.shape == SHAPE
    expected = truth.clamp(-1, 1)
    if mode == "diffusion":
        assert torch.equal(res.image, expected)
    else:
        torch.testing.assert_close(res.image, expected, rtol=0, atol=1e-6)
    if high > 1:
        assert float(res.image.max()) == 1.0 and float(res.image.min()) == -1.0
    assert torch.equal(truth, before)  # the denoiser's output is not clamped in place


def test_expa_noisy_oracle_approaches_eq2_limit() -> None:
    """Final samples x = x0' + sigma * n with n ~ N(0, 1), fresh per trajectory.

    Scaling: u = (x + 1) / 2 (non-negative scale), so u = u' + sigma' n with u' = (x0' + 1) / 2
    and sigma' = sigma / 2. The RMS of N samples converges to sqrt(u'^2 + sigma'^2) (Eq. 2 for
    real-valued noise), with an error shrinking like 1 / sqrt(N). Truth in [-0.2, 0.2] and
    sigma = 0.2 keep clamping at [-1, 1] (4 sigma away) negligible.
    """
    truth = _truth(-0.2, 0.2, shape=(16, 16, 16), seed=3)
    sigma = 0.2
    sched = make_schedule("linear", 8)
    u_true = (truth + 1) / 2
    limit = (u_true.square() + (sigma / 2) ** 2).sqrt()
    errors = []
    for n_ex in (1, 4, 16, 64):
        res = expa(
            Oracle(truth, sigma=sigma, seed=n_ex),
            truth.shape,
            sched,
            n_ex=n_ex,
            generator=_gen(n_ex),
        )
        u = (res.image + 1) / 2
        errors.append(float((u - limit).abs().mean()))
        assert res.samples is not None and res.samples.shape == (n_ex, *truth.shape)
        # the combination is the RMS of the kept samples on the non-negative scale
        torch.testing.assert_close(u.square(), ((res.samples + 1) / 2).square().mean(0))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 4, errors  # 1/sqrt(N): expected ratio 8
    # converges to the Eq. 2 limit, which lies measurably above the noise-free u'
    assert abs(float(u.mean() - limit.mean())) < 2e-3
    assert float(limit.mean() - u_true.mean()) > 6e-3


# ----------------------------------------------------------------------------- NFE


@pytest.mark.parametrize(
    ("mode", "T", "kw", "nfe", "calls"),
    [
        ("regression", 1000, {}, 3, 3),
        ("regression", 1000, {"views": ("axial",)}, 1, 1),
        ("diffusion", 1000, {}, 251, 251),
        ("diffusion", 20, {"timesteps": "full"}, 20, 20),
        ("diffusion", 1000, {"timesteps": 10}, 10, 10),
        ("expa4", 1000, {}, 1004, 251),
        ("expa4", 1000, {"chunk": 3}, 1004, 502),
        ("expa4", 1000, {"chunk": 1}, 1004, 1004),
    ],
)
def test_nfe(mode: str, T: int, kw: dict, nfe: int, calls: int) -> None:
    oracle = Oracle(_truth(shape=(2, 2, 2)))
    sched = make_schedule("linear", T)
    if mode == "regression":
        res = regression(oracle, (2, 2, 2), sched, **kw)
    elif mode == "diffusion":
        res = diffusion(oracle, (2, 2, 2), sched, **kw)
    else:
        res = expa(oracle, (2, 2, 2), sched, n_ex=4, **kw)
    assert res.nfe == nfe == oracle.evaluations
    assert oracle.calls == calls


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("mode", ["regression", "diffusion", "expa"])
def test_seeded_determinism(mode: str) -> None:
    truth = _truth()
    sched = make_schedule("linear", 40)
    a = _run(mode, _mixing(truth), sched, generator=_gen(7)).image
    b = _run(mode, _mixing(truth), sched, generator=_gen(7)).image
    c = _run(mode, _mixing(truth), sched, generator=_gen(8)).image
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_expa_one_equals_diffusion() -> None:
    truth = _truth()
    sched = make_schedule("cosine", 40)
    for steps in (None, "full", 5):
        d = diffusion(_mixing(truth), SHAPE, sched, timesteps=steps, generator=_gen(11))
        e = expa(_mixing(truth), SHAPE, sched, n_ex=1, timesteps=steps, generator=_gen(11))
        assert torch.equal(d.image, e.image)
        assert e.nfe == d.nfe


def test_expa_chunk_larger_than_n_ex_is_one_batch() -> None:
    truth = _truth()
    sched = make_schedule("linear", 40)
    a = expa(_mixing(truth), SHAPE, sched, n_ex=3, generator=_gen(5))
    b = expa(_mixing(truth), SHAPE, sched, n_ex=3, chunk=8, generator=_gen(5))
    assert torch.equal(a.image, b.image) and torch.equal(a.samples, b.samples)
    # independent trajectories differ
    assert not torch.allclose(a.samples[0], a.samples[1])


def test_draw_order_and_renoising() -> None:
    """x_T is drawn first, then one fresh draw per step; x0_hat is clamped before re-noising."""
    truth = _truth(-1.5, 1.5)
    sched = make_schedule("linear", 20)
    steps = [19, 4, 2, 0]
    oracle = Oracle(truth)
    res = diffusion(oracle, SHAPE, sched, timesteps=steps, generator=_gen(9))
    assert oracle.ts == steps
    g = _gen(9)
    x_T = torch.randn((1, *SHAPE), generator=g)
    assert torch.equal(oracle.inputs[0], x_T)
    for k in range(1, len(steps)):
        eps = torch.randn((1, *SHAPE), generator=g)
        expected = q_sample(sched, truth.clamp(-1, 1)[None], steps[k], eps)
        assert torch.equal(oracle.inputs[k], expected)
    assert res.timesteps == tuple(steps)


def test_expa_trajectories_draw_their_own_noise() -> None:
    """Each ExpA trajectory gets its own x_T and its own re-noising noise at every step:
    the batch's draws are (N_Ex, X, Y, Z), in the order x_T, then one draw per step."""
    truth = _truth()
    sched = make_schedule("linear", 20)
    steps = [19, 4, 0]
    oracle = Oracle(truth)
    expa(oracle, SHAPE, sched, n_ex=3, timesteps=steps, generator=_gen(4))
    g = _gen(4)
    expected = [torch.randn((3, *SHAPE), generator=g)]
    for t in steps[1:]:
        expected.append(q_sample(sched, truth[None], t, torch.randn((3, *SHAPE), generator=g)))
    assert len(oracle.inputs) == len(expected)
    for seen, want in zip(oracle.inputs, expected, strict=True):
        assert torch.equal(seen, want)
        assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


def test_regression_uses_one_x_T_for_all_views() -> None:
    oracle = Oracle(_truth())
    regression(oracle, SHAPE, make_schedule("linear", 100), generator=_gen(2))
    assert oracle.ts == [99, 99, 99]
    assert torch.equal(oracle.inputs[0], torch.randn((1, *SHAPE), generator=_gen(2)))
    assert all(torch.equal(x, oracle.inputs[0]) for x in oracle.inputs)


# ----------------------------------------------------------------------------- views


def test_orthogonal_view_order() -> None:
    oracle = Oracle(_truth())
    diffusion(oracle, SHAPE, make_schedule("linear", 20), timesteps="full")
    assert oracle.views[:4] == ["axial", "coronal", "sagittal", "axial"]
    assert oracle.views == [VIEWS[k % 3] for k in range(20)]


def test_single_fixed_view() -> None:
    oracle = Oracle(_truth())
    diffusion(oracle, SHAPE, make_schedule("linear", 20), timesteps="full", views=("axial",))
    assert oracle.views == ["axial"] * 20


def test_regression_view_combinations() -> None:
    truth = _truth(-0.5, 0.5)
    offsets = {"axial": 0.3, "coronal": -0.1, "sagittal": 0.05}

    def denoise(x_t: torch.Tensor, t: int, view: str) -> torch.Tensor:
        return (truth + offsets[view]).expand_as(x_t)

    sched = make_schedule("linear", 100)
    preds = torch.stack([truth + offsets[v] for v in VIEWS])
    got = {c: regression(denoise, SHAPE, sched, combine=c) for c in COMBINES}
    torch.testing.assert_close(got["mean"].image, truth + 0.25 / 3)
    torch.testing.assert_close(got["median"].image, truth + 0.05)
    u = (preds + 1) / 2
    torch.testing.assert_close(got["rms"].image, 2 * u.square().mean(0).sqrt() - 1)
    # RMS lies above the mean where the views disagree (Jensen)
    assert bool((got["rms"].image > got["mean"].image).all())
    assert got["mean"].samples.shape == (3, *SHAPE)


def test_combine_views_even_median() -> None:
    preds = torch.tensor([[1.0], [-1.0], [0.5], [0.0]])
    torch.testing.assert_close(combine_views(preds, "median"), torch.tensor([0.25]))
    with pytest.raises(ConfigError):
        combine_views(preds, "max")


# ----------------------------------------------------------------------------- misc


def test_regression_refuses_eps() -> None:
    check_regression_allowed("v")
    check_regression_allowed("x0")
    with pytest.raises(ConfigError, match="eps"):
        check_regression_allowed("eps")
    with pytest.raises(ConfigError):
        check_regression_allowed("noise")
    oracle = Oracle(_truth())
    with pytest.raises(ConfigError, match="regression"):
        regression(oracle, SHAPE, make_schedule("linear", 100), prediction="eps")
    assert oracle.calls == 0


def test_callback_sees_every_step() -> None:
    truth = _truth(-1.5, 1.5)
    seen: list[tuple[int, int]] = []

    def callback(k: int, t: int, x0_hat: torch.Tensor) -> None:
        seen.append((k, t))
        assert torch.equal(x0_hat, truth.clamp(-1, 1)[None])

    diffusion(Oracle(truth), SHAPE, make_schedule("linear", 20), timesteps=5, callback=callback)
    assert seen == list(enumerate(timesteps_preview(make_schedule("linear", 20), 5)))


def test_sample_batch_shape_and_bad_denoiser() -> None:
    sched = make_schedule("linear", 10)
    x_T = torch.randn(2, *SHAPE)
    res = sample(Oracle(_truth()), x_T, sched, [9, 1, 0], views=VIEWS, generator=_gen(0))
    assert res.image.shape == (2, *SHAPE) and res.nfe == 6
    with pytest.raises(ModelError):
        sample(lambda x, t, v: x[:, :-1], x_T, sched, [9], views=VIEWS)


@pytest.mark.parametrize(
    "kw", [{"n_ex": 0}, {"n_ex": 2, "chunk": 0}, {"n_ex": 2, "views": ("oblique",)}]
)
def test_expa_option_errors(kw: dict) -> None:
    with pytest.raises(ConfigError):
        expa(Oracle(_truth()), SHAPE, make_schedule("linear", 10), **kw)


def test_keep_samples_off() -> None:
    truth = _truth()
    res = expa(Oracle(truth), SHAPE, make_schedule("linear", 10), n_ex=2, keep_samples=False)
    assert res.samples is None
    torch.testing.assert_close(res.image, truth, rtol=0, atol=1e-6)
