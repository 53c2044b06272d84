"""Frechet distance of ResNet-50 features of axial slices (the paper's FID with RadImageNet).

The feature extractor is a ResNet-50 (torchvision layout: 7x7 stride-2 stem, max pool, bottleneck
blocks with the stride on the 3x3 convolution) built with MONAI, whose weights come from a file
the user supplies (e.g. the RadImageNet ResNet-50). Without such a file there is no FID:
:func:`fid_available` says why, and the caller skips the metric.

Features are the 2048-d global-average-pooled output of the last residual stage. Inputs are
axial slices on the 0-255 scale, clipped to [0, 255], divided by 255, replicated to 3 channels,
shown in radiological display orientation (anterior up, the patient's right on the image's left)
and resized bilinearly to ``size`` x ``size`` (224 by default), and the ImageNet channel means in
BGR order (:data:`CHANNEL_MEANS`) are subtracted, as for the RadImageNet ResNet-50 in the usual
FID protocols of medical image generation (its networks were trained on BGR images; the
replicated grey channels make the channel order moot otherwise).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from yoda.atomic import atomic_path
from yoda.errors import ConfigError, InputError, ModelError

__all__ = [
    "CHANNEL_MEANS",
    "FEATURE_DIM",
    "frechet_distance",
    "fid_from_features",
    "ResNet50Features",
    "axial_slices",
    "fid_axial",
    "fid_available",
]

FEATURE_DIM = 2048
"""Length of a ResNet-50 feature vector."""

CHANNEL_MEANS = (0.406, 0.456, 0.485)
"""Subtracted from the three input channels (values in [0, 1]): ImageNet's means, BGR order."""

_PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIX = ".safetensors"
# RadImageNet's PyTorch backbone is torchvision's ResNet-50 children wrapped in nn.Sequential:
# 0 conv1, 1 bn1, 2 relu, 3 maxpool, 4-7 layer1-4, 8 avgpool.
_SEQUENTIAL_NAMES = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
_WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "net.", "resnet.", "_orig_mod.")


# --------------------------------------------------------------------------- Frechet distance


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``. The trace of the matrix
    square root is computed as ``sum sqrt(eig(S1 cov2 S1))`` with ``S1 = cov1^(1/2)`` from a
    symmetric eigendecomposition; this equals ``tr(scipy.linalg.sqrtm(cov1 @ cov2))`` for
    covariance matrices but stays real and exact when they are singular (fewer samples than
    feature dimensions), so no diagonal offset is needed. Rounding below zero is clipped to 0.
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    c1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    c2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise InputError(
            "frechet_distance: means must be (D,) and covariances (D, D) with one D; got "
            f"{m1.shape}, {c1.shape}, {m2.shape}, {c2.shape}"
        )
    for name, a in (("mu1", m1), ("mu2", m2), ("cov1", c1), ("cov2", c2)):
        if not np.isfinite(a).all():
            raise InputError(f"frechet_distance: {name} contains NaN or Inf values")
    c1 = 0.5 * (c1 + c1.T)
    c2 = 0.5 * (c2 + c2.T)
    s1 = _sqrt_psd(c1)
    m = s1 @ c2 @ s1
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sum(np.sqrt(np.clip(ev, 0.0, None))))
    diff = m1 - m2
    value = float(diff @ diff) + float(np.trace(c1)) + float(np.trace(c2)) - 2.0 * tr_covmean
    return max(value, 0.0)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between two feature sets (N1, D) and (N2, D), N >= 2.

    Means and sample covariances (ddof=1) of the rows are compared as in
    :func:`frechet_distance`. With few samples (N1 * N2 <= D^2, e.g. a few hundred slices of
    2048-d features) the same value is computed in sample space: with centred, scaled features
    A1, A2 (cov = A^T A), tr((cov1 cov2)^(1/2)) is the sum of the singular values of A1 A2^T,
    which avoids D x D matrices.
    """
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"feature sets must be (N, D) with one D; got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise InputError(
            f"FID needs at least 2 feature vectors per set; got {a.shape[0]} and {b.shape[0]}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("feature sets contain NaN or Inf values")
    (n1, d), n2 = a.shape, b.shape[0]
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    a1 = (a - mu1) / np.sqrt(n1 - 1)
    a2 = (b - mu2) / np.sqrt(n2 - 1)
    if n1 * n2 > d * d:
        return frechet_distance(mu1, a1.T @ a1, mu2, a2.T @ a2)
    tr_covmean = float(np.sum(np.linalg.svd(a1 @ a2.T, compute_uv=False)))
    diff = mu1 - mu2
    value = float(diff @ diff) + float(np.sum(a1 * a1)) + float(np.sum(a2 * a2)) - 2.0 * tr_covmean
    return max(value, 0.0)


# --------------------------------------------------------------------------- weights files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"FID weights file {path} does not exist")
    if path.is_dir():
        raise ModelError(
            f"FID weights path {path} is a directory, expected a .pt or .safetensors file"
        )
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as err:
            raise ModelError(f"cannot read FID weights {path} as safetensors: {err}") from err
    elif suffix in _PT_SUFFIXES:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ModelError(
                f"cannot read FID weights {path} as a weights-only PyTorch file: {err}"
            ) from err
    else:
        raise ModelError(
            f"FID weights {path}: unsupported file type {path.suffix!r} "
            f"(expected .safetensors or one of {', '.join(_PT_SUFFIXES)})"
        )
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping):
        raise ModelError(f"FID weights {path} hold a {type(raw).__name__}, not a state dict")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"FID weights {path} contain no tensors")
    return tensors


def _map_key(key: str) -> str:
    """Map torchvision / RadImageNet / wrapped checkpoint keys onto the MONAI ResNet names."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    m = re.match(r"^backbone\.(\d+)\.(.*)$", key)
    if m and m.group(1) in _SEQUENTIAL_NAMES:
        return f"{_SEQUENTIAL_NAMES[m.group(1)]}.{m.group(2)}"
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    return key


