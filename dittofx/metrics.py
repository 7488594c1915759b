"""Quality metrics for cached vs uncached generations: PSNR, SSIM, relative L2, and PNG folders.

All arithmetic is in float64, so uint8 inputs cannot wrap around. SSIM is scikit-image's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _f64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")


def psnr(a: ArrayLike, b: ArrayLike, data_range: float) -> float:
    """10 log10(data_range^2 / MSE) over all elements (a batch pools its MSE); inf when equal."""
    a, b = _f64(a), _f64(b)
    _check_shapes(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: ArrayLike, b: ArrayLike, data_range: float) -> float:
    """Mean SSIM (scikit-image, 7x7 window) over images laid out (H, W, C) or (N, H, W, C)."""
    from skimage.metrics import structural_similarity

    a, b = _f64(a), _f64(b)
    _check_shapes(a, b)
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {a.shape}")
    return float(np.mean([structural_similarity(x, y, data_range=data_range, channel_axis=-1) for x, y in zip(a, b)]))


def relative_l2(a: ArrayLike, reference: ArrayLike) -> float:
    """||a - reference|| / ||reference|| (e.g. final latents of a cached run vs the uncached run)."""
    a, r = _f64(a), _f64(reference)
    _check_shapes(a, r)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8, rounded."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_pngs(images: np.ndarray, directory: str | Path, names: list[str]) -> None:
    """Write (N, H, W, 3) uint8 images as DIRECTORY/NAME.png."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        Image.fromarray(image).save(directory / f"{name}.png")


def load_pngs(directory: str | Path) -> dict[str, np.ndarray]:
    """All .png files of a folder (any case: .PNG too) as RGB uint8 arrays, keyed by file name."""
    from PIL import Image

    files = sorted(f for f in Path(directory).iterdir() if f.suffix.lower() == ".png" and f.is_file())
    if not files:
        raise ValueError(f"{directory}: no .png files")
    images = {}
    for f in files:
        try:
            images[f.name] = np.asarray(Image.open(f).convert("RGB"))
        except OSError as err:  # PIL's UnidentifiedImageError is one
            raise ValueError(f"{f}: not a readable PNG ({err})") from None
    return images


SSIM_WINDOW = 7  # scikit-image's default window: smaller images have no SSIM


def compare_dirs(dir_a: str | Path, dir_b: str | Path) -> dict[str, float]:
    """PSNR (pooled over all pixels) and mean SSIM between same-named PNGs of two folders; each
    pair must match in size, the folders' images need not (they are compared pair by pair)."""
    a, b = load_pngs(dir_a), load_pngs(dir_b)
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"the folders hold different files: only in {dir_a}: {only_a[:5]}; only in {dir_b}: {only_b[:5]}")
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"{name}: {x.shape[1]}x{x.shape[0]} in {dir_a}, {y.shape[1]}x{y.shape[0]} in {dir_b}")
        if min(x.shape[:2]) < SSIM_WINDOW:
            raise ValueError(f"{name}: {x.shape[1]}x{x.shape[0]}, smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window")
    pooled = psnr(np.concatenate([x.ravel() for x in a.values()]), np.concatenate([b[k].ravel() for k in a]), 255.0)
    return {"images": len(a), "psnr": pooled, "ssim": float(np.mean([ssim(x, b[k], 255.0) for k, x in a.items()]))}
