"""A calibration session: the fine-tune as a float32 model, one tokenized calibration batch, the fine-tune's
reference output on it and what every Linear layer saw; then the objective q searches are judged by.

Activations (WANDA's ‖X_j‖₂, Algorithm 3's x̄_j) come from the *fine-tuned* model on the calibration text:
the pruned model is meant to reproduce the fine-tune, so the inputs its layers must serve are the
fine-tune's (WANDA likewise scores a model with its own activations); it is also the model whose output is
the label-free reference, so one forward pass yields both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deltas_store import calibration as cal
from deltas_store.checkpoint import ModelDir
from deltas_store.compression import autoselect
from deltas_store.compression.qtuning import (
    Candidate,
    Objective,
    Rescaling,
    better,
    search_eta,
    search_global_q,
)
from deltas_store.compression.registry import get_method
from deltas_store.compression.streaming import StreamedDeltas, stream_deltas
from deltas_store.errors import CalibrationError
from deltas_store.extraction import Alignment
from deltas_store.format.manifest import AutoSelection
from deltas_store.lora import LoraFinetune
from deltas_store.progress import progress

Metric = Callable[[torch.nn.Module], float]


@dataclass
class CalibrationSession:
    model: torch.nn.Module
    decoder: bool
    reference: cal.OutputChange
    inputs: dict[str, cal.InputStats]  # Linear module name -> input statistics
    layers: dict[str, tuple[str, ...]]  # Linear module name -> its parameter names
    source: str
    tokenizer_dirs: tuple[Path, Path]

    @classmethod
    def open(
        cls, base: ModelDir, finetune: ModelDir, calibration: Path | None, samples: int, max_tokens: int
    ) -> CalibrationSession:
        texts, source = cal.load_texts(calibration)
        model = load_finetune_model(finetune)
        decoder = cal.is_decoder(finetune.config)
        positions = finetune.config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            max_tokens = min(max_tokens, positions)  # never ask a model for more positions than it has
        batch = cal.tokenize(finetune.path, base.path, texts[:samples], max_tokens)
        with cal.LinearInputRecorder(model, batch["attention_mask"]) as recorder:
            reference = cal.OutputChange.capture(model, batch, decoder)
        return cls(
            model,
            decoder,
            reference,
            recorder.stats,
            cal.linear_layers(model),
            source,
            (finetune.path, base.path),
        )

    def reset_to_base_(self, base: ModelDir, base_names: dict[str, str]) -> None:
        """Give the parameters about to be pruned the base's values (candidates add kept deltas on top)."""
        cal.load_base_into_(self.model, base, base_names)

    def label_free(self) -> Objective:
        return Objective(self.reference.metric, "min", self.reference.score, self.source)

    def output_change(self) -> float:
        """The label-free score of the model as it is now."""
        return self.reference.score(self.model)

    def labeled(self, metric: Metric | None, validation: Path | None) -> Objective | None:
        """A user metric (maximised), or the built-in one for a validation JSONL file; None without either."""
        if metric is not None:
            return Objective(getattr(metric, "__name__", "user_metric"), "max", metric, "user metric")
        if validation is None:
            return None
        from deltas_store.validation import build_metric, load_validation

        data = load_validation(validation)
        if data.kind == "generation" and not self.decoder:
            raise CalibrationError(f"{validation}: prompt/answer examples need a causal LM fine-tune")
        if data.kind == "classification" and self.decoder:
            raise CalibrationError(
                f"{validation}: text/label examples need a sequence-classification fine-tune"
            )
        tokenizer = cal.load_tokenizer(*self.tokenizer_dirs)
        return Objective(data.metric_name, "max", build_metric(data, tokenizer), str(validation))

    def layers_of(self, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Linear layers whose weight is among `names`, with those of their parameters that are."""
        wanted = set(names)
        return {
            layer: tuple(p for p in params if p in wanted)
            for layer, params in self.layers.items()
            if params[0] in wanted
        }


def load_finetune_model(finetune: ModelDir) -> torch.nn.Module:
    """The fine-tune in float32 on CPU; a LoRA adapter is the base architecture with its merged weights."""
    if isinstance(finetune, LoraFinetune):
        model = cal.load_model_fp32(finetune.base.path, finetune.base.config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in finetune.changed():
                if name not in params:
                    raise CalibrationError(f"the base model has no parameter {name} that the adapter changes")
                params[name].copy_(finetune.get_tensor(name).to(params[name].dtype))
        return model
    return cal.load_model_fp32(finetune.path, finetune.config)


def search_rescaling(
    session: CalibrationSession,
    base: ModelDir,
    streamed: StreamedDeltas,
    objective: Objective,
    drop_rate: float,
    q_mode: str,
    eta: float | None,
    quiet: bool = True,
) -> Rescaling:
    """The q search q_mode asks for ("global", "per-layer", "per-layer-abs" or "best"), with the pruned
    deltas swapped in."""
    session.reset_to_base_(base, streamed.base_names)
    bar = progress(None, total=None, desc="searching q", quiet=quiet)
    candidate = Candidate(session.model, streamed.masks, on_evaluate=lambda: bar.update(1))
    try:
        found: list[Rescaling] = []
        if q_mode in ("global", "best"):
            found.append(search_global_q(candidate, objective, 1.0 - drop_rate))
        if q_mode in ("per-layer", "per-layer-abs", "best"):
            layers = session.layers_of(streamed.params)
            sums = {layer: s for layer, s in streamed.sums.items() if layer in layers}
            if not sums:
                raise CalibrationError(
                    "per-layer q needs Linear layers with calibration activations; none found"
                )
            signed = q_mode != "per-layer-abs"
            found.append(search_eta(candidate, objective, sums, layers, drop_rate, eta, signed))
    finally:
        bar.close()
    best = found[0] if len(found) == 1 else better(found[0], found[1], objective.goal)
    details = {**best.details, "evaluations": candidate.evaluations}
    if len(found) > 1:
        details["compared"] = {r.details["q_mode"]: r.score for r in found}
    return replace(best, details=details)


def measure_and_choose(
    session: CalibrationSession,
    base: ModelDir,
    finetune: ModelDir,
    alignment: Alignment,
    *,
    drop_rate: float,
    seed: int,
    keep_dense: Sequence[re.Pattern[str]],
    prune_scope: str,
    has_calibration: bool,
    labeled: bool,
    quiet: bool = True,
) -> AutoSelection:
    """`auto`: measure the deltas (one streaming pass) and what DARE does to the calibration output, decide."""
    dare = get_method("dare")
    streamed = stream_deltas(
        base,
        finetune,
        alignment,
        dare,
        1.0 - drop_rate,
        [seed],
        keep_dense=keep_dense,
        prune_scope=prune_scope,
        delta_stats=True,
        quiet=quiet,
    )
    session.reset_to_base_(base, streamed.base_names)
    base_change = session.output_change()
    dare_change = None
    if drop_rate > 0:
        scale = dare.scale(1.0 - drop_rate, None)
        dare_change = Candidate(session.model, streamed.masks).score(session.label_free(), lambda _n: scale)[
            0
        ]
    decision = autoselect.decide(
        streamed.stats,
        drop_rate,
        decoder=session.decoder,
        has_calibration=has_calibration,
        labeled=labeled,
        base_output_change=base_change,
        dare_output_change=dare_change,
    )
    return AutoSelection(
        method=decision.method, q_mode=decision.q_mode, reason=decision.reason, measured=decision.measured
    )
