"""The command line's options: every command's arguments, their defaults and help."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from instructlm.answering.answerer import BATCH_SIZE, DecodeSettings
from instructlm.data.encode import MAX_LENGTH
from instructlm.export.gguf_file import DEFAULT_QUANT, QUANTS
from instructlm.serve.settings import ServeSettings

if TYPE_CHECKING:
    from instructlm.training.settings import TrainSettings

EPILOG = "Run 'instructlm COMMAND --help' for the options of a command."
API_KEY_ENV = "INSTRUCTLM_API_KEY"  # a key in the environment, not in `ps` output


def _add_training(p: argparse.ArgumentParser) -> None:
    from instructlm.model.devices import PRECISIONS
    from instructlm.model.loss import AVERAGES
    from instructlm.training.budget import DEFAULT_EPOCHS, SCHEDULES
    from instructlm.training.layer_decay import LAYER_DECAY
    from instructlm.training.settings import FULL_LR, LORA_LR, TrainSettings

    d = TrainSettings()
    p.add_argument("--base", help="base model: a model folder, a trained run (trained "
                                  "further, in its own template), a Hugging Face hub id, or "
                                  "'embedded' (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model to run its own Python code (only for ids you trust)")
    p.add_argument("--template", help="seed-de, seed-en, chat, or a string with {instruction} "
                                      "(default: seed-en; the base model's chat template "
                                      "with --lora or where examples carry earlier turns)")
    p.add_argument("--epochs", type=int,
                   help=f"passes over the data (default: {DEFAULT_EPOCHS}, raised to reach "
                        f"--min-steps)")
    p.add_argument("--min-steps", type=int,
                   help=f"without --epochs: train at least this many optimizer steps "
                        f"(default {d.min_steps})")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help=f"learning rate after the warm-up (default {d.schedule}): linear "
                        "decay to zero, constant, cosine, or wsd (constant, then a decay over "
                        "the last 20%%)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {FULL_LR:g}, with "
                                            f"--lora {LORA_LR:g})")
    p.add_argument("--layer-decay", type=float,
                   help=f"each layer's learning rate as a multiple of the one above it, the "
                        f"top layer's being --lr (default {LAYER_DECAY:g}: every layer alike)")
    p.add_argument("--batch-size", type=int, help=f"examples a step (default {d.batch_size})")
    p.add_argument("--max-length", type=int,
                   help=f"tokens per example, prompt + response (default {d.max_length})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 where this CPU or GPU computes it faster, fp16 "
                        "with loss scaling on GPUs without bf16, else fp32")
    p.add_argument("--device", help="auto (default: a CUDA GPU if there is one, else the "
                                    "CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-end-token", dest="end_token", action="store_false", default=None,
                   help="do not teach the end token (the tutorial's way, to compare: answers "
                        "then run on to --max-new-tokens)")
    p.add_argument("--prompt-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="learn the instruction too, not only the response (default: off; "
                        "supervised runs only)")
    p.add_argument("--loss-average", choices=AVERAGES,
                   help=f"how a batch's loss averages its answers' tokens (default "
                        f"{d.loss_average}): example, each example's mean and then the mean "
                        "over the examples (short answers weigh as much as long ones); "
                        "token, the mean over all tokens")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_lora(p, d)


def _add_lora(p: argparse.ArgumentParser, d: TrainSettings) -> None:
    lora = p.add_argument_group("LoRA", "train small adapters beside frozen base weights; the "
                                        "run then stores only the adapter")
    lora.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters")
    lora.add_argument("--lora-rank", type=int, help=f"adapter rank (default {d.lora_rank})")
    lora.add_argument("--lora-alpha", type=int,
                      help=f"adapter scale numerator (default {d.lora_alpha})")
    lora.add_argument("--lora-dropout", type=float,
                      help=f"dropout on the adapters' input (default {d.lora_dropout})")
    lora.add_argument("--lora-targets", help="layer names to adapt, comma-separated (default: "
                                             "attention and MLP layers of the architecture)")


def _add_max_new_tokens(p: argparse.ArgumentParser) -> None:
    d = DecodeSettings()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"longest answer in tokens (default {d.max_new_tokens})")


def _add_decoding(p: argparse.ArgumentParser) -> None:
    d = DecodeSettings()
    p.add_argument("--beams", type=int, default=d.beams,
                   help=f"beam search with N beams (default {d.beams}: greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"with --sample (default {d.temperature:g})")
    p.add_argument("--top-p", type=float, default=d.top_p,
                   help=f"with --sample (default {d.top_p:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"with --sample (default {d.seed})")
    p.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help=f"forbid repeating any N-gram (default {d.no_repeat_ngram}: off)")
    _add_max_new_tokens(p)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the answer where TEXT appears (repeatable)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"instructions decoded together (default {BATCH_SIZE})")
    p.add_argument("--template", help="for a base model only: how to show the instruction")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model to run its own Python code")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="where the model answers: auto (default: "
                   "a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps")


def build_parser(commands: dict[str, Callable[[argparse.Namespace], int]]
                 ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one parser per command; each command's docstring is its
    help."""
    from instructlm import __version__

    parser = argparse.ArgumentParser(prog="instructlm", epilog=EPILOG, description=(
        "Teach a pretrained language model your own instructions from a text file."))
    parser.add_argument("--version", action="version", version=f"instructlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    parsers: dict[str, argparse.ArgumentParser] = {}

    def add(name: str) -> argparse.ArgumentParser:
        doc = (commands[name].__doc__ or "").strip()
        p = parsers[name] = sub.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=commands[name])
        return p

    p = add("train")
    p.add_argument("file", nargs="?",
                   help="instruction file (instruction#response a line, or JSONL)")
    p.add_argument("--output", "-o", help="run folder (default: runs/<file name>)")
    _add_training(p)
    p.add_argument("--force", action="store_true", help="replace an existing run")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="save a checkpoint every N steps, beside the run (default: none)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue the interrupted run RUN from its last checkpoint")
    from instructlm.training.preference import DEFAULT_BETA, DEFAULT_NLL_WEIGHT, METHODS
    from instructlm.training.settings import DPO_LORA_LR, DPO_LR

    taste = p.add_argument_group(
        "preference tuning", "learn from pairs, this answer and not that one: lines "
        "instruction#chosen#rejected, or JSONL prompt/chosen/rejected")
    taste.add_argument("--method", choices=METHODS,
                       help="sft (default): teach the responses; dpo: prefer the chosen "
                            "answers, starting from a tuned run (--base RUN); orpo: teach the "
                            "chosen answers and prefer them, from a base model")
    taste.add_argument("--beta", type=float,
                       help=f"DPO's beta, ORPO's lambda (default {DEFAULT_BETA:g}); the "
                            f"learning rate for dpo defaults to {DPO_LR:g} ({DPO_LORA_LR:g} "
                            "with --lora)")
    taste.add_argument("--nll-weight", type=float,
                       help=f"dpo: weight of the chosen answers' cross-entropy added to the "
                            f"loss (default {DEFAULT_NLL_WEIGHT:g}; 0: DPO alone)")

    p = add("ask")
    p.add_argument("run", help="a trained run folder, or a base model to see untuned answers "
                               "('embedded', a model folder, a hub id)")
    p.add_argument("instructions", nargs="*", help="instructions; without them, one a line "
                                                    "from standard input")
    p.add_argument("--json", action="store_true", help="one JSON object per answer and line")
    _add_decoding(p)

    p = add("eval")
    p.add_argument("run", help="a trained run folder (or a base model, with FILE)")
    p.add_argument("file", nargs="?", help="instruction file to evaluate on: its eval part, or "
                                           "all of it if it has none (default: the run's own "
                                           "eval part)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", metavar="FILE.html", help="also write an HTML report")
    p.add_argument("--no-loss", action="store_true", help="skip the eval loss")
    _add_decoding(p)

    p = add("compare")
    p.add_argument("models", nargs="+", help="runs and/or base models ('embedded', a folder, "
                                             "a hub id)")
    p.add_argument("--base", action="store_true",
                   help="also score each run's untuned base model, asked with the run's template")
    p.add_argument("--file", help="instruction file to evaluate on (default: the first run's "
                                  "own eval part)")
    p.add_argument("--decode", default="greedy", help="decodings to try, comma-separated: "
                   "greedy, beamsN, sampleT (temperature T) (default: greedy)")
    _add_max_new_tokens(p)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"instructions decoded together (default {BATCH_SIZE})")
    p.add_argument("--json", action="store_true", help="print a JSON list of results")
    p.add_argument("--report", metavar="FILE.html", help="also write an HTML report")
    _add_device(p)

    p = add("curve")
    p.add_argument("file", help="instruction file with a held-out ('# _EVAL_') part")
    p.add_argument("--sizes", help="numbers of training examples, e.g. 4,8,16,all; 0 is the "
                                   "untuned model (default: 0,4,8,16,... and all)")
    p.add_argument("--output", "-o", help="folder for curve.png, report.html and curve.json "
                                          "(default: runs/<file name>-curve)")
    _add_max_new_tokens(p)
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    _add_training(p)

    p = add("merge")
    p.add_argument("run", help="a run trained with --lora")
    p.add_argument("--output", "-o", help="folder for the merged run (default: RUN-merged)")
    p.add_argument("--force", action="store_true", help="replace an existing run there")

    p = add("export")
    p.add_argument("run", help="a trained run folder (a LoRA run is merged on the way)")
    p.add_argument("--quant", default=DEFAULT_QUANT, choices=QUANTS,
                   help="how the weights are stored: f16, q8_0 (default: about half of f16's "
                        "size, near f16's answers) or q4_k_m (needs llama-cpp-python)")
    p.add_argument("--output", "-o", help="the GGUF file (default: RUN-QUANT.gguf beside the "
                                          "run, or in the --ollama folder)")
    p.add_argument("--ollama", metavar="DIR", help="also write an Ollama Modelfile into DIR")
    p.add_argument("--force", action="store_true", help="replace an earlier export there")

    p = add("serve")
    served = ServeSettings()
    p.add_argument("run", help="a trained run folder (or a base model, untuned)")
    p.add_argument("--compare-base", action="store_true",
                   help="also serve the run's untuned base model, shown beside it on the page")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--api-key", help=f"require this key as 'Authorization: Bearer KEY' "
                                     f"(default: ${API_KEY_ENV}, else none)")
    p.add_argument("--max-tokens", type=int, default=served.max_tokens,
                   help=f"most new tokens of one answer, and the default (default "
                        f"{served.max_tokens})")
    p.add_argument("--max-prompt-tokens", type=int, default=served.max_prompt_tokens,
                   help=f"longest prompt accepted, in tokens (default "
                        f"{served.max_prompt_tokens})")
    p.add_argument("--max-batch", type=int, default=served.max_batch,
                   help=f"answers decoded together, from all requests (default "
                        f"{served.max_batch})")
    p.add_argument("--max-queue", type=int, default=served.max_queue,
                   help=f"requests waiting for a place in the batch; more are answered 429 "
                        f"(default {served.max_queue})")
    p.add_argument("--max-batch-tokens", type=int, default=served.max_batch_tokens,
                   help=f"key/value positions the batch may hold, its rows times the widest "
                        f"row's prompt and answer; a row that would pass it waits (default "
                        f"{served.max_batch_tokens})")
    p.add_argument("--queue-timeout", type=float, default=served.queue_timeout_s,
                   metavar="SECONDS", help=f"a request waiting longer for a place is answered "
                                           f"503 (default {served.queue_timeout_s:g})")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model to run its own Python code")
    _add_device(p)

    p = add("inspect")
    p.add_argument("file", help="instruction file to check")
    p.add_argument("--base", help="model whose tokenizer counts the tokens (default: embedded)")
    p.add_argument("--template", help="template used for the token counts (default: as train "
                                      "without --lora)")
    p.add_argument("--no-tokens", action="store_true",
                   help="skip token counts (no model needed)")
    p.add_argument("--pairs", action="store_true",
                   help="read preference pairs, as train --method dpo|orpo does: lines "
                        "instruction#chosen#rejected")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help=f"warn, as train does, of examples longer than this many tokens "
                        f"(default {MAX_LENGTH})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser, parsers
