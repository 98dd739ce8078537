"""Answers: load a run (or an untuned base model) and decode instructions in batches.

Prompts are left-padded so a batch decodes together with the KV cache; answers come back in
input order, each with why it ended: "stop" (the model ended it, or a stop text appeared) or
"length" (it hit --max-new-tokens).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from instructlm.answering.decode_loop import answers_as_they_end, can_drop_finished
from instructlm.answering.textcut import TextCutter
from instructlm.data.encode import encode_prompt, opening_length
from instructlm.data.formats import Example
from instructlm.data.templates import Template, choose_template, render_prompt
from instructlm.errors import InstructlmError
from instructlm.model.adapters import is_adapter_run, load_merged
from instructlm.model.base import EMBEDDED, load_model, load_tokenizer, resolve_base
from instructlm.model.devices import pick_device
from instructlm.runs import is_run, read_run_info, recover_hidden

# Instructions decoded together. Answering is bound by reading the weights once per token, so a
# batch costs little more than one answer.
BATCH_SIZE = 32


# Below this, sampling is greedy decoding in all but name, and dividing the logits by the
# temperature overflows (1e-103 gave infinities, then a crash in sampling).
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int = 200
    beams: int = 1
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    no_repeat_ngram: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def check(self) -> None:
        """Refuse settings that cannot decode, before the model is loaded."""
        if self.beams < 1 or self.max_new_tokens < 1:
            raise InstructlmError("--beams and --max-new-tokens must be at least 1")
        if self.sample and (self.temperature < MIN_TEMPERATURE or not 0 < self.top_p <= 1):
            raise InstructlmError(f"--temperature must be at least {MIN_TEMPERATURE} and "
                                  "--top-p in (0, 1]",
                                  hint="for the most likely answer, leave out --sample")


@dataclass(frozen=True)
class Answer:
    instruction: str
    response: str
    finish_reason: str  # "stop" | "length"
    new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Answerer:
    """A model, its tokenizer and the template it was taught with."""

    def __init__(self, model: Any, tokenizer: Any, template: Template, name: str) -> None:
        # imports torch: only once a model is here
        from instructlm.model.weight_first import use_weight_first

        self.model = use_weight_first(model.eval())
        self.tokenizer = tokenizer
        self.template = template
        self.name = name

    def answer(self, items: Iterable[str | Example], decode: DecodeSettings = DecodeSettings(),
               batch_size: int = BATCH_SIZE,
               should_stop: Callable[[], bool] | None = None) -> Iterator[Answer]:
        """Answer instructions lazily, `batch_size` at a time, in input order; decoding ends
        early once `should_stop()` is true."""
        it = iter(items)
        while batch := list(itertools.islice(it, batch_size)):
            examples = [Example(x, "") if isinstance(x, str) else x for x in batch]
            yield from self._answer_batch(examples, decode, should_stop=should_stop)

    def prompt_ids(self, example: Example) -> list[int]:
        """The token ids the model sees before it answers `example`."""
        return encode_prompt(render_prompt(self.template, example, self.tokenizer),
                             self.tokenizer, self.template)

    def opening_length(self, example: Example, ids: list[int]) -> int:
        """How many of `ids` (the prompt of `example`) come before its instruction."""
        return opening_length(example, ids, self.template, self.tokenizer)

    def answer_streaming(self, item: str | Example, decode: DecodeSettings,
                         on_text: Callable[[str], None],
                         should_stop: Callable[[], bool] | None = None) -> Answer:
        """Answer one instruction, passing the text to `on_text` as it is generated.

        Greedy or sampled decoding without stop texts (beam search cannot stream: its best
        beam is known only at the end); the whole Answer is returned at the end. Decoding
        ends early once `should_stop()` is true (a client went away, a stop text appeared).
        """
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        example = Example(item, "") if isinstance(item, str) else item
        streamer = Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return list(self._answer_batch([example], decode, streamer, should_stop))[0]

    def _answer_batch(self, examples: list[Example], decode: DecodeSettings,
                      streamer: Any = None,
                      should_stop: Callable[[], bool] | None = None) -> Iterator[Answer]:
        """Answers to `examples` in their order, each as soon as it and those before it are
        done (with `generate`: all at the end)."""
        import torch

        tok = self.tokenizer
        prompts = [self.prompt_ids(ex) for ex in examples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        eos_ids = self.end_ids()
        if decode.sample:
            torch.manual_seed(decode.seed)
        device = self.model.device
        if can_drop_finished(self.model, decode.beams, decode.no_repeat_ngram):
            if streamer:  # it skips what it is given first: the prompt, as `generate` does
                streamer.put(ids)
            heard = _StopTexts(tok, decode.stop, len(examples))

            def on_token(row: int, token: int) -> bool:
                if streamer:
                    streamer.put(torch.tensor([token]))
                return heard(row, token)

            ready: dict[int, list[int]] = {}  # ended, waiting for those before them
            given = 0
            for row, tokens in answers_as_they_end(
                    self.model, ids.to(device), mask.to(device), decode.max_new_tokens,
                    eos_ids, decode.sample, decode.temperature, decode.top_p,
                    on_token=on_token if streamer or decode.stop else None,
                    should_stop=should_stop):
                ready[row] = tokens
                while given in ready:
                    yield self.finish(examples[given], ready.pop(given), eos_ids, decode)
                    given += 1
            if streamer:
                streamer.end()
            return
        out = self._generate(ids.to(device), mask.to(device), decode, streamer, should_stop)
        for ex, row in zip(examples, out, strict=True):
            yield self.finish(ex, row[width:].tolist(), eos_ids, decode)

    def generate_tokens(self, prompt: list[int], decode: DecodeSettings, streamer: Any,
                        should_stop: Callable[[], bool] | None = None) -> None:
        """One prompt's answer by `generate`, its tokens handed to `streamer` as they come
        (for families that cannot decode in the faster loop)."""
        import torch

        ids = torch.tensor([prompt], device=self.model.device)
        if decode.sample:
            torch.manual_seed(decode.seed)
        self._generate(ids, torch.ones_like(ids), decode, streamer, should_stop)

    def _generate(self, ids: Any, mask: Any, decode: DecodeSettings, streamer: Any,
                  should_stop: Callable[[], bool] | None) -> Any:
        import torch
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=decode.max_new_tokens, num_beams=decode.beams,
            do_sample=decode.sample,
            temperature=decode.temperature if decode.sample else None,
            top_p=decode.top_p if decode.sample else None, top_k=None,
            no_repeat_ngram_size=decode.no_repeat_ngram or None,
            eos_token_id=self.end_ids(), pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(decode.stop) or None)
        with torch.inference_mode():
            return self.model.generate(input_ids=ids, attention_mask=mask,
                                       generation_config=config, streamer=streamer,
                                       stopping_criteria=_asked(should_stop),
                                       tokenizer=self.tokenizer if decode.stop else None)

    def end_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    def finish(self, ex: Example, tokens: list[int], eos_ids: list[int],
                decode: DecodeSettings) -> Answer:
        end = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        reason = "stop" if end is not None else "length"
        tokens = tokens[:end] if end is not None else tokens
        # Cut by the same rule as a streamed answer, so that both read the same.
        cutter = TextCutter(decode.stop)
        text = cutter.feed(self.tokenizer.decode(tokens, skip_special_tokens=True))
        text += cutter.finish()
        return Answer(ex.instruction, text, "stop" if cutter.stopped else reason, len(tokens))


class _StopTexts:
    """Whether a row's answer so far holds a stop text, told token by token: the decoding
    loop then ends that row, as the model's end token would."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], rows: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    def __call__(self, row: int, token: int) -> bool:
        if not self.stops:
            return False
        self.tokens[row].append(token)
        # The whole answer is decoded again: a token's text can depend on those before it.
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return any(stop in text for stop in self.stops)


