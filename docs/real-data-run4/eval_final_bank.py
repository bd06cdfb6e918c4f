# Evaluate run 4's final (step 960) bank on the evaluation records with reproduce's own settings.
import json
from pathlib import Path
from modecotd_engine.engine.reproduce import ReproduceConfig, _Session
from modecotd_engine.engine.experts import ExpertBank
from modecotd_engine.engine.inject import inject_experts

out = Path("/tmp/rep/r4")
cfg = ReproduceConfig(**{k: v for k, v in json.loads((out / "config.json").read_text())["config"].items()
                         if k not in ("tasks", "unseen", "skip", "overrides")})
rec = json.loads((out / "config.json").read_text())
cfg.tasks = tuple(rec["config"]["tasks"]); cfg.overrides = rec["config"]["overrides"]; cfg.progress = False
s = _Session(cfg, out)
student, _, own = s._load()
own.remove()
bank = ExpertBank.load(out / "experts" / "bank", student=student)
h = inject_experts(student.model, bank)
seen = rec["seen"]
s._evaluate("experts-final", seen, {t: bank.weights_vector(t) for t in seen}, handle=h, dest=Path("/tmp/rep/r4-final-eval"))
