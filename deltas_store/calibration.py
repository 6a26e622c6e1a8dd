"""Label-free calibration: how much pruning changes a model's last-layer output on unlabeled text."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltas_store.checkpoint import ModelDir
from deltas_store.errors import CalibrationError
from deltas_store.progress import transformers_bars_off

# Built-in generic text, used when no --calibration file is given (one text per line).
GENERIC_TEXT = """\
The history of science is the study of how people came to understand the natural world.
A recipe lists the ingredients first, then the steps: mix, rest, bake, and let it cool.
The committee will meet on Tuesday to review the budget and vote on the new proposal.
Rivers carry sediment from the mountains to the sea, building deltas over thousands of years.
She opened the letter slowly, afraid of what it might say, and then began to laugh.
To solve the equation, subtract three from both sides and divide the result by two.
The software update fixes a memory leak and improves the speed of the search feature.
Markets rose in early trading after the central bank left interest rates unchanged.
Photosynthesis converts light energy into chemical energy stored in sugar molecules.
In the morning the village square fills with farmers selling bread, cheese and fruit.
Question: what is the capital of France? Answer: the capital of France is Paris.
The museum's new exhibition brings together paintings from five centuries of European art.
""".splitlines()


def load_texts(path: Path | None) -> tuple[list[str], str]:
    """Calibration texts (one per non-empty line) and where they came from."""
    if path is None:
        return list(GENERIC_TEXT), "built-in generic text"
    try:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from None
    if not texts:
        raise CalibrationError(f"calibration file {path} has no non-empty lines")
    return texts, str(path)


def is_decoder(config: Mapping[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model_fp32(path: Path, config: Mapping[str, Any]) -> torch.nn.Module:
    """The fine-tune's own architecture, in float32 on CPU (fast and precise enough for scoring)."""
    import transformers

    archs = config.get("architectures") or []
    cls = getattr(transformers, str(archs[0]), None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if is_decoder(config) else transformers.AutoModel
    with transformers_bars_off():  # our "searching q" bar covers this step
        model: torch.nn.Module = cls.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def load_tokenizer(path: Path, fallback: Path) -> Any:
    """The fine-tune's own tokenizer (else the base's), with a pad token."""
    from transformers import AutoTokenizer

    for candidate in (path, fallback):
        try:
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
        except (OSError, ValueError):
            continue
    else:
        raise CalibrationError(f"no tokenizer in {path} or {fallback}: calibration needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize(path: Path, fallback: Path, texts: Iterable[str], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(path, fallback)
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@dataclass
class OutputChange:
    """Scores a candidate model against the fine-tune's reference output on one calibration batch.

    Decoders: MSE between the fine-tune's top-5 logits and the candidate's logits at those indices.
    Encoders: mean |ΔH| of the last hidden state. Padding positions are excluded.
    """

    decoder: bool
    batch: dict[str, torch.Tensor]
    reference: torch.Tensor
    top5: torch.Tensor | None
    metric: str

    @classmethod
    def capture(cls, model: torch.nn.Module, batch: dict[str, torch.Tensor], decoder: bool) -> OutputChange:
        out = _forward(model, batch, decoder)
        if decoder:
            top5 = out.topk(5, dim=-1).indices  # (B, T, 5)
            return cls(True, batch, out.gather(-1, top5), top5, "top5_logit_mse")
        return cls(False, batch, out, None, "mean_abs_last_hidden_change")

    def score(self, model: torch.nn.Module) -> float:
        out = _forward(model, self.batch, self.decoder)
        mask = self.batch["attention_mask"].bool()  # (B, T)
        if self.top5 is not None:
            diff = (out.gather(-1, self.top5) - self.reference).pow(2)
        else:
            diff = (out - self.reference).abs()
        return float(diff[mask].mean())


@dataclass
class InputStats:
    """What a Linear layer saw on the calibration batch, per input feature j (padding excluded)."""

    total: torch.Tensor  # (in,) float64: Σ_t x_tj
    sq_total: torch.Tensor  # (in,) float64: Σ_t x_tj²
    tokens: int

    @property
    def mean(self) -> torch.Tensor:
        """x̄_j, the mean input per feature (Algorithm 3)."""
        return self.total / max(self.tokens, 1)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over the calibration tokens (WANDA)."""
        return self.sq_total.sqrt()


class LinearInputRecorder:
    """Forward hooks on every nn.Linear that accumulate per-feature input statistics.

    Example::

        with LinearInputRecorder(model, batch["attention_mask"]) as rec:
            model(**batch)
        rec.stats["model.layers.0.mlp.down_proj"].norm  # (intermediate,)
    """

    def __init__(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> None:
        self.model = model
        self.mask = attention_mask.bool()  # (B, T)
        self.stats: dict[str, InputStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LinearInputRecorder:
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().double()
            if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]  # (tokens, in): padding excluded
            x = x.reshape(-1, x.shape[-1])
            s = self.stats.get(name)
            if s is None:
                zeros = torch.zeros(x.shape[-1], dtype=torch.float64)
                s = self.stats[name] = InputStats(zeros, zeros.clone(), 0)
            s.total += x.sum(dim=0)
            s.sq_total += x.pow(2).sum(dim=0)
            s.tokens += x.shape[0]

        return hook


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every nn.Linear's module name -> the parameter names of its weight (and bias)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            params = [f"{name}.weight"] + ([f"{name}.bias"] if module.bias is not None else [])
            out[name] = tuple(params)
    return out


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], decoder: bool) -> torch.Tensor:
    with torch.no_grad():
        if decoder:
            logits: torch.Tensor = model(**batch).logits.float()  # (B, T, V)
            return logits
        encoder = getattr(model, "base_model", model)
        hidden: torch.Tensor = encoder(**batch).last_hidden_state.float()  # (B, T, H)
        return hidden


def load_base_into_(model: torch.nn.Module, base: ModelDir, base_names: Mapping[str, str]) -> None:
    """Overwrite the fine-tune model's parameters named in base_names with the base's values."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ft_name, base_name in base_names.items():
            param = params.get(ft_name)
            if param is None:
                raise CalibrationError(f"the fine-tune model has no parameter {ft_name}")
            param.copy_(base.get_tensor(base_name).to(param.dtype))


ScoreFn = Callable[[float], float]
