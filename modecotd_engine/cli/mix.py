"""`modecotd-engine mix`: find how to combine a bank's experts for a target task from a few examples.

Which "mix" is which: ``engine/mix.py`` finds the gates (the mixing methods, :func:`mix`),
``engine/mixture.py`` saves and loads the result (``Mixture``, the file format), the kernels' op
``lora_mixture`` (``kernels/ops.py``) applies gate rows to the experts inside a layer,
``cli/mix.py`` is the ``mix`` command and ``bench/mix.py`` its benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine.mixture import METHODS
from .infer import add_precision_args
from ..kernels.args import MODES

ROUTER_DEFAULT_STEPS = 200


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mix", help="combine the bank's experts for a target task (seen or unseen) from a few examples",
        description="Adapt the expert bank to a target task from a handful of examples (shots): gradient-free "
        "search over one weight per expert (the paper's method), gradient descent through the kernel's "
        "gate gradient, a learned per-layer per-token router, or the uniform average. Writes a mixture "
        "JSON file (and, for a router, NAME.router.safetensors beside it).",
    )
    p.add_argument("--bank", required=True, help="expert bank directory (experts.safetensors + experts.json)")
    p.add_argument("--target", required=True, help="name of the target task (recorded in the mixture)")
    p.add_argument("--shots", required=True,
                   help="JSON/JSONL file of the target's examples in the training format "
                   "(input; output = rationale, a line '-->', the answer and END)")
    p.add_argument("--method", choices=METHODS, default="search",
                   help="search: nevergrad NGOpt (the paper's); gradient: Adam through the gate gradient; "
                   "router: per-layer per-token router trained on --router-data; uniform: 1/E each (default: search)")
    p.add_argument("--mode", choices=MODES, default="weight",
                   help="composition: weight = (sum w B)(sum w A), the paper's; output = sum w B A (default: weight)")
    p.add_argument("--budget", type=int, default=None,
                   help="search: candidate evaluations (forward passes over the shots); gradient: forward+backward "
                   f"evaluations; router: training steps (default: 40, router {ROUTER_DEFAULT_STEPS})")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty on mean |w| added to the shots loss (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search / router init and batches (default: 0)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (gradient: Adam on the weights, default 0.2; router: default 5e-3)")
    p.add_argument("--student", default=None,
                   help="student model directory (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device for the student, e.g. cpu or cuda (default: cuda if available)")
    add_precision_args(p, dtype_default="float32",
                       note="; the experts and routers stay float32, and float32 reproduces earlier mixtures")
    p.add_argument("--router-data", default=None,
                   help="directory of the seen tasks' training files (NAME.json/.jsonl), required by --method router")
    p.add_argument("--top-k", type=int, default=0,
                   help="router: keep the k largest gates per token and renormalize (0 = dense softmax; default: 0)")
    p.add_argument("--max-len", type=int, default=512, help="maximum tokens per example, prompt + output (default: 512)")
    p.add_argument("--finalists", type=int, default=4,
                   help="check by generation: the best N distinct candidates of the search (the result for gradient "
                   "and uniform), the prior (a seen --target's own expert, else w = 0) and w = 0 each answer the "
                   "shots greedily; the prior is kept unless the shots are evidence that another answers more of "
                   "them correctly (a one-sided sign test at level 0.05 over the shots the two answer differently: "
                   "with 5 shots, 5 to 0). 0: the shots loss alone decides (default: 4)")
    p.add_argument("--no-probe", action="store_true",
                   help="search: start at w = 0 as the paper does, without first evaluating each expert alone (by "
                   "default the search starts from the best of w = 0 and the single experts, E extra forward passes)")
    p.add_argument("--verify-max-new-tokens", type=int, default=256,
                   help="token budget of each shot's answer in that check (default: 256)")
    p.add_argument("--guide-answers", action="store_true",
                   help="the check's generations have guided answers, as 'eval --guide-answers' scores them: "
                   "after '-->' only an answer of the target task's type, and a generation about to end "
                   "without an answer gets the marker written for it")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (by default one on stderr counts the objective evaluations, or a router's "
                   "training steps, with the last and best shots loss, then the check's generations)")
    p.add_argument("--out", required=True, help="mixture JSON file to write")
    p.add_argument("--export-peft", default=None,
                   help="also write the mixture as a PEFT LoRA adapter directory (weight mode: merged A and B at "
                   "rank r; output mode: exact rank E*r concatenation); not for router mixtures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.data import read_task_dir, read_task_file
    from ..engine.experts import ExpertBank
    from ..engine.mix import mix
    from ..engine.mixture import save_mixture
    from ..engine.student import load_student

    if args.method == "router":
        if not args.router_data:
            raise ValueError("--method router needs --router-data DIR (the seen tasks' training files)")
        if args.export_peft:
            raise ValueError("--export-peft: a router mixture cannot be a PEFT adapter (its gates depend on each token)")
    elif args.top_k:
        raise ValueError("--top-k applies to --method router only")
    if args.finalists < 0:
        raise ValueError(f"--finalists must be >= 0, got {args.finalists}")
    if args.method == "router" and args.finalists:
        args.finalists = 0  # a router's gates depend on each token: nothing to choose between
    budget = args.budget if args.budget is not None else (ROUTER_DEFAULT_STEPS if args.method == "router" else 40)
    if budget < 1:
        raise ValueError(f"--budget must be >= 1, got {budget}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the mixture JSON file to write")

    shots = read_task_file(args.shots, require_marker=True, missing_marker="error").records
    router_data = None
    if args.method == "router":
        router_data = {name: tf.records for name, tf in read_task_dir(args.router_data).items()}
    student = load_student(args.student, device=args.device, dtype=args.dtype, attention=args.attention)
    bank = ExpertBank.load(args.bank, student=student)

    print(f"student {student.dtype}, "
          f"mix {args.target}: {args.method}, {args.mode} composition, {bank.num_experts} experts "
          f"({', '.join(bank.names)}), {len(shots)} shots, budget {budget}")
    if router_data is not None:
        print(f"router data: {', '.join(f'{t} ({len(r)})' for t, r in router_data.items())}")
    m = mix(bank, student, shots, method=args.method, mode=args.mode, budget=budget, l1=args.l1, seed=args.seed,
            target=args.target, router_data=router_data, top_k=args.top_k, lr=args.lr, max_len=args.max_len,
            bank_dir=args.bank, finalists=args.finalists, probe_experts=not args.no_probe,
            verify_max_new_tokens=args.verify_max_new_tokens, guide_answers=args.guide_answers,
            progress=not args.no_progress)
    info = m.info
    if "finalists" in info:
        print(f"checked by generation on the {len(shots)} shots (correct/answered):")
        for i, c in enumerate(info["finalists"]):
            mark = "*" if i == info["chosen"] else " "
            print(f" {mark} objective {c['objective']:.4f}  {c['correct']}/{c['answered']}  w={c['weights']}")
    print(f"shots loss (mean CE over {info['shots_tokens']} supervised tokens): before {m.shots_loss_before:.4f} "
          f"-> after {m.shots_loss_after:.4f}")
    if args.method in ("search", "gradient", "uniform"):
        print(f"objective (loss + {args.l1:g} * mean|w|): {info['objective_before']:.4f} -> "
              f"{info['objective_after']:.4f}")
    print(f"{m.evaluations} evaluations in {info['seconds']:.1f} s")
    label = "mean routed gate on the shots" if args.method == "router" else "weights"
    print(f"{label}:")
    width = max(len(n) for n in m.weights)
    for name, w in m.weights.items():
        print(f"  {name:<{width}}  {w:+.4f}")
    path = save_mixture(m, out)
    print(f"wrote {path}" + (f" and {m.router}" if m.router is not None else ""))
    if args.export_peft:
        d = bank.export_peft(args.export_peft, m.weights, mode=m.mode, base_model=str(student.path))
        print(f"wrote PEFT adapter {d} ({m.mode} composition)")
    return 0
