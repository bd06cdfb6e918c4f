"""Serving under load: Poisson arrivals over loopback against the offline engine loop on the same requests.

Workload: ``requests`` prompts of the built-in tasks, spread over the bank's experts (one expert a
request) and weighted mixtures of two of them (inline specs ``a=0.6,b=0.4``), output composition,
greedy, each generating exactly ``new_tokens`` tokens (EOS ignored, no stop strings) so both sides do
the same work. Without ``--bank`` the experts are random LoRAs over the student (``common.random_bank``).

Providers, one after the other on the same student and experts:

* ``offline engine loop``: every request handed to ``generate_detailed`` at once (what ``infer`` and
  ``eval`` run): the ceiling on throughput.
* ``server``: ``serve``'s loop and app under uvicorn in this process; a client process sends the
  requests at Poisson arrival times (seeded) over loopback, streaming, and records when each request
  was sent, when its first text event came (TTFT), when its last came and how many tokens it got
  (time per output token after the first, TPOT).
* ``merged server``: the same app, client and arrivals, over a loop that serves one adapter at a time
  merged into the student's weights (:class:`MergedAdapterLoop`), as servers without per-row
  adapters do: requests of the merged adapter (an expert or a mixture) join the batch, any other
  waits until the batch is empty and its own update is merged in. It runs on a second copy of the
  student without injected experts, so its forward is the plain student's.

Figures: generated tokens/s (first request sent to last finished), TTFT and TPOT p50/p99, the
server/offline throughput ratio, and whether the greedy texts of both agree; each a median over rounds
that run both providers in alternating order, since a shared machine's load drifts. The client sits in
its own process so that its Python work does not hold this process's interpreter lock; it still shares
the CPU.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..engine.serve_loop import ServeLoop

MIX_WEIGHTS = (0.6, 0.4)


def _prompts(n: int) -> list[str]:
    """``n`` prompts of the built-in tasks, round-robin over the tasks."""
    from ..engine.tasks import BUILTIN_TASKS, generate_eval

    names = list(BUILTIN_TASKS)
    per = -(-n // len(names))
    pools = {t: [r["input"] for r in generate_eval(t, per, seed=0)] for t in names}
    return [pools[names[i % len(names)]][i // len(names)] for i in range(n)]


def _models(names: list[str], n: int) -> list[str]:
    """Request ``i``'s model: an expert (even i) or a weighted mixture of two experts (odd i)."""
    out = []
    for i in range(n):
        a = names[(i // 2) % len(names)]
        if i % 2 == 0:
            out.append(a)
        else:
            b = names[(i // 2 + 1) % len(names)]
            out.append(a if a == b else f"{a}={MIX_WEIGHTS[0]},{b}={MIX_WEIGHTS[1]}")
    return out


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which ``n`` Poisson arrivals of ``rate`` per second come (the first at 0)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ------------------------------------------------------------------------------------ the client


def _one_request(port: int, body: dict, start: float, at: float, out: dict) -> None:
    """Send ``body`` (streaming) at ``start + at`` and record its timings, text and token count in ``out``."""
    time.sleep(max(0.0, start + at - time.perf_counter()))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    pieces, tokens = [], 0
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            raise RuntimeError(f"request failed: {event['error']['message']}")
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            if choice["text"]:
                last = time.perf_counter()
                first = first or last
                pieces.append(choice["text"])
    conn.close()
    # A server that sends no usage (or none per stream) is counted one token per text event, as
    # OpenAI-style servers stream them.
    out.update(sent=sent, first=first, last=last, done=time.perf_counter(), text="".join(pieces),
               tokens=tokens or len(pieces), status=resp.status)


def run_clients(port: int, bodies: list[dict], arrivals: list[float]) -> list[dict]:
    """Send every request at its arrival time, one thread each; their records in request order.

    Raises:
        RuntimeError: a request failed (its error message).
    """
    records = [{} for _ in bodies]
    start = time.perf_counter() + 0.05

    def send(body: dict, at: float, out: dict) -> None:
        try:
            _one_request(port, body, start, at, out)
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            out["error"] = repr(exc)

    threads = [threading.Thread(target=send, args=(b, at, r)) for b, at, r in zip(bodies, arrivals, records)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(records)} requests failed, e.g. {errors[0]}")
    return records


def _client_process(port: int, bodies: list[dict], arrivals: list[float], results) -> None:
    """The client process: runs the clients and sends their records back (or the error)."""
    try:
        results.put(("ok", run_clients(port, bodies, arrivals)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        results.put(("error", repr(exc)))


# ------------------------------------------------------------------------------------ the figures


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (linear interpolation), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def _latency(ttft: list[float], tpot: list[float]) -> dict:
    return {"ttft_p50_ms": _ms(_quantile(ttft, 0.5)), "ttft_p99_ms": _ms(_quantile(ttft, 0.99)),
            "tpot_p50_ms": _ms(_quantile(tpot, 0.5)), "tpot_p99_ms": _ms(_quantile(tpot, 0.99))}


def server_figures(records: list[dict]) -> dict:
    """Throughput and latency quantiles of the client's records."""
    tokens = sum(r["tokens"] for r in records)
    wall = max(r["done"] for r in records) - min(r["sent"] for r in records)
    ttft = [r["first"] - r["sent"] for r in records if r["first"] is not None]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in records if r["first"] is not None and r["tokens"] > 1]
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1), **_latency(ttft, tpot)}


# ------------------------------------------------------------------------------------ the run


def _offline_round(st, handle, prompts: list[str], gates, config) -> tuple[dict, list[str]]:
    """Every request handed to the offline engine loop at once: figures and texts."""
    from ..engine.generate import generate_detailed

    res = generate_detailed(st.model, st.tokenizer, prompts, handle=handle, gates=gates, config=config)
    return ({"wall_s": round(res.seconds, 2), "tokens": res.total_tokens,
             "tokens_per_s": round(res.total_tokens / res.seconds, 1), **_latency(res.first_token_s, [])}, res.texts)


def _server_round(port: int, bodies: list[dict], arrivals: list[float]) -> tuple[dict, list[str]]:
    """The requests sent at their arrival times by a client process: figures and texts."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    client = ctx.Process(target=_client_process, args=(port, bodies, arrivals, results))
    client.start()
    status, records = results.get(timeout=3600)
    client.join(60)
    if status != "ok":
        raise RuntimeError(f"the client process failed: {records}")
    return server_figures(records), [r["text"] for r in records]


class MergedAdapterLoop(ServeLoop):
    """``serve``'s loop on a student without injected experts that merges one adapter at a time.

    A request's group is its composition mode and gate row: requests of the merged adapter join the
    running batch; another adapter waits until the batch is empty, then :meth:`_switch` sets every
    target weight to the original plus that adapter's update, computed in float32 and rounded once to
    the student's dtype (no drift from merging and unmerging): ``scale * sum_e w_e B_e A_e`` (output
    composition) or ``scale * (sum_e w_e B_e)(sum_e w_e A_e)`` (weight composition). ``merges`` and
    ``merge_s`` count the switches and their time.
    """

    def __init__(self, model, tokenizer, bank, config, serve=None):
        super().__init__(model, tokenizer, None, config, serve)
        self.bank = bank
        self.targets = {name: model.get_submodule(name) for name in bank.modules}
        self.original = {name: m.weight.detach().float().clone() for name, m in self.targets.items()}
        # float32 A and B beside each weight, cast once: a switch computes its update where the weight is
        self.lora = {name: (bank.lora_a[name].detach().to(m.weight.device, torch.float32),
                            bank.lora_b[name].detach().to(m.weight.device, torch.float32))
                     for name, m in self.targets.items()}
        self.merges, self.merge_s = 0, 0.0

    def group_of(self, selection) -> tuple:
        gate = () if selection.gate is None or not selection.gate.any() else tuple(float(x) for x in selection.gate)
        return ("merged", selection.mode if gate else None, gate)

    @torch.no_grad()
    def _switch(self, selection) -> None:
        if selection.router is not None:
            raise ValueError("a router mixture cannot be merged into the weights")
        t0 = time.perf_counter()
        self._group = None  # unknown until the switch is complete
        gate = torch.zeros(self.bank.num_experts) if selection.gate is None else selection.gate.float()
        for name, lin in self.targets.items():
            a, b = self.lora[name]
            gate = gate.to(a.device)
            if selection.mode == "weight":
                delta = torch.einsum("e,enr->nr", gate, b) @ torch.einsum("e,erk->rk", gate, a)
            else:
                delta = torch.einsum("e,enr,erk->nk", gate, b, a)
            merged = self.original[name] + self.bank.scale * delta
            lin.weight.copy_(merged.to(lin.weight.dtype))
        self._group = self.group_of(selection)
        self.merges += 1
        self.merge_s += time.perf_counter() - t0


@contextlib.contextmanager
def _serving(st, handle, bank, bank_dir: str | None, config, max_queue: int, merged: bool = False):
    """``serve``'s loop and app under uvicorn in a thread, on a free loopback port (yielded with the
    loop). ``merged``: the loop is a :class:`MergedAdapterLoop` on ``st`` (a student without
    injected experts; ``handle`` unused)."""
    import socket

    import uvicorn

    from ..engine.serve_api import ModelTable, Server, build_app
    from ..engine.serve_loop import ServeConfig

    serve_config = ServeConfig(max_queue=max_queue)
    if merged:
        loop = MergedAdapterLoop(st.model, st.tokenizer, bank, config, serve_config)
    else:
        loop = ServeLoop(st.model, st.tokenizer, handle, config, serve_config)
    server = Server(loop, ModelTable(bank, bank_dir), st.tokenizer, config, root=st.path.name)
    loop.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    web = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    web.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.01)
        yield sock.getsockname()[1], loop
    finally:
        uv.should_exit = True
        web.join(60)
        loop.stop(60)
        sock.close()


def _medians(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (None where a round has none)."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = None if not values else round(_quantile(values, 0.5), 2)
    return out


def run_serve_bench(out_dir: Path, *, student: str | None = None, bank: str | None = None, requests: int = 64,
                    rate: float = 8.0, new_tokens: int = 64, batch_size: int = 32, experts: int = 10,
                    device: str | None = None, dtype: str = "auto", threads: int | None = None, seed: int = 0,
                    repeats: int = 2, merged: bool = True) -> dict:
    """Run the offline loop and the server on the same requests; write ``serve.json`` and ``serve.md``.

    Args:
        out_dir: report directory.
        student: student directory (default: the built-in student).
        bank: expert bank directory (default: ``experts`` random experts over the student).
        requests: number of requests.
        rate: Poisson arrival rate, requests per second.
        new_tokens: tokens each request generates.
        batch_size: rows decoding together at most (both providers).
        experts: random experts made when ``bank`` is None.
        device: cpu, cuda, ... (default: cuda if available).
        dtype: student dtype (auto: as ``serve``).
        threads: torch CPU threads (default: torch's setting).
        seed: seed of the arrival times.
        repeats: rounds; each runs every provider, in rotating order (a shared machine's load
            drifts); figures are medians over the rounds.
        merged: also run the merged-adapter server (:class:`MergedAdapterLoop`, on a second copy of
            the student).
    """
    from ..engine.atomic import atomic_write_text
    from ..engine.experts import ExpertBank
    from ..engine.generate import GenerationConfig, generate_detailed
    from ..engine.inject import inject_experts
    from ..engine.selection import parse_expert_spec
    from ..engine.student import load_student
    from .common import device_name, load_average, random_bank, versions

    if threads:
        torch.set_num_threads(threads)
    st = load_student(student, dtype=dtype, device=device)
    b = ExpertBank.load(bank, student=st) if bank else random_bank(st.model, [f"expert{i}" for i in range(experts)])
    handle = inject_experts(st.model, b)
    prompts, models = _prompts(requests), _models(list(b.names), requests)
    config = GenerationConfig(max_new_tokens=new_tokens, stop_strings=(), ignore_eos=True, batch_size=batch_size,
                              prompt_format=b.prompt_format)
    gates = torch.stack([parse_expert_spec(m, b) for m in models])  # (requests, E)
    bodies = [{"model": m, "prompt": p, "max_tokens": new_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for m, p in zip(models, prompts)]
    arrivals = arrival_times(requests, rate, seed)
    offline_name, server_name = "offline engine loop (all at once)", "server (Poisson arrivals)"
    merged_name = "merged-adapter server (Poisson arrivals)"
    names = [offline_name, server_name] + ([merged_name] if merged else [])
    rounds: list[dict] = []
    with contextlib.ExitStack() as stack:
        port, _ = stack.enter_context(_serving(st, handle, b, bank, config, max_queue=max(requests, 1)))
        if merged:
            plain = load_student(student, dtype=dtype, device=device)  # no experts injected: the merged weights
            merged_port, merged_loop = stack.enter_context(
                _serving(plain, None, b, bank, config, max_queue=max(requests, 1), merged=True))
        # warm-up, outside the figures: a short offline run and one request through each server
        generate_detailed(st.model, st.tokenizer, prompts[:2], handle=handle, gates=gates[:2], config=config)
        run_clients(port, bodies[:1], [0.0])
        if merged:
            run_clients(merged_port, bodies[:1], [0.0])
        for k in range(repeats):
            figures, texts, extra = {}, {}, {}
            for name in names[k % len(names):] + names[:k % len(names)]:
                if name == offline_name:
                    figures[name], texts[name] = _offline_round(st, handle, prompts, gates, config)
                elif name == server_name:
                    figures[name], texts[name] = _server_round(port, bodies, arrivals)
                else:
                    merges, merge_s = merged_loop.merges, merged_loop.merge_s
                    figures[name], texts[name] = _server_round(merged_port, bodies, arrivals)
                    extra = {"merges": merged_loop.merges - merges, "merge_s": round(merged_loop.merge_s - merge_s, 2)}
            agree = {name: round(sum(a == o for a, o in zip(texts[name], texts[offline_name])) / requests, 3)
                     for name in names[1:]}
            rounds.append({"figures": figures, "agreement": agree, **extra,
                           "ratio": figures[server_name]["tokens_per_s"] / figures[offline_name]["tokens_per_s"],
                           **({"ratio_merged": figures[server_name]["tokens_per_s"]
                               / figures[merged_name]["tokens_per_s"]} if merged else {})})

    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(st.device),
              **versions("fastapi", "uvicorn"), "load_average": load_average(), "student": str(st.path),
              "dtype": str(st.dtype), "bank": bank or f"{experts} random experts",
              "workload": {"requests": requests, "rate_per_s": rate, "new_tokens": new_tokens, "batch_size": batch_size,
                           "experts": len(b.names), "mixtures": sum("," in m for m in models), "seed": seed,
                           "offered_tokens_per_s": round(rate * new_tokens, 1), "repeats": repeats},
              "providers": {name: _medians([r["figures"][name] for r in rounds]) for name in names},
              "server_vs_offline": round(_quantile([r["ratio"] for r in rounds], 0.5), 2),
              "greedy_text_agreement": min(r["agreement"][server_name] for r in rounds), "rounds": rounds}
    if merged:
        report.update(server_vs_merged=round(_quantile([r["ratio_merged"] for r in rounds], 0.5), 2),
                      merged_text_agreement=min(r["agreement"][merged_name] for r in rounds),
                      merges=_quantile([r["merges"] for r in rounds], 0.5),
                      merge_s=_quantile([r["merge_s"] for r in rounds], 0.5))
    lines = _markdown(report, st.path.name)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "serve.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "serve.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def figures_table(providers: dict[str, dict], first: str = "provider") -> list[str]:
    """Markdown table of each provider's figures (``server_figures`` keys; medians over rounds)."""

    def cell(x):
        return "-" if x is None else f"{x:g}"

    lines = [f"| {first} | wall (s) | tokens | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, p in providers.items():
        lines.append(f"| {name} | {p['wall_s']:.2f} | {p['tokens']:.0f} | {p['tokens_per_s']:.1f} | "
                     f"{cell(p['ttft_p50_ms'])} | {cell(p['ttft_p99_ms'])} | {cell(p['tpot_p50_ms'])} | "
                     f"{cell(p['tpot_p99_ms'])} |")
    return lines


def _markdown(report: dict, student: str) -> list[str]:
    w = report["workload"]
    lines = ["# Serving under Poisson arrivals vs the offline engine loop", "",
             f"{report['date']}, {report['device']}, torch {report['torch']}, transformers {report['transformers']}, "
             f"fastapi {report['fastapi']}, uvicorn {report['uvicorn']}; load average {report['load_average']}", "",
             f"student {student} ({report['dtype']}), {report['bank']}; {w['requests']} requests ({w['mixtures']} "
             f"weighted two-expert mixtures, the rest single experts), {w['new_tokens']} new tokens each, greedy, "
             f"batch {w['batch_size']} rows; arrivals Poisson at {w['rate_per_s']:g}/s (offered "
             f"{w['offered_tokens_per_s']:g} tokens/s)", "", *figures_table(report["providers"])]
    lines += ["", f"Medians over {w['repeats']} rounds (each runs both, in alternating order). Server / offline "
              f"throughput: {report['server_vs_offline']:.2f}x (median of the rounds' ratios); greedy texts agree on "
              f"{100 * report['greedy_text_agreement']:.0f}% of the requests (the worst round).", "",
              "Offline TTFT is from the call's start (every request is there at once); it has no TPOT per request.",
              *([] if "server_vs_merged" not in report else [
                  "", f"The merged-adapter server serves one expert or mixture at a time merged into the weights "
                  f"(requests of other adapters wait until its batch is empty): {report['merges']:g} merges a round "
                  f"({report['merge_s']:g} s of merging, medians). Multi-adapter server / merged-adapter server "
                  f"throughput: {report['server_vs_merged']:.2f}x; its greedy texts agree with the offline loop's on "
                  f"{100 * report['merged_text_agreement']:.0f}% of the requests (its weights are rounded to "
                  f"{report['dtype'].removeprefix('torch.')} after merging; the offline loop adds the update "
                  f"unrounded)."]),
              "", f"Command: `modecotd-engine bench serve --requests {w['requests']} --rate {w['rate_per_s']:g} "
              f"--new-tokens {w['new_tokens']} --batch-size {w['batch_size']} --repeats {w['repeats']} --out DIR`"]
    return lines
