"""Scattering features: a fixed, parameter-free front end for the image classifier.

Tramèr & Boneh (ICLR 2021, "Differentially Private Learning Needs Better Features") show that
under DP-SGD a model trained on handcrafted ScatterNet features beats the same budget spent on
learning features from pixels (Fashion-MNIST at epsilon 3: 89.7% against 86.0%): nothing of the
privacy budget goes into learning edges and textures. We use their transform:

    images [N, C, H, W] -> 2D scattering transform, J = 2 scales, L = 8 angles (kymatio):
      1 + J L + L^2 J (J - 1) / 2 = 81 coefficients per input channel at (H/4) x (W/4)
    -> GroupNorm over groups of 3 coefficients, no learned affine (their normalisation)
    -> zero-padded to ``scattering_grid(H)``, a multiple of 4, so patches make a 4 x 4 token grid.

The transform depends on nothing but the image: it is computed by each site on its own data and
by the server on the public test set, and needs no privacy budget. Feature tensors are kept on
disk (``cache_dir()/features``), since every deployment task is a fresh process.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run config reads the grid's geometry before torch is imported
    import torch

J = 2
ANGLES = 8
COEFFICIENTS = 1 + J * ANGLES + ANGLES**2 * J * (J - 1) // 2  # per input channel: 81
GROUP = 3  # coefficients normalised together (Tramèr & Boneh: 27 groups of the 81)
BATCH_PIXELS = 2000 * 28 * 28  # input values per transform call: bounds kymatio's FFT buffers


def scattering_grid(image_size: int) -> int:
    """Side of the feature grid: image_size / 4 rounded up to a multiple of 4 (28 -> 8)."""
    return 4 * math.ceil(math.ceil(image_size / 2**J) / 4)


def scattering_features(images: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, H] -> [N, C * 81, G, G] features, G = scattering_grid(H); see the module."""
    import torch
    import torch.nn.functional as F
    # the 2D front end only: kymatio 0.3's `kymatio.torch` also imports its 3D transforms, which
    # need scipy.special.sph_harm, gone from scipy 1.15
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    n, c, h, w = images.shape
    transform = ScatteringTorch2D(J=J, shape=(h, w), L=ANGLES)
    grid = scattering_grid(h)
    batch = max(1, BATCH_PIXELS // (c * h * w))
    out = images.new_zeros(n, c * COEFFICIENTS, grid, grid)
    with torch.no_grad():
        for start in range(0, n, batch):
            coefficients = transform(images[start : start + batch].float()).flatten(1, 2)  # [B, C*81, h', w']
            normalised = F.group_norm(coefficients, c * COEFFICIENTS // GROUP)
            out[start : start + batch, :, : normalised.shape[2], : normalised.shape[3]] = normalised
    return out


def cached_scattering_features(images: torch.Tensor) -> torch.Tensor:
    """``scattering_features(images)``, from the disk cache when these exact images were seen."""
    from importlib.metadata import version

    import torch

    from ..results import atomic_replace
    from .fashion_mnist import cache_dir

    recipe = repr((J, ANGLES, GROUP, tuple(images.shape), version("kymatio"))).encode()
    key = hashlib.sha256(images.float().contiguous().numpy().tobytes() + recipe).hexdigest()[:32]
    path = cache_dir() / "features" / f"scattering-{key}.pt"
    with contextlib.suppress(OSError, RuntimeError):
        return torch.load(path, weights_only=True)
    features = scattering_features(images)
    with contextlib.suppress(OSError):  # a read-only cache only costs the recomputation
        atomic_replace(path, lambda tmp: torch.save(features, tmp))
    return features
