"""The GPU run in one call: GPU tests, kernel benchmark, training and inference benchmarks, one report.

    python benchmarks/gpu_suite.py --out /tmp/gpu-suite                 # H100/H200: under 8 minutes
    python benchmarks/gpu_suite.py --rehearse --out /tmp/gpu-rehearsal  # the same plumbing on a CPU

Made for a GPU lent for one short run, with no network and only the working tree at hand: nothing is
downloaded and no checkpoint is needed. The parts, in order, each in its own process with its own
time limit (a part that hangs is killed with its process group, recorded as ``timeout``, and the
suite goes on; one that fails is recorded as ``failed`` with its log):

``env``      device, driver, library versions, TF32 setting.
``tests``    tests/test_kernels_gpu.py and tests/test_router_gpu.py (the compiled kernels against the
             float64 oracle) through pytest: junit.xml, and tests.jsonl written test by test, so a
             killed run still tells which tests passed.
``kernels``  the kernel benchmark's target cases, both compositions (output, weight), through
             ``modecotd_engine.bench.kernels.run_kernel_bench``: do_bench timings, and decode also
             back to back with one sync and from a CUDA graph; kernels.json is rewritten per case.
``student``  a SmolLM2-135M (576 hidden, 1536 MLP, 30 layers, 9 heads, 3 KV heads, vocab 49152) with
             random weights and a byte-level tokenizer, written to a temporary directory (removed at
             the end, not part of the report).
``train``    ``bench.train.run_train_bench`` on it: the distillation loop against PEFT + Trainer.
``infer``    ``bench.infer.run_infer_bench`` on it: one mixed-expert batch against PEFT.

Everything lands under --out: suite.json and suite.md (device, versions, date, the command, each
part's status, time and summary), and one folder per part with its own JSON, markdown and log.
The default time limits add up to under 8 minutes; --budget caps the whole run (a part that would
start with less than a few seconds left is skipped and recorded as such).

``--rehearse`` runs the same parts on the CPU with tiny shapes (the kernels under Triton's
interpreter when TRITON_INTERPRET=1, else the torch providers; a two-layer student; the GPU test
files skip there, so two interpreter tests stand in) in well under a minute:
tests/test_gpu_suite.py runs it, so the suite is exercised wherever the tests run.

Loaded as a pytest plugin (``-p gpu_suite``, which the ``tests`` part does), this module appends one
JSON line per test report to the file named by GPU_SUITE_TEST_LOG.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# (part, time limit in seconds on a GPU, in a rehearsal)
PARTS = [("env", 30, 60), ("tests", 150, 90), ("kernels", 150, 90), ("student", 40, 60), ("train", 60, 90),
         ("infer", 60, 90)]
BUDGET_S = 465  # the whole GPU run, start to report; the parts' limits add up to 490
MIN_PART_S = 8  # a part is not started with less time than this left
GPU_TESTS = ["tests/test_kernels_gpu.py", "tests/test_router_gpu.py"]
# On a CPU the GPU test files skip as a whole; these interpreter tests run the same pytest plumbing.
REHEARSAL_TESTS = ["tests/test_kernels_triton.py::test_shapes[16-16-1-1]",
                   "tests/test_router_triton.py::test_single_expert[1-7-1-output]"]
PER_TEST_TIMEOUT_S = 120  # with pytest-timeout installed: one hung test fails alone
# With pytest-xdist installed (GPU runs only), the GPU tests run in this many processes: most of their
# time is Triton compiling, one kernel at a time per process, on a machine with CPU cores to spare.
TEST_WORKERS = 6
TINY_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
TAIL_CHARS = 3000


# ---------------------------------------------------------------------------------------------
# pytest plugin: one JSON line per test report, flushed as it comes
# ---------------------------------------------------------------------------------------------


def _log_report(report, when: str) -> None:
    path = os.environ.get("GPU_SUITE_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # with xdist the controller writes every report
        return
    line = {"nodeid": report.nodeid, "when": when, "outcome": report.outcome,
            "seconds": round(getattr(report, "duration", 0.0) or 0.0, 3)}
    if report.outcome != "passed":
        text = str(report.longrepr) if report.longrepr is not None else ""
        line["message"] = text[-1500:]
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def pytest_runtest_logreport(report):
    """Each test's outcome (setup and teardown only when they did not pass)."""
    if report.when == "call" or report.outcome != "passed":
        _log_report(report, report.when)


