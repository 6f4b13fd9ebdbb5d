import pytest
import torch
from torch import nn

from largebatch.cli import main
from largebatch.optim import LARS, describe_groups, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.tied = self.head  # shared module: each parameter must appear once
        self.pos = nn.Parameter(torch.zeros(1, 4))


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_default_excludes_1d_tensors():
    m = Net()
    groups = param_groups(m, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["adapted", "excluded"]
    assert names(m, groups[0]) == ["conv.weight", "head.weight", "pos"]
    assert groups[0]["adapt"] and groups[0]["weight_decay"] == 0.1
    assert names(m, groups[1]) == ["bn.bias", "bn.weight", "conv.bias", "head.bias", "ln.bias", "ln.weight"]
    assert not groups[1]["adapt"] and groups[1]["weight_decay"] == 0.0
    LARS(groups, lr=0.1)  # accepted as is


@pytest.mark.parametrize("exclude", ["pos", [nn.Linear], lambda n, p, mod: n.startswith("head")])
def test_exclude_by_glob_type_and_predicate(exclude):
    m = Net()
    adapted = names(m, param_groups(m, exclude=exclude)[0])
    assert len(adapted) == 2 and "conv.weight" in adapted


def test_keep_1d_and_extra_options():
    m = Net()
    groups = param_groups(m, exclude_1d=False, lr=0.5)
    assert len(groups) == 1 and groups[0]["lr"] == 0.5 and len(groups[0]["params"]) == 9


def test_bad_exclude_rule():
    with pytest.raises(TypeError, match="exclude"):
        param_groups(Net(), exclude=[3])


def test_describe_groups_lists_every_parameter():
    m = Net()
    text = describe_groups(m, weight_decay=0.1)
    for n, _ in m.named_parameters():
        assert n in text
    assert "conv.weight  3x3" not in text  # shapes are written whole
    assert "4x3x3x3" in text and "excluded" in text
    frozen = describe_groups(m, groups=[{"params": [m.conv.weight]}])
    assert "not optimized" in frozen


def test_groups_cli(capsys):
    assert main(["groups", "resnet18", "--weight-decay", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.bn2.bias" in out and "fc.weight" in out and "adapted" in out
