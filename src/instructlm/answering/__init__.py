"""Answers: a run's answers to instructions, the batched decoding loop, stop texts."""
