"""The method suite through `deltaserve compress`: new methods and flags, validation JSONL, LoRA adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client.cli import main
from deltas_store.format.io import read_manifest

FAST = ("--quiet",)


@pytest.fixture(autouse=True)
def _small_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DELTASERVE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DELTASERVE_CALIBRATION_SAMPLES", "2")
    monkeypatch.setenv("DELTASERVE_CALIBRATION_TOKENS", "16")


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_validation_jsonl_drives_a_labeled_q_search(
    capsys: pytest.CaptureFixture[str], tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    validation = tmp_path / "val.jsonl"
    rows = [{"text": "the quick brown fox", "label": 1}, {"text": "hello world", "label": 0}] * 3
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "v.safetensors"
    printed = _run(
        capsys,
        "compress",
        tiny_bert_dir,
        tiny_bert_classifier_dir,
        "-o",
        out,
        "--validation",
        validation,
        *FAST,
    )
    m = read_manifest(out)
    assert m.calibration is not None and m.calibration.metric == "accuracy"
    assert m.calibration.source == str(validation) and m.calibration.details["goal"] == "max"
    assert 0.0 <= m.calibration.score <= 1.0  # type: ignore[operator]
    assert "calibration: accuracy" in printed


def test_per_layer_auto_and_new_methods_flags(
    capsys: pytest.CaptureFixture[str], tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pl.safetensors"
    _run(
        capsys, "compress", tiny_bert_dir, tiny_bert_classifier_dir, "-o", out, "--q-mode", "per-layer",
        "--eta", "0.5", "--drop-rate", "0.99", "--mask-seeds", "2", *FAST,
    )  # fmt: skip
    m = read_manifest(out)
    assert m.q is None and m.calibration is not None and m.calibration.details["eta"] == 0.5
    assert m.calibration.details["mask_seeds"] == 2
    auto = tmp_path / "auto.safetensors"
    printed = _run(
        capsys, "compress", tiny_bert_dir, tiny_bert_classifier_dir, "-o", auto, "--method", "auto", *FAST
    )
    assert read_manifest(auto).auto is not None and "auto: " in printed
    structural = tmp_path / "s.safetensors"
    _run(
        capsys, "compress", tiny_bert_dir, tiny_bert_classifier_dir, "-o", structural,
        "--method", "structural", "--q", "0.5", *FAST,
    )  # fmt: skip
    assert {e.encoding for e in read_manifest(structural).params.values()} == {"columns", "dense"}
    shown = _run(capsys, "inspect", structural)
    assert "bytes_per_kept_value" in shown
    blocks = tmp_path / "blocks.safetensors"
    _run(
        capsys, "compress", tiny_bert_dir, tiny_bert_classifier_dir, "-o", blocks, "--method", "dare",
        "--drop-rate", "0.9", "--mask-block", "16",
    )  # fmt: skip
    assert {e.encoding for e in read_manifest(blocks).params.values()} == {"seeded_blocks", "dense"}
    assert "seeded_blocks" in _run(capsys, "inspect", blocks)


def test_bad_method_flags_fail_cleanly(
    capsys: pytest.CaptureFixture[str], tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.safetensors"
    args = ["compress", str(tiny_bert_dir), str(tiny_bert_classifier_dir), "-o", str(out)]
    rc = main([*args, "--method", "dare", "--q-mode", "per-layer"])
    assert rc != 0 and "q mode" in capsys.readouterr().err and not out.exists()
    rc = main([*args, "--method", "magnitude", "--mask-block", "16"])
    assert rc == 1 and "mask block applies to random masks" in capsys.readouterr().err and not out.exists()
    rc = main([*args, "--mask-block", "0"])
    assert rc == 1 and "mask block must be at least 1" in capsys.readouterr().err and not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    rc = main([*args, "--validation", str(bad)])
    assert rc != 0 and "bad.jsonl:1" in capsys.readouterr().err and not out.exists()
