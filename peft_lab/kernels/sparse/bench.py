"""Benchmark of the sparse-delta linear y = x·(W + S)^T + b (docs/kernels.md), five paths side by side.

    python -m peft_lab.kernels.sparse.bench            # 4096x4096 weight, x 8x512, bfloat16, 0.1% / 1% / 5%
    python -m peft_lab.kernels.sparse.bench --quick    # small shapes, a minute on a CPU
    peft-lab bench kernels [ARGS...]                   # the same

Paths, all at the same nnz (SHiRA's budget r·(out + in), r chosen to hit each density):
- triton:    `pattern_linear` on the Triton kernels (CUDA only);
- csr:       `pattern_linear` on `torch.sparse` CSR kernels (the CPU default; also runs on CUDA);
- reference: `pattern_linear` on the PyTorch reference;
- naive:     autograd through W' = W + scatter(values), F.linear: a dense W' saved for the backward, a dense
             (out, in) gradient of W', gathered at the indices;
- shira:     PEFT's SHiRA layer (`ShiraConfig`, our positions as its mask): W.clone() + a sparse COO delta.
Per path: forward time, forward + backward time (gradients for x and the values), peak memory of the
forward + backward above what was allocated before (CUDA only), and the bytes it saves for the backward
beyond its inputs (any device). Then the two targets: the forward against a plain dense F.linear(x, W), and
the value gradient alone: SDDMM against dense dy^T·x then gather.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from peft_lab.errors import UserError
from peft_lab.kernels.sparse import csr, op, reference
from peft_lab.kernels.sparse.pattern import SparsePattern

__all__ = ["main"]

PATHS = ("triton", "csr", "reference", "naive", "shira")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peft_lab.kernels.sparse.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--densities", default="0.001,0.01,0.05", help="comma-separated fractions of out·in")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--repeat", type=int, default=0, help="timed repetitions (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quick", action="store_true", help="1024x1024 weight, x 4x128: a quick look on a CPU")
    a = p.parse_args(argv)
    if a.quick:
        a.out_features, a.in_features, a.batch, a.seq = 1024, 1024, 4, 128
    a.device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device; use --device cpu.")
    a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
    bad = [s for s in a.paths if s not in PATHS]
    if bad:
        raise UserError(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}.")
    try:
        a.densities = [float(s) for s in a.densities.split(",")]
    except ValueError:
        raise UserError(f"--densities must be comma-separated numbers, got {a.densities!r}.") from None
    if not all(0 < d <= 1 for d in a.densities):
        raise UserError(f"--densities must lie in (0, 1], got {a.densities}.")
    a.dtype = getattr(torch, a.dtype)
    a.repeat = a.repeat or (20 if a.device.startswith("cuda") else 3)
    return a


class _Timer:
    """Milliseconds per call of `fn`: the median of CUDA-event timings on a GPU; on a CPU the process CPU time
    per call (user + sys), which a shared, busy machine inflates far less than wall time."""

    def __init__(self, device: str, repeat: int):
        self.cuda = device.startswith("cuda")
        self.repeat = repeat

    @property
    def unit(self) -> str:
        return "ms" if self.cuda else "CPU-ms"

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # warm-up: compile kernels, fill allocator caches
        if self.cuda:
            torch.cuda.synchronize()
            times = []
            for _ in range(self.repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        cpu0 = time.process_time()
        for _ in range(self.repeat):
            fn()
        return (time.process_time() - cpu0) / self.repeat * 1e3


def _peak_mb(device: str, fn: Callable[[], object]) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _saved_extra_mb(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """MB of tensors saved for the backward that are not views of the inputs (what a layer keeps alive)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:  # SHiRA's sparse COO delta: its indices and values
            seen[id(t)] = sum(u.numel() * u.element_size() for u in (t._indices(), t._values()))
            return t
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _shira_layer(weight: torch.Tensor, bias: torch.Tensor, pattern: SparsePattern, r: int) -> torch.nn.Module:
    from peft import ShiraConfig, get_peft_model

    out_f, in_f = weight.shape
    lin = torch.nn.Linear(in_f, out_f, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    mask = torch.zeros(out_f, in_f, device=weight.device, dtype=weight.dtype)
    mask[pattern.rows.long(), pattern.cols.long()] = 1
    cfg = ShiraConfig(r=r, target_modules=["lin"])
    cfg.mask_fn = lambda base_layer, r, **kwargs: mask  # our positions, so every path trains the same entries
    model = get_peft_model(torch.nn.ModuleDict({"lin": lin}), cfg)
    return model.base_model.model["lin"]


def _path_fn(path: str, x, weight, bias, pattern, values, shira) -> Callable[[], torch.Tensor]:
    if path in ("triton", "csr", "reference"):

        def fwd():
            with _backend(path):
                return op.pattern_linear(x, weight, pattern, values, bias)

        return fwd
    if path == "naive":
        flat = pattern.flat

        def fwd():  # W' = W + S densely; autograd keeps W' and forms the dense (out, in) gradient of W'
            w_eff = weight.reshape(-1).index_add(0, flat, values.to(weight.dtype)).view_as(weight)
            return F.linear(x, w_eff, bias)

        return fwd
    return lambda: shira(x)


@contextlib.contextmanager
def _backend(name: str):
    old = os.environ.get(op.BACKEND_ENV)
    os.environ[op.BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(op.BACKEND_ENV, None)
        else:
            os.environ[op.BACKEND_ENV] = old


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    a = _parse(list(argv) if argv is not None else None)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # PEFT's SHiRA builds a COO tensor per call
    dev, dt = a.device, a.dtype
    out_f, in_f, batch = a.out_features, a.in_features, a.batch * a.seq
    tk = op._triton_module()
    triton_ok = tk is not None and tk.usable_on(torch.device(dev))
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"sparse-delta linear: weight {out_f}x{in_f}, x {a.batch}x{a.seq} ({batch} rows), {dt}, {dev} ({name})")
    timer = _Timer(dev, a.repeat)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, in_f, generator=g).to(dev, dt).requires_grad_()
    weight = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(dev, dt)
    bias = torch.randn(out_f, generator=g).to(dev, dt)
    dy = torch.randn(batch, out_f, generator=g).to(dev, dt)

    with torch.no_grad():
        dense_ms = timer(lambda: F.linear(x, weight, bias))
    u = timer.unit
    print(f"plain dense F.linear(x, W, b) forward: {dense_ms:.3f} {u}")
    print(
        f"\n{'density':>8} {'nnz':>9}  {'path':<9} {'fwd ' + u:>10} {'fwd+bwd ' + u:>14} {'peak MB':>9} "
        f"{'saved extra MB':>15}"
    )
    summary = []
    for density in a.densities:
        r = max(1, round(density * out_f * in_f / (out_f + in_f)))  # SHiRA's budget: nnz = r·(out + in)
        nnz = min(r * (out_f + in_f), out_f * in_f)
        flat = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values.to(dev)
        pattern = SparsePattern.from_flat(flat, (out_f, in_f))
        values = (torch.randn(nnz, generator=g) * 1e-3).to(dev).requires_grad_()  # float32 master values
        shira = _shira_layer(weight, bias, pattern, r) if "shira" in a.paths else None
        results = {}
        for path in a.paths:
            if path == "triton" and not triton_ok:
                print(f"{nnz / (out_f * in_f):>8.3%} {nnz:>9}  {path:<9} (needs CUDA and Triton: skipped)")
                continue
            fwd = _path_fn(path, x, weight, bias, pattern, values, shira)
            params = [x, values] if path != "shira" else [x] + [p for p in shira.parameters() if p.requires_grad]

            def step():
                torch.autograd.grad(fwd(), params, dy)

            fwd_ms = timer(fwd)
            step_ms = timer(step)
            peak = _peak_mb(dev, step)
            inputs = [x, weight, bias, values] + ([shira.base_layer.weight] if path == "shira" else [])
            saved = _saved_extra_mb(fwd, inputs)
            results[path] = fwd_ms
            print(
                f"{nnz / (out_f * in_f):>8.3%} {nnz:>9}  {path:<9} {fwd_ms:>10.3f} {step_ms:>14.3f} "
                f"{_fmt(peak, 1):>9} {saved:>15.3f}"
            )
        summary.append((nnz / (out_f * in_f), nnz, pattern, results))

    print("\nforward / plain dense forward (target: triton <= 1.15x on H100/H200):")
    for density, _nnz, _, results in summary:
        ratios = ", ".join(f"{p} {ms / dense_ms:.2f}x" for p, ms in results.items())
        print(f"  {density:.3%}: {ratios}")

    print("\nvalue gradient alone: SDDMM vs dense dy^T·x then gather (target: >= 5x faster at 1%, O(nnz) memory)")
    dyt, xt = dy.t().contiguous(), x.detach().t().contiguous()
    for density, _nnz, pattern, _ in summary:
        r_, c_ = pattern.rows.long(), pattern.cols.long()
        naive = lambda: (dy.t() @ x.detach())[r_, c_].float()  # noqa: E731
        naive_ms = timer(naive)
        line = f"  {density:.3%}: dense-then-gather {naive_ms:.3f} {u}, peak {_fmt(_peak_mb(dev, naive), 1)} MB"
        impls = [("triton", tk)] if triton_ok else []
        impls += [("csr", csr), ("reference", reference)]
        for label, impl in impls:
            fn = lambda impl=impl: impl.sddmm(dyt, xt, pattern)  # noqa: E731
            ms = timer(fn)
            line += f" | {label} SDDMM {ms:.3f} {u} ({naive_ms / ms:.1f}x), peak {_fmt(_peak_mb(dev, fn), 1)} MB"
        print(line)
    if not triton_ok:
        print("\n(the Triton path needs a CUDA device; run this on a GPU for the triton rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