def pytest_collectreport(report):
    """A test file that skips as a whole (no CUDA) or fails to import."""
    if report.outcome != "passed":
        _log_report(report, "collect")


# ---------------------------------------------------------------------------------------------
# the parts (each runs in a process of its own: ``gpu_suite.py --part NAME``)
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def _versions() -> dict:
    import importlib

    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "peft", "safetensors", "pytest"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # absent or broken: recorded as such
            out[name] = None
    return out


def part_env(args, out: Path) -> dict:
    import torch

    info = {"versions": _versions(), "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "MODECOTD_TRITON_TUNE", "TRITON_CACHE_DIR")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as err:  # no nvidia-smi: the torch fields above still say what the device is
            info["nvidia_smi"] = f"{type(err).__name__}: {err}"
    else:
        from modecotd_engine.bench.common import device_name

        info["device"] = device_name(torch.device("cpu"))
    return info


def _rehearsal_cases():
    from modecotd_engine.bench.kernels import Case

    shape = "tiny 64->96"
    return [Case(shape, 64, 96, 4, 3, 4, "dense", "fwd", "T", mode="output"),
            Case(shape, 64, 96, 4, 3, 4, "one-hot-grouped", "fwd+bwd", "T", mode="weight")]


def part_kernels(args, out: Path) -> dict:
    import torch

    from modecotd_engine.bench.kernels import run_kernel_bench

    if args.rehearse:
        torch.set_num_threads(1)
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        providers = ["base", "triton", "torch", "loop"] if interpreting else ["base", "torch", "loop"]
        report = run_kernel_bench(out, quick=True, device="cpu", cases=_rehearsal_cases(), providers=providers)
    else:
        report = run_kernel_bench(out, quick=True)
    return kernels_summary(report)


def kernels_summary(report: dict) -> dict:
    rows = report["rows"]
    failed = sorted({f"{r['provider']} {r['shape']} T={r['t']} {r['gates']} {r['pass']} {r.get('mode')}"
                     for r in rows if r["median_ms"] is None})
    decode = [{k: r.get(k) for k in ("shape", "t", "gates", "pass", "mode", "provider", "median_ms", "wall_ms",
                                     "wall_ratio_to_base", "graph_ms", "graph_ratio_to_base")}
              for r in rows if r.get("wall_ms") is not None]
    return {"complete": report.get("complete", True), "cases": report.get("cases"),
            "rows": len(rows), "failed_rows": failed, "targets": report.get("targets", []), "decode": decode,
            "device": report["env"]["device"], "device_type": report["env"]["device_type"],
            "dtype": report.get("dtype")}


def part_student(args, out: Path) -> dict:
    import torch

    from modecotd_engine.bench.common import SMOLLM2_135M, write_random_student

    if args.rehearse:
        torch.set_num_threads(1)
        config, dtype, device = TINY_STUDENT, torch.float32, "cpu"
    else:
        config, dtype, device = SMOLLM2_135M, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    path = write_random_student(Path(args.student_dir), config, dtype=dtype, device=device)
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"config": config, "dtype": str(dtype), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}


def part_train(args, out: Path) -> dict:
    import torch

    from modecotd_engine.bench.train import run_train_bench

    if args.rehearse:
        torch.set_num_threads(1)
        report = run_train_bench(out, student=args.student_dir, steps=3, batch_size=2, quick=True, dtype="float32")
    else:
        report = run_train_bench(out, student=args.student_dir, steps=10, batch_size=8, quick=True)
    return {"dtype": report["dtype"], "steps": report["steps"], "batch_size": report["batch_size"],
            "engine_tokens_per_s": report["ours"]["tokens_per_s"],
            "baselines": {r["label"]: {"tokens_per_s": r["tokens_per_s"], "speedup": r["speedup"]}
                          for r in report["peft_trainer"]},
            "speedup": report.get("speedup")}


