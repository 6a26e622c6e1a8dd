"""AdamR (DAREx-L2/L1): λ = 0 is Adam exactly; λ > 0 pulls toward the pre-trained weights; heads are free."""

from __future__ import annotations

import pytest
import torch

from deltas_store import AdamR


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _train(model: _Net, optimizer: torch.optim.Optimizer, steps: int = 25) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _pair() -> tuple[_Net, _Net, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    a = _Net()
    b = _Net()
    b.load_state_dict(a.state_dict())
    pretrained = {k: v.clone() for k, v in a.state_dict().items() if k.startswith("body.")}
    return a, b, pretrained


def _distance(model: _Net, pretrained: dict[str, torch.Tensor]) -> float:
    state = model.state_dict()
    return sum(float((state[k] - v).pow(2).sum()) for k, v in pretrained.items()) ** 0.5


def test_lambda_zero_is_adam_exactly() -> None:
    a, b, pretrained = _pair()
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False))
    _train(b, AdamR.for_model(b, pretrained, lr=1e-2, reg_lambda=0.0))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(("reg", "reg_lambda"), [("l2", 0.1), ("l1", 0.005)])
def test_regulariser_shrinks_distance_to_pretrained(reg: str, reg_lambda: float) -> None:
    a, b, pretrained = _pair()
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False))
    _train(b, AdamR.for_model(b, pretrained, lr=1e-2, reg=reg, reg_lambda=reg_lambda))  # type: ignore[arg-type]
    assert _distance(b, pretrained) < 0.9 * _distance(a, pretrained)


def test_params_without_pretrained_counterpart_are_not_regularised() -> None:
    """The head has no anchor, so only Adam moves it. On step 1 θ = θ_B (no pull yet) and on step 2 the head's
    gradient still comes from an identical body: the head matches Adam while the body has been pulled."""
    a, b, pretrained = _pair()
    opt = AdamR.for_model(b, pretrained, lr=1e-2, reg_lambda=5.0)
    assert all("pretrained" not in opt.state[p] for p in b.head.parameters())
    assert all("pretrained" in opt.state[p] for p in b.body.parameters())
    _train(a, torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False), steps=2)
    _train(b, opt, steps=2)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.body.weight, b.body.weight)


def test_prefix_alignment_and_input_checks() -> None:
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = torch.nn.Linear(4, 4)
            self.classifier = torch.nn.Linear(4, 2)

    model = Wrapped()
    base = {"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}  # a bare model's names: no `bert.` prefix
    opt = AdamR.for_model(model, base, reg_lambda=0.1)
    assert (
        "pretrained" in opt.state[model.bert.weight]
        and "pretrained" not in opt.state[model.classifier.weight]
    )
    with pytest.raises(ValueError):
        AdamR(model.parameters(), reg="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AdamR(model.parameters(), {model.bert.weight: torch.zeros(2)}, reg_lambda=0.1)
