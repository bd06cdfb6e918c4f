"""benchmarks/answer_signal.py: the student's yes/no preference scored against the gold answers, on a
tiny student (the AUC and its helpers against hand-computed values, the scores against a direct
forward pass of each prompt alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "answer_signal.py"


def test_auc_and_its_standard_error():
    mod = load_script(SCRIPT)
    assert mod.auc([1.0, 2.0], [0.0, 3.0]) == 0.5  # 1>0, 2>0 win; 1<3, 2<3 lose
    assert mod.auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and mod.auc([0.0], [1.0]) == 0.0
    assert mod.auc([1.0], [1.0]) == 0.5  # a tie counts half
    with pytest.raises(ValueError, match="one record of each"):
        mod.auc([], [1.0])
    # Hanley-McNeil at A = 0.5 with 100 and 200 records: Q1 = 1/3, Q2 = 1/3
    want = ((0.25 + 99 * (1 / 3 - 0.25) + 199 * (1 / 3 - 0.25)) / 20000) ** 0.5
    assert mod.auc_stderr(0.5, 100, 200) == pytest.approx(want)


@pytest.mark.usefixtures("one_thread")
def test_answer_signal_scores_match_a_direct_forward(tiny_student_dir, base_model, tokenizer, tmp_path):
    mod = load_script(SCRIPT)
    data = tmp_path / "eval"
    data.mkdir()
    recs = [{"input": f"Is {i} {'even' if i % 3 else 'odd'}{'?' * (i % 4 + 1)}\nA:",
             "output": f"-->\n\n{'Yes' if i % 2 else 'No'} END"} for i in range(9)]
    (data / "parity.json").write_text(json.dumps(recs))
    (data / "sums.json").write_text(json.dumps([{"input": "1+1?", "output": "-->\n\n2 END"}]))
    out = tmp_path / "out"
    rc = mod.main(["--data", str(data), "--tasks", "parity", "--student", str(tiny_student_dir),
                   "--prompt-format", "plain", "--out", str(out)])
    r = json.loads((out / "signal.json").read_text())["tasks"]["parity"]
    assert rc == 0 and r["n"] == 9 and r["yes"] == 4 and r["constant"] == pytest.approx(5 / 9)
    yes, no = mod.answer_tokens(tokenizer)
    assert yes and no and not set(yes) & set(no)
    for rec, got in zip(recs, r["scores"]):  # batched and left padded vs each prompt alone
        ids = torch.tensor([mod.encode_prompt(tokenizer, rec["input"])])
        with torch.no_grad():
            logp = torch.log_softmax(base_model(ids).logits[0, -1].float(), -1)
        assert got == pytest.approx(float(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)), abs=1e-4)
    pos = [s for s, y in zip(r["scores"], r["gold_yes"]) if y]
    neg = [s for s, y in zip(r["scores"], r["gold_yes"]) if not y]
    assert r["auc"] == mod.auc(pos, neg)
    assert r["accuracy_as_is"] == pytest.approx(sum((s > 0) == y for s, y in zip(r["scores"], r["gold_yes"])) / 9)
    assert "| parity | 9 | 4 |" in (out / "signal.md").read_text()
    with pytest.raises(ValueError, match="not a yes/no task"):
        mod.main(["--data", str(data), "--tasks", "sums", "--student", str(tiny_student_dir),
                  "--prompt-format", "plain", "--out", str(out)])
