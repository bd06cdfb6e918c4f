"""`modecotd-engine serve`: OpenAI-compatible HTTP serving of the student, its experts and weighted mixtures.

One engine loop owns the student (``engine.serve_loop``); requests join its running batch at any
decoding step, each with its own gate row. The HTTP side is FastAPI under uvicorn (``engine.serve_api``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..engine.serve_loop import ServeConfig
from .infer import add_generation_args, add_model_args, generation_config, load_model

_EPILOG = """\
routes:
  GET  /v1/models             base, every expert, every mixture file (each with its parent)
  POST /v1/completions        prompt -> text ("stream": true for server-sent events)
  POST /v1/chat/completions   messages -> text (the student's chat template)
  GET  /health, GET /metrics  liveness; queue, running rows, tokens/s (Prometheus text)
"model" is base, an expert name, a mixture name (file stem) or a spec like "a=0.7,b=0.3".
Extensions: "mode", "weights", "vote", "task_type", "timeout" (docs/serving.md).

examples:
  modecotd-engine serve --bank runs/x/experts --mixtures runs/x/mixtures --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "word_math", "prompt": "Q: Ann has 3 pens ...\\nA:", "max_tokens": 64}'
"""


def register(subparsers) -> None:
    d = ServeConfig()
    p = subparsers.add_parser(
        "serve", help="serve the student, its experts and mixtures over an OpenAI-compatible HTTP API",
        description="An OpenAI-compatible server (FastAPI + uvicorn) in front of one engine loop with "
        "continuous batching: requests for different experts, mixtures and inline weighted specs decode in "
        "the same forward, each with its own gate row.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bank", required=True, help="expert bank directory (experts.json + experts.safetensors)")
    p.add_argument("--mixtures", default=None, metavar="DIR",
                   help="directory of mixture files (from 'modecotd-engine mix'); each is served by its file stem")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting to join the batch at most; more are answered 429 (default {d.max_queue})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help=f"seconds a request may wait and decode before it is ended with 408 "
                   f"(default {d.request_timeout_s:g})")
    p.add_argument("--log-requests", action="store_true",
                   help="log prompt and output texts (default: only ids, models, token counts and times)")
    add_model_args(p)
    add_generation_args(p)
    p.set_defaults(func=run, batch_size=32)


def build_server(args):
    """Load the student and bank, inject the experts, read the mixtures: a :class:`Server`, loop not started."""
    from ..engine.serve_api import ModelTable, Server
    from ..engine.serve_loop import ServeLoop

    generation_config(args)  # bad flags fail before the student loads
    serve = ServeConfig(max_queue=args.max_queue, request_timeout_s=args.request_timeout)
    student, bank, handle = load_model(args, need_bank=True)
    config = generation_config(args, bank)
    table = ModelTable(bank, args.bank, args.mixtures, mode=args.mode)
    loop = ServeLoop(student.model, student.tokenizer, handle, config, serve)
    return Server(loop, table, student.tokenizer, config, root=student.identity.get("name", "student"),
                  log_requests=args.log_requests)


def run(args) -> int:
    import uvicorn

    from ..engine.serve_api import build_app

    logging.getLogger("modecotd_engine").setLevel(logging.INFO)
    server = build_server(args)
    kinds = [e.kind for e in server.table.entries.values()]
    print(f"serving base, {kinds.count('expert')} experts and {kinds.count('mixture')} mixtures at "
          f"http://{args.host}:{args.port}/v1 (batch {server.config.batch_size} rows, queue {args.max_queue})",
          file=sys.stderr)
    server.loop.start()
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        server.loop.stop()
    return 0
