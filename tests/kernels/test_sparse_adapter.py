"""The sparse adapter trains through this op: switching the backend changes no result beyond tolerance."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of Triton

from peft_lab.adapters.base import ADAPTERS, build_adapter  # noqa: E402
from peft_lab.kernels.sparse import op  # noqa: E402

assert "sparse" in ADAPTERS.names(), "the sparse adapter must be registered"
if op._triton_module() is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

DEVICE = "cpu" if op._triton_module().INTERPRETED else "cuda"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(33, 17), nn.Linear(17, 33), nn.Linear(33, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_adapter_trains_the_same_on_both_backends(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3, 12, 33, generator=g)
    target = torch.randint(0, 5, (3, 12), generator=g)
    torch.manual_seed(0)
    base = MLP()
    result = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv(op.BACKEND_ENV, backend)
        model = MLP()
        model.load_state_dict(base.state_dict())
        adapter = build_adapter("sparse", r=2, seed=0, target_modules=["fc1", "fc2"])
        model = adapter.attach(model).to(DEVICE, dtype)
        params = list(adapter.trainable_parameters().values())
        opt = torch.optim.SGD(params, lr=0.1)
        for xb, tb in zip(data, target, strict=True):
            loss = nn.functional.cross_entropy(model(xb.to(DEVICE, dtype)).float(), tb.to(DEVICE))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = model(data[0].to(DEVICE, dtype)).float().cpu()
        result[backend] = (out, [p.detach().float().cpu().clone() for p in params])
    ref_out, ref_params = result["reference"]
    got_out, got_params = result["triton"]
    assert any(p.abs().sum() > 0 for p in ref_params)  # the values moved
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_out, ref_out, **tol)
    for a, b in zip(ref_params, got_params, strict=True):
        torch.testing.assert_close(b, a, **tol)
