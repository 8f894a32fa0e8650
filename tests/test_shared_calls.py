"""Shared calls: an Embedding on indices without the batch (position ids (1, L), as in BERT and GPT-2)
is on the Embedding rule when only batch-wise elementwise ops consume its output, and goes to the
generic remainder (still exact) when anything else does — at the probe or on any later call."""
import types

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import reference



class PosModel(nn.Module):
    """Token + position embeddings, the position ids a (1, L) buffer sliced to the input's length."""

    def __init__(self, use="add"):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(20, 8), nn.Embedding(16, 8), nn.Linear(8, 3)
        self.register_buffer("pid", torch.arange(16).unsqueeze(0))
        self.use = use
        self.switch = types.SimpleNamespace(on=False)  # not a plain attribute: outside the plan's fingerprint

    def forward(self, ids):
        p = self.pos(self.pid[:, :ids.shape[1]])
        h = self.tok(ids)
        if self.use == "add":
            h = h + p
        elif self.use == "iadd":
            h += p
        elif self.use == "to_mul":  # a no-op .to, then a scale, as HF writes `x + pos.to(x.device)`
            h = h * (1 + p.to(ids.device))
        elif self.use == "mean":  # reduces over the batch axis of the shared rows: not batch-wise
            h = h + p.mean(0, keepdim=True)
        elif self.use == "late_mean":  # batch-wise until the switch is turned on
            h = h + (p.mean(0, keepdim=True) if self.switch.on else p)
        elif self.use == "inplace":  # writes into the shared rows once the switch is on
            if self.switch.on:
                p.mul_(2.0)
            h = h + p
        return self.fc(torch.tanh(h)).mean(1)


def _paths(m, x):
    return {p["name"]: (p["path"], p["reason"]) for p in lazyfast.explain(m, x).parameters}


@pytest.mark.parametrize("use", ["add", "iadd", "to_mul"])
def test_shared_position_embedding_on_rule_and_exact(use):
    torch.manual_seed(0)
    m = PosModel(use).double()
    x = torch.randint(0, 20, (5, 7))
    assert _paths(m, x)["pos.weight"][0] == "rule"
    before = {k: v.clone() for k, v in m.state_dict().items()}
    K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
    R = reference.ntk_oracle(m, x, mode="full")
    assert float((K - R).norm() / R.norm()) < 1e-12
    x2 = torch.randint(0, 20, (3, 7))
    K12 = lazyfast.empirical_ntk(m, x, x2, mode="full", implementation="structured")
    R12 = reference.ntk_oracle(m, x, x2, mode="full")
    assert float((K12 - R12).norm() / R12.norm()) < 1e-12
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_shared_call_float32_close_to_float64():
    torch.manual_seed(1)
    m = PosModel("add")
    x = torch.randint(0, 20, (6, 9))
    K = lazyfast.empirical_ntk(m, x, mode="trace")
    K64 = reference.ntk_oracle(m.double(), x, mode="trace")
    assert float((K.double() - K64).norm() / K64.norm()) < 1e-5


def test_shared_output_reduced_over_batch_goes_to_remainder():
    torch.manual_seed(0)
    m = PosModel("mean").double()
    x = torch.randint(0, 20, (5, 7))
    path, reason = _paths(m, x)["pos.weight"]
    assert path == "remainder" and "batch-wise" in reason
    K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
    R = reference.ntk_oracle(m, x, mode="full")
    assert float((K - R).norm() / R.norm()) < 1e-12


@pytest.mark.parametrize("use", ["late_mean", "inplace"])
def test_shared_call_misused_only_on_a_real_call_is_caught(use):
    """The probe and a first call see a batch-wise use; later calls (the cached plan) do not: the
    capture's check moves the layer to the remainder and the kernel stays exact, on that call and the
    next (the revised plan is kept)."""
    torch.manual_seed(0)
    m = PosModel(use).double()
    x = torch.randint(0, 20, (5, 7))
    assert _paths(m, x)["pos.weight"][0] == "rule"
    K0 = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
    R0 = reference.ntk_oracle(m, x, mode="full")
    assert float((K0 - R0).norm() / R0.norm()) < 1e-12
    m.switch.on = True
    R = reference.ntk_oracle(m, x, mode="full")
    if use == "inplace":  # (a mean over the batch axis of one shared row leaves each sample's kernel as it was)
        assert float((R - R0).norm() / R0.norm()) > 1e-3
    for _ in range(2):
        K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
        assert float((K - R).norm() / R.norm()) < 1e-12
    xs = x[:2]  # a small batch again: exact too
    Ks = lazyfast.empirical_ntk(m, xs, mode="full", implementation="structured")
    Rs = reference.ntk_oracle(m, xs, mode="full")
    assert float((Ks - Rs).norm() / Rs.norm()) < 1e-12


def test_batch_shaped_position_ids_stay_per_sample():
    """Position ids given per sample ((n, L), e.g. expanded) are ordinary calls, not shared ones."""
    class PerSample(PosModel):
        def forward(self, ids):
            return self.fc(torch.tanh(self.tok(ids) + self.pos(self.pid[:, :ids.shape[1]].expand_as(ids)))).mean(1)

    torch.manual_seed(0)
    m = PerSample().double()
    x = torch.randint(0, 20, (4, 6))
    assert _paths(m, x)["pos.weight"][0] == "rule"
    K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
    R = reference.ntk_oracle(m, x, mode="full")
    assert float((K - R).norm() / R.norm()) < 1e-12


def test_forward_hook_on_a_shared_embedding_is_seen_and_exact():
    """A forward hook on the position Embedding that rescales its output (a batch-wise op) keeps the
    rule and matches autograd through the user's own module; a hook that reduces over the batch axis
    sends the parameter to the remainder, still exact."""
    for hook, path in ((lambda m, i, o: o * 1.5, "rule"), (lambda m, i, o: o.sum(0, keepdim=True), "remainder")):
        torch.manual_seed(0)
        m = PosModel("add").double()
        h = m.pos.register_forward_hook(hook)
        x = torch.randint(0, 20, (4, 6))
        assert _paths(m, x)["pos.weight"][0] == path
        K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured")
        R = reference.ntk_oracle(m, x, mode="full")
        assert float((K - R).norm() / R.norm()) < 1e-12
        h.remove()