def _asked(should_stop: Callable[[], bool] | None) -> Any:
    """`should_stop` as stopping criteria for `generate`."""
    if should_stop is None:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Asked(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.full((input_ids.shape[0],), bool(should_stop()),
                              dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Asked()])


def load_answerer(spec: str | None, template: str | Template | None = None,
                  trust_remote_code: bool = False, device: str = "auto") -> Answerer:
    """A trained run folder, or a base model (folder, hub id, or the embedded default), on
    `device` (auto: a CUDA GPU if there is one, else the CPU).

    A run always uses the template it was trained with; a base model uses `template` (a name,
    a custom string, or a run's Template), or its own chat template, or `seed-en`.
    """
    where = pick_device(device)  # a wrong name is refused before anything loads
    if spec and not Path(spec).exists() and Path(spec).parent.is_dir():
        recover_hidden(Path(spec))  # a run a killed command left moved aside
    if spec and is_run(spec):
        info = read_run_info(spec)
        if template is not None:
            raise InstructlmError("--template is only for base models: a run is always asked "
                                  "with the template it was trained with")
        if is_adapter_run(spec):
            model = load_merged(spec, info["base"]["spec"], trust_remote_code)
        else:
            model = load_model(spec)
        return Answerer(model.to(where), load_tokenizer(spec),
                        Template.from_dict(info["template"]), Path(spec).name)
    return _load_base(spec, template, trust_remote_code, where)


def load_untuned_base(run: str, trust_remote_code: bool = False,
                      device: str = "auto") -> Answerer:
    """A run's base model before tuning, asked with the run's template (for comparisons)."""
    info = read_run_info(run)
    answerer = _load_base(info["base"]["spec"], Template.from_dict(info["template"]),
                          trust_remote_code, pick_device(device))
    answerer.name = f"{info['base']['name']} (untuned)"
    return answerer


def _load_base(spec: str | None, template: str | Template | None,
               trust_remote_code: bool, device: str) -> Answerer:
    source = resolve_base(spec)
    tokenizer = load_tokenizer(source, trust_remote_code)
    chosen = template if isinstance(template, Template) else choose_template(template, tokenizer)
    model = load_model(source, trust_remote_code)
    return Answerer(model.to(device), tokenizer, chosen, spec or EMBEDDED)

