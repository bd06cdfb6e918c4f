"""`modecotd-engine infer`: generate with experts or mixtures; every request may name its own.

One prompt (``--prompt`` or stdin) streams its continuation to stdout. A request file (``--input``,
JSON lines) is served in shared batches where each request carries its own experts or mixture and
composition (output / weight); router mixtures are served in groups of their own, since a router is
a setting of the whole model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.answer_guide import AnswerForm
from ..engine.answers import TASK_TYPES
from ..engine.atomic import atomic_write_text
from ..engine.data import PROMPT_FORMATS, format_prompt
from ..engine.decoder import LOOP_REPEATS
from ..engine.generate import GenerationConfig, PromptError, encode_prompts, generate_detailed, model_context_length
from ..engine.selection import GenerationError, Selection, frozen_selection, mixture_selection, spec_selection
from ..kernels import MODES

_EPILOG = """\
request file (--input): one JSON object a line, e.g.
  {"prompt": "Q: Tom has 3 apples ...\\nA:", "experts": "word_math"}
  {"input": "Q: ...", "experts": "word_math=0.7,last_letters=0.3"}
  {"prompt": "Q: ...", "mixture": "mixtures/price_math.json"}
  {"prompt": "Q: ...", "experts": null}          (the frozen student)
A request without "experts"/"mixture" uses --experts/--mixture, else the frozen student. A relative
mixture path is looked up from the current directory, then from the request file's directory.
Each output line is the request's object plus "output", "num_tokens" and "finish_reason"
(stop, eos or length).

examples:
  modecotd-engine infer --bank runs/x/experts --experts word_math --prompt "Q: Ann has 3 pens ...\\nA:"
  printf 'Q: ...\\nA:' | modecotd-engine infer --bank runs/x/experts --mixture mixtures/price_math.json
  modecotd-engine infer --bank runs/x/experts --input requests.jsonl --out answers.jsonl
"""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default=None, help="student model directory (Hugging Face layout, safetensors); "
                   "default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="expert composition: output = gated sum of the experts' outputs, weight = gated sums of "
                   "their A and B matrices (LoraHub-style merge); default: a mixture file's own mode, else output")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                   help="mixture kernel backend (auto: triton on CUDA, torch on CPU)")
    add_precision_args(p)


def add_precision_args(p: argparse.ArgumentParser, *, dtype_default: str = "auto", note: str = "") -> None:
    """--dtype and --attention of the student (``load_student``'s arguments of the same names)."""
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=dtype_default,
                   help="student dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 math (about 2x "
                   f"faster there, as in training), float32 otherwise{note} (default: {dtype_default})")
    p.add_argument("--attention", default="auto",
                   help="student attention: auto (the engine's grouped-query matmul attention on CPU with bf16/fp16 "
                   "weights, transformers' default elsewhere), grouped, sdpa, eager")


def add_generation_args(p: argparse.ArgumentParser, *, max_new_tokens: int = 128, sampling: bool = True) -> None:
    d = GenerationConfig()
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"generated tokens per request at most (default {max_new_tokens})")
    if sampling:
        p.add_argument("--temperature", type=float, default=d.temperature,
                       help="sampling temperature; 0 = greedy decoding (default 0)")
        p.add_argument("--top-p", type=float, default=d.top_p,
                       help="nucleus sampling: keep the most likely tokens up to this probability mass, "
                       "in (0, 1] (default 1 = all)")
        p.add_argument("--seed", type=int, default=d.seed, help="seed of the sampling generator (default 0)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"requests per batch; one forward per step serves the whole batch (default {d.batch_size})")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string; the text up to and including it is returned (repeatable; default: END)")
    p.add_argument("--no-stop", action="store_true", help="no stop strings (stop at EOS or the token budget only)")
    p.add_argument("--prompt-format", choices=("auto",) + PROMPT_FORMATS, default="auto",
                   help="plain: prompts as given; chat: each prompt as the user turn of the student's chat template; "
                   "auto: the format the bank's experts were trained with (plain without a bank)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="> 1 lowers the logits of tokens a request already generated (CTRL rule; 1 = off)")
    p.add_argument("--no-answer-stop", action="store_true",
                   help="keep generating after the answer line that follows '-->' is complete (default: stop there)")
    p.add_argument("--no-loop-stop", action="store_true",
                   help=f"keep generating when the tail is one short piece repeated {LOOP_REPEATS} times "
                   "(default: end such a request, it never leaves the cycle under greedy decoding)")


def generation_config(args, bank=None) -> GenerationConfig:
    """The decoding settings of the generation flags; ``--prompt-format auto`` follows ``bank``."""
    stops = () if args.no_stop else tuple(args.stop) if args.stop else GenerationConfig().stop_strings
    fmt = args.prompt_format
    if fmt == "auto":
        fmt = bank.prompt_format if bank is not None else "plain"
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=getattr(args, "temperature", 0.0),
                            top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", 0), stop_strings=stops,
                            batch_size=args.batch_size, prompt_format=fmt,
                            repetition_penalty=args.repetition_penalty, stop_after_answer=not args.no_answer_stop,
                            stop_on_loop=not args.no_loop_stop)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "infer",
        help="generate with experts or mixtures (one prompt, stdin, or a file of requests)",
        description="Generate continuations with the student and chosen experts. Every request may name its own "
        "experts or mixture; all are served together in shared batches (one gate row per request). "
        "Without --bank the frozen student runs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bank", default=None, help="expert bank directory (experts.json + experts.safetensors)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--experts", default=None, metavar="SPEC",
                     help="experts for every request without its own: 'a', 'a,b' (equal weights) or "
                     "'a=0.7,b=-0.2' (explicit weights)")
    sel.add_argument("--mixture", default=None, metavar="FILE",
                     help="mixture file (from 'modecotd-engine mix') for every request without its own")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, metavar="TEXT",
                     help="one prompt; its continuation streams to stdout (default: one prompt read from stdin, "
                     "one trailing newline removed)")
    src.add_argument("--input", default=None, metavar="FILE.jsonl",
                     help="request file, one JSON object a line (see below)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="where the results of --input go, one JSON object a line (default: stdout)")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--answer-type", choices=TASK_TYPES, default=None,
                   help="guided answers of this type for every request: after '-->' only such an answer (a "
                   "choice question's option letters, Yes/No/True/False, a number; free text for letters and "
                   "text) and END; a request that loops, reaches its budget or ends without an answer gets the "
                   "marker written for it (finish reason 'forced'). Default: no guide")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------- requests


