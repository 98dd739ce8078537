"""Example + template + tokenizer -> token ids and labels.

Prompt and response are encoded separately and concatenated, so the boundary between the
masked prompt and the learned response is exact by construction. An end-of-sequence token
is appended to every response: that is what teaches the model to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InstructlmError
from .formats import Example
from .templates import Template, render_prompt

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def encode_prompt(prompt: str, tokenizer: Any, template: Template) -> list[int]:
    """Token ids of a rendered prompt, the same way for training and for asking."""
    # A chat-rendered prompt already holds the model's special tokens (BOS included, where the
    # model uses one); a plain-text prompt gets what the tokenizer adds by itself.
    return tokenizer(prompt, add_special_tokens=template.name != "chat")["input_ids"]


def end_token_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise InstructlmError("the base model's tokenizer has no end-of-sequence token",
                              hint="choose a base model whose tokenizer defines eos_token")
    return int(tokenizer.eos_token_id)


def encode_example(example: Example, template: Template, tokenizer: Any, max_length: int,
                   end_token: bool = True) -> EncodedExample | None:
    """Ids and labels with the prompt masked; None when truncation would leave no response.

    The response is followed by the end token, which is how the model learns to stop;
    `end_token=False` leaves it out, as the tutorial did (for comparisons).
    """
    prompt_ids = encode_prompt(render_prompt(template, example, tokenizer), tokenizer, template)
    # The response is the user's text: a control token written in it ("<|im_end|>") is
    # taught as the text it is, not as the token that ends an answer.
    response_ids = tokenizer(example.response, add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]
    if end_token:
        response_ids = [*response_ids, end_token_id(tokenizer)]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return EncodedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def encode_examples(examples: list[Example], template: Template, tokenizer: Any,
                    max_length: int, end_token: bool = True,
                    ) -> tuple[list[EncodedExample], list[str]]:
    """Encode many; return the kept ones and a warning for each dropped or cut example."""
    kept, warnings = [], []
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1]
    for ex in examples:
        written = [t for t in specials if t in f"{ex.instruction}{ex.input}{ex.response}"]
        if written:
            warnings.append(f"{ex.source}: holds the model's control token {written[0]!r} as "
                            "text; the response is taught it as plain text, but check that "
                            "you meant it")
        enc = encode_example(ex, template, tokenizer, max_length, end_token)
        if enc is None:
            warnings.append(f"{ex.source}: dropped, the prompt alone is longer than "
                            f"--max-length {max_length} tokens")
            continue
        if enc.truncated:
            warnings.append(f"{ex.source}: response cut to fit --max-length {max_length}; "
                            "the model will not learn to stop here")
        kept.append(enc)
    return kept, warnings


def collate(batch: list[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch into tensors; padded positions carry no loss and no attention."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