def part_infer(args, out: Path) -> dict:
    from modecotd_engine.bench.infer import run_infer_bench

    if args.rehearse:
        report = run_infer_bench(out, student=args.student_dir, quick=True, threads=1, dtype="float32")
    else:
        report = run_infer_bench(out, student=args.student_dir, quick=True)
    return {"dtype": report["dtype"], "providers": {k: {"tokens_per_s": v["tokens_per_s"], "ttft_mean_s": v["ttft_mean_s"]}
                                                    for k, v in report["providers"].items()},
            "speedup_vs_peft_best": report.get("speedup_vs_peft_best"),
            "greedy_text_agreement": report.get("greedy_text_agreement")}


PART_FUNCS = {"env": part_env, "kernels": part_kernels, "student": part_student, "train": part_train,
              "infer": part_infer}


def run_part(args) -> int:
    out = Path(args.out) / args.part
    out.mkdir(parents=True, exist_ok=True)
    summary = PART_FUNCS[args.part](args, out)
    _write_json(out / "part.json", {"part": args.part, "summary": summary})
    return 0


# ---------------------------------------------------------------------------------------------
# the orchestration
# ---------------------------------------------------------------------------------------------


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-TAIL_CHARS:]


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[str, int | None, float]:
    """Run ``cmd`` in its own process group with output to ``log``; on timeout the group is killed.
    Returns (status, return code, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return "timeout", None, time.perf_counter() - t0
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - t0


def _child_env(args, part_dir: Path) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["GPU_SUITE_TEST_LOG"] = str(part_dir / "tests.jsonl")
    if args.rehearse:  # the CPU, also on a machine with a GPU: the GPU test files skip, the kernels interpret
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def _tests_cmd(args, part_dir: Path) -> list[str]:
    import importlib.util

    files = GPU_TESTS + (REHEARSAL_TESTS if args.rehearse else [])
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "gpu_suite",
           f"--junitxml={part_dir / 'junit.xml'}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    if not args.rehearse and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(TEST_WORKERS)]
    return cmd


def tests_summary(part_dir: Path) -> dict:
    """Counts by outcome and the failures, from tests.jsonl (written test by test) and junit.xml."""
    reports = []
    log = part_dir / "tests.jsonl"
    if log.exists():
        reports = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for r in reports:
        if r["when"] == "collect":  # a whole file: skipped (no CUDA) or not importable
            key = "file skipped" if r["outcome"] == "skipped" else "collection error"
        else:
            key = "error" if r["outcome"] == "failed" and r["when"] != "call" else r["outcome"]
        counts[key] = counts.get(key, 0) + 1
    junit = None
    path = part_dir / "junit.xml"
    if path.exists():
        try:
            suite = ET.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            junit = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            junit["seconds"] = float(suite.get("time", 0.0))
        except (ET.ParseError, AttributeError, ValueError) as err:
            junit = {"unreadable": str(err)}
    failures = [{"nodeid": r["nodeid"], "when": r["when"], "message": r.get("message", "")[-600:]}
                for r in reports if r["outcome"] == "failed"]
    slowest = sorted((r for r in reports if r["when"] == "call"), key=lambda r: -r["seconds"])[:10]
    return {"counts": counts, "junit": junit, "failures": failures,
            "slowest": [{"nodeid": r["nodeid"], "seconds": r["seconds"]} for r in slowest]}


def _part_summary(name: str, part_dir: Path) -> dict | None:
    if name == "tests":
        return tests_summary(part_dir)
    path = part_dir / "part.json"
    if path.exists():
        return json.loads(path.read_text())["summary"]
    if name == "kernels" and (part_dir / "kernels.json").exists():  # stopped part-way: the rows so far
        return kernels_summary(json.loads((part_dir / "kernels.json").read_text()))
    return None


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or None
    except Exception:  # no git or no repository (a copy of the working tree)
        return None


def run_suite(args, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    budget = args.budget if args.budget is not None else (180 if args.rehearse else BUDGET_S)
    deadline = start + budget
    own_student_dir = args.student_dir is None
    if own_student_dir:
        args.student_dir = tempfile.mkdtemp(prefix="gpu-suite-student-")
    only = set(args.only.split(",")) if args.only else None
    report = {"suite": "gpu", "rehearse": args.rehearse,
              "command": " ".join(["python", "benchmarks/gpu_suite.py", *argv]),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "git_commit": _git_commit(), "budget_s": budget, "env": None, "parts": []}
    try:
        for name, gpu_limit, rehearsal_limit in PARTS:
            if only is not None and name not in only:
                continue
            part_dir = out / name
            part_dir.mkdir(parents=True, exist_ok=True)
            for stale in ("part.json", "tests.jsonl", "junit.xml"):
                (part_dir / stale).unlink(missing_ok=True)
            limit = rehearsal_limit if args.rehearse else gpu_limit
            left = deadline - time.perf_counter()
            entry = {"part": name, "status": None, "rc": None, "seconds": 0.0, "timeout_s": None,
                     "log": f"{name}/log.txt", "summary": None, "log_tail": None}
            if left < MIN_PART_S:
                entry["status"] = "skipped (out of time)"
                report["parts"].append(entry)
                continue
            timeout = min(limit, left)
            if name == "tests":
                cmd = _tests_cmd(args, part_dir)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(out),
                       "--student-dir", str(args.student_dir)] + (["--rehearse"] if args.rehearse else [])
            print(f"[gpu suite] {name}: up to {timeout:.0f} s ...", flush=True)
            status, rc, seconds = _run(cmd, part_dir / "log.txt", timeout, _child_env(args, part_dir))
            if name == "tests" and status == "failed" and rc in (1, 5):
                status = "tests failed" if rc == 1 else "no tests ran"
            entry.update(status=status, rc=rc, seconds=round(seconds, 1), timeout_s=round(timeout, 1))
            try:
                entry["summary"] = _part_summary(name, part_dir)
            except Exception as err:  # a summary that cannot be read must not lose the others
                entry["summary"] = {"unreadable": f"{type(err).__name__}: {err}"}
            if status != "ok":
                entry["log_tail"] = _tail(part_dir / "log.txt")
            if name == "env" and entry["summary"]:
                report["env"] = entry["summary"]
            report["parts"].append(entry)
            print(f"[gpu suite] {name}: {status} in {seconds:.0f} s", flush=True)
            _write_report(out, report, start)
    finally:
        if own_student_dir:
            shutil.rmtree(args.student_dir, ignore_errors=True)
    report["ok"] = all(p["status"] == "ok" for p in report["parts"])
    _write_report(out, report, start)
    print((out / "suite.md").read_text())
    return 0 if report["ok"] else 1


def _write_report(out: Path, report: dict, start: float) -> None:
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(out / "suite.json", report)
    tmp = out / "suite.md.tmp"
    tmp.write_text(render_markdown(report))
    tmp.replace(out / "suite.md")


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def render_markdown(report: dict) -> str:
    env = report.get("env") or {}
    versions = env.get("versions") or {}
    lines = [
        "# GPU suite" + (" (CPU rehearsal)" if report["rehearse"] else ""), "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; {report.get('seconds', 0):.0f} s of a {report['budget_s']} s budget"
        + (f"; commit {report['git_commit'][:12]}" if report.get("git_commit") else ""),
        f"- device: {env.get('device', '?')}" + (f" (sm_{env['capability'].replace('.', '')}, {env['sms']} SMs, "
                                                  f"{env['memory_gib']} GiB)" if env.get("capability") else "")
        + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else ""),
        "- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items() if v) or "?")
        + (f"; CUDA {env['torch_cuda']}" if env.get("torch_cuda") else "")
        + (f"; TF32 matmuls {'on' if env.get('allow_tf32') else 'off'}" if env else ""),
        "", "| part | status | seconds | limit (s) |", "| --- | --- | ---: | ---: |",
    ]
    for p in report["parts"]:
        lines.append(f"| {p['part']} | {p['status']} | {p['seconds']:.0f} | {_fmt(p['timeout_s'], '.0f')} |")
    parts = {p["part"]: p for p in report["parts"]}
    tests = (parts.get("tests") or {}).get("summary")
    if tests:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(tests["counts"].items())) or "no test reports"
        lines += ["", "## GPU tests", "", f"{counts} (tests/test_kernels_gpu.py, tests/test_router_gpu.py; "
                  "junit.xml and tests.jsonl in tests/)."]
        for f in tests["failures"][:20]:
            msg = f["message"].strip().splitlines()[-1] if f["message"].strip() else ""
            lines.append(f"- FAILED `{f['nodeid']}` ({f['when']}): {msg[:300]}")
    kern = (parts.get("kernels") or {}).get("summary")
    if kern:
        state = "complete" if kern["complete"] else f"stopped after {kern['rows']} rows of {kern['cases']} cases"
        lines += ["", "## Kernel benchmark", "", f"{kern['device']}, {kern['dtype']}, {state}; every row in "
                  "kernels/kernels.md.", "", "| target | limit | measured | met |", "| --- | --- | --- | --- |"]
        for t in kern["targets"]:
            op = "<=" if t["kind"] == "ratio<=" else ">="
            met = {True: "yes", False: "NO", None: "-"}[t["met"]]
            lines.append(f"| {t['target']} | {op} {t['limit']} | {_fmt(t['measured'])} | {met}"
                         + (f" ({t['note']})" if t["note"] else "") + " |")
        if kern["decode"]:
            timer = "do_bench" if kern["device_type"] == "cuda" else "rounds"
            lines += ["", f"Decode: {timer} median, then back to back with one sync (wall) and replayed from a CUDA "
                      "graph (graph), ms per call (x base):", "",
                      f"| shape | T | gates | pass | mode | provider | {timer} | wall | graph |",
                      "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |"]

            def ms(v, ratio):
                return "-" if v is None else f"{v:.3f} ({_fmt(ratio)}x)"

            for d in kern["decode"]:
                lines.append(f"| {d['shape']} | {d['t']} | {d['gates']} | {d['pass']} | {d['mode']} | {d['provider']} | "
                             f"{_fmt(d['median_ms'], '.3f')} | {ms(d['wall_ms'], d['wall_ratio_to_base'])} | "
                             f"{ms(d['graph_ms'], d['graph_ratio_to_base'])} |")
        if kern["failed_rows"]:
            lines += ["", "Providers that failed: " + "; ".join(kern["failed_rows"][:20])]
    train = (parts.get("train") or {}).get("summary")
    if train:
        lines += ["", "## Training (random-weight student)", "",
                  f"engine {train['engine_tokens_per_s']:.0f} supervised tokens/s ({train['dtype']}, {train['steps']} "
                  f"steps of batch {train['batch_size']})"
                  + "".join(f"; {label}: {b['tokens_per_s']:.0f} tokens/s, engine {b['speedup']:.2f}x"
                            for label, b in train["baselines"].items()) + ". Details in train/train-bench.md."]
    infer = (parts.get("infer") or {}).get("summary")
    if infer:
        lines += ["", "## Inference (random-weight student)", "", "| provider | tokens/s | TTFT mean (s) |",
                  "| --- | ---: | ---: |"]
        for name, p in infer["providers"].items():
            lines.append(f"| {name} | {p['tokens_per_s']:.1f} | {p['ttft_mean_s']:.3f} |")
        lines += ["", f"ours (mixed batch) / PEFT best: {_fmt(infer['speedup_vs_peft_best'])}x. Details in "
                  "infer/infer.md."]
    bad = [p for p in report["parts"] if p["status"] != "ok" and p.get("log_tail")]
    for p in bad:
        lines += ["", f"## {p['part']}: {p['status']} (end of {p['log']})", "", "```",
                  p["log_tail"][-1500:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the same parts on the CPU with tiny shapes (well under a minute)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {BUDGET_S}; 180 when rehearsing)")
    p.add_argument("--only", default=None,
                   help="comma-separated parts to run (of " + ", ".join(n for n, *_ in PARTS) + "; train and infer "
                   "need student)")
    p.add_argument("--student-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=sorted(PART_FUNCS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args)
    return run_suite(args, argv)


if __name__ == "__main__":
    sys.exit(main())
