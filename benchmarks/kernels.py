"""Kernel figures at d_model 1024 with 4096 tokens, densities 1/4 .. 1/256, side by side in one run:

- masked linear forward+backward (1024 -> 4096) vs dense nn.Linear, and vs its reference twin;
- threshold top-k vs torch.topk and torch.kthvalue (same mask, 4096 x 1024 weight);
- the projection of that weight (top-k mask with the per-neuron floor, zeroing, decay): the native CPU pass
  (kernels/cpu_projection.py) vs the threshold path then mask-and-decay (CPU only);
- the fused sparse Adam step vs the reference sequence (torch Adam, sort-based projection, decay) over
  the parameters of a 2-layer d_model 1024 model;
- the model's forward on compressed (CSR) weights vs on dense weights (2 layers, 32 x 128 tokens).

- the compressed linear alone (1024 -> 4096, 4096 tokens) vs the dense linear.

Ends with one JSON line: `fwd_speedup_1_64` (compressed vs dense linear forward), `topk_speedup_vs_torch`
(at density 1/64), plus the whole-model forward, masked-linear and fused-step ratios.

    .venv/bin/python benchmarks/kernels.py [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from kernels.dispatch import select_kernels  # noqa: E402
from kernels.topk import keep_count, threshold_topk_mask  # noqa: E402
from model.config import ModelConfig, SparsityConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.sparsity import project_, sparse_tensors  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train import build_optimizer  # noqa: E402

DENSITIES = {"1/4": 1 / 4, "1/16": 1 / 16, "1/64": 1 / 64, "1/256": 1 / 256}
D, TOKENS, VOCAB = 1024, 4096, 2048


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `fn()` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_masked_linear(kernels, device, repeats) -> dict:
    x = torch.randn(TOKENS, D, device=device, requires_grad=True)
    dense = torch.nn.Linear(D, 4 * D, device=device)
    grad = torch.randn(TOKENS, 4 * D, device=device)
    t_dense = timed(lambda: dense(x).backward(grad), repeats, device)
    out = {}
    for label, density in DENSITIES.items():
        mask = torch.rand(4 * D, D, device=device) < density
        t_fast = timed(lambda: kernels.linear(x, dense.weight, mask, dense.bias).backward(grad), repeats, device)
        ref = select_kernels(device, "reference").linear
        t_ref = timed(lambda: ref(x, dense.weight, mask, dense.bias).backward(grad), repeats, device)
        out[label] = t_fast / t_dense
        print(f"masked linear fwd+bwd  density {label:5s}: {kernels.name} {t_fast * 1e3:7.1f} ms  reference "
              f"{t_ref * 1e3:7.1f} ms  dense nn.Linear {t_dense * 1e3:7.1f} ms  ratio to dense {t_fast / t_dense:5.2f}")
    return out


def bench_topk(device, repeats) -> dict:
    w = torch.randn(4 * D, D, device=device)
    out = {}
    for label, density in DENSITIES.items():
        k = keep_count(w.numel(), density)

        def by_topk():
            mask = torch.zeros(w.numel(), dtype=torch.bool, device=device)
            mask[w.abs().flatten().topk(k).indices] = True
            return mask

        def by_kthvalue():
            flat = w.abs().flatten()
            return flat >= flat.kthvalue(flat.numel() - k + 1).values

        t_fast = timed(lambda: threshold_topk_mask(w, k), repeats, device)
        t_topk = timed(by_topk, repeats, device)
        t_kth = timed(by_kthvalue, repeats, device) if device == "cpu" else float("nan")
        out[label] = t_topk / t_fast
        print(f"top-k mask 4096x1024    density {label:5s}: threshold {t_fast * 1e3:6.1f} ms  torch.topk "
              f"{t_topk * 1e3:6.1f} ms ({t_topk / t_fast:4.1f}x)  torch.kthvalue {t_kth * 1e3:6.1f} ms "
              f"({t_kth / t_fast:4.1f}x)")
    return out


def bench_projection(repeats) -> dict:
    from kernels.cpu_projection import project_native
    from kernels.optimizer import mask_decay_reference

    w = torch.randn(4 * D, D)
    out = {}
    for label, density in DENSITIES.items():
        k = keep_count(w.numel(), density)
        for floor_dim in (0, 1):
            def native():
                project_native(w.clone(), k, floor=4, floor_dim=floor_dim, factor=0.999)

            def threshold():
                p = w.clone()
                mask_decay_reference(p, threshold_topk_mask(p, k, floor=4, floor_dim=floor_dim), 0.999)

            t_copy = timed(lambda: w.clone(), repeats, "cpu")  # both time a fresh copy; it is taken off
            t_native = timed(native, repeats, "cpu") - t_copy
            t_threshold = timed(threshold, repeats, "cpu") - t_copy
            out[(label, floor_dim)] = t_threshold / t_native
            print(f"projection 4096x1024    density {label:5s} floor dim {floor_dim}: native {t_native * 1e3:6.1f} ms  "
                  f"threshold path {t_threshold * 1e3:6.1f} ms ({t_threshold / t_native:4.1f}x)")
    return out


def bench_fused_step(device, repeats) -> dict:
    out = {}
    for label, density in DENSITIES.items():
        if density < 4 / D:
            continue
        times = {}
        for backend in ("auto", "reference"):
            torch.manual_seed(0)
            model = GPT(ModelConfig(d_model=D, num_layers=2, context_length=128, kernels=backend), VOCAB, device=device)
            sparsity = SparsityConfig(density=density)
            tensors = sparse_tensors(model, sparsity)
            if backend == "reference":
                adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=0.1)

                def step():
                    adam.step()
                    project_(tensors, density, density, 4)
                    with torch.no_grad():
                        torch._foreach_mul_([t.param for t in tensors], 1 - 1e-4)
            else:
                opt = build_optimizer(model, tensors, TrainConfig(), sparsity)
                opt.schedule(TrainConfig().lr, {"matrix": density, "embedding": density, "bias": 1.0})
                step = opt.step
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            times[backend] = timed(step, repeats, device)
        out[label] = times["reference"] / times["auto"]
        print(f"sparse optimizer step   density {label:5s}: fused {times['auto'] * 1e3:7.1f} ms  reference sequence "
              f"{times['reference'] * 1e3:7.1f} ms  speedup {out[label]:4.1f}x")
    return out


def bench_sparse_linear(kernels, device, repeats) -> dict:
    """The compressed linear alone: 4096 tokens through 1024 -> 4096 (an MLP's c_fc)."""
    from kernels.sparse_inference import compress

    x = torch.randn(TOKENS, D, device=device)
    w, b = torch.randn(4 * D, D, device=device), torch.randn(4 * D, device=device)
    out = {}
    with torch.no_grad():
        t_dense = timed(lambda: torch.nn.functional.linear(x, w, b), repeats, device)
        for label, density in DENSITIES.items():
            csr = compress(w, torch.rand(4 * D, D, device=device) < density)
            t_sparse = timed(lambda: kernels.sparse_linear(x, csr, b, False), repeats, device)
            out[label] = t_dense / t_sparse
            print(f"linear forward 1024->4096 density {label:5s}: CSR {t_sparse * 1e3:7.1f} ms  dense "
                  f"{t_dense * 1e3:7.1f} ms  speedup {out[label]:4.1f}x")
    return out


def bench_forward(device, repeats) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=D, num_layers=2, context_length=128), VOCAB, device=device)
    x = torch.randint(0, VOCAB, (TOKENS // 128, 128), device=device)
    out = {}
    with torch.no_grad():
        t_dense = timed(lambda: model(x), repeats, device)
        for label, density in DENSITIES.items():
            if density < 4 / D:
                continue
            project_(sparse_tensors(model, SparsityConfig()), density, density, 4)
            model.compress_()
            t_sparse = timed(lambda: model(x), repeats, device)
            model.decompress_()
            out[label] = t_dense / t_sparse
            print(f"model forward 2L d1024  density {label:5s}: compressed {t_sparse * 1e3:7.1f} ms  dense "
                  f"{t_dense * 1e3:7.1f} ms  speedup {out[label]:4.1f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = select_kernels(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {name}, kernels '{kernels.name}', medians of {args.repeats}")
    linear = bench_masked_linear(kernels, device, args.repeats)
    topk = bench_topk(device, args.repeats)
    projection = bench_projection(args.repeats) if device == "cpu" else {}
    step = bench_fused_step(device, args.repeats)
    sparse_linear = bench_sparse_linear(kernels, device, args.repeats)
    forward = bench_forward(device, args.repeats)
    print(json.dumps({
        "fwd_speedup_1_64": round(sparse_linear["1/64"], 2),
        "model_fwd_speedup_1_64": round(forward["1/64"], 2),
        "topk_speedup_vs_torch": round(topk["1/64"], 2),
        "projection_native_vs_threshold_1_64": round(projection[("1/64", 0)], 2) if projection else None,
        "masked_linear_ratio_1_64": round(linear["1/64"], 2),
        "fused_step_speedup_1_64": round(step["1/64"], 2),
        "device": device,
    }))


if __name__ == "__main__":
    main()
