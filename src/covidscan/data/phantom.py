"""Synthetic chest-CT-like phantoms: the embedded default data set.

Why synthetic: the demo and the tests must run offline, without patient data.
The phantom is built to exercise the same code paths as real data: class
folders with a patient level, several neighbouring (similar) slices per
patient, and a COVID class whose only difference is the disease pattern
(peripheral, bilateral ground-glass opacities and consolidations), not a
file property. Both classes share the confounders (vessels, small nodules,
noise, position), so a model has to look at the lungs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from covidscan import atomic

COVID_CLASS = "COVID"
NON_COVID_CLASS = "non-COVID"


@dataclass(frozen=True)
class PhantomSpec:
    """How many synthetic patients and slices to make, and how large."""

    patients_per_class: int = 24
    slices_per_patient: int = 6
    image_size: int = 128
    seed: int = 0
    scanner: str = "A"  # "B": another hospital's scanner (other window and more noise), for external tests

    def __post_init__(self) -> None:
        from covidscan.errors import ConfigError

        if self.patients_per_class < 1 or self.slices_per_patient < 1:
            raise ConfigError(f"phantom: patients per class and slices per patient must be at least 1 "
                              f"(got {self.patients_per_class} and {self.slices_per_patient})")
        if not 32 <= self.image_size <= 2048:
            raise ConfigError(f"phantom: image size must be between 32 and 2048 px, got {self.image_size}")
        if self.scanner not in ("A", "B"):
            raise ConfigError(f"phantom: scanner must be 'A' or 'B', got {self.scanner!r}")


@dataclass(frozen=True)
class _Lesion:
    lung: int  # 0 = left, 1 = right (image left/right)
    angle: float  # position on the lung's outline, radians
    depth: float  # 0 = at the pleura, 1 = at the lung centre
    z_centre: float  # slice index where the lesion is widest
    radius: float  # in units of image size
    density: float  # added attenuation: ~0.15 ground glass, ~0.45 consolidation


@dataclass(frozen=True)
class _Patient:
    body_axes: tuple[float, float]
    centre: tuple[float, float]
    lung_axes: tuple[float, float]
    lung_gap: float
    vessels: np.ndarray  # (n, 4): lung, u, v, radius in the lung's own coordinates
    nodules: np.ndarray  # (n, 4): lung, u, v, radius
    noise: float
    lesions: tuple[_Lesion, ...]


def _random_patient(rng: np.random.Generator, covid: bool, n_slices: int) -> _Patient:
    vessels = np.column_stack(
        [
            rng.integers(0, 2, 40),
            rng.uniform(-0.8, 0.8, 40),
            rng.uniform(-0.8, 0.8, 40),
            rng.uniform(0.004, 0.012, 40),
        ]
    )
    nodules = np.column_stack(
        [
            rng.integers(0, 2, 3),
            rng.uniform(-0.6, 0.6, 3),
            rng.uniform(-0.6, 0.6, 3),
            rng.uniform(0.008, 0.018, 3),
        ]
    )[: rng.integers(0, 4)]
    lesions: list[_Lesion] = []
    if covid:
        # Bilateral in most patients; every slice gets at least one lesion because
        # the slices' label is the patient's label.
        n_lesions = int(rng.integers(2, 7))
        lungs = [0, 1] + list(rng.integers(0, 2, n_lesions - 2))
        for i, lung in enumerate(lungs):
            z = (i / max(1, n_lesions - 1)) * (n_slices - 1) + rng.normal(0, 0.5)
            lesions.append(
                _Lesion(
                    lung=int(lung),
                    angle=float(rng.uniform(0, 2 * np.pi)),
                    depth=float(rng.uniform(0.0, 0.35)),
                    z_centre=float(z),
                    radius=float(rng.uniform(0.035, 0.11)),
                    density=float(rng.choice([0.14, 0.2, 0.3, 0.45])),
                )
            )
    return _Patient(
        body_axes=(float(rng.uniform(0.40, 0.46)), float(rng.uniform(0.28, 0.34))),
        centre=(float(rng.uniform(0.47, 0.53)), float(rng.uniform(0.48, 0.53))),
        lung_axes=(float(rng.uniform(0.13, 0.16)), float(rng.uniform(0.19, 0.23))),
        lung_gap=float(rng.uniform(0.17, 0.20)),
        vessels=vessels,
        nodules=nodules,
        noise=float(rng.uniform(0.015, 0.04)),
        lesions=tuple(lesions),
    )


def _render_slice(
    patient: _Patient, z: int, n_slices: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Render one axial slice as float32 in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = patient.centre
    image = np.zeros((size, size), np.float32)
    # Table under the patient, then body (soft tissue) with a brighter rim.
    image[(yy > cy + patient.body_axes[1] + 0.03) & (yy < cy + patient.body_axes[1] + 0.05)] = 0.35
    body = ((xx - cx) / patient.body_axes[0]) ** 2 + ((yy - cy) / patient.body_axes[1]) ** 2
    image[body <= 1.0] = 0.45
    image[(body <= 1.0) & (body > 0.88)] = 0.55
    # Spine: a bright vertebra at the back (bottom of the image).
    spine = ((xx - cx) / 0.045) ** 2 + ((yy - (cy + patient.body_axes[1] - 0.09)) / 0.05) ** 2
    image[spine <= 1.0] = 0.85
    # Lungs change size smoothly along z: neighbouring slices look alike.
    t = z / max(1, n_slices - 1)
    scale = 0.8 + 0.35 * np.sin(np.pi * (0.2 + 0.6 * t))
    ax, ay = patient.lung_axes[0] * scale, patient.lung_axes[1] * scale
    lung_mask = np.zeros((size, size), bool)
    for side, sign in ((0, -1.0), (1, 1.0)):
        lx, ly = cx + sign * patient.lung_gap, cy - 0.02
        u, v = (xx - lx) / ax, (yy - ly) / ay
        this_lung = u**2 + v**2 <= 1.0
        lung_mask |= this_lung
        lung_image = np.full((size, size), 0.06, np.float32)
        for lung, vu, vv, radius in patient.vessels:
            if int(lung) != side:
                continue
            drift = 0.05 * z  # vessels move a little from slice to slice
            d2 = ((xx - (lx + (vu + drift) * ax)) ** 2 + (yy - (ly + vv * ay)) ** 2) / radius**2
            lung_image = np.maximum(lung_image, np.where(d2 <= 1.0, 0.32, 0.0))
        for lung, vu, vv, radius in patient.nodules:
            if int(lung) != side:
                continue
            d2 = ((xx - (lx + vu * ax)) ** 2 + (yy - (ly + vv * ay)) ** 2) / radius**2
            lung_image = np.maximum(lung_image, np.where(d2 <= 1.0, 0.5, 0.0))
        for lesion in patient.lesions:
            if lesion.lung != side:
                continue
            dz = (z - lesion.z_centre) / 1.6
            radius = lesion.radius * np.sqrt(max(0.0, 1.0 - dz**2 / 4.0))
            if radius <= 0.01:
                continue
            # Peripheral: centred near the pleura, on the lung's outline.
            r = 1.0 - lesion.depth
            px = lx + r * ax * np.cos(lesion.angle)
            py = ly + r * ay * np.sin(lesion.angle)
            d = np.sqrt((xx - px) ** 2 + (yy - py) ** 2) / radius
            blob = np.clip(1.2 - d, 0.0, 1.0) * lesion.density
            blob *= 0.7 + 0.3 * rng.random((size, size)).astype(np.float32)  # patchy texture
            lung_image = lung_image + ndimage.gaussian_filter(blob, 1.0)
        image = np.where(this_lung, lung_image, image)
    image = ndimage.gaussian_filter(image, 0.7)
    image += rng.normal(0.0, patient.noise, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _scanner_b(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another hospital: a wider display window (brighter lungs) and a noisier, sharper kernel."""
    shifted = np.power(pixels, 0.75) + rng.normal(0.0, 0.04, pixels.shape).astype(np.float32)
    return np.clip(shifted, 0.0, 1.0).astype(np.float32)


def generate_phantom_dataset(root: str | Path, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write `root/<class>/<patient>/<slice>.png` (8-bit grayscale) and return `root`.

    Deterministic for `spec.seed`: the same spec gives byte-identical files.
    """
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    scanner_rng = np.random.default_rng([spec.seed, 1])  # its own stream: the anatomy stays that of scanner A
    for class_name, covid in ((NON_COVID_CLASS, False), (COVID_CLASS, True)):
        for p in range(spec.patients_per_class):
            patient = _random_patient(rng, covid, spec.slices_per_patient)
            folder = root / class_name / f"{'cov' if covid else 'non'}-patient-{p:03d}"
            for z in range(spec.slices_per_patient):
                pixels = _render_slice(patient, z, spec.slices_per_patient, spec.image_size, rng)
                if spec.scanner == "B":
                    pixels = _scanner_b(pixels, scanner_rng)
                png = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
                atomic.write_with(folder / f"slice-{z:02d}.png", lambda tmp, im=png: im.save(tmp, format="PNG"))
    return root
