"""What `instructlm serve` may be asked: its settings, read by the command line too."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InstructlmError

BODY_TIMEOUT_S = 15.0  # to send the whole body of a request: else 408


@dataclass(frozen=True)
class ServeSettings:
    max_tokens: int = 256  # the most new tokens of one answer, and the default
    max_prompt_tokens: int = 2048  # tokens of one prompt, after the template
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' when set
    body_timeout_s: float = BODY_TIMEOUT_S

    def check(self) -> None:
        """Refuse settings that cannot serve, before the model is loaded."""
        if self.max_tokens < 1 or self.max_prompt_tokens < 1:
            raise InstructlmError("--max-tokens and --max-prompt-tokens must be at least 1")
        if self.body_timeout_s <= 0:
            raise InstructlmError("the body timeout must be above 0 seconds")