@dataclass
class Request:
    prompt: str
    record: dict  # the request's JSON object (or {"prompt": ...})
    where: str  # "FILE line N", "--prompt" or "stdin"
    experts: str | None = None
    mixture: str | None = None
    frozen: bool = False  # "experts": null


def read_requests(path: str) -> list[Request]:
    """Parse a request file; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"request file not found: {p}") from None
    except UnicodeDecodeError as exc:
        raise GenerationError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    out: list[Request] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerationError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise GenerationError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        keys = [k for k in ("prompt", "input") if k in rec]
        if len(keys) != 1:
            raise GenerationError(f"{where}: give the prompt as exactly one of 'prompt' or 'input'")
        prompt = rec[keys[0]]
        if not isinstance(prompt, str):
            raise GenerationError(f"{where}: '{keys[0]}' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise GenerationError(f"{where}: empty prompt")
        if "experts" in rec and "mixture" in rec:
            raise GenerationError(f"{where}: give 'experts' or 'mixture', not both")
        experts, mixture, frozen = rec.get("experts"), rec.get("mixture"), "experts" in rec and rec["experts"] is None
        if experts is not None and not isinstance(experts, str):
            raise GenerationError(f"{where}: 'experts' must be a spec string like 'a=0.7,b=0.3' or null")
        if "mixture" in rec and not isinstance(mixture, str):
            raise GenerationError(f"{where}: 'mixture' must be a path string")
        if mixture is not None and not Path(mixture).is_absolute() and not Path(mixture).exists():
            mixture = str(p.parent / mixture)
        out.append(Request(prompt, rec, where, experts, mixture, frozen))
    if not out:
        raise GenerationError(f"{p}: no requests in the file")
    return out


# ----------------------------------------------------------------------------- model, selection


def load_model(args, *, need_bank: bool):
    """(student, bank or None, handle or None) from --student / --bank."""
    from ..engine.experts import ExpertBank
    from ..engine.inject import inject_experts
    from ..engine.student import load_student

    if need_bank and not args.bank:
        raise GenerationError("experts or mixtures need --bank (the expert bank directory)")
    student = load_student(args.student, dtype=args.dtype, device=args.device, attention=args.attention)
    if not args.bank:
        return student, None, None
    bank = ExpertBank.load(args.bank, student=student)
    handle = inject_experts(student.model, bank, mode=args.mode or "output", backend=args.backend)
    return student, bank, handle


def serve(model, tokenizer, handle, prompts: list[str], selections: list[Selection], config: GenerationConfig,
          *, stream=None, progress: bool = False, answers: list | None = None) -> dict:
    """Generate for every request: one mixed batch stream for every gated selection (each row with
    its own composition mode), one per router mixture. ``answers``: each request's answer form
    (``answer_guide.AnswerForm``) or None.

    Returns:
        ``{"texts", "num_tokens", "finish_reasons", "seconds", "groups"}`` in request order.
    """
    from ..engine.mixture import load_router_state

    n = len(prompts)
    texts, num_tokens, reasons = [""] * n, [0] * n, [""] * n
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(selections):
        groups.setdefault(s.group, []).append(i)
    t0 = time.perf_counter()
    for (mode, _router), idx in groups.items():
        gates = modes = None
        sel0 = selections[idx[0]]
        if handle is not None:
            if sel0.router is None:
                gates = torch.stack([selections[i].gate for i in idx])  # (n_group, E)
                modes = [selections[i].mode for i in idx]
            else:
                handle.set_mode(mode)
                handle.attach_router(load_router_state(sel0.router), top_k=sel0.router.top_k)
        try:
            res = generate_detailed(model, tokenizer, [prompts[i] for i in idx], handle=handle, gates=gates,
                                    config=config, stream=stream, progress=progress, modes=modes,
                                    answers=None if answers is None else [answers[i] for i in idx])
        finally:
            if handle is not None and sel0.router is not None:
                handle.detach_router()
        for j, i in enumerate(idx):
            texts[i], num_tokens[i], reasons[i] = res.texts[j], res.num_tokens[j], res.finish_reasons[j]
    return {"texts": texts, "num_tokens": num_tokens, "finish_reasons": reasons,
            "seconds": time.perf_counter() - t0, "groups": len(groups)}


# -------------------------------------------------------------------------------------- run


def _collect_requests(args) -> tuple[list[Request], bool]:
    """The requests and whether to stream (a single prompt from --prompt or stdin)."""
    if args.input:
        return read_requests(args.input), False
    if args.out:
        raise GenerationError("--out goes with --input (a single prompt streams to stdout)")
    if args.prompt is not None:
        prompt, where = args.prompt, "--prompt"
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise GenerationError("give --prompt TEXT, --input FILE.jsonl, or pipe a prompt on stdin")
        prompt, where = sys.stdin.read(), "stdin"
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    if not prompt.strip():
        raise GenerationError(f"empty prompt ({where})")
    return [Request(prompt, {"prompt": prompt}, where)], True


def run(args) -> int:
    generation_config(args)  # bad flags fail before the student loads
    requests, streaming = _collect_requests(args)
    need_bank = bool(args.experts or args.mixture or any(r.experts or r.mixture for r in requests))
    student, bank, handle = load_model(args, need_bank=need_bank)
    config = generation_config(args, bank)
    model, tok = student.model, student.tokenizer

    default = frozen_selection(bank)
    if args.experts:
        default = spec_selection(args.experts, bank, args.mode)
    elif args.mixture:
        default = mixture_selection(args.mixture, bank, args.bank, args.mode)
    selections: list[Selection] = []
    for r in requests:
        try:
            if r.experts is not None:
                selections.append(spec_selection(r.experts, bank, args.mode))
            elif r.mixture is not None:
                selections.append(mixture_selection(r.mixture, bank, args.bank, args.mode))
            elif r.frozen:
                selections.append(frozen_selection(bank))
            else:
                selections.append(default)
        except ValueError as exc:
            raise GenerationError(f"{r.where}: {exc}") from None

    prompts = [r.prompt for r in requests]
    answers = None if args.answer_type is None else [AnswerForm.of(args.answer_type, p) for p in prompts]
    try:  # check every prompt before generating anything
        encode_prompts(tok, [format_prompt(tok, p, config.prompt_format) for p in prompts],
                       context=model_context_length(model))
    except PromptError as exc:
        raise GenerationError(f"{requests[exc.index].where}: prompt {exc.detail}") from None

    if streaming:
        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        res = serve(model, tok, handle, prompts, selections, config, stream=write, answers=answers)
        sys.stdout.write("\n")
        sys.stdout.flush()
        rate = res["num_tokens"][0] / res["seconds"] if res["seconds"] > 0 else 0.0
        print(f"[{selections[0].label}: {res['num_tokens'][0]} tokens, {rate:.1f} tokens/s, "
              f"finished by {res['finish_reasons'][0]}]", file=sys.stderr)
        return 0

    res = serve(model, tok, handle, prompts, selections, config, progress=sys.stderr.isatty(), answers=answers)
    lines = []
    for i, r in enumerate(requests):
        rec = dict(r.record)
        rec.update(output=res["texts"][i], num_tokens=res["num_tokens"][i], finish_reason=res["finish_reasons"][i])
        lines.append(json.dumps(rec, ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), body)
    else:
        sys.stdout.write(body)
    total = sum(res["num_tokens"])
    rate = total / res["seconds"] if res["seconds"] > 0 else 0.0
    print(f"served {len(requests)} requests in {res['groups']} group(s): {total} tokens in {res['seconds']:.1f} s "
          f"({rate:.1f} tokens/s)" + (f"; results in {args.out}" if args.out else ""), file=sys.stderr)
    return 0
