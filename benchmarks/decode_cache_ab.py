"""Decoding forward time with the KV cache read as views of its filled part vs as whole buffers.

    python benchmarks/decode_cache_ab.py [--bank DIR] [--rows 32] [--new-tokens 33] [--repeats 3] [--out DIR]
                                         [--student DIR] [--dtype auto] [--attention auto] [--prompt-format chat]

Runs ``generate_detailed`` (what ``infer``, ``eval`` and ``serve`` decode through) on the student
(default: the built-in one) in its default dtype, ``rows`` prompts of ~190 tokens under the chat template, greedy, no
stop rule, alternating the two ways the cache hands keys and values to the attention
(``kv_cache.GrowingLayer``'s ``full_reads``) ``repeats`` times. Every decoding forward (one token per
row) is timed; the figure per run is the median forward, and the table gives each setting's runs. With
``--bank`` the bank's experts are injected and each row gets one expert (output composition). Texts
must be identical between the settings (the spare room is masked out); the script says whether they
were. Writes ``decode-cache.md`` / ``.json`` under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", help="expert bank to inject (one expert per row); default: the student alone")
    ap.add_argument("--rows", type=int, default=32, help="prompts decoded together (32)")
    ap.add_argument("--new-tokens", type=int, default=33, help="tokens generated per row (33)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternating (3)")
    ap.add_argument("--out", help="directory for decode-cache.md / decode-cache.json")
    ap.add_argument("--student", help="student directory (default: the built-in student)")
    ap.add_argument("--dtype", default="auto", help="student dtype (auto: bf16 where the CPU has it natively)")
    ap.add_argument("--attention", default="auto", help="attention implementation (auto, grouped, ...); whole-"
                    "buffer reads need the engine's grouped attention")
    ap.add_argument("--prompt-format", default="chat", choices=("chat", "plain"),
                    help="prompts inside the student's chat template (chat) or as they are (plain)")
    args = ap.parse_args(argv)

    import modecotd_engine.engine.decoder as decoder
    from modecotd_engine.bench.common import device_name, versions
    from modecotd_engine.engine.atomic import atomic_write_text
    from modecotd_engine.engine.generate import GenerationConfig, generate_detailed
    from modecotd_engine.engine.attention import GROUPED
    from modecotd_engine.engine.kv_cache import growing_cache
    from modecotd_engine.engine.student import load_student

    st = load_student(args.student, dtype=args.dtype, attention=args.attention)
    if st.model.config._attn_implementation != GROUPED:
        ap.error(f"the student runs {st.model.config._attn_implementation} attention; whole-buffer reads need "
                 f"the engine's grouped attention (--attention grouped)")
    model, handle, gates = st.model, None, None
    if args.bank:
        from modecotd_engine.engine.experts import ExpertBank
        from modecotd_engine.engine.inject import inject_experts

        bank = ExpertBank.load(args.bank, student=st)
        handle = inject_experts(model, bank)
        gates = torch.zeros(args.rows, bank.num_experts)
        gates[torch.arange(args.rows), torch.arange(args.rows) % bank.num_experts] = 1
    prompts = [("Q: Tom has %d apples and buys %d more, then gives away %d. How many are left? "
                "Explain each step carefully. " % (i, 2 * i + 3, i // 2)) * 6 for i in range(args.rows)]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.rows, prompt_format=args.prompt_format,
                           stop_after_answer=False, stop_on_loop=False)

    forward_times: list[float] = []
    plain_forward = type(model).forward

    def timed_forward(self, *a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        t0 = time.perf_counter()
        out = plain_forward(self, *a, **kw)
        if ids is not None and ids.shape[1] == 1:  # a decoding step (prefill runs whole prompts)
            forward_times.append(time.perf_counter() - t0)
        return out

    type(model).forward = timed_forward
    runs: dict[str, list[float]] = {"views of the filled part": [], "whole buffers": []}
    texts = {}
    new_cache = decoder._new_cache
    try:
        for _ in range(args.repeats):
            for label, full in (("views of the filled part", False), ("whole buffers", True)):
                decoder._new_cache = lambda m, full=full: growing_cache(m.config, full_reads=full)
                forward_times.clear()
                res = generate_detailed(model, st.tokenizer, prompts, config=cfg, handle=handle, gates=gates)
                runs[label].append(round(statistics.median(forward_times) * 1e3, 1))
                texts[label] = res.texts
    finally:
        decoder._new_cache = new_cache
        type(model).forward = plain_forward
    same = len({tuple(t) for t in texts.values()}) == 1
    old, new = (statistics.median(v) for v in runs.values())
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(st.device),
              **versions(), "dtype": str(st.dtype), "attention": model.config._attn_implementation,
              "bank": args.bank, "rows": args.rows, "new_tokens": args.new_tokens, "runs_ms": runs,
              "speedup": round(old / new, 2), "same_texts": same}
    lines = ["# Decoding forward: KV cache read as views vs as whole buffers", "",
             f"{report['date']}, {report['device']}, torch {report['torch']}, transformers "
             f"{report['transformers']}; student {st.path.name} ({st.dtype}, attention "
             f"{report['attention']}); {'experts of ' + args.bank + ', one per row' if args.bank else 'no experts'}; "
             f"{args.rows} rows, ~190-token prompts ({args.prompt_format}), {args.new_tokens} new tokens, greedy", "",
             "| cache read | median decoding forward per run (ms) |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in runs.items()]
    lines += ["", f"speed-up (median of runs): {report['speedup']:.2f}x; same texts: {'yes' if same else 'NO'}", "",
              "Command: `python benchmarks/decode_cache_ab.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`"]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / "decode-cache.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "decode-cache.md", "\n".join(lines) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
