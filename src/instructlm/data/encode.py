"""Example + template + tokenizer -> token ids and labels.

Prompt and response are encoded separately and concatenated, so the boundary between the
prompt and the learned response is exact by construction. An end-of-sequence token is
appended to every response: that is what teaches the model to stop.

With `prompt_loss` the instruction and the template after it are learned too (Axolotl's
train_on_inputs; Shi et al., 2024, "Instruction Tuning With Loss Over Instructions"), but
never the prompt's opening (the template up to the instruction, a chat model's system
prompt, earlier turns): it is the same in every example, and shared prompts are computed
once only where no row learns them (batches.shared_prefix_length).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from instructlm.data.formats import Example
from instructlm.data.templates import Template, around_instruction, render_prompt
from instructlm.errors import InstructlmError

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips
MAX_LENGTH = 512  # tokens of an example, prompt and response, unless --max-length says


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_labels(self) -> int:
        """How many tokens it teaches: its response's, and with prompt loss its prompt's."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The length of each row it takes in a batch."""
        return (len(self.input_ids),)

    @property
    def weight(self) -> int:
        """Its share of a batch's mean loss averaged over the tokens taught (loss.AVERAGES);
        averaged per example, each has one share."""
        return self.n_labels


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair: its prompt with the chosen answer and with the rejected one, each
    encoded as a supervised example is (prompt masked, end token appended), and, once
    computed, the reference model's log-probabilities of both answers."""

    chosen: EncodedExample
    rejected: EncodedExample
    reference: tuple[float, float] | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        """The length of each row it takes in a batch: the chosen, then the rejected."""
        return (len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def weight(self) -> int:
        """Its share of a batch's mean loss, which is a mean over pairs."""
        return 1


def encode_prompt(prompt: str, tokenizer: Any, template: Template) -> list[int]:
    """Token ids of a rendered prompt, the same way for training and for asking."""
    return _encode_prompts([prompt], tokenizer, template)[0]


def _encode_prompts(prompts: list[str], tokenizer: Any, template: Template) -> list[list[int]]:
    # A chat-rendered prompt already holds the model's special tokens (BOS included, where the
    # model uses one); a plain-text prompt gets what the tokenizer adds by itself.
    return tokenizer(prompts, add_special_tokens=template.name != "chat")["input_ids"]


def _encode_responses(responses: list[str], tokenizer: Any) -> list[list[int]]:
    # The response is the user's text: a control token written in it ("<|im_end|>") is
    # taught as the text it is, not as the token that ends an answer.
    return tokenizer(responses, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def opening_length(example: Example, ids: list[int], template: Template, tokenizer: Any) -> int:
    """How many of `ids` (the prompt of `example`) come before its instruction: the same
    tokens for every instruction asked this way (after the same conversation). 0 where
    they cannot be told apart (a token that spans both)."""
    parts = around_instruction(template, example, tokenizer)
    if parts is None:
        return 0
    before = parts[0]
    # Without the space before the instruction first: most tokenizers make it part of
    # the instruction's first word, whichever word that is.
    for text in dict.fromkeys([before.rstrip(" "), before]):
        opening = encode_prompt(text, tokenizer, template)
        if len(opening) < len(ids) and ids[:len(opening)] == opening:
            return len(opening)
    return 0


def end_token_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise InstructlmError("the base model's tokenizer has no end-of-sequence token",
                              hint="choose a base model whose tokenizer defines eos_token")
    return int(tokenizer.eos_token_id)


def encode_example(example: Example, template: Template, tokenizer: Any, max_length: int,
                   end_token: bool = True, prompt_loss: bool = False) -> EncodedExample | None:
    """Ids and labels with the prompt masked (with `prompt_loss`, only its opening); None
    when truncation would leave no response.

    The response is followed by the end token, which is how the model learns to stop;
    `end_token=False` leaves it out, as the tutorial did (for comparisons).
    """
    return _encode_many([example], template, tokenizer, max_length, end_token, prompt_loss)[0]


def _encode_many(examples: list[Example], template: Template, tokenizer: Any, max_length: int,
                 end_token: bool, prompt_loss: bool = False) -> list[EncodedExample | None]:
    """encode_example of each, tokenized in one batch (several times faster for many)."""
    if not examples:
        return []
    prompts = _encode_prompts([render_prompt(template, ex, tokenizer) for ex in examples],
                              tokenizer, template)
    responses = _encode_responses([ex.response for ex in examples], tokenizer)
    end = [end_token_id(tokenizer)] if end_token else []
    out: list[EncodedExample | None] = []
    for ex, prompt_ids, response_ids in zip(examples, prompts, responses, strict=True):
        response_ids = [*response_ids, *end]
        room = max_length - len(prompt_ids)
        if room <= 0:
            out.append(None)
            continue
        masked = (opening_length(ex, prompt_ids, template, tokenizer) if prompt_loss
                  else len(prompt_ids))
        out.append(EncodedExample(
            input_ids=prompt_ids + response_ids[:room],
            labels=([IGNORE_INDEX] * masked + prompt_ids[masked:] + response_ids[:room]),
            truncated=len(response_ids) > room))
    return out


def encode_examples(examples: list[Example], template: Template, tokenizer: Any,
                    max_length: int, end_token: bool = True, prompt_loss: bool = False,
                    ) -> tuple[list[EncodedExample], list[str]]:
    """Encode many; return the kept ones and a warning for each dropped or cut example."""
    kept, warnings = [], []
    encoded = _encode_many(examples, template, tokenizer, max_length, end_token, prompt_loss)
    for ex, enc in zip(examples, encoded, strict=True):
        warnings += _warnings(ex, [enc], tokenizer, max_length)
        if enc is not None:
            kept.append(enc)
    return kept, warnings


def encode_pairs(examples: list[Example], template: Template, tokenizer: Any,
                 max_length: int, end_token: bool = True,
                 ) -> tuple[list[EncodedPair], list[str]]:
    """Encode the preference pairs among `examples` (those with a rejected answer); return
    the kept ones and a warning for each dropped or cut pair."""
    examples = [ex for ex in examples if ex.rejected]
    chosen = _encode_many(examples, template, tokenizer, max_length, end_token)
    rejected = _encode_many([replace(ex, response=ex.rejected) for ex in examples], template,
                            tokenizer, max_length, end_token)
    kept, warnings = [], []
    for ex, one, other in zip(examples, chosen, rejected, strict=True):
        warnings += _warnings(ex, [one, other], tokenizer, max_length)
        if one is not None and other is not None:
            kept.append(EncodedPair(one, other))
    return kept, warnings


def _warnings(example: Example, encoded: list[EncodedExample | None], tokenizer: Any,
              max_length: int) -> list[str]:
    """What the user should hear about one encoded example (or pair)."""
    out = []
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1]
    text = f"{example.instruction}{example.input}{example.response}{example.rejected}"
    written = [t for t in specials if t in text]
    if written:
        out.append(f"{example.source}: holds the model's control token {written[0]!r} as "
                   "text; the response is taught it as plain text, but check that you meant it")
    if any(enc is None for enc in encoded):
        out.append(f"{example.source}: dropped, the prompt alone is longer than "
                   f"--max-length {max_length} tokens")
    elif any(enc.truncated for enc in encoded if enc is not None):
        out.append(f"{example.source}: response cut to fit --max-length {max_length}; "
                   "the model will not learn to stop here")
    return out
