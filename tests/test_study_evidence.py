"""A study answer only from enough evidence: the evidence rule, its fit on validation patients, and the validated figures."""
from __future__ import annotations

import math

import numpy as np
import pytest

from covidscan.decision import NOT_EVALUABLE, REFUSED, EvidenceRule, fit_evidence_rule, study_answer

CLASSES = ["non-COVID", "COVID"]
RULE = {"aggregation": "mean", "threshold": 0.341}


def test_a_study_the_gate_mostly_refuses_is_not_evaluable() -> None:
    """The issue's COVID patient: 19 of 148 slices accepted, mostly below the lungs, answered 'COVID suspected'."""
    accepted = np.zeros(148, bool)
    accepted[120:139] = True  # 19 accepted: the bases and the upper abdomen
    lung = np.zeros(148, bool)
    lung[10:130] = True  # 120 slices show lung, 110 of them refused
    answer = study_answer(np.full(148, 0.9), accepted, lung, CLASSES, RULE, EvidenceRule())
    assert answer.label == NOT_EVALUABLE and not answer.answered and math.isnan(answer.probability)
    assert "refused 110 of 120 slices that show lung" in answer.reason and (answer.used, answer.total) == (19, 148)


def test_a_study_whose_accepted_slices_lie_outside_the_lungs_is_not_evaluable() -> None:
    accepted = np.ones(40, bool)
    accepted[:30] = False  # the lung slices refused ... but the rule counts refusals among lung slices only
    lung = np.zeros(40, bool)
    lung[:12] = True
    rule = EvidenceRule(max_refused_share=1.0)  # refusals allowed: the lung check alone must withhold it
    answer = study_answer(np.full(40, 0.2), accepted, lung, CLASSES, RULE, rule)
    assert answer.label == NOT_EVALUABLE and "0 of the 10 accepted slices show lung" in answer.reason


def test_too_few_accepted_slices_and_none_at_all() -> None:
    lung = np.ones(4, bool)
    few = study_answer(np.full(4, 0.9), np.array([True, False, False, False]), lung, CLASSES, RULE, EvidenceRule(max_refused_share=1.0, min_accepted=3))
    assert few.label == NOT_EVALUABLE and "only 1 of 4 slices accepted" in few.reason
    none = study_answer(np.full(4, 0.9), np.zeros(4, bool), lung, CLASSES, RULE, EvidenceRule())
    assert none.label == REFUSED and none.used == 0


def test_a_well_covered_study_is_answered_by_the_study_rule() -> None:
    accepted = np.ones(100, bool)
    accepted[:20] = False  # the neck: refused, no lung
    lung = np.zeros(100, bool)
    lung[25:85] = True
    scores = np.linspace(0.2, 0.6, 100)
    answer = study_answer(scores, accepted, lung, CLASSES, RULE, EvidenceRule(min_accepted=3))
    assert answer.answered and answer.label == "COVID" and answer.probability == pytest.approx(scores[20:].mean())
    assert answer.lung_slices == 60 and answer.refused == 20


def test_the_rule_fitted_on_validation_withholds_no_validated_study() -> None:
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(40)], 30)
    lung = rng.random(len(patients)) < 0.8
    accepted = rng.random(len(patients)) < 0.99  # the gate's target: about 0.5 % refused in-domain
    rule = fit_evidence_rule(patients, accepted, lung)
    assert rule.max_refused_share == 0.5 and rule.min_accepted == 3 and 0 < rule.min_lung_share <= 0.5
    assert rule.validation["withheld"] == 0 and rule.validation["patients"] == 40 and "40 patients" in rule.chosen_on
    assert EvidenceRule.from_json(rule.to_json()) == rule


def test_the_lung_check_is_off_where_validation_images_show_no_lung() -> None:
    """sarscov2-ct's slices are cropped to the chest: the lung mask finds lungs on fewer than half of them."""
    patients = np.repeat([f"p{i}" for i in range(10)], 5)
    lung = np.arange(50) < 35  # the mask misses the lungs of three validation patients entirely
    rule = fit_evidence_rule(patients, np.ones(50, bool), lung)
    assert rule.min_lung_share == 0.0 and "no lung check" in rule.describe() and rule.validation["withheld"] == 0
    assert fit_evidence_rule(patients, np.ones(50, bool), np.arange(50) % 3 == 0).min_lung_share == 0  # 10 of 10: too few to trust
    many = np.repeat([f"p{i}" for i in range(40)], 3)
    assert fit_evidence_rule(many, np.ones(120, bool), np.arange(120) % 3 == 0).min_lung_share > 0  # lungs in 40 of 40 studies
    single = fit_evidence_rule(np.array([f"p{i}" for i in range(10)]), np.ones(10, bool), np.ones(10, bool))
    assert single.min_accepted == 1  # validated on single-image patients: one accepted image is enough
    unknown = fit_evidence_rule(np.full(10, ""), np.ones(10, bool), np.ones(10, bool))
    assert "lack patient IDs" in unknown.chosen_on


def test_a_malformed_evidence_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        EvidenceRule.from_json({"max_refused_share": 1.5})


def test_the_report_counts_withheld_studies_as_the_service_decides_them() -> None:
    import pandas as pd

    from covidscan.evaluate.evaluation import study_evidence

    frame = pd.DataFrame({"patient_id": ["a"] * 4 + ["b"] * 4 + ["c"] * 4})
    accepted = np.array([False] * 4 + [True, False, False, False] + [True] * 4)  # a: refused; b: 1 of 4; c: all
    card = {"evidence_rule": EvidenceRule(min_accepted=3).to_json()}
    withheld, summary = study_evidence(frame, accepted, np.ones(12, bool), card)
    assert (summary["studies"], summary["answered"], summary["not_evaluable"], summary["refused"]) == (3, 1, 1, 1)
    assert withheld.tolist() == [True] * 8 + [False] * 4 and "only 1 of 4 slices accepted" in summary["examples"][0]
