"""The model card (model.json) that a run folder and an exported bundle both carry.

One typed reader for the PyTorch predictor and the torch-free service, so the
two never disagree on labels, input size, threshold, temperature, study rule
or ensemble members (like timm's pretrained config: a frozen record that
says how to use a set of weights). Torch-free.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidscan.decision import EvidenceRule, StudyAnswer
from covidscan.errors import CovidscanError

NETWORK, ENSEMBLE = "network", "ensemble"


@dataclass(frozen=True)
class LabelSpace:
    """How a network's outputs map to classes.

    Usually one output per class. With DeTraC's class decomposition each class
    is split into sub-classes; the network predicts sub-classes and `compose`
    sums their probabilities back per class, for decisions, metrics,
    calibration and heat maps alike. Two classes: the positive one is last.
    """

    classes: tuple[str, ...]
    outputs: tuple[str, ...]  # one name per network output (a class, or "class/k" for a sub-class)
    parents: tuple[int, ...]  # class index of each output

    @classmethod
    def identity(cls, classes: list[str] | tuple[str, ...]) -> LabelSpace:
        return cls(tuple(classes), tuple(classes), tuple(range(len(classes))))

    @classmethod
    def decomposed(cls, classes: list[str] | tuple[str, ...], parts: list[int]) -> LabelSpace:
        """`parts[c]` sub-classes for class c (1 = not decomposed)."""
        outputs, parents = [], []
        for index, (name, k) in enumerate(zip(classes, parts)):
            outputs += [name] if k == 1 else [f"{name}/{j + 1}" for j in range(k)]
            parents += [index] * k
        return cls(tuple(classes), tuple(outputs), tuple(parents))

    @property
    def is_decomposed(self) -> bool:
        return len(self.outputs) != len(self.classes)

    @property
    def positive(self) -> str:
        return self.classes[-1]

    def compose(self, output_probs: np.ndarray) -> np.ndarray:
        """Output probabilities (N, K) -> class probabilities (N, C): sub-class probabilities summed per class."""
        output_probs = np.asarray(output_probs)
        if not self.is_decomposed:
            return output_probs
        out = np.zeros((len(output_probs), len(self.classes)), output_probs.dtype)
        np.add.at(out.T, np.asarray(self.parents), output_probs.T)
        return out

    def to_json(self) -> dict[str, object]:
        return {"classes": list(self.classes), "outputs": list(self.outputs), "parents": list(self.parents)}

    @classmethod
    def from_json(cls, raw: object, classes: list[str]) -> LabelSpace:
        if raw is None:
            return cls.identity(classes)
        if not isinstance(raw, dict):
            raise ValueError("labels must be an object")
        space = cls(tuple(classes), tuple(str(o) for o in raw["outputs"]), tuple(int(p) for p in raw["parents"]))
        if len(space.outputs) != len(space.parents) or sorted(set(space.parents)) != list(range(len(classes))):
            raise ValueError(f"labels: outputs {list(space.outputs)} do not map onto the classes {classes}")
        return space


@dataclass(frozen=True)
class MemberCard:
    """One network of an ensemble: where it lives (relative to the card) and what it weighs."""

    name: str
    folder: str
    backbone: str
    pretrained_from: str
    weight: float  # in the soft/weighted vote and the heat map

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "folder": self.folder, "backbone": self.backbone, "pretrained_from": self.pretrained_from, "weight": self.weight}


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to turn images into the deployed decision; `raw` keeps the descriptive rest."""

    raw: dict[str, object] = field(repr=False)
    kind: str  # NETWORK or ENSEMBLE
    labels: LabelSpace
    size: int
    threshold: float
    temperature: float  # fitted on validation; 1.0 when calibration was not kept
    tta: bool
    study_rule: dict[str, object]
    gate_threshold: float  # inf: a run trained before the gate existed
    members: tuple[MemberCard, ...] = ()
    combiner: dict[str, object] = field(default_factory=dict)
    preprocess: str = "none"  # data.preprocess: how a gray image becomes the input (data/preprocess.py)
    evidence_rule: EvidenceRule = field(default_factory=EvidenceRule)  # when a study may be answered at all

    @property
    def classes(self) -> list[str]:
        return list(self.labels.classes)

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> ModelCard:
        from covidscan.decision import DEFAULT_STUDY_RULE

        classes = [str(c) for c in raw["classes"]]  # type: ignore[union-attr]
        calibration = raw.get("calibration") or {}
        gate = raw.get("gate")
        kind = str(raw.get("kind", NETWORK))
        if kind not in (NETWORK, ENSEMBLE):
            raise ValueError(f"unknown kind {kind!r}")
        from covidscan.data.preprocess import PREPROCESSING

        if str(raw.get("preprocess", "none")) not in PREPROCESSING:
            raise ValueError(f"unknown preprocess {raw.get('preprocess')!r}")
        members = tuple(
            MemberCard(str(m["name"]), str(m["folder"]), str(m.get("backbone", "")), str(m.get("pretrained_from", "")), float(m.get("weight", 1.0)))
            for m in raw.get("members") or []  # type: ignore[union-attr]
        )
        if kind == ENSEMBLE and not members:
            raise ValueError("an ensemble card lists no members")
        return cls(
            raw=raw, kind=kind, labels=LabelSpace.from_json(raw.get("labels"), classes), size=int(raw["image_size"]),  # type: ignore[arg-type]
            threshold=float(raw.get("threshold", 0.5)),  # type: ignore[arg-type]
            temperature=float(calibration.get("temperature", 1.0)),  # type: ignore[union-attr]
            tta=bool(raw.get("tta", False)),
            study_rule=dict(raw.get("study_rule") or DEFAULT_STUDY_RULE),  # type: ignore[call-overload]
            gate_threshold=float(gate["threshold"]) if isinstance(gate, dict) and "threshold" in gate else math.inf,
            members=members, combiner=dict(raw.get("combiner") or {}),  # type: ignore[call-overload]
            preprocess=str(raw.get("preprocess", "none")),
            evidence_rule=EvidenceRule.from_json(raw.get("evidence_rule")),
        )

    def to_json(self) -> dict[str, object]:
        """model.json: the descriptive fields as read, the typed ones as they are now."""
        out = dict(self.raw)
        out.update({"kind": self.kind, "classes": self.classes, "positive_class": self.labels.positive, "image_size": self.size,
                    "threshold": self.threshold, "tta": self.tta, "study_rule": self.study_rule, "preprocess": self.preprocess,
                    "evidence_rule": self.evidence_rule.to_json()})
        if self.labels.is_decomposed:
            out["labels"] = self.labels.to_json()
        if self.members:
            out["members"] = [m.to_json() for m in self.members]
            out["combiner"] = self.combiner
        return out

    def with_fields(self, **raw_fields: object) -> ModelCard:
        """A new card with these model.json fields replaced (re-read, so typed and raw agree)."""
        return ModelCard.from_json({**self.to_json(), **raw_fields})


