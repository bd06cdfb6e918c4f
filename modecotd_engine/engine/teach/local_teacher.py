"""``LocalTeacher``: a local Hugging Face causal LM as teacher, batched ``model.generate`` with left padding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .teacher import Completion, SampleConfig, TeachError


class LocalTeacher:
    """A local Hugging Face causal LM as teacher (loaded through ``student.load_student``).

    Args:
        source: a model directory, None for the built-in student, or an already loaded ``Student``.
        batch_size: questions per ``generate`` call (each expands to K sequences when sampling).
        chat: apply the tokenizer's chat template to the prompt; None = when the tokenizer has one.
        dtype, device: passed to ``load_student``.
    """

    def __init__(
        self,
        source: str | Path | None | Any = None,
        *,
        batch_size: int = 8,
        chat: bool | None = None,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        if batch_size < 1:
            raise TeachError("batch_size must be >= 1")
        if source is not None and hasattr(source, "model") and hasattr(source, "tokenizer"):
            student = source
        else:
            from ..student import StudentError, load_student

            try:
                student = load_student(source, dtype=dtype, device=device)
            except StudentError as exc:
                raise TeachError(f"cannot load the teacher model: {exc}") from None
        self.model = student.model
        self.tokenizer = student.tokenizer
        self.batch_size = batch_size
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise TeachError("the teacher's tokenizer has no chat template; use plain text prompts")
        self.chat = has_template if chat is None else chat
        name = getattr(student, "path", None) or getattr(self.model.config, "_name_or_path", "") or "local model"
        self.description = f"local {name}"
        self._stats: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def _render(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def complete(self, jobs: Sequence[tuple[int, str]], config: SampleConfig) -> Iterator[Completion]:
        """Batched generation; yields every question of a batch once the batch is done."""
        import torch
        from transformers import GenerationConfig

        from ..data import pad_token_id

        tok = self.tokenizer
        try:
            pad_id = pad_token_id(tok)
        except ValueError:
            raise TeachError("the teacher's tokenizer has neither a pad nor an eos token") from None
        do_sample = config.temperature > 0
        # Greedy decoding gives one answer; K copies of it would only be removed as duplicates.
        n = config.samples if do_sample else 1
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=n,
            pad_token_id=pad_id,
            eos_token_id=tok.eos_token_id,
        )
        if do_sample:
            # Pure temperature sampling: no top-k / top-p truncation unless a template asks for it.
            gen_kwargs.update(temperature=config.temperature, top_k=0, top_p=1.0)
        gen_config = GenerationConfig(**gen_kwargs)

        rendered = [(index, self._render(prompt)) for index, prompt in jobs]
        # Similar lengths share a batch, so left padding wastes little.
        rendered.sort(key=lambda item: len(item[1]))
        device = next(self.model.parameters()).device
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in range(0, len(rendered), self.batch_size):
                batch = rendered[start : start + self.batch_size]
                enc = tok([text for _, text in batch], return_tensors="pt", padding=True,
                          add_special_tokens=not self.chat)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                if config.seed is not None:
                    # Seed per batch (by its first question) so a resumed run samples the same way.
                    torch.manual_seed(config.seed + batch[0][0])
                with torch.inference_mode():
                    out = self.model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
                self._stats["generate_calls"] += 1
                self._stats["sequences"] += len(texts)
                for i, (index, _) in enumerate(batch):
                    yield Completion(index, texts[i * n : (i + 1) * n])
        finally:
            tok.padding_side = old_side
