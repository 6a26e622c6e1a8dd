"""The offline `deltaserve` subcommands end to end: compress (every method), inspect, verify, apply,
DELTASERVE_* defaults, and quiet output off a TTY."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client.cli import main
from deltas_store.apply import materialize
from deltas_store.checkpoint import ModelDir
from deltas_store.compression.registry import METHODS
from deltas_store.format.io import read_delta, read_manifest
from deltas_store.format.manifest import Manifest

DELTASERVE = Path(sys.executable).parent / "deltaserve"


@pytest.fixture(autouse=True)
def _no_deltaserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DELTASERVE_"):
            monkeypatch.delenv(key)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """The real `deltaserve` entry function, in process (an uncaught exception fails the test)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert err == "", f"unexpected stderr off a TTY: {err!r}"
    return out


@pytest.fixture(scope="module")
def ft_dir(tiny_llama_finetunes: dict[str, Path]) -> Path:
    return tiny_llama_finetunes["ft-1"]


@pytest.fixture(scope="module")
def dare_delta(tiny_llama_dir: Path, ft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "math-v1.safetensors"
    assert main(["compress", str(tiny_llama_dir), str(ft_dir), "-o", str(out), "--method", "dare"]) == 0
    return out


def delta_of(tensor: str, base: Path, ft: Path) -> torch.Tensor:
    with ModelDir.open(base) as b, ModelDir.open(ft) as f:
        return (f.get_tensor(tensor).float() - b.get_tensor(tensor).float()).reshape(-1)


# ---------------------------------------------------------------------------------------------- compress


@pytest.mark.parametrize(
    ("method", "flags"),
    [
        ("dare", ["--drop-rate", "0.8"]),
        ("darex-q", ["--drop-rate", "0.8", "--q", "0.5"]),
        ("magnitude", ["--drop-rate", "0.8"]),
    ],
)
def test_compress_each_method(
    method: str,
    flags: list[str],
    tiny_llama_dir: Path,
    ft_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "v.safetensors"
    stdout = ok(capsys, "compress", tiny_llama_dir, ft_dir, "-o", out, "--method", method, *flags)
    assert stdout.startswith(f"wrote {out} ")
    assert f"{method} p=0.8" in stdout
    delta = read_delta(out)
    m = delta.manifest
    assert (m.method, m.drop_rate, m.seed, m.name) == (method, 0.8, 0, "v")
    assert m.q == (0.5 if method == "darex-q" else None)
    assert m.calibration is None  # q given (or not needed): no search
    assert not m.unchanged and not delta.dense  # every tensor of the fine-tune changed
    with ModelDir.open(ft_dir) as ft:
        assert set(delta.sparse) == set(ft.names())
    want_scale = {"dare": 1 / (1 - 0.8), "darex-q": 1 / 0.5, "magnitude": 1.0}[method]
    want_encoding = "varint_gaps" if method == "magnitude" else "seeded"
    kept = total = 0
    for name, entry in m.params.items():
        assert entry.encoding == want_encoding
        assert entry.scale == pytest.approx(want_scale)
        numel = math.prod(delta.sparse[name].shape)
        if method == "magnitude":  # top-k keeps exactly round(density * n) per tensor
            assert entry.nnz == round(0.2 * numel)
        kept, total = kept + entry.nnz, total + numel
    assert abs(kept / total - 0.2) < 0.01
    # The value added at every kept index is exactly delta * scale (here on one matrix).
    name = "model.layers.1.mlp.up_proj.weight"
    sp = delta.sparse[name]
    expected = delta_of(name, tiny_llama_dir, ft_dir)[sp.indices] * want_scale
    assert torch.equal(sp.values, expected.to(sp.values.dtype))
    if method == "magnitude":  # ...and what magnitude drops is never larger than what it keeps
        full = delta_of(name, tiny_llama_dir, ft_dir).abs()
        dropped = torch.ones_like(full, dtype=torch.bool)
        dropped[sp.indices] = False
        assert float(full[dropped].max()) <= float(full[sp.indices].min())


def test_compress_darex_q_searches_q_on_calibration_text(
    tiny_llama_dir: Path, ft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "calib.txt"
    texts.write_text("Hello world! How are you today?\n\nThe quick brown fox jumps over the lazy dog.\n")
    out = tmp_path / "q.safetensors"
    # darex-q is the default method; --quiet and no TTY: nothing at all on stderr.
    stdout = ok(capsys, "compress", tiny_llama_dir, ft_dir, "-o", out, "--calibration", texts, "--quiet")
    m = read_manifest(out)
    assert m.method == "darex-q"
    assert m.q is not None and 1 - m.drop_rate - 1e-9 <= m.q <= 1.0
    assert f"q={m.q:g}" in stdout
    assert m.calibration is not None
    assert m.calibration.source == str(texts)
    assert m.calibration.metric == "top5_logit_mse"
    assert m.calibration.score is not None and m.calibration.score >= 0
    assert (m.q, m.calibration.score) in [tuple(p) for p in m.calibration.grid]  # the winner was measured
    assert all(e.scale == pytest.approx(1 / m.q) for e in m.params.values())


def test_compress_seed_name_and_keep_dense(
    tiny_llama_dir: Path, ft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compress", tiny_llama_dir, ft_dir, "--method", "dare"]
    ok(capsys, *args, "-o", tmp_path / "a.safetensors", "--seed", "7")
    ok(capsys, *args, "-o", tmp_path / "b.safetensors", "--seed", "7", "--name", "renamed")
    ok(capsys, *args, "-o", tmp_path / "c.safetensors", "--seed", "8")
    a, b, c = (read_delta(tmp_path / f"{x}.safetensors") for x in "abc")
    assert (a.manifest.seed, a.manifest.name, b.manifest.name) == (7, "a", "renamed")
    assert a.manifest.data_sha256 == b.manifest.data_sha256  # same seed, same mask, same values
    assert a.manifest.data_sha256 != c.manifest.data_sha256
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.sparse[name].indices, b.sparse[name].indices)
    assert not torch.equal(a.sparse[name].indices, c.sparse[name].indices)

    out = tmp_path / "dense.safetensors"
    ok(capsys, *args, "-o", out, "--keep-dense", r"norm\.weight$", "--keep-dense", "^lm_head")
    d = read_delta(out)
    dense = {n for n, e in d.manifest.params.items() if e.kind == "dense"}
    assert dense == {n for n in d.manifest.params if n.endswith("norm.weight") or n.startswith("lm_head")}
    with ModelDir.open(ft_dir) as ft:
        for n in dense:
            assert torch.equal(d.dense[n].value, ft.get_tensor(n))  # stored whole, unpruned


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_human(dare_delta: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(capsys, "inspect", dare_delta)
    m = read_manifest(dare_delta)
    assert "math-v1" in out and "dare" in out
    assert m.base.fingerprint in out
    for name in m.params:
        line = next(line for line in out.splitlines() if name in line)
        assert "sparse" in line and "seeded" in line and f"{m.params[name].nnz:,}" in line


def test_inspect_json(dare_delta: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(ok(capsys, "inspect", "--json", dare_delta))
    assert set(doc) == {"summary", "manifest"}
    summary, manifest = doc["summary"], doc["manifest"]
    m = read_manifest(dare_delta)
    assert Manifest.model_validate(manifest) == m
    assert manifest["format"] == "deltaserve.delta" and manifest["format_version"] == 1
    assert summary["name"] == "math-v1"
    assert summary["method"] == "dare"
    assert summary["drop_rate"] == 0.9
    assert summary["base_id"] == m.base.id
    assert summary["file_bytes"] == dare_delta.stat().st_size
    assert summary["params"] == len(m.params)
    assert summary["kept_values"] == sum(e.nnz for e in m.params.values())
    assert 0.08 < summary["density"] < 0.12


# ---------------------------------------------------------------------------------------------- verify


def test_verify(dare_delta: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(capsys, "verify", dare_delta)
    assert out.startswith(f"ok: {dare_delta} is intact")
    out = ok(capsys, "verify", dare_delta, "--base", tiny_llama_dir)
    assert out.startswith("ok: ") and f"fits base {tiny_llama_dir}" in out


# ---------------------------------------------------------------------------------------------- apply


def test_apply_writes_a_loadable_model_equal_to_materialize(
    dare_delta: Path, tiny_llama_dir: Path, ft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "applied"
    assert ok(capsys, "apply", tiny_llama_dir, dare_delta, "-o", out, "--quiet").strip() == f"wrote {out}"
    with ModelDir.open(tiny_llama_dir) as base:
        expected = materialize(base, read_delta(dare_delta))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype
        assert torch.equal(state[name], tensor), name
    # It is base + delta: the kept entries moved, every other entry is the base's.
    name = "model.layers.0.mlp.down_proj.weight"
    sp = read_delta(dare_delta).sparse[name]
    base_w = load_file(tiny_llama_dir / "model.safetensors")[name].reshape(-1)
    got = state[name].reshape(-1)
    untouched = torch.ones_like(got, dtype=torch.bool)
    untouched[sp.indices] = False
    assert torch.equal(got[untouched], base_w[untouched])
    assert torch.equal(got[sp.indices], base_w[sp.indices] + sp.values)
    # The fine-tune's config, the base's tokenizer.
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied"]  # no staging dir left behind


def test_apply_bert_classifier_with_prefix_and_new_head(
    tiny_bert_dir: Path, tiny_bert_classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A BertForSequenceClassification fine-tune of a bare BertModel: `bert.` prefix plus a new head."""
    from transformers import AutoModelForSequenceClassification

    delta = tmp_path / "cls.safetensors"
    ok(capsys, "compress", tiny_bert_dir, tiny_bert_classifier_dir, "-o", delta, "--method", "dare")
    m = read_manifest(delta)
    assert (m.finetune_prefix, m.base_prefix) == ("bert.", "")
    assert {n for n, e in m.params.items() if e.kind == "dense"} >= {"classifier.weight", "classifier.bias"}
    ok(capsys, "verify", delta, "--base", tiny_bert_dir)
    out = tmp_path / "applied"
    ok(capsys, "apply", tiny_bert_dir, delta, "-o", out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    ft = load_file(tiny_bert_classifier_dir / "model.safetensors")
    state = model.state_dict()
    assert torch.equal(state["classifier.weight"], ft["classifier.weight"])
    with ModelDir.open(tiny_bert_dir) as base:
        expected = materialize(base, read_delta(delta))
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# ---------------------------------------------------------------------------------------------- settings


def test_env_vars_are_defaults_and_flags_win(
    tiny_llama_dir: Path,
    ft_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["compress", tiny_llama_dir, ft_dir]
    monkeypatch.setenv("DELTASERVE_DROP_RATE", "0.5")
    monkeypatch.setenv("DELTASERVE_METHOD", "magnitude")
    monkeypatch.setenv("DELTASERVE_SEED", "11")
    ok(capsys, *args, "-o", tmp_path / "env.safetensors")
    m = read_manifest(tmp_path / "env.safetensors")
    assert (m.drop_rate, m.method, m.seed) == (0.5, "magnitude", 11)
    ok(
        capsys,
        *args,
        "-o",
        tmp_path / "flags.safetensors",
        "--drop-rate",
        "0.8",
        "--method",
        "dare",
        "--seed",
        "2",
    )
    m = read_manifest(tmp_path / "flags.safetensors")
    assert (m.drop_rate, m.method, m.seed) == (0.8, "dare", 2)
    monkeypatch.setenv("DELTASERVE_METHOD", "darex-q")
    monkeypatch.setenv("DELTASERVE_Q", "0.7")
    ok(capsys, *args, "-o", tmp_path / "q.safetensors")
    m = read_manifest(tmp_path / "q.safetensors")
    assert (m.method, m.q, m.calibration) == ("darex-q", 0.7, None)


@pytest.mark.parametrize("quiet", ["flag", "env", "no"])
def test_progress_bar_only_on_a_tty_and_not_when_quiet(
    quiet: str,
    tiny_llama_dir: Path,
    ft_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # stderr is a terminal now
    flags = ["--quiet"] if quiet == "flag" else []
    if quiet == "env":
        monkeypatch.setenv("DELTASERVE_QUIET", "1")
    argv = ["compress", tiny_llama_dir, ft_dir, "-o", tmp_path / "d.safetensors", "--method", "dare", *flags]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0
    if quiet == "no":
        assert "diffing" in err  # the bar is there on a TTY...
    else:
        assert err == ""  # ...and silent with --quiet / DELTASERVE_QUIET
    rc, _, err = run_cli(
        capsys, "apply", tiny_llama_dir, tmp_path / "d.safetensors", "-o", tmp_path / "m", *flags
    )
    assert rc == 0
    assert ("applying" in err) == (quiet == "no")


def test_every_registered_method_is_accepted(
    tiny_llama_dir: Path, ft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for method in METHODS:
        extra = ["--q", "0.5"] if METHODS[method].rescale == "q" else []
        ok(
            capsys,
            "compress",
            tiny_llama_dir,
            ft_dir,
            "-o",
            tmp_path / f"{method}.safetensors",
            "--method",
            method,
            *extra,
        )
        assert read_manifest(tmp_path / f"{method}.safetensors").method == method


# ---------------------------------------------------------------------------------------------- console script


def test_console_script_round_trip_without_a_tty(tiny_llama_dir: Path, ft_dir: Path, tmp_path: Path) -> None:
    """The installed executable writes a delta; off a TTY its stderr stays empty (no bars, no warnings)."""
    out = tmp_path / "cli.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTASERVE_")}
    proc = subprocess.run(
        [
            str(DELTASERVE),
            "compress",
            str(tiny_llama_dir),
            str(ft_dir),
            "-o",
            str(out),
            "--method",
            "magnitude",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"wrote {out}")
    assert read_manifest(out).method == "magnitude"