class CardFields:
    """The deployed decision's fields, read from `model_card`: for the PyTorch scorers and the served bundles alike."""

    model_card: ModelCard

    @property
    def classes(self) -> list[str]:
        return self.model_card.classes

    @property
    def size(self) -> int:
        return self.model_card.size

    @property
    def threshold(self) -> float:
        return self.model_card.threshold

    @property
    def temperature(self) -> float:
        return self.model_card.temperature

    @property
    def tta(self) -> bool:
        return self.model_card.tta

    @property
    def study_rule(self) -> dict[str, object]:
        return self.model_card.study_rule

    @property
    def gate_threshold(self) -> float:
        return self.model_card.gate_threshold

    @property
    def modality(self) -> str:
        """'CT', 'CXR' or '' (unknown: trained on a manifest without one modality, or before it was recorded)."""
        data = self.model_card.raw.get("training_data") or {}
        modality = str(data.get("modality", "")) if isinstance(data, dict) else ""
        return modality if modality in ("CT", "CXR") else ""  # a hand-edited or future value routes as unknown

    @property
    def evidence_rule(self) -> EvidenceRule:
        return self.model_card.evidence_rule

    @property
    def validated(self) -> str:
        """The plain statement of where the model was validated and how it did (model.json "validation")."""
        validation = self.model_card.raw.get("validation")
        return str(validation.get("statement", "")) if isinstance(validation, dict) else ""

    def study(self, results: Sequence[Any]) -> StudyAnswer:
        """Slices taken as one study: the card's evidence rule, then its study rule over the accepted slices.
        `results`: anything with `probabilities`, `in_distribution` and `lung` (a scorer's Prediction, a bundle's SliceResult)."""
        from covidscan.decision import study_answer

        return study_answer([r.probabilities[self.classes[-1]] for r in results], [r.in_distribution for r in results],
                            [bool(r.lung) for r in results], self.classes, self.study_rule, self.evidence_rule)


def read_model_card(path: Path, missing: str) -> ModelCard:
    """Parse model.json; `missing` is the one-line message when the file is absent."""
    if not path.is_file():
        raise CovidscanError(missing)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovidscanError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CovidscanError(f"{path}: not a model card (expected a JSON object, got {type(raw).__name__})")
    try:
        card = ModelCard.from_json(raw)
    except KeyError as exc:
        raise CovidscanError(f"{path}: not a model card (no {exc.args[0]!r} field)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise CovidscanError(f"{path}: malformed model card ({exc})") from None
    if len(card.classes) < 2 or not 8 <= card.size <= 4096 or not (card.temperature > 0 and 0 <= card.threshold <= 1):
        raise CovidscanError(f"{path}: malformed model card (classes {card.classes}, image_size {card.size}, "
                             f"threshold {card.threshold}, temperature {card.temperature})")
    return card
