"""The parts of a CPU training step, each against what it replaces (forward + backward, one call each).

    python benchmarks/step_parts.py --out docs/bench/step-parts

SmolLM2-135M-Instruct shapes (hidden 576, 9 query / 3 key-value heads of 64, vocabulary 49,152) at
the training loop's batch: 8 sequences of 88 tokens, ~290 supervised positions, bfloat16 (the
loop's dtype on a CPU with native bf16). Random weights: the figures depend on shapes, not values.
Each pair runs the functions the engine runs (``engine.fused.rms_norm``,
``engine.attention.grouped_attention``, ``engine.loss.linear_cross_entropy``,
``kernels.lora_single_expert``) and what they replace, best of 7 repeats of 30 calls, interleaved.
Writes step-parts.json and step-parts.md into --out (device, versions and date included).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from modecotd_engine.bench.common import device_name, versions
from modecotd_engine.engine.attention import grouped_attention
from modecotd_engine.engine.fused import rms_norm
from modecotd_engine.engine.loss import linear_cross_entropy
from modecotd_engine.kernels import lora_mixture, lora_single_expert

B, L, HID, HEADS, KV, HD, VOCAB, SUP, RANK, EXPERTS = 8, 88, 576, 9, 3, 64, 49152, 290, 8, 7


def _time(fn, repeats: int = 7, calls: int = 30) -> float:
    fn()  # warm-up, outside the figure
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def _fwd_bwd(make):
    """make() -> (output, inputs needing grad); time forward + backward of output.sum()."""
    def run():
        out = make()
        out.float().sum().backward()
    return run


def cases(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, grad=True: torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)  # noqa: E731
    x = rnd(B, L, HID)
    w = torch.ones(HID, dtype=dtype)

    def hf_rms():
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        m = LlamaRMSNorm(HID, eps=1e-5).to(dtype)
        return lambda: m(x)

    q, k, v = rnd(B, HEADS, L, HD), rnd(B, KV, L, HD), rnd(B, KV, L, HD)
    causal = torch.full((L, L), float("-inf")).triu(1).to(dtype)[None, None]  # (1, 1, L, L) additive

    class _M(torch.nn.Module):
        training = True

    mod = _M()

    def sdpa():
        kk, vv = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal, scale=HD ** -0.5)

    h = rnd(SUP, HID)
    head = torch.randn(VOCAB, HID, generator=g).to(dtype) * 0.02
    targets = torch.randint(0, VOCAB, (SUP,), generator=g)

    xs = rnd(B * L, HID)
    wq = torch.randn(HID, HID, generator=g).to(dtype) * 0.02
    la = (torch.randn(EXPERTS, RANK, HID, generator=g) * 0.02).requires_grad_()
    lb = (torch.randn(EXPERTS, HID, RANK, generator=g) * 0.02).requires_grad_()
    onehot = torch.zeros(B * L, EXPERTS)
    onehot[:, 2] = 1.0
    return {
        "RMSNorm (one norm)": {
            "transformers LlamaRMSNorm": _fwd_bwd(hf_rms()),
            "engine rms_norm (hand-written backward)": _fwd_bwd(lambda: rms_norm(x, w, 1e-5)),
        },
        "attention (one layer)": {
            "SDPA (key/value heads repeated)": _fwd_bwd(sdpa),
            "engine grouped_attention": _fwd_bwd(lambda: grouped_attention(mod, q, k, v, causal, HD ** -0.5)[0]),
        },
        "output head + cross-entropy (supervised rows)": {
            "F.cross_entropy(logits.float())": _fwd_bwd(lambda: F.cross_entropy((h @ head.t()).float(), targets,
                                                                                 reduction="none")),
            "engine linear_cross_entropy": _fwd_bwd(lambda: linear_cross_entropy(h, head, targets)),
        },
        "one-task LoRA layer (q_proj)": {
            "grouped mixture, one-hot gates": _fwd_bwd(lambda: lora_mixture(xs, wq, None, la, lb, onehot, 2.0)),
            "engine lora_single_expert": _fwd_bwd(lambda: lora_single_expert(xs, wq, None, la, lb, 2, 1.0, 2.0)),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/bench/step-parts", help="report directory")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = {}
    for part, impls in cases(dtype).items():
        rows[part] = {name: round(_time(fn), 3) for name, fn in impls.items()}
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": device_name(torch.device("cpu")), "versions": versions(), "dtype": args.dtype,
              "shapes": {"batch": B, "tokens": L, "hidden": HID, "heads": HEADS, "kv_heads": KV, "vocab": VOCAB,
                         "supervised_rows": SUP, "rank": RANK, "experts": EXPERTS}, "ms": rows}
    lines = ["# Parts of a training step: the engine's function against what it replaces", "",
             f"{report['date']}, {report['device']}, torch {report['versions']['torch']}, {args.dtype}; "
             f"forward + backward, best of 7 x 30 calls", "",
             "| part | replaced | ms | engine | ms | ratio |", "|---|---|---:|---|---:|---:|"]
    for part, r in rows.items():
        (old, t_old), (new, t_new) = r.items()
        lines.append(f"| {part} | {old} | {t_old:.2f} | {new} | {t_new:.2f} | {t_old / t_new:.2f}x |")
    lines += ["", f"Command: `python benchmarks/step_parts.py --dtype {args.dtype} --out DIR`"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step-parts.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "step-parts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
