"""Noise schedules, forward noising (Eq. 5) and conversions between v, eps and x0 predictions.

Timesteps are indexed ``0 .. T-1``; index ``t`` holds the paper's step ``t + 1``, so
``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` and the first sampling step is ``t = T - 1``.
``alpha_bar`` is computed and stored in float64 on the CPU; the functions below cast the
coefficients they need to the dtype and device of the tensors they are applied to.

With ``a = sqrt(alpha_bar_t)`` and ``b = sqrt(1 - alpha_bar_t)`` (so ``a**2 + b**2 = 1``)::

    x_t = a * x0 + b * eps          (Eq. 5)
    v   = a * eps - b * x0          (v-prediction target)
    x0  = a * x_t - b * v = (x_t - b * eps) / a
    eps = b * x_t + a * v = (x_t - a * x0) / b
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral

import torch

from yoda.errors import ConfigError

PREDICTIONS = ("v", "eps", "x0")
SCHEDULES = ("linear", "cosine")

_BETA_MAX = 0.999
_COSINE_S = 0.008

Timestep = int | torch.Tensor


@dataclass(frozen=True, eq=False)
class Schedule:
    """A diffusion noise schedule.

    Attributes
    ----------
    kind : str
        One of ``SCHEDULES``.
    T : int
        Number of diffusion steps (timesteps ``0 .. T-1``).
    alpha_bar : torch.Tensor
        float64 tensor of shape (T,), cumulative product of ``1 - beta``, on the CPU.
    """

    kind: str
    T: int
    alpha_bar: torch.Tensor
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ab = self.alpha_bar
        if ab.dtype != torch.float64 or ab.ndim != 1 or ab.shape[0] != self.T:
            raise ConfigError(
                f"schedule: alpha_bar must be a float64 tensor of shape ({self.T},), "
                f"got {ab.dtype} {tuple(ab.shape)}"
            )
        object.__setattr__(self, "alpha_bar", ab.detach().cpu())

    def coefficients(
        self, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables ``sqrt(alpha_bar)`` and ``sqrt(1 - alpha_bar)`` of shape (T,) on ``device``.

        Computed in float64, then cast; cached per (device, dtype). The tables are built
        outside inference mode so that a first use under ``torch.inference_mode`` does not
        make them unusable for training afterwards.
        """
        key = (torch.device(device), dtype)
        tables = self._tables.get(key)
        if tables is None:
            ab = self.alpha_bar
            with torch.inference_mode(False):
                tables = (
                    ab.sqrt().to(dtype=dtype).to(device),
                    (1.0 - ab).sqrt().to(dtype=dtype).to(device),
                )
            self._tables[key] = tables
        return tables

    def sqrt_ab(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``sqrt(alpha_bar_t)`` broadcastable to ``like`` (t: int, 0-d or (B,) LongTensor)."""
        return _gather(self, self.coefficients(like.device, like.dtype)[0], t, like)

    def sqrt_1mab(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 - alpha_bar_t)`` broadcastable to ``like`` (t: int, 0-d or (B,) LongTensor)."""
        return _gather(self, self.coefficients(like.device, like.dtype)[1], t, like)


def _gather(sched: Schedule, table: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
    """Index ``table`` at ``t`` and shape the result to broadcast over ``like``'s batch dim."""
    if isinstance(t, Integral) and not isinstance(t, bool):
        t = int(t)
        if not 0 <= t < sched.T:
            raise ConfigError(f"timestep {t} is outside 0..{sched.T - 1} of the schedule")
        return table[t]
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ConfigError(f"timestep must be an int or an integer tensor, got {t!r}")
    if t.ndim > 1:
        raise ConfigError(f"timestep tensor must be 0-d or (B,), got shape {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= sched.T):
        raise ConfigError(f"timesteps outside 0..{sched.T - 1} of the schedule")
    coef = table[t.to(device=table.device, dtype=torch.long)]
    if t.ndim == 1:
        coef = coef.reshape(-1, *([1] * (like.ndim - 1)))
    return coef


def _check_T(T: object) -> int:
    if isinstance(T, bool) or not isinstance(T, Integral) or int(T) < 1:
        raise ConfigError(f"number of diffusion steps T must be an integer >= 1, got {T!r}")
    return int(T)


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    return prediction


def linear_betas(T: int) -> torch.Tensor:
    """Linear betas 1e-4 .. 0.02 (float64), scaled by 1000/T and clipped at 0.999.

    For T = 1000 these are the betas of Ho et al.; other T span the same noise range.
    """
    T = _check_T(T)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * (1000.0 / T)
    return betas.clamp(max=_BETA_MAX)


def cosine_betas(T: int, s: float = _COSINE_S) -> torch.Tensor:
    """Cosine betas of Nichol & Dhariwal (float64), clipped at 0.999."""
    T = _check_T(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1.0 + s) * (math.pi / 2.0)) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(min=0.0, max=_BETA_MAX)


def make_schedule(kind: str = "linear", T: int = 1000) -> Schedule:
    """Build a noise schedule.

    Parameters
    ----------
    kind : str
        ``"linear"`` (betas 1e-4 .. 0.02 at T = 1000, scaled by 1000/T otherwise) or
        ``"cosine"`` (Nichol & Dhariwal, s = 0.008). Betas are clipped at 0.999.
    T : int
        Number of steps, >= 1. ``T = 1`` gives ``alpha_bar = [0.0]`` exactly for both kinds:
        a dedicated regression model whose only input x_T is pure noise.

    Returns
    -------
    Schedule
        With ``alpha_bar`` in float64, strictly decreasing.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {kind!r}; choose one of {SCHEDULES}")
    T = _check_T(T)
    if T == 1:
        return Schedule(kind=kind, T=1, alpha_bar=torch.zeros(1, dtype=torch.float64))
    betas = linear_betas(T) if kind == "linear" else cosine_betas(T)
    return Schedule(kind=kind, T=T, alpha_bar=torch.cumprod(1.0 - betas, dim=0))


def q_sample(sched: Schedule, x0: torch.Tensor, t: Timestep, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising (Eq. 5): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
    return sched.sqrt_ab(t, x0) * x0 + sched.sqrt_1mab(t, x0) * noise


def v_from(sched: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: Timestep) -> torch.Tensor:
    """Velocity ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``."""
    return sched.sqrt_ab(t, x0) * eps - sched.sqrt_1mab(t, x0) * x0


def training_target(
    sched: Schedule, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: Timestep
) -> torch.Tensor:
    """Regression target of the network for ``x_t = q_sample(sched, x0, t, noise)``.

    ``"v"``: the velocity, ``"eps"``: the noise, ``"x0"``: the clean image.
    """
    _check_prediction(prediction)
    if prediction == "v":
        return v_from(sched, x0, noise, t)
    if prediction == "eps":
        return noise
    return x0


def predict_x0(
    sched: Schedule, prediction: str, model_out: torch.Tensor, x_t: torch.Tensor, t: Timestep
) -> torch.Tensor:
    """Convert a network output (v, eps or x0) at timestep ``t`` to the estimate ``x0_hat``.

    This is the one place where prediction types are converted to images. No clamping.

    Raises
    ------
    ConfigError
        For an unknown prediction, or eps-prediction on a schedule whose ``alpha_bar`` is 0
        (T = 1), where ``x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` is undefined.
    """
    _check_prediction(prediction)
    if prediction == "x0":
        return model_out
    a = sched.sqrt_ab(t, x_t)
    b = sched.sqrt_1mab(t, x_t)
    if prediction == "v":
        return a * x_t - b * model_out
    if sched.T == 1:
        raise ConfigError(
            "an eps-prediction model with T=1 cannot estimate x0 (alpha_bar is 0); "
            "use prediction 'v' or 'x0'"
        )
    return (x_t - b * model_out) / a


def predict_eps(
    sched: Schedule, prediction: str, model_out: torch.Tensor, x_t: torch.Tensor, t: Timestep
) -> torch.Tensor:
    """Convert a network output (v, eps or x0) at timestep ``t`` to the noise estimate."""
    _check_prediction(prediction)
    if prediction == "eps":
        return model_out
    a = sched.sqrt_ab(t, x_t)
    b = sched.sqrt_1mab(t, x_t)
    if prediction == "v":
        return b * x_t + a * model_out
    return (x_t - a * model_out) / b