# --------------------------------------------------------------------------- feature extractor


def _build_resnet50() -> torch.nn.Module:
    from monai.networks.nets import ResNet

    return ResNet(
        block="bottleneck",
        layers=[3, 4, 6, 3],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=3,
        conv1_t_size=7,
        conv1_t_stride=2,
        no_max_pool=False,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


class ResNet50Features(torch.nn.Module):
    """ResNet-50 feature extractor: images in [0, 1] -> 2048-d pooled features.

    Parameters
    ----------
    weights_path : path, optional
        State dict of a ResNet-50 (``.safetensors``, or ``.pt``/``.pth`` read with
        ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` wrapper is unwrapped).
        torchvision names (``conv1.``, ``layer1.0.conv1.`` ...), RadImageNet's
        ``backbone.<i>.`` names and ``module.`` prefixes are understood. Unused tensors (e.g. a
        classifier ``fc.*``) are ignored and listed in ``load_report["unexpected"]``; a file that
        lacks a backbone tensor or has a tensor of the wrong shape is refused with ModelError.
        Without a file the weights are random (for tests only: such features mean nothing).
    size : int
        Images are resized to ``size`` x ``size`` before the network (224 for RadImageNet).
    device : str or torch.device
        Where the network runs.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        size: int = 224,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ConfigError(f"FID input size must be an integer >= 32, got {size!r}")
        self.size = size
        self.net = _build_resnet50()
        self.load_report: dict[str, list[str]] = {"missing": [], "unexpected": []}
        self.weights_path: Path | None = None
        if weights_path is not None:
            self.load_weights(weights_path)
        self.eval()
        self.to(torch.device(device))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def load_weights(self, weights_path: str | os.PathLike[str]) -> dict[str, list[str]]:
        """Load a ResNet-50 state dict (see the class docstring); returns the load report."""
        path = Path(weights_path)
        tensors = _read_state_dict(path)
        target = self.net.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, value in tensors.items():
            name = _map_key(key)
            if name not in target:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(target[name].shape):
                mismatched.append(
                    f"{key}: {tuple(value.shape)} in the file, {tuple(target[name].shape)} expected"
                )
            else:
                mapped[name] = value.to(target[name].dtype)
        if mismatched:
            raise ModelError(
                f"FID weights {path} do not fit a ResNet-50 with 3 input channels: "
                f"{len(mismatched)} tensors have other shapes (first: {mismatched[0]})"
            )
        missing = [k for k in target if k not in mapped]
        needed = [k for k in missing if not k.endswith("num_batches_tracked")]
        if needed:
            raise ModelError(
                f"FID weights {path} are not a ResNet-50 backbone: {len(needed)} of "
                f"{len(target)} tensors are missing (first: {needed[0]}; "
                f"{len(unexpected)} tensors in the file are not used)"
            )
        self.net.load_state_dict(mapped, strict=False)
        self.load_report = {"missing": missing, "unexpected": unexpected}
        self.weights_path = path
        return self.load_report

    def save_weights(self, path: str | os.PathLike[str]) -> Path:
        """Write the network's state dict (``.safetensors`` or ``.pt``) atomically."""
        out = Path(path)
        suffix = out.suffix.lower()
        if suffix not in (_SAFETENSORS_SUFFIX, *_PT_SUFFIXES):
            raise ConfigError(f"cannot save weights as {out}: use a .safetensors or .pt file name")
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            if suffix == _SAFETENSORS_SUFFIX:
                from safetensors.torch import save_file

                save_file(state, str(tmp))
            else:
                torch.save(state, tmp)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of images ``x`` (N, 1 or 3, H, W) with values in [0, 1] -> (N, 2048)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False
            )
        means = torch.tensor(CHANNEL_MEANS, dtype=x.dtype, device=x.device)
        return self.net(x - means.view(1, 3, 1, 1))

    @torch.inference_mode()
    def slice_features(self, slices: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Features of 2-D images on the 0-255 scale, (N, H, W) -> float64 array (N, 2048).

        The images are clipped to [0, 255] and divided by 255; no reorientation is done here.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        t = torch.as_tensor(slices)
        if t.ndim != 3:
            raise InputError(f"expected slices (N, H, W), got shape {tuple(t.shape)}")
        out = np.empty((t.shape[0], FEATURE_DIM), dtype=np.float64)
        for start in range(0, t.shape[0], batch_size):
            batch = t[start : start + batch_size].to(device=self.device, dtype=torch.float32)
            batch = (batch.clamp(0.0, 255.0) / 255.0).unsqueeze(1)
            out[start : start + batch.shape[0]] = self(batch).double().cpu().numpy()
        return out


# --------------------------------------------------------------------------- FID on volumes


def axial_slices(vol: np.ndarray, skip_empty: bool = True) -> np.ndarray:
    """Axial slices of a canonical (X, Y, Z) volume in display orientation, (N, Y, X).

    Row 0 is the most anterior row and column 0 the patient's right (radiological convention).
    With ``skip_empty``, slices whose voxels are all 0 (background only) are left out.
    """
    v = np.asarray(vol, dtype=np.float32)
    if v.ndim != 3:
        raise InputError(f"expected a 3-D volume (X, Y, Z), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise InputError("volume contains NaN or Inf values")
    s = np.moveaxis(v, 2, 0)  # (Z, X, Y)
    if skip_empty:
        s = s[np.any(s != 0, axis=(1, 2))]
    return np.ascontiguousarray(np.swapaxes(s[:, ::-1, ::-1], 1, 2))


def _volume_features(
    vols: Sequence[np.ndarray], model: ResNet50Features, batch_size: int, name: str
) -> np.ndarray:
    if len(vols) == 0:
        raise InputError(f"FID: no {name} volumes given")
    feats = [model.slice_features(axial_slices(v), batch_size) for v in vols]
    out = np.concatenate(feats, axis=0)
    if out.shape[0] < 2:
        raise InputError(
            f"FID: the {name} volumes have {out.shape[0]} non-empty axial slices (< 2)"
        )
    return out


def fid_axial(
    preds: Sequence[np.ndarray],
    refs: Sequence[np.ndarray],
    weights_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    *,
    size: int = 224,
    model: ResNet50Features | None = None,
) -> float:
    """FID between the axial slices of two lists of volumes (0-255 scale, canonical order).

    All non-empty axial slices of all ``preds`` form one feature set, those of ``refs`` the other
    (the lists need not be paired or of equal length). Pass ``weights_path`` (a ResNet-50 state
    dict, loaded on ``device`` with input size ``size``) or a ready ``model`` (then those three
    arguments are ignored). The value is returned unscaled (the paper's tables mark FID with a
    factor 1e-3).
    """
    if model is None:
        if weights_path is None:
            raise ConfigError("fid_axial needs weights_path (a ResNet-50 state dict) or a model")
        model = ResNet50Features(weights_path, size=size, device=device)
    f_pred = _volume_features(preds, model, batch_size, "predicted")
    f_ref = _volume_features(refs, model, batch_size, "reference")
    return fid_from_features(f_pred, f_ref)


def fid_available(weights_path: str | os.PathLike[str] | None) -> tuple[bool, str]:
    """Whether FID can be computed with ``weights_path``, and a one-line message saying why.

    The file is loaded into a ResNet-50 to check that it fits (about a second).
    """
    if weights_path is None or str(weights_path) == "":
        return (
            False,
            "FID skipped: no ResNet-50 weights file given (e.g. the RadImageNet ResNet-50 "
            "state dict as .pt or .safetensors)",
        )
    try:
        model = ResNet50Features(weights_path)
    except ModelError as err:
        return False, f"FID skipped: {err}"
    n_unused = len(model.load_report["unexpected"])
    extra = f"; {n_unused} tensors in the file unused" if n_unused else ""
    return True, f"FID with ResNet-50 features from {weights_path}{extra}"
