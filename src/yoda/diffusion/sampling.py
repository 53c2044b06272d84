"""YODA sampling (Alg. 3) as pure functions over a volume denoiser.

Every sampler calls ``denoise(x_t, t, view) -> x0_hat`` with ``x_t`` of shape (B, X, Y, Z)
(B parallel trajectories, canonical axis order, network scale [-1, 1]), ``t`` a Python int
timestep and ``view`` one of ``VIEWS``; the callable returns x0_hat of the same shape.
Regression, diffusion and ExpA are choices of timesteps and repetitions over one loop,
:func:`sample`.

Random numbers: every draw comes from ``generator`` (on the generator's device, then moved to
the sampling device): first x_T, then one re-noising draw per step, in step order. So a seed
fixes the result, and ``expa(n_ex=1)`` reproduces ``diffusion`` with the same seed exactly.

NFE counts whole-volume evaluations per trajectory, as in the paper: 1 per view for
regression, ``len(timesteps)`` for diffusion (251 for the truncated sampler at T = 1000),
``n_ex * len(timesteps)`` for ExpA (which batches the trajectories, so ``denoise`` itself is
called only ``len(timesteps)`` times per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from yoda.diffusion.schedule import PREDICTIONS, Schedule, q_sample
from yoda.errors import ConfigError, InputError, ModelError
from yoda.volume.views import VIEWS, view_name

Denoise = Callable[[torch.Tensor, int, str], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]
Steps = Sequence[int] | str | int | None

COMBINES = ("mean", "median", "rms")


@dataclass
class SampleResult:
    """Output of a sampler.

    Attributes
    ----------
    image : torch.Tensor
        (X, Y, Z) from the public samplers, (B, X, Y, Z) from :func:`sample`; network scale.
    nfe : int
        Whole-volume function evaluations summed over trajectories.
    samples : torch.Tensor or None
        ExpA: the individual trajectories (n_ex, X, Y, Z); regression: the per-view
        predictions (n_views, X, Y, Z); otherwise None.
    timesteps : tuple of int
        The timesteps each trajectory visited, in order.
    """

    image: torch.Tensor
    nfe: int
    samples: torch.Tensor | None = None
    timesteps: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- timesteps


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, Integral) or T < 1:
        raise ConfigError(f"number of diffusion steps T must be an integer >= 1, got {T!r}")
    return int(T)


def _check_t_trunc(T: int, t_trunc: int | None) -> int:
    if t_trunc is None:
        return T // 4
    if isinstance(t_trunc, bool) or not isinstance(t_trunc, Integral) or not 0 <= t_trunc < T:
        raise ConfigError(f"t_trunc must be an integer in 0..{T - 1} (T={T}), got {t_trunc!r}")
    return int(t_trunc)


def timesteps_full(T: int) -> list[int]:
    """All timesteps ``T-1, T-2, ..., 0`` (native DDPM sampling, T evaluations)."""
    return list(range(_check_T(T) - 1, -1, -1))


def timesteps_truncated(T: int, t_trunc: int | None = None) -> list[int]:
    """Truncated sampling: ``[T-1, t_trunc-1, ..., 0]`` (``t_trunc + 1`` evaluations).

    ``t_trunc`` defaults to ``T // 4`` (251 evaluations for T = 1000); ``t_trunc = T - 1`` is
    the full sampler, ``t_trunc = 0`` the single step ``[T-1]``.
    """
    T = _check_T(T)
    t_trunc = _check_t_trunc(T, t_trunc)
    return [T - 1, *range(t_trunc - 1, -1, -1)]


def timesteps_preview(sched: Schedule, k: int, t_trunc: int | None = None) -> list[int]:
    """``k`` evaluations: ``T-1``, then ``k-1`` steps of the truncated range, evenly spaced in
    log-SNR.

    The steps run from ``t_trunc - 1`` down to 0 (``t_trunc`` defaults to ``T // 4``); each is
    the timestep whose ``log(alpha_bar / (1 - alpha_bar))`` lies nearest to evenly spaced
    values between those of the two ends, kept distinct. So a few steps still visit the low
    noise levels where the truncated sampler lays down the target's noise texture; even strides
    in ``t`` would leave the last step at ``t_trunc / (k - 2)``. ``k = 1`` is the single step
    ``[T-1]``, ``k = 2`` is ``[T-1, 0]`` and ``k = t_trunc + 1`` gives
    :func:`timesteps_truncated`.
    """
    T = _check_T(sched.T)
    t_trunc = _check_t_trunc(T, t_trunc)
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ConfigError(f"number of sampling steps must be a positive integer, got {k!r}")
    m = int(k) - 1
    if m > t_trunc:
        raise ConfigError(
            f"{k} sampling steps exceed the {t_trunc + 1} available at T={T} "
            f"(t_trunc={t_trunc}); use at most {t_trunc + 1}"
        )
    if m == 0:
        return [T - 1]
    ab = sched.alpha_bar[:t_trunc]
    log_snr = torch.log(ab) - torch.log1p(-ab)
    targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), m, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    # `nearest` runs from t_trunc - 1 down to 0, but near t = 0, where log-SNR changes by more
    # than the target spacing per timestep, it may repeat a timestep. Going up from t = 0,
    # step j keeps above step j+1 and leaves room for the j steps before it.
    steps = [0]
    for j in range(m - 2, -1, -1):
        steps.append(min(max(nearest[j], steps[-1] + 1), t_trunc - 1 - j))
    return [T - 1, *reversed(steps)]


def timesteps_for(sched: Schedule, steps: Steps = None) -> list[int]:
    """Map a user option to a timestep list.

    ``None`` or ``"truncated"``: :func:`timesteps_truncated`; ``"full"``:
    :func:`timesteps_full`; an int ``k`` (or its decimal string): :func:`timesteps_preview`
    with ``k`` evaluations (``k = 1`` is the single regression-like step ``t = T-1``); a
    sequence, 1-D tensor or 1-D array of ints is validated and returned as a list.
    """
    T = _check_T(sched.T)
    if steps is None:
        steps = "truncated"
    if isinstance(steps, str):
        if steps == "truncated":
            return timesteps_truncated(T)
        if steps == "full":
            return timesteps_full(T)
        if not (steps.strip().isascii() and steps.strip().isdigit()):
            raise ConfigError(
                f"unknown sampling steps {steps!r}; use 'truncated', 'full' or a number of steps"
            )
        steps = int(steps)
    if isinstance(steps, Integral) and not isinstance(steps, bool):
        return timesteps_preview(sched, int(steps))
    return _check_timesteps(T, steps)


def _check_timesteps(T: int, timesteps: object) -> list[int]:
    if isinstance(timesteps, (torch.Tensor, np.ndarray)):
        timesteps = timesteps.tolist()
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise ConfigError(f"timesteps must be a sequence of integers, got {timesteps!r}")
    out = []
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < T:
            raise ConfigError(f"timestep {t!r} is not an integer in 0..{T - 1} (T={T})")
        out.append(int(t))
    if not out:
        raise ConfigError("timesteps must not be empty")
    return out


# ----------------------------------------------------------------------------- helpers


def check_regression_allowed(prediction: str) -> None:
    """Raise ConfigError unless a model of this prediction type can be sampled by regression.

    At ``t = T-1`` alpha_bar is ~0, so an eps-prediction model has to divide by
    ``sqrt(alpha_bar) ~ 0`` to obtain x0 and carries no usable one-step estimate.
    """
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if prediction == "eps":
        raise ConfigError(
            "regression sampling needs a v- or x0-prediction model; this model predicts eps, "
            "whose x0 estimate at t=T-1 divides by sqrt(alpha_bar)~0: use sampling "
            "'diffusion' or 'expa'"
        )


def _check_views(views: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(views, str):
        views = (views,)
    names = tuple(view_name(v) for v in views)
    if not names:
        raise ConfigError("at least one view is needed")
    return names


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or not all(
        isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise InputError(f"volume shape must be 3 positive integers (X, Y, Z), got {shape!r}")
    return tuple(int(s) for s in shape)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _device(device: torch.device | str | None, generator: torch.Generator | None):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise from ``generator`` (drawn on its device), moved to ``device``."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def rms_nonneg(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """RMS along ``dim`` on the non-negative intensity scale (Eq. 9), back on [-1, 1].

    ``2 * sqrt(mean(((x + 1) / 2) ** 2)) - 1``: intensities are magnitudes >= 0 on the
    scale ``u = (x + 1) / 2`` (background 0), as in the acquisition average of Eq. 2.
    """
    u = (x + 1.0) * 0.5
    return u.square().mean(dim=dim).sqrt() * 2.0 - 1.0


def combine_views(preds: torch.Tensor, combine: str = "mean") -> torch.Tensor:
    """Combine per-view predictions stacked along dim 0 by "mean", "median" or "rms"."""
    if combine == "mean":
        return preds.mean(dim=0)
    if combine == "median":
        srt = preds.sort(dim=0).values
        k = preds.shape[0]
        if k % 2:
            return srt[k // 2]
        return 0.5 * (srt[k // 2 - 1] + srt[k // 2])
    if combine == "rms":
        return rms_nonneg(preds, dim=0)
    raise ConfigError(f"unknown view combination {combine!r}; choose one of {COMBINES}")


# ----------------------------------------------------------------------------- samplers


def sample(
    denoise: Denoise,
    x_T: torch.Tensor,
    sched: Schedule,
    timesteps: Sequence[int],
    *,
    views: Sequence[str] | str = VIEWS,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Run Alg. 3 for a batch of trajectories: the one loop every sampler shares.

    Step ``k`` predicts ``x0_hat = clamp(denoise(x_t, t_k, views[k % len(views)]), -1, 1)``
    and, unless it is the last step, re-noises it to ``t_{k+1}`` with fresh noise:
    ``x_{t_{k+1}} = sqrt(ab) x0_hat + sqrt(1 - ab) eps``. Orthogonal denoising is
    ``views=VIEWS`` (axial, coronal, sagittal, axial, ...); a single fixed view is e.g.
    ``views=("axial",)``. Only the current latent and estimate are kept in memory.

    Parameters
    ----------
    denoise : callable
        ``denoise(x_t, t, view) -> x0_hat``, x_t of shape (B, X, Y, Z).
    x_T : torch.Tensor
        (B, X, Y, Z) starting latents.
    sched : Schedule
        The model's noise schedule.
    timesteps : sequence of int
        Timesteps in visiting order (see :func:`timesteps_for`).
    views : sequence of str
        Views cycled through step by step.
    generator : torch.Generator, optional
        Source of the re-noising draws.
    callback : callable, optional
        ``callback(step_index, t, x0_hat)`` after each step.

    Returns
    -------
    SampleResult
        ``image`` (B, X, Y, Z): the last x0_hat; ``nfe = B * len(timesteps)``.
    """
    steps = _check_timesteps(sched.T, timesteps)
    names = _check_views(views)
    if x_T.ndim != 4:
        raise InputError(f"x_T must have shape (B, X, Y, Z), got {tuple(x_T.shape)}")
    x_t = x_T
    x0_hat = x_T
    for k, t in enumerate(steps):
        out = denoise(x_t, t, names[k % len(names)])
        if out.shape != x_t.shape:
            raise ModelError(
                f"the denoiser returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}"
            )
        x0_hat = out.to(x_t.dtype).clamp(-1.0, 1.0)
        if callback is not None:
            callback(k, t, x0_hat)
        if k + 1 < len(steps):
            noise = _randn(x_t.shape, generator, x_t.device, x_t.dtype)
            x_t = q_sample(sched, x0_hat, steps[k + 1], noise)
    return SampleResult(image=x0_hat, nfe=x_T.shape[0] * len(steps), timesteps=tuple(steps))


def regression(
    denoise: Denoise,
    shape: Sequence[int],
    sched: Schedule,
    *,
    views: Sequence[str] | str = VIEWS,
    combine: str = "mean",
    prediction: str = "v",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Regression sampling: one evaluation at ``t = T-1`` per view from one x_T ~ N(0, I).

    Each view's prediction is a one-step MMSE estimate ``x0_hat ~ E[X | C]`` (Sec. III-B.4),
    i.e. already noise-free; the views differ only by their own (roughly unbiased, equally
    large) slicing errors. The arithmetic mean is the MSE-optimal combination of unbiased
    estimates of equal variance, hence the default ``combine="mean"``. ``"median"`` is robust
    to one failing view; ``"rms"`` (on the non-negative scale) is the ExpA combination meant
    for noisy samples and biases noise-free estimates upwards where the views disagree.

    Parameters
    ----------
    denoise, sched, generator, callback
        As for :func:`sample` (callback step index = view index).
    shape : (X, Y, Z)
        Volume shape.
    views : sequence of str
        Views to evaluate (NFE = len(views)); ``("axial",)`` for no view aggregation.
    combine : str
        One of ``COMBINES``.
    prediction : str
        The model's prediction type; eps-prediction is refused (ConfigError).
    device : torch.device or str, optional
        Sampling device (default: the generator's, else CPU).

    Returns
    -------
    SampleResult
        ``image`` (X, Y, Z), ``samples`` the per-view predictions (V, X, Y, Z).
    """
    check_regression_allowed(prediction)
    if combine not in COMBINES:
        raise ConfigError(f"unknown view combination {combine!r}; choose one of {COMBINES}")
    names = _check_views(views)
    shape = _check_shape(shape)
    dev = _device(device, generator)
    x_T = _randn((1, *shape), generator, dev)
    t_last = [sched.T - 1]
    preds, nfe = [], 0
    for i, name in enumerate(names):
        view_cb = None
        if callback is not None:

            def view_cb(_k: int, t: int, x0: torch.Tensor, i: int = i) -> None:
                callback(i, t, x0)

        res = sample(denoise, x_T, sched, t_last, views=(name,), callback=view_cb)
        preds.append(res.image[0])
        nfe += res.nfe
    stacked = torch.stack(preds)
    image = stacked[0] if len(names) == 1 else combine_views(stacked, combine)
    return SampleResult(image=image, nfe=nfe, samples=stacked, timesteps=tuple(t_last))


def diffusion(
    denoise: Denoise,
    shape: Sequence[int],
    sched: Schedule,
    *,
    timesteps: Steps = None,
    views: Sequence[str] | str = VIEWS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Diffusion sampling (Alg. 3, N_Ex = 1) of one trajectory.

    Parameters
    ----------
    timesteps : sequence of int, str, int or None
        Explicit timesteps, or an option for :func:`timesteps_for` (default: truncated,
        ``[T-1, T//4-1, ..., 0]``).
    views : sequence of str
        ``VIEWS`` for orthogonal denoising (step k uses view k mod 3), or one fixed view.
    Others
        As for :func:`regression`.

    Returns
    -------
    SampleResult
        ``image`` (X, Y, Z), ``nfe = len(timesteps)``.
    """
    steps = timesteps_for(sched, timesteps)
    shape = _check_shape(shape)
    dev = _device(device, generator)
    x_T = _randn((1, *shape), generator, dev)
    res = sample(denoise, x_T, sched, steps, views=views, generator=generator, callback=callback)
    return SampleResult(image=res.image[0], nfe=res.nfe, timesteps=res.timesteps)


def expa(
    denoise: Denoise,
    shape: Sequence[int],
    sched: Schedule,
    *,
    n_ex: int,
    timesteps: Steps = None,
    views: Sequence[str] | str = VIEWS,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    keep_samples: bool = True,
) -> SampleResult:
    """Expectation-approximation sampling: RMS of ``n_ex`` diffusion trajectories (Eq. 9).

    The trajectories run as one batch (B = n_ex), or in batches of ``chunk`` to bound memory;
    each chunk draws its x_T, then its re-noising noise step by step, so results depend on
    ``chunk`` (fixed seed and chunk give identical results). The samples are combined by
    :func:`rms_nonneg`: ``2 * sqrt(mean_j ((x_j + 1) / 2) ** 2) - 1``; with ``n_ex = 1``
    the image is the single sample, identical to :func:`diffusion` with the same seed.

    Parameters
    ----------
    n_ex : int
        Number of trajectories N_Ex >= 1.
    chunk : int, optional
        Trajectories per batch (default: all at once).
    keep_samples : bool
        Keep the individual samples in ``result.samples`` (n_ex, X, Y, Z).
    Others
        As for :func:`diffusion` (the callback sees each chunk's batch of estimates).

    Returns
    -------
    SampleResult
        ``image`` (X, Y, Z), ``nfe = n_ex * len(timesteps)``.
    """
    n_ex = _positive_int(n_ex, "n_ex")
    chunk = n_ex if chunk is None else _positive_int(chunk, "chunk")
    steps = timesteps_for(sched, timesteps)
    shape = _check_shape(shape)
    dev = _device(device, generator)
    sumsq: torch.Tensor | None = None
    kept: list[torch.Tensor] = []
    nfe, done = 0, 0
    last = None
    while done < n_ex:
        b = min(chunk, n_ex - done)
        x_T = _randn((b, *shape), generator, dev)
        res = sample(
            denoise, x_T, sched, steps, views=views, generator=generator, callback=callback
        )
        last = res.image
        u2 = ((res.image + 1.0) * 0.5).square().sum(dim=0)
        sumsq = u2 if sumsq is None else sumsq + u2
        if keep_samples:
            kept.append(res.image)
        nfe += res.nfe
        done += b
    if n_ex == 1:
        image = last[0]
    else:
        image = (sumsq / n_ex).sqrt() * 2.0 - 1.0
    samples = torch.cat(kept) if keep_samples else None
    return SampleResult(image=image, nfe=nfe, samples=samples, timesteps=tuple(steps))
