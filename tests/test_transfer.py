"""The transfer attack: an oracle (transferred from the defense's own model it is the white-box
attack, example for example), its black-box traits, its failure paths, and masking traps it
sees through."""

from __future__ import annotations

import pytest
import torch

from attacks.pgd import PGD
from attacks.transfer import Transfer
from benchmark.plugins.builtin import ATTACKS
from benchmark.plugins.traits import attack_traits
from benchmark.zoo import load_model
from tests import flag_toys
from threat_models import L2Threat, LinfThreat

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    from benchmark.data import load_dataset

    test = load_dataset("digits").test
    return test.x[:n], test.y[:n]


@pytest.mark.parametrize("threat", [LinfThreat(0.1), L2Threat(1.0)], ids=["linf", "l2"])
def test_transfer_from_the_defense_itself_is_the_white_box_attack(threat):
    """Oracle: with the defense's own weights as the source, the transferred examples are
    exactly PGD's on the defense (same start, same steps)."""
    x, y = _digits()
    cnn = load_model("digits-cnn")
    params = dict(steps=10, random_start=False)
    white = PGD(**params).run(cnn, x, y, threat, generator=torch.Generator().manual_seed(0))
    moved = Transfer(source="digits-cnn", **params).run(
        torch.nn.Identity(), x, y, threat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(white.x_adv, moved.x_adv)
    assert moved.grad_evals == 0 and moved.extras["source_grad_evals"] == white.grad_evals
    fooled = (cnn(moved.x_adv).argmax(1) != y).float().mean().item()
    assert moved.extras["source_success"] == pytest.approx(fooled)


def test_transfer_is_a_black_box_row_and_records_its_config():
    traits = attack_traits("transfer", {"source": "digits-cnn", "attack": "pgd"})
    assert traits.blackbox and traits.wraps == "pgd"
    attack = ATTACKS.get("transfer")(source="digits-cnn-at", attack="pgd", steps=5)
    assert attack.config() == {"source": "digits-cnn-at", "attack": "pgd", "steps": 5}
    assert attack.budget.steps == 5


def test_transfer_refuses_bad_input():
    from benchmark.plugins.registry import UnknownNameError

    with pytest.raises((KeyError, ValueError, UnknownNameError), match="no-such-model"):
        Transfer(source="no-such-model")
    with pytest.raises(ValueError, match="source must be the name"):
        Transfer(source="")
    with pytest.raises(ValueError, match="cannot wrap itself"):
        Transfer(attack="transfer")
    with pytest.raises(UnknownNameError):
        Transfer(attack="no-such-attack")
    with pytest.raises(ValueError, match="steps"):
        Transfer(steps=0)


@pytest.mark.parametrize("trap", ["Detached", "Rounding"])
def test_transfer_sees_through_gradient_masking(trap):
    """White-box PGD stalls on a detached or rounding wrapper of the CNN; examples crafted on
    the CNN itself break it (l-inf 0.3, 16 digits)."""
    x, y = _digits()
    defense = getattr(flag_toys, trap)()
    threat = LinfThreat(0.3)
    moved = Transfer(steps=20, random_start=False).run(defense, x, y, threat)
    with torch.no_grad():
        transferred = (defense(moved.x_adv).argmax(1) == y).float().mean().item()
    assert transferred <= 0.1, transferred
    if trap == "Rounding":  # PGD runs, but on zero gradients it never leaves the start
        white = PGD(steps=20, random_start=False).run(defense, x, y, threat)
        with torch.no_grad():
            assert (defense(white.x_adv).argmax(1) == y).float().mean().item() >= 0.9
