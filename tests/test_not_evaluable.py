"""A study the gate mostly refuses is 'not evaluable with this model' on every surface, beside the validated figures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_helpers import FAKE_PATIENT_ID, mostly_refused_series, phantom_series


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> TestClient:
    from covidscan.serve.app import create_app

    return TestClient(create_app(tiny_bundle))


def _upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def test_the_bundle_carries_the_validated_figures_and_the_evidence_rule(tiny_run: Path, tiny_bundle: Path) -> None:
    run_card, card = json.loads((tiny_run / "model.json").read_text()), json.loads((tiny_bundle / "model.json").read_text())
    validation = card["validation"]
    assert validation == run_card["validation"] and card["evidence_rule"] == run_card["evidence_rule"]
    home = validation["sets"]["in-domain test"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())["evaluation"]["sets"]["in-domain test"]
    assert home["slice_auc"]["value"] == pytest.approx(metrics["metrics"]["auc"], abs=1e-4)
    assert home["slice_auc"]["low"] == pytest.approx(metrics["ci"]["auc"]["low"], abs=1e-4)
    points = metrics["operating_points"]
    assert set(home["operating_points"]) == set(points) and home["data"]  # the operating points and the data, described
    for name, point in points.items():
        assert home["operating_points"][name]["sensitivity"]["value"] == pytest.approx(point["metrics"]["sensitivity"], abs=1e-4)
    statement = validation["statement"]
    assert statement.startswith("Validated on held-out patients of") and f"{home['slice_auc']['value']:.2f}" in statement
    assert "not measured on another hospital's images" in statement  # the tiny run has no external set
    rule = card["evidence_rule"]
    assert rule["chosen_on"].startswith("validation part") and rule["validation"]["withheld"] <= 0.05 * rule["validation"]["patients"] + 1


def test_the_statement_says_at_chance_or_not_evaluable_where_that_was_measured() -> None:
    from covidscan.evaluate.evaluation import validated_figures

    def result(kind: str, auc: tuple[float, float, float], refused: int, evaluable: bool = True) -> dict[str, object]:
        return {"kind": kind, "sources": [kind + "-set"], "gate": {"accepted": 100 - refused, "refused": refused},
                "metrics": {"auc": auc[0]}, "ci": {"auc": {"low": auc[1], "high": auc[2]}}, "evaluable": {"evaluable": evaluable}}

    statement = validated_figures({"in-domain test": result("in-domain", (0.96, 0.93, 0.98), 1),
                                   "ucsd": result("external", (0.52, 0.45, 0.58), 13),
                                   "moscow": result("external", (0.9, 0.7, 0.97), 68, evaluable=False)})["statement"]
    assert "Validated on held-out patients of in-domain-set (100 images): slice AUC 0.96 (95% CI 0.93-0.98)" in statement
    assert "(external-set) it was at chance: slice AUC 0.52 (95% CI 0.45-0.58), 13% of its images refused" in statement
    assert "it was not evaluable: the input gate refused 68% of its images" in statement and "0.90" not in statement


def test_a_mostly_refused_study_is_not_evaluable_in_the_rest_answer(client: TestClient, tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    series = mostly_refused_series(tiny_run, tmp_path / "s")
    response = client.post("/api/v1/predict?study=true", files=_upload(series))
    assert response.status_code == 200, response.text
    study = response.json()["study"]
    assert study["label"] == "not evaluable" and study["probability"] is None, study
    assert study["slices_used"] + study["slices_refused"] == 12 and study["slices_refused"] >= 7
    assert study["reason"].startswith("the input gate refused") and "unlike the images the model was validated on" in study["reason"]
    card = json.loads((tiny_bundle / "model.json").read_text())
    assert study["validated"] == card["validation"]["statement"] and study["evidence_rule"].startswith("answered only when")
    assert FAKE_PATIENT_ID not in response.text
    clean = client.post("/api/v1/predict?study=true", files=_upload(phantom_series(tiny_run, tmp_path / "c", 8))).json()["study"]
    assert clean["label"] in ("COVID", "non-COVID") and 0 <= clean["probability"] <= 1  # the same model answers a study like its own


def test_a_mostly_refused_study_is_not_evaluable_for_predict(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidscan.cli import main

    mostly_refused_series(tiny_run, tmp_path / "s")
    for model in (tiny_bundle, tiny_run):  # the bundle (ONNX) and the run (PyTorch) decide alike
        monkeypatch.setattr(sys, "argv", ["covidscan", "predict", str(model), str(tmp_path / "s")])
        with pytest.raises(SystemExit) as done:
            main()  # the CLI in this process (as tests/test_cli_mistakes.py does): no second torch import
        assert done.value.code in (0, None)
        out = capsys.readouterr().out
        study = next(line for line in out.splitlines() if line.startswith("study:"))
        assert study.startswith("study: not evaluable with this model (") and "the input gate refused" in study
        assert "validated: Validated on held-out patients" in out and "P = " not in study


def test_a_mostly_refused_study_is_not_evaluable_in_the_structured_report(tiny_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    from pydicom import dcmread

    from covidscan.serve.dicom_node import _identifiers, answer_lines, structured_report
    from covidscan.serve.predictor import load_bundle
    from covidscan.serve.router import Router
    from covidscan.serve.study_view import analyse_routed_study

    router = Router([("tiny", load_bundle(tiny_bundle))])
    series = mostly_refused_series(tiny_run, tmp_path / "s")
    analysis, served, _ = analyse_routed_study(router, {p.name: p.read_bytes() for p in series}, 1024)
    sr = structured_report(answer_lines(analysis, served.bundle), _identifiers(dcmread(series[0])))
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in sr.ContentSequence}
    assert texts["Study answer"].startswith("not evaluable with this model: the input gate refused")
    card = json.loads((tiny_bundle / "model.json").read_text())
    assert texts["Validation"] == card["validation"]["statement"] and "answered only when" in texts["Study rule"]
