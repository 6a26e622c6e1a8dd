"""AdamR: Adam with a decoupled pull toward the pre-trained weights (DAREx-L2 / -L1, arXiv 2410.09344).

Fine-tuning with it keeps the deltas small and well-behaved, so they survive extreme DARE / DAREx-q pruning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch

Regularizer = Literal["l2", "l1"]


class AdamR(torch.optim.Optimizer):
    """Adam whose decoupled decay pulls θ toward the pre-trained θ_B instead of toward zero, normalised like
    AdamS. At step t, after the moment updates, with v̂ the bias-corrected second moment and
    s = sqrt(mean of v̂ over all elements of all parameters) (1 if 0):

        L2: θ ← θ − λ·lr/s·(θ − θ_B)      L1: θ ← θ − λ·lr/s·sign(θ − θ_B)

    then the usual Adam step. Parameters without a pre-trained counterpart (a new head) are not
    regularised; with λ = 0 this is exactly `torch.optim.Adam` (single-tensor implementation). Since s is
    the scale of a typical gradient, λ·lr/s is the fraction of (θ − θ_B) removed per step (L2; keep it well
    below 1) or the per-step L1 pull in units of a typical Adam step.

    Example — fine-tune a classifier with DAREx-L2, then prune its delta hard::

        from transformers import AutoModel, AutoModelForSequenceClassification
        from deltas_store import AdamR, CompressOptions, compress

        base = AutoModel.from_pretrained("models/base")
        model = AutoModelForSequenceClassification.from_pretrained("models/base", num_labels=2)
        optimizer = AdamR.for_model(model, base.state_dict(), lr=5e-5, reg="l2", reg_lambda=0.1)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained("models/ft")
        compress(CompressOptions(Path("models/base"), Path("models/ft"), Path("ft.safetensors"),
                                 method="darex-q", drop_rate=0.99))
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        pretrained: Mapping[torch.Tensor, torch.Tensor] | None = None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        reg: Regularizer = "l2",
        reg_lambda: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or reg_lambda < 0:
            raise ValueError(f"lr, eps and reg_lambda must be non-negative (got {lr}, {eps}, {reg_lambda})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if reg not in ("l2", "l1"):
            raise ValueError(f"reg must be 'l2' or 'l1', got {reg!r}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "reg": reg, "reg_lambda": reg_lambda}
        super().__init__(params, defaults)
        pretrained = pretrained or {}
        for group in self.param_groups:
            for p in group["params"]:
                anchor = pretrained.get(p)
                if anchor is None:
                    continue
                if tuple(anchor.shape) != tuple(p.shape):
                    raise ValueError(
                        f"pre-trained tensor of shape {tuple(anchor.shape)} for a {tuple(p.shape)} parameter"
                    )
                self.state[p]["pretrained"] = anchor.detach().to(p.device, p.dtype).clone()

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, pretrained_state: Mapping[str, torch.Tensor], **kwargs: Any
    ) -> AdamR:
        """AdamR over model's trainable parameters, anchored to the same-named, same-shaped pre-trained tensors.

        Names may differ by the model's base-model prefix (`bert.` in a classifier built on a bare BertModel).
        """
        anchors: dict[torch.Tensor, torch.Tensor] = {}
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for name, p in params:
            for candidate in (name, re.sub(r"^[^.]+\.", "", name, count=1)):
                t = pretrained_state.get(candidate)
                if t is not None and tuple(t.shape) == tuple(p.shape):
                    anchors[p] = t
                    break
        return cls([p for _, p in params], anchors, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active: list[tuple[dict[str, Any], torch.Tensor, dict[str, Any]]] = []
        v_hat_sum, count = 0.0, 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamR does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                v_hat_sum += float(state["exp_avg_sq"].sum()) / (1 - beta2 ** state["step"])
                count += p.numel()
                active.append((group, p, state))
        s = math.sqrt(v_hat_sum / count) if count else 0.0
        s = s if s > 0 else 1.0
        for group, p, state in active:
            beta1, beta2 = group["betas"]
            anchor = state.get("pretrained")
            if anchor is not None and group["reg_lambda"] != 0:
                pull = p - anchor if group["reg"] == "l2" else torch.sign(p - anchor)
                p.add_(pull, alpha=-group["reg_lambda"] * group["lr"] / s)
            step = state["step"]
            step_size = group["lr"] / (1 - beta1**step)
            denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        return loss
