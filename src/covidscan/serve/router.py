"""Which served model answers an upload, when one service holds several bundles (a CT model, an X-ray model).

The rule, in order:
1. one bundle: it answers everything (its gate still refuses what is unlike its training images);
2. a DICOM file: its Modality tag (CT; CR or DX = chest X-ray) picks the bundle trained on that modality;
   a NIfTI volume is CT; no bundle for that modality is a clear 422, never a guess by another model; every other
   Modality (MR, US, PT, NM, XA, MG, OT, ...) is refused by name (no model here is trained on it);
3. anything else (PNG, JPEG, ...): every candidate's input gate measures the image, and the bundle whose gate
   accepts it, closest to its training images (distance / the gate's threshold), answers.
A bundle's modality comes from its model card (`training_data.modality`, recorded at training time from the
manifest); a bundle with none recorded takes part in step 3 only, and in step 2 only when no bundle has the modality.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covidscan.errors import CovidscanError
from covidscan.serve.predictor import Bundle, EnsembleBundle, SliceResult, load_bundle

MODALITY_NAMES = {"CT": "chest CT", "CXR": "chest X-ray", "": "unknown modality"}


def modality_name(modality: str) -> str:
    """'chest CT', 'chest X-ray', 'unknown modality', or 'MR' style DICOM tags as 'DICOM modality MR'."""
    return MODALITY_NAMES.get(modality, f"DICOM modality {modality}")
BY_TAG, BY_VOLUME, BY_GATE, ONLY = "DICOM Modality tag", "NIfTI volume (CT)", "input gates", "the only model served"
BY_STUDY = "the study's first file"  # the other files of a study go to the model that answered its first


@dataclass(frozen=True)
class ServedBundle:
    """One bundle behind the service, with the name the answers and the page show."""

    name: str
    bundle: Bundle | EnsembleBundle

    @property
    def modality(self) -> str:
        return self.bundle.modality

    def images_noun(self) -> str:
        """'chest CT slices' / 'chest X-rays' / 'images': what the gate's refusal says the model was trained on."""
        return {"CT": "chest CT slices", "CXR": "chest X-rays"}.get(self.modality, "images")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "modality": self.modality, "modality_name": modality_name(self.modality), **self.bundle.describe()}


class NoModelForModality(CovidscanError):
    """A DICOM (or NIfTI) upload of a modality no served bundle was trained on."""


class Router:
    """The served bundles and the rule that picks one per upload (module docstring)."""

    def __init__(self, bundles: list[tuple[str, Bundle | EnsembleBundle]]) -> None:
        if not bundles:
            raise CovidscanError("no bundle to serve")
        self.served: list[ServedBundle] = []
        for name, bundle in bundles:
            taken = {s.name for s in self.served}
            unique, n = name, 2
            while unique in taken:
                unique, n = f"{name}-{n}", n + 1
            self.served.append(ServedBundle(unique, bundle))
        by_modality: dict[str, str] = {}
        for served in self.served:
            if served.modality and served.modality in by_modality:
                raise CovidscanError(f"two bundles were trained on {modality_name(served.modality)}: {by_modality[served.modality]} and "
                                     f"{served.name}; serve one model per modality (an ensemble combines networks: `covidscan ensemble`)")
            by_modality[served.modality] = served.name

    @property
    def default(self) -> ServedBundle:
        return self.served[0]

    def get(self, name: str) -> ServedBundle:
        return next(s for s in self.served if s.name == name)

    def candidates(self, kind: str, modality: str, where: str) -> tuple[list[ServedBundle], str]:
        """The bundles that may answer an upload of `kind` ('dicom', 'nifti', 'raster') whose DICOM Modality family is
        `modality` ('CT', 'CXR', '' unknown), and how they were chosen. Raises NoModelForModality naming `where`
        (also with one bundle: a chest X-ray DICOM sent to a CT model is refused by name, not left to the gate)."""
        wanted, how = (modality, BY_TAG) if kind == "dicom" and modality else ("CT", BY_VOLUME) if kind == "nifti" else ("", BY_GATE)
        if not wanted:
            return list(self.served), ONLY if len(self.served) == 1 else BY_GATE
        matching = [s for s in self.served if s.modality == wanted] or [s for s in self.served if not s.modality]
        if not matching:
            offered = ", ".join(f"{s.name} ({modality_name(s.modality)})" for s in self.served)
            raise NoModelForModality(f"{where}: a {modality_name(wanted)} image, and no model served here was trained on that modality "
                                     f"(served: {offered}); no prediction is given")
        return matching, ONLY if len(self.served) == 1 else how

    def can_serve(self, modality: str) -> bool:
        """Whether a DICOM series of this routing modality ('CT', 'CXR', 'MR', '') has a model here (`candidates`)."""
        return not modality or any(s.modality in (modality, "") for s in self.served)

    @staticmethod
    def closest(answers: list[tuple[ServedBundle, list[SliceResult]]]) -> int:
        """Of several bundles' answers to the same images, the index of the one whose gate accepted most of them,
        then of the one closest to its training images (mean distance / the gate's threshold)."""
        def rank(index: int) -> tuple[int, float]:
            served, results = answers[index]
            threshold = served.bundle.gate_threshold
            ratio = sum(r.gate_distance for r in results) / max(len(results), 1) / threshold if threshold > 0 else 0.0
            return -sum(r.in_distribution for r in results), ratio

        return min(range(len(answers)), key=rank)


def load_router(folders: list[str] | list[Path], threads: int = 0) -> Router:
    """The served bundles of the service or the DICOM node; the same folder given twice is refused, not served twice."""
    seen: dict[Path, str] = {}
    for folder in folders:
        resolved = Path(folder).resolve()
        if resolved in seen:
            raise CovidscanError(f"{folder}: the same bundle is given twice (as {seen[resolved]} too); give each bundle once")
        seen[resolved] = str(folder)
    return Router([(bundle_name(folder), load_bundle(folder, threads=threads)) for folder in folders])


def bundle_name(folder: str | Path) -> str:
    """A served bundle's name: its folder's name ('bundle' inside a run folder: the run's name)."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "bundle" and path.parent.name else path.name
