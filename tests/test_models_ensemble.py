"""One model abstraction: DeTraC's decomposed networks and ensembles go through the same pipeline as one network."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidscan.combine import combine, heatmap_weights
from covidscan.errors import CovidscanError, DataError
from covidscan.model_card import LabelSpace
from tests.conftest import TINY


# --- label space and composition ------------------------------------------------------------------------------
def test_composed_probabilities_sum_to_one_and_equal_the_networks_log_sum_exp() -> None:
    from covidscan.models.classifier import compose_logits

    space = LabelSpace.decomposed(["non-COVID", "COVID"], [2, 3])
    assert space.outputs == ("non-COVID/1", "non-COVID/2", "COVID/1", "COVID/2", "COVID/3") and space.parents == (0, 0, 1, 1, 1)
    logits = torch.randn(7, 5)
    sub = logits.softmax(1).numpy()
    composed = space.compose(sub)
    assert composed.shape == (7, 2) and np.allclose(composed.sum(1), 1.0, atol=1e-6)
    assert np.allclose(composed[:, 1], sub[:, 2:].sum(1), atol=1e-6)
    membership = torch.zeros(2, 5)
    membership[torch.tensor(space.parents), torch.arange(5)] = 1
    assert np.allclose(compose_logits(logits, membership).softmax(1).numpy(), composed, atol=1e-5)
    plain = LabelSpace.identity(["a", "b"])
    assert not plain.is_decomposed and np.array_equal(plain.compose(sub[:, :2]), sub[:, :2])


def test_decomposition_finds_the_sub_classes_planted_in_a_class() -> None:
    from covidscan.models.decompose import decompose_classes, parse_decompose

    rng = np.random.default_rng(0)
    negatives = rng.normal(0, 1, (60, 16))
    positives = np.concatenate([rng.normal(8, 1, (30, 16)), rng.normal(-8, 1, (30, 16))])  # two kinds of positive
    labels = np.array([0] * 60 + [1] * 60)
    result = decompose_classes(np.concatenate([negatives, positives]), labels, ["non-COVID", "COVID"], parse_decompose("COVID=auto", ["non-COVID", "COVID"]))
    assert result.labels.outputs == ("non-COVID", "COVID/1", "COVID/2")
    assert set(result.output_labels[:60]) == {0}
    assert sorted(np.bincount(result.output_labels[60:])[1:]) == [30, 30]
    assert (result.output_labels[60:90] == result.output_labels[60]).all()  # one planted kind is one sub-class
    with pytest.raises(CovidscanError, match="model.decompose"):
        parse_decompose("COVID=zero", ["non-COVID", "COVID"])
    assert parse_decompose("off", ["a", "b"]) is None and parse_decompose("3", ["a", "b"]) == {"a": 3, "b": 3}


# --- combiners --------------------------------------------------------------------------------------------------
def _val_frame(n: int, split: str = "val") -> pd.DataFrame:
    return pd.DataFrame({"path": [f"img{i}.png" for i in range(n)], "label": ["COVID" if i % 2 else "non-COVID" for i in range(n)], "split": split})


def _member_probs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.15, n), 0.01, 0.99)
    noise = rng.uniform(0.01, 0.99, n)
    return [np.stack([1 - p, p], 1).astype(np.float32) for p in (good, noise)]


def test_stacking_and_weights_are_fitted_on_validation_predictions_only() -> None:
    from covidscan.ensemble import fit_combiner

    probs = _member_probs(80, 0)
    stacking = fit_combiner("stacking", _val_frame(80), probs, ["non-COVID", "COVID"])
    coef = np.asarray(stacking["coef"])[0]
    assert coef[0] > 3 * abs(coef[1])  # the informative member carries the stack
    weighted = fit_combiner("weighted", _val_frame(80), probs, ["non-COVID", "COVID"])
    assert weighted["weights"][0] > weighted["weights"][1]  # type: ignore[index]
    assert np.allclose(combine(probs, stacking).sum(1), 1.0, atol=1e-6)
    for split in ("test", "train"):
        mixed = _val_frame(80)
        mixed.loc[5, "split"] = split
        with pytest.raises(DataError, match=f"validation predictions only.*{split}"):
            fit_combiner("stacking", mixed, probs, ["non-COVID", "COVID"])
    assert np.allclose(heatmap_weights(stacking, 2).sum(), 1.0) and heatmap_weights({"method": "soft"}, 3).tolist() == pytest.approx([1 / 3] * 3)


# --- through the pipeline ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_members(tiny_run: Path, tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shared tiny run, and a decomposed second network trained on its very split."""
    from covidscan.config import load_config
    from covidscan.data.manifest import load_manifest
    from covidscan.pipeline import train_run

    second = tmp_path_factory.mktemp("decomposed")
    train_run(load_manifest(tiny_run / "manifest.csv"), load_config(None, TINY + ["model.decompose=2", "train.seed=1"]), second,
              show_progress=False, log=lambda m: None)
    return tiny_run, second


