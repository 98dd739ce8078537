"""What `instructlm serve` may be asked: its settings, read by the command line too."""

from __future__ import annotations

from dataclasses import dataclass

from instructlm.errors import InstructlmError

BODY_TIMEOUT_S = 15.0  # to send the whole body of a request: else 408
SHUTDOWN_GRACE_S = 30.0  # on SIGTERM or Ctrl-C: running answers get this long to finish
# Key/value positions the batch may hold: its rows are padded to the widest, so one long
# prompt among short ones would otherwise multiply the memory by the batch's size.
MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class ServeSettings:
    max_tokens: int = 256  # the most new tokens of one answer, and the default
    max_prompt_tokens: int = 2048  # tokens of one prompt, after the template
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' when set
    body_timeout_s: float = BODY_TIMEOUT_S
    # Answers decoded together in one loop. On a CPU a step of 32 costs a few times a step
    # of one (the weights are read once a step), as batched `ask` does.
    max_batch: int = 32
    max_queue: int = 64  # requests waiting for a place in the batch; more: 429
    max_batch_tokens: int = MAX_BATCH_TOKENS  # rows x the widest row's prompt and answer
    queue_timeout_s: float = 60.0  # a request waiting longer for a place: 503

    def check(self) -> None:
        """Refuse settings that cannot serve, before the model is loaded."""
        if self.max_tokens < 1 or self.max_prompt_tokens < 1:
            raise InstructlmError("--max-tokens and --max-prompt-tokens must be at least 1")
        if self.max_batch < 1 or self.max_queue < 1:
            raise InstructlmError("--max-batch and --max-queue must be at least 1")
        if self.max_batch_tokens < 1:
            raise InstructlmError("--max-batch-tokens must be at least 1")
        if self.queue_timeout_s <= 0:
            raise InstructlmError("--queue-timeout must be above 0 seconds")
        if self.body_timeout_s <= 0:
            raise InstructlmError("the body timeout must be above 0 seconds")
