"""A careless user's mistakes: each gets one line naming the problem, exit code 2, no traceback.

In-process through `cli.main` (fast); anything but CovidscanError escapes as the
traceback the user would have seen, and fails the test.
"""
from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.cli import main

from conftest import TINY


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["covidscan", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def _refused(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 2, (code, out[-500:], err)
    assert err.startswith("error:") and len(err) < 600, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def manifest(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covidscan.data.manifest import save_manifest
    from covidscan.data.sources import index_folder

    path = tmp_path_factory.mktemp("m") / "m.csv"
    save_manifest(index_folder(tiny_phantom), path)
    return path


def _train(manifest: Path, out: Path, *overrides: str) -> list[str]:
    args = ["train", str(manifest), "--out", str(out), "--quiet"]
    for item in [*TINY, *overrides]:
        args += ["--set", item]
    return args


def test_output_path_that_is_a_folder(capsys, monkeypatch, tiny_phantom: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _refused(_cli(capsys, monkeypatch, "data", "index", str(tiny_phantom), "-o", str(tmp_path)), str(tmp_path), "is a folder")


def test_config_file_that_is_not_utf8(capsys, monkeypatch, manifest: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "c.yaml"
    config.write_bytes(b"train:\n  epochs: \xff\xfe2\n")
    _refused(_cli(capsys, monkeypatch, "train", str(manifest), "-o", str(tmp_path / "r"), "--config", str(config)), "c.yaml", "UTF-8")


@pytest.mark.parametrize("override, needle", [
    ("train.epochs=[1", "not valid YAML"),
    ("data.image_size=-5", "data.image_size"),
    ("data.image_size=7", "data.image_size"),  # was a segfault in t-SNE
    ("train.lr=.nan", "finite"),
    ("train.lr=.inf", "finite"),
    ("train.device=banana", "unknown device"),
    ("data.positive_class=covid", "did you mean 'COVID'"),  # was: non-COVID silently became the positive class
])
def test_bad_overrides(capsys, monkeypatch, manifest: Path, tmp_path: Path, override: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    _refused(_cli(capsys, monkeypatch, *_train(manifest, tmp_path / "run", override)), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys, monkeypatch, manifest: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _refused(_cli(capsys, monkeypatch, *_train(manifest, tmp_path / "run", "train.device=cuda")), "no CUDA GPU")


def test_manifest_with_a_bad_slice_index(capsys, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "m.csv"
    bad.write_text("path,label,slice_index\na.nii,COVID,abc\nb.nii,non-COVID,1\n")
    _refused(_cli(capsys, monkeypatch, "split", str(bad), "-o", str(tmp_path / "s.csv")), "m.csv", "slice_index", "'abc'")


def test_corrupt_metrics_and_model_cards(capsys, monkeypatch, tiny_run: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "metrics.json").write_text('{"test": ')
    _refused(_cli(capsys, monkeypatch, "evaluate", str(run), "--quiet"), "metrics.json", "not valid JSON")
    (run / "model.json").write_text("[1, 2, 3]")
    _refused(_cli(capsys, monkeypatch, "predict", str(run), str(run / "config.yaml")), "model.json", "expected a JSON object")
    (run / "model.json").write_text('{"classes": ["a", "b"]}')
    _refused(_cli(capsys, monkeypatch, "predict", str(run), str(run / "config.yaml")), "model.json", "'image_size'")


def test_predict_on_a_bundle_applies_the_gate(capsys, monkeypatch, tiny_bundle: Path, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    image = frame.loc[frame["split"] == "test", "path"].iloc[0]
    code, out, err = _cli(capsys, monkeypatch, "predict", str(tiny_bundle), image)
    assert code == 0, err
    assert "P(COVID)=" in out and "gate distance" in out and "not a diagnosis" in out


def _zero_dim_nifti(path: Path) -> Path:
    import nibabel as nib

    data = bytearray(nib.Nifti1Image(np.zeros((8, 8, 2), np.int16), np.eye(4)).to_bytes())
    struct.pack_into("<8h", data, 40, 3, 8, 0, 2, 1, 1, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_zero_dimension_nifti_is_refused_by_index_and_flagged_by_audit(capsys, monkeypatch, tiny_phantom: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    bad = _zero_dim_nifti(data / "COVID" / "x" / "empty.nii")
    _refused(_cli(capsys, monkeypatch, "data", "index", str(data), "-o", str(tmp_path / "m.csv")), "empty.nii", "empty or negative dimension")
    bad.unlink()
    assert _cli(capsys, monkeypatch, "data", "index", str(data), "-o", str(tmp_path / "m.csv"))[0] == 0
    with (tmp_path / "m.csv").open("a") as handle:  # a manifest written by the old indexer, which accepted it
        handle.write(f"{_zero_dim_nifti(bad)},COVID,,,phantom,,0\n")
    code, out, err = _cli(capsys, monkeypatch, "audit", str(tmp_path / "m.csv"), "-o", str(tmp_path / "audit"), "--quiet")
    assert code == 0, err
    audited = (tmp_path / "audit" / "manifest.audited.csv").read_text()
    row = next(line for line in audited.splitlines() if "empty.nii" in line)
    assert "corrupt" in row
    _refused(_cli(capsys, monkeypatch, *_train(tmp_path / "m.csv", tmp_path / "run")), "empty.nii")


@pytest.mark.parametrize("args, needle", [
    (["--test-size", "1.5"], "test size 1.5"),
    (["--test-size", "0.5", "--val-size", "0.5"], "sum to less than 1"),
    (["--folds", "1"], "at least 2"),
])
def test_split_sizes_are_checked(capsys, monkeypatch, manifest: Path, tmp_path: Path, args: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    _refused(_cli(capsys, monkeypatch, "split", str(manifest), "-o", str(tmp_path / "s.csv"), "--quiet", *args), needle)


def test_split_of_one_class(capsys, monkeypatch, manifest: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines = manifest.read_text().splitlines()
    one = tmp_path / "one.csv"
    one.write_text("\n".join([lines[0]] + [line for line in lines[1:] if ",COVID," in line]) + "\n")
    _refused(_cli(capsys, monkeypatch, "split", str(one), "-o", str(tmp_path / "s.csv"), "--quiet"), "only one class")


@pytest.mark.parametrize("args", [["--slices", "-1"], ["--patients", "0"], ["--size", "7"]])
def test_phantom_counts_are_checked(capsys, monkeypatch, tmp_path: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    _refused(_cli(capsys, monkeypatch, "data", "phantom", str(tmp_path / "p"), *args), "phantom")
    assert not any((tmp_path / "p").rglob("*.png")) if (tmp_path / "p").exists() else True


def test_models_prints_no_markup(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = _cli(capsys, monkeypatch, "models")
    assert code == 0 and "[bold]" not in out and "--weights FILE" not in out and "efficientnet_lite0" in out
