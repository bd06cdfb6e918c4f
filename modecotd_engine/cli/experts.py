"""`modecotd-engine experts`: inspect and edit an expert bank; PEFT import and export."""

from __future__ import annotations

import argparse

from ..engine.experts import ExpertBank
from ..kernels.args import MODES


def register(subparsers) -> None:
    p = subparsers.add_parser("experts", help="show, rename, remove, import (PEFT) and export (PEFT) experts",
                              description="Inspect and edit an expert bank directory (experts.safetensors + "
                              "experts.json). Edits rewrite the bank atomically.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("show", help="list the experts and their shapes")
    s.add_argument("--bank", required=True, help="expert bank directory")
    s = sub.add_parser("rename", help="rename an expert")
    s.add_argument("--bank", required=True, help="expert bank directory")
    s.add_argument("old", help="current expert name")
    s.add_argument("new", help="new expert name")
    s = sub.add_parser("remove", help="remove an expert")
    s.add_argument("--bank", required=True, help="expert bank directory")
    s.add_argument("name", help="expert to remove")
    s = sub.add_parser("import-peft", help="add a PEFT LoRA adapter directory as one expert")
    s.add_argument("--bank", required=True, help="expert bank directory")
    s.add_argument("--adapter", required=True, help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("--name", required=True, help="name of the new expert")
    s = sub.add_parser("export-peft", help="write an expert or a weighted mixture as a PEFT LoRA adapter")
    s.add_argument("--bank", required=True, help="expert bank directory")
    s.add_argument("--experts", required=True,
                   help="one expert name, 'a,b' (equal weights) or 'a=0.7,b=0.3' (weights)")
    s.add_argument("--mode", choices=MODES, default="weight",
                   help="weight: merged A and B at rank r; output: exact rank E*r concatenation")
    s.add_argument("--out", required=True, help="adapter directory to write")
    p.set_defaults(func=run)


def _parse_weights(spec: str):
    parts = [x.strip() for x in spec.split(",") if x.strip()]
    if not parts:
        raise ValueError("--experts is empty")
    if not any("=" in x for x in parts):
        return parts if len(parts) > 1 else parts[0]
    out = {}
    for x in parts:
        name, _, w = x.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"cannot parse the weight in {x!r} (expected name=number)") from None
    return out


def run(args: argparse.Namespace) -> int:
    bank = ExpertBank.load(args.bank)
    if args.action == "show":
        print(f"bank {args.bank}: {bank.num_experts} experts, rank {bank.rank}, alpha {bank.alpha:g} "
              f"(scale {bank.scale:g}), {len(bank.modules)} modules, {bank.num_parameters():,} parameters")
        print(f"student: {bank.student.get('name', '?')} ({bank.student.get('model_type', '?')})")
        for i, n in enumerate(bank.names):
            norm = sum(float(bank.lora_b[m][i].norm()) ** 2 for m in bank.modules) ** 0.5
            print(f"  [{i}] {n}  |B| = {norm:.4g}")
        return 0
    if args.action == "rename":
        bank.rename_expert(args.old, args.new)
    elif args.action == "remove":
        bank.remove_expert(args.name)
    elif args.action == "import-peft":
        bank.import_peft(args.adapter, args.name)
    elif args.action == "export-peft":
        out = bank.export_peft(args.out, _parse_weights(args.experts), mode=args.mode)
        print(f"wrote PEFT adapter {out}")
        return 0
    bank.save(args.bank)
    print(f"updated {args.bank}: experts {', '.join(bank.names)}")
    return 0
