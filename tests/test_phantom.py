from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_layout_and_counts(tiny_phantom: Path) -> None:
    files = _files(tiny_phantom)
    assert len(files) == 2 * 8 * 3
    assert {f.relative_to(tiny_phantom).parts[0] for f in files} == {"COVID", "non-COVID"}
    assert all(len(f.relative_to(tiny_phantom).parts) == 3 for f in files)  # class/patient/slice
    with Image.open(files[0]) as img:
        assert img.mode == "L" and img.size == (48, 48)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    spec = PhantomSpec(patients_per_class=2, slices_per_patient=2, image_size=40, seed=7)
    a = generate_phantom_dataset(tmp_path / "a", spec)
    b = generate_phantom_dataset(tmp_path / "b", spec)
    c = generate_phantom_dataset(tmp_path / "c", PhantomSpec(2, 2, 40, seed=8))
    assert [f.read_bytes() for f in _files(a)] == [f.read_bytes() for f in _files(b)]
    assert [f.read_bytes() for f in _files(a)] != [f.read_bytes() for f in _files(c)]


def test_covid_slices_are_denser_in_the_lungs(tmp_path: Path) -> None:
    """The disease pattern raises attenuation inside the (dark) lung fields."""
    root = generate_phantom_dataset(tmp_path, PhantomSpec(patients_per_class=6, slices_per_patient=3, image_size=96, seed=3))

    def lung_brightness(cls: str) -> float:
        values = []
        for f in sorted((root / cls).rglob("*.png")):
            pixels = np.asarray(Image.open(f), np.float32) / 255
            body = pixels[20:76, 15:81]
            values.append(float(np.mean((body > 0.12) & (body < 0.4))))  # lesion-range pixels
        return float(np.mean(values))

    assert lung_brightness("COVID") > lung_brightness("non-COVID") * 1.2


def test_neighbouring_slices_are_more_alike_than_other_patients(tiny_phantom: Path) -> None:
    def load(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path), np.float32)

    patients = sorted(p for p in (tiny_phantom / "non-COVID").iterdir())
    same = np.abs(load(patients[0] / "slice-00.png") - load(patients[0] / "slice-01.png")).mean()
    other = np.abs(load(patients[0] / "slice-00.png") - load(patients[1] / "slice-00.png")).mean()
    assert same < other


def test_scanner_b_is_another_look_of_the_same_patients(tmp_path: Path) -> None:
    """The external demo set: same anatomy generator, other window and noise; deterministic too."""
    import numpy as np
    from PIL import Image

    a = generate_phantom_dataset(tmp_path / "a", PhantomSpec(patients_per_class=1, slices_per_patient=2, image_size=48, seed=4))
    b1 = generate_phantom_dataset(tmp_path / "b1", PhantomSpec(patients_per_class=1, slices_per_patient=2, image_size=48, seed=4, scanner="B"))
    b2 = generate_phantom_dataset(tmp_path / "b2", PhantomSpec(patients_per_class=1, slices_per_patient=2, image_size=48, seed=4, scanner="B"))
    name = "COVID/cov-patient-000/slice-00.png"
    pa, pb = (np.asarray(Image.open(root / name), float) for root in (a, b1))
    assert (b1 / name).read_bytes() == (b2 / name).read_bytes()
    assert pb.mean() > pa.mean() + 5  # the wider window brightens the image
    assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.9  # same anatomy