def test_decomposed_network_trains_evaluates_exports_and_serves(two_members: tuple[Path, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from covidscan.export.onnx import export_run
    from covidscan.predict import load_scorer
    from covidscan.serve.app import create_app
    from covidscan.serve.predictor import load_bundle

    run = two_members[1]
    card = json.loads((run / "model.json").read_text())
    assert card["labels"]["outputs"] == ["non-COVID/1", "non-COVID/2", "COVID/1", "COVID/2"]
    assert sum(sum(v["sizes"]) for v in card["decomposition"]["per_class"].values()) == card["training_data"]["by_split"]["train"]["images"]
    assignment = pd.read_csv(run / "decomposition.csv", keep_default_na=False)
    assert len(assignment) == card["training_data"]["by_split"]["train"]["images"] and "patient_id" not in assignment.columns
    assert (assignment["sub_class"].str.split("/").str[0] == assignment["label"]).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "auc" in metrics["evaluation"]["sets"]["in-domain test"]["metrics"] and metrics["model_card"]["decomposition"]
    scorer = load_scorer(run)
    rows = pd.read_csv(run / "test_predictions.csv", keep_default_na=False)
    from covidscan.data.io import load_image_array

    images = load_image_array([(p, None) for p in rows["path"]], 48, show=False)
    raw, _ = scorer.score(images)
    assert raw.shape == (len(rows), 2) and np.allclose(raw.sum(1), 1.0, atol=1e-5)
    assert np.allclose(scorer.calibrated(raw)[:, 1], rows["p_COVID"], atol=1e-5)  # the report's figures are the scorer's
    heat = scorer.heatmaps(images[:2], target_class=1)
    assert heat.shape == (2, 48, 48) and heat.max() <= 1.0
    bundle_dir = tmp_path / "bundle"
    export_run(run, bundle_dir)
    bundle = load_bundle(bundle_dir)
    served = bundle.analyse(list(images[:, 0]), heatmaps=True)
    assert np.allclose([r.probabilities["COVID"] for r in served], rows["p_COVID"], atol=1e-4)
    assert served[0].heatmap is not None and served[0].heatmap.shape == (48, 48)
    with TestClient(create_app(str(bundle_dir))) as client:
        accepted = int(np.flatnonzero(rows["accepted"].astype(str) == "True")[0])  # an image the run's gate accepted
        reply = client.post("/api/v1/predict", files={"files": ("a.png", _png(images[accepted, 0]), "image/png")})
        assert reply.status_code == 200, reply.text
        assert reply.json()["results"][0]["slices"][0]["probabilities"]["COVID"] == pytest.approx(rows["p_COVID"].iloc[accepted], abs=1e-4)
        assert client.get("/api/v1/model").json()["sub_classes"] == card["labels"]["outputs"]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stacked(two_members: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covidscan.ensemble import build_ensemble

    out = tmp_path_factory.mktemp("ensemble") / "stack"
    build_ensemble(list(two_members), out, "stacking", show=False, log=lambda m: None)
    return out


def test_ensemble_is_a_run_folder_like_any_other(stacked: Path, two_members: tuple[Path, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from covidscan.data.io import load_image_array
    from covidscan.evaluate.evaluation import evaluate_run
    from covidscan.export.onnx import export_run
    from covidscan.predict import load_scorer
    from covidscan.serve.app import create_app
    from covidscan.serve.predictor import load_bundle

    card = json.loads((stacked / "model.json").read_text())
    assert card["kind"] == "ensemble"
    assert [m["folder"] for m in card["members"]] == ["members/efficientnet_lite0", "members/efficientnet_lite0-2"]
    assert card["members"][1]["decomposed"]["outputs"] == ["non-COVID/1", "non-COVID/2", "COVID/1", "COVID/2"]
    assert card["combiner"]["method"] == "stacking" and card["combiner"]["fitted_on"].startswith("validation part")
    metrics = json.loads((stacked / "metrics.json").read_text())
    assert metrics["evaluation"]["sets"]["in-domain test"]["n"] > 0 and (stacked / "report.html").is_file()
    assert "members" in (stacked / "report.html").read_text()
    scorer = load_scorer(stacked)
    rows = pd.read_csv(stacked / "test_predictions.csv", keep_default_na=False)
    images = load_image_array([(p, None) for p in rows["path"]], 48, show=False)
    raw, ratios = scorer.score(images)
    assert ratios.shape == (len(rows), 2) and np.allclose(raw.sum(1), 1.0, atol=1e-5)
    assert np.allclose(scorer.calibrated(raw)[:, 1], rows["p_COVID"], atol=1e-5)
    assert scorer.heatmaps(images[:1], 1).shape == (1, 48, 48)
    evaluate_run(stacked, show=False, log=lambda m: None)  # re-evaluation from disk
    bundle_dir = tmp_path / "bundle"
    export_run(stacked, bundle_dir)
    bundle = load_bundle(bundle_dir)
    served = bundle.analyse(list(images[:, 0]), heatmaps=True, heatmap_top=2)
    assert np.allclose([r.probabilities["COVID"] for r in served], rows["p_COVID"], atol=1e-4)
    assert sum(r.heatmap is not None for r in served) == 2 and all(r.members and len(r.members) == 2 for r in served)
    every = bundle.analyse(list(images[:, 0]), heatmaps=True)  # all maps drawn in the members' one pass
    assert all(r.heatmap is not None for r in every)
    for r_all, r_top in zip(every, served):
        if r_top.heatmap is not None:  # the same weighted mean of member maps either way
            assert np.allclose(r_all.heatmap, r_top.heatmap, atol=1e-5)
    with TestClient(create_app(str(bundle_dir))) as client:
        accepted = int(np.flatnonzero(rows["accepted"].astype(str) == "True")[0])  # an image every member's gate accepted
        reply = client.post("/api/v1/predict?heatmap=true", files={"files": ("a.png", _png(images[accepted, 0]), "image/png")})
        assert reply.status_code == 200, reply.text
        slice_out = reply.json()["results"][0]["slices"][0]
        assert set(slice_out["member_probabilities"]) == {m["name"] for m in card["members"]} and slice_out["heatmap_png"]
        described = client.get("/api/v1/model").json()
        assert described["kind"] == "ensemble" and described["combiner"] == "stacking"


def test_stacking_never_sees_test_labels_and_members_must_share_a_split(two_members: tuple[Path, Path], stacked: Path, tmp_path: Path) -> None:
    """Flipping every test label of the members changes nothing the ensemble fits; a different split is refused."""
    from covidscan.ensemble import build_ensemble

    copies = []
    for run in two_members:
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        manifest = pd.read_csv(copy / "manifest.csv", keep_default_na=False)
        test = manifest["split"] == "test"
        manifest.loc[test, "label"] = np.where(manifest.loc[test, "label"] == "COVID", "non-COVID", "COVID")
        manifest.to_csv(copy / "manifest.csv", index=False)
        copies.append(copy)
    build_ensemble(copies, tmp_path / "flipped", "stacking", show=False, log=lambda m: None)
    original, flipped = (json.loads((p / "model.json").read_text()) for p in (stacked, tmp_path / "flipped"))
    assert flipped["combiner"]["coef"] == original["combiner"]["coef"] and flipped["combiner"]["intercept"] == original["combiner"]["intercept"]
    assert flipped["calibration"] == original["calibration"] and flipped["study_rule"] == original["study_rule"]
    manifest = pd.read_csv(copies[1] / "manifest.csv", keep_default_na=False)
    moved = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[moved, "split"] = "train"
    manifest.to_csv(copies[1] / "manifest.csv", index=False)
    with pytest.raises(DataError, match="share one split; 1 images differ.*test in .*train in"):
        build_ensemble(copies, tmp_path / "refused", "soft", show=False, log=lambda m: None)


# --- adaptation to a new hospital (AdaBN) ------------------------------------------------------------------------
def test_adabn_adapts_batch_norm_refits_the_gate_on_the_new_hospital_and_resets_calibration(tiny_run: Path, tmp_path: Path) -> None:
    from covidscan.adapt import adapt_run
    from covidscan.data.io import load_image_array
    from covidscan.data.manifest import image_refs
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
    from covidscan.data.sources import index_folder
    from covidscan.predict import Predictor

    other = index_folder(generate_phantom_dataset(tmp_path / "b", PhantomSpec(patients_per_class=6, slices_per_patient=4, image_size=48, seed=3, scanner="B")))
    with pytest.raises(DataError, match="at least 32"):
        adapt_run(tiny_run, other.head(10), tmp_path / "few", "hospital-b", show=False, log=lambda m: None)
    adapt_run(tiny_run, other, tmp_path / "adapted", "hospital-b", show=False, log=lambda m: None)
    source, adapted = Predictor(tiny_run), Predictor(tmp_path / "adapted")
    means = [[m.running_mean.clone() for m in p.model.modules() if isinstance(m, torch.nn.BatchNorm2d)] for p in (source, adapted)]
    assert len(means[0]) > 5 and all(not torch.allclose(a, b) for a, b in zip(*means))
    assert [p.numel() for p in adapted.model.parameters()] == [p.numel() for p in source.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(source.model.parameters(), adapted.model.parameters()))  # no weight changed
    card = json.loads((tmp_path / "adapted" / "model.json").read_text())
    assert card["adaptation"]["unlabelled_images"] == len(other) and card["calibration"]["temperature"] == 1.0
    assert card["calibration"]["operating_points"] == {"default": 0.5} and "hospital-b" in card["gate"]["fitted_on"]
    # new images of the same hospital (other patients), as the adapted model will meet them
    fresh = index_folder(generate_phantom_dataset(tmp_path / "b2", PhantomSpec(patients_per_class=6, slices_per_patient=4, image_size=48, seed=4, scanner="B")))
    images = load_image_array(image_refs(fresh), 48, show=False)
    refused_before = (source.gate_distances(source.score(images)[1]) > source.gate_threshold).mean()
    refused_after = (adapted.gate_distances(adapted.score(images)[1]) > adapted.gate_threshold).mean()
    assert refused_after < refused_before and refused_after <= 0.25  # the new hospital's images are now the accepted kind
    metrics = json.loads((tmp_path / "adapted" / "metrics.json").read_text())
    assert metrics["model_card"]["adaptation"]["method"].startswith("AdaBN") and "Adapted" in (tmp_path / "adapted" / "report.html").read_text()


def test_tent_trains_only_batch_norm_scale_and_shift_and_makes_the_new_hospital_confident(tiny_run: Path, tmp_path: Path) -> None:
    """Entropy minimisation lowers the prediction entropy on the new hospital's images, changes batch-norm affine
    parameters only, and is recorded in the adapted run's card; an unknown method is refused before any work."""
    from covidscan.adapt import adabn, adapt_run, entropy_minimisation
    from covidscan.data.io import load_image_array
    from covidscan.data.manifest import image_refs
    from covidscan.data.phantom import PhantomSpec, generate_phantom_dataset
    from covidscan.data.sources import index_folder
    from covidscan.predict import Predictor

    other = index_folder(generate_phantom_dataset(tmp_path / "b", PhantomSpec(patients_per_class=6, slices_per_patient=4, image_size=48, seed=3, scanner="B")))
    images = load_image_array(image_refs(other), 48, show=False)

    def entropy(predictor: Predictor) -> float:
        probs = np.clip(predictor.score(images, tta=False)[0], 1e-8, 1)
        return float(-(probs * np.log(probs)).sum(1).mean())

    by_adabn, by_tent, source = Predictor(tiny_run), Predictor(tiny_run), Predictor(tiny_run)
    adabn(by_adabn.model, images, by_adabn.normaliser)
    entropy_minimisation(by_tent.model, images, by_tent.normaliser, epochs=10, lr=1e-2)
    assert entropy(by_tent) < entropy(by_adabn) - 0.01
    batch_norm = {id(p) for m in by_tent.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in (m.weight, m.bias)}
    changed = [id(a) in batch_norm for a, b in zip(by_tent.model.parameters(), source.model.parameters()) if not torch.equal(a, b)]
    assert changed and all(changed)  # some batch-norm scale or shift moved, and nothing else
    assert all(p.requires_grad for p in by_tent.model.parameters())  # the network is left as it was found

    with pytest.raises(CovidscanError, match="unknown adaptation method 'tnet'"):
        adapt_run(tiny_run, other, tmp_path / "typo", "hospital-b", show=False, log=lambda m: None, method="tnet")
    assert not (tmp_path / "typo").exists()
    adapt_run(tiny_run, other, tmp_path / "tent", "hospital-b", show=False, log=lambda m: None, method="tent")
    card = json.loads((tmp_path / "tent" / "model.json").read_text())
    assert card["adaptation"]["method"].startswith("TENT") and card["calibration"]["operating_points"] == {"default": 0.5}
