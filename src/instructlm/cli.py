"""The command line: parse arguments, call one function, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from instructlm.arguments import API_KEY_ENV, build_parser
from instructlm.errors import InstructlmError
from instructlm.model.base import quiet_libraries

# --- train ----------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    """Teach a base model the instructions in FILE and save a run."""
    from instructlm.training.checkpoints import checkpoint_dir
    from instructlm.training.train import default_output, resume, train

    quiet_libraries()
    if args.resume:
        if args.file or args.output:
            raise InstructlmError("--resume RUN goes on with the interrupted run's own file, "
                                  "settings and folder: give no FILE or --output with it")
        output = Path(args.resume)
    elif args.file:
        output = Path(args.output or default_output(args.file))
    else:
        raise InstructlmError("give the instruction FILE to train on (or --resume RUN)")
    try:
        with _terminate_as_interrupt():
            if args.resume:
                resume(output, report=_say, progress=not args.quiet)
            else:
                train(args.file, output, _train_settings(args), force=args.force, report=_say,
                      progress=not args.quiet)
    except KeyboardInterrupt:
        saved = checkpoint_dir(output)
        _say(f"\nInterrupted: {output} is as it was before. " + (
            f"Continue from the last checkpoint with `instructlm train --resume {output}`."
            if saved.exists() else "Nothing was saved (--save-every N saves checkpoints)."))
        return 130
    return 0


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a container's stop) ends a training as Ctrl-C does: the step under
    way ends, the folders and the lock are tidied, and the earlier run stays as it was."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_settings(args: argparse.Namespace) -> Any:
    from instructlm.training.settings import TrainSettings

    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in vars(args).items()
                            if k in names and v is not None})


# --- ask ------------------------------------------------------------------------------------

def cmd_ask(args: argparse.Namespace) -> int:
    """Answer instructions with a trained run or an untuned base model."""
    from instructlm.answering.answerer import load_answerer

    quiet_libraries()
    decode = _decode_settings(args)
    answerer = load_answerer(args.run, args.template, args.trust_remote_code, args.device)
    interactive = not args.instructions and sys.stdin.isatty()
    if args.instructions:
        items: Iterable[str] = args.instructions
    elif interactive:
        items = _prompt_lines()
    else:
        items = (line.strip() for line in sys.stdin if line.strip())
    # One question at a time is shown as it is written; many are answered in batches.
    one_by_one = interactive or len(args.instructions) == 1
    streaming = one_by_one and not args.json and decode.beams == 1 and not decode.stop
    try:
        if streaming:
            for item in items:
                _print_cut(answerer.answer_streaming(item, decode, _TextPrinter()))
            return 0
        for answer in answerer.answer(items, decode, batch_size=1 if one_by_one
                                      else args.batch_size):
            if args.json:
                print(json.dumps(answer.to_dict(), ensure_ascii=False), flush=True)
            else:
                print(answer.response, end="", flush=True)
                _print_cut(answer)
    except KeyboardInterrupt:
        return 130
    return 0


class _TextPrinter:
    """Prints streamed answer text, without the leading space of the first piece."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        print(text, end="", flush=True)


def _print_cut(answer: Any) -> None:
    print("" if answer.finish_reason == "stop" else "  [cut at --max-new-tokens]", flush=True)


def _prompt_lines() -> Iterator[str]:
    print("Type an instruction and press Enter (Ctrl-D to end).", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line:
            yield line


def _decode_settings(args: argparse.Namespace) -> Any:
    from instructlm.answering.answerer import DecodeSettings

    decode = DecodeSettings(
        max_new_tokens=args.max_new_tokens, beams=args.beams, sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, no_repeat_ngram=args.no_repeat_ngram,
        stop=tuple(args.stop or ()), seed=args.seed)
    decode.check()
    return decode


def _decode_label(args: argparse.Namespace) -> str:
    if args.sample:
        return f"sample{args.temperature:g}"
    return f"beams{args.beams}" if args.beams > 1 else "greedy"


# --- eval, compare, curve -------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    """Score a run's answers to held-out instructions (its own, or those in FILE)."""
    from instructlm.answering.answerer import load_answerer
    from instructlm.measuring.evaluate import eval_set_for, evaluate
    from instructlm.measuring.report import eval_table, results_page, write_text
    from instructlm.measuring.scores import describe_summary

    quiet_libraries()
    decode = _decode_settings(args)
    eval_set = eval_set_for(args.run, args.file)
    if eval_set.note:
        _say(f"note: {eval_set.note}")
    answerer = load_answerer(args.run, args.template, args.trust_remote_code, args.device)
    result = evaluate(answerer, eval_set, decode, _decode_label(args), args.batch_size,
                      with_loss=not args.no_loss)
    if args.report:
        page = results_page(f"instructlm eval {answerer.name}", [result], eval_set.note)
        _say(f"Wrote {write_text(args.report, page)}", err=args.json)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(eval_table(result))
    loss = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.3f}"
    print(f"\n{answerer.name} on {result.source}: {describe_summary(result.summary)}{loss}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Score several runs and base models under several decodings, side by side."""
    from instructlm.measuring.evaluate import compare, eval_set_for, parse_decodes
    from instructlm.measuring.report import compare_table, results_page, write_text

    quiet_libraries()
    decodes = parse_decodes(args.decode, args.max_new_tokens)
    eval_set = eval_set_for(args.models[0], args.file)
    if eval_set.note:
        _say(f"note: {eval_set.note}")
    results = compare(args.models, eval_set, decodes, with_bases=args.base,
                      batch_size=args.batch_size, report=lambda m: _say(m, err=True),
                      device=args.device)
    if args.report:
        page = results_page("instructlm compare", results, f"Examples: {eval_set.source}")
        _say(f"Wrote {write_text(args.report, page)}", err=args.json)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2))
        return 0
    print(f"{len(eval_set.examples)} examples from {eval_set.source}")
    print(compare_table(results))
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    """Train on growing parts of FILE and plot how the held-out scores grow."""
    from instructlm.answering.answerer import DecodeSettings
    from instructlm.curve import learning_curve
    from instructlm.measuring.report import compare_table, plot_curve, results_page, write_text

    quiet_libraries()
    settings = _train_settings(args)
    decode = DecodeSettings(max_new_tokens=args.max_new_tokens)
    decode.check()
    output = Path(args.output or Path("runs") / f"{Path(args.file).stem}-curve")
    results = learning_curve(args.file, args.sizes, settings, decode,
                             report=lambda m: _say(m, err=args.json), progress=not args.quiet)
    points = [{"n_train": r.extra["n_train"], "summary": r.summary, "eval_loss": r.eval_loss,
               "train_seconds": r.extra["train_seconds"]} for r in results]
    png = plot_curve(points, f"{Path(args.file).name}: held-out answers")
    output.mkdir(parents=True, exist_ok=True)
    (output / "curve.png").write_bytes(png)
    write_text(output / "curve.json", json.dumps(
        {"file": args.file, "points": points, "results": [r.to_dict() for r in results]},
        ensure_ascii=False, indent=2) + "\n")
    write_text(output / "report.html", results_page(
        f"instructlm curve {args.file}", results,
        f"Trained on growing parts of {args.file}, each scored on its held-out part.", png))
    if args.json:
        print(json.dumps(points, ensure_ascii=False))
        return 0
    print(compare_table(results))
    print(f"\nWrote {output / 'curve.png'}, {output / 'report.html'} and "
          f"{output / 'curve.json'}")
    return 0


# --- inspect --------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    """Check an instruction file: counts, token lengths, warnings."""
    from instructlm.measuring.inspection import inspect_file

    quiet_libraries()
    report = inspect_file(args.file, base=args.base, template=args.template,
                          tokens=not args.no_tokens, preferences=args.pairs,
                          max_length=args.max_length)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(f"{report['file']} ({report['format']}): {len(report['train'])} training, "
          f"{len(report['eval'])} evaluation examples")
    for split, stats in report.get("token_stats", {}).items():
        if stats:
            print(f"  {split}: tokens per example (template {report['template']}): "
                  f"min {stats['min']}, mean {stats['mean']}, max {stats['max']}")
    if args.pairs:
        for split in ("train", "eval"):
            for ex in report[split]:
                print(f"{split} {ex['source']}: {ex['instruction']}\n  chosen:   "
                      f"{ex['response']}\n  rejected: {ex.get('rejected', '(none)')}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    return 0


# --- merge ----------------------------------------------------------------------------------

def cmd_merge(args: argparse.Namespace) -> int:
    """Merge a LoRA run's adapter into its base model: a standalone run."""
    from instructlm.model.adapters import merge

    quiet_libraries()
    output = merge(args.run, args.output, args.force)
    _say(f"Saved the merged model to {output}")
    return 0


# --- export ---------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    """Write a run as one GGUF file (and an Ollama Modelfile) for llama.cpp and friends."""
    from instructlm.export.export_run import export

    quiet_libraries()
    done = export(args.run, args.quant, args.output, args.ollama, args.force)
    size = done.gguf.stat().st_size / 1e6
    _say(f"Wrote {done.gguf} ({args.quant}, {size:.0f} MB): the run's model, tokenizer and "
         "prompt, for llama.cpp and LM Studio")
    if done.end_token is None:
        _say("warning: the run was trained with --no-end-token: its answers will not stop")
    else:
        _say(f"Its answers end with {done.end_token}, the GGUF's end-of-sequence token.")
    if done.modelfile is not None:
        _say(f"Wrote {done.modelfile}; to use it: ollama create {Path(args.run).name} "
             f"-f {done.modelfile}")
    return 0


# --- serve ----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run over OpenAI's HTTP API, with a web page to try it in a browser."""
    import os

    from instructlm.serve.app import serve
    from instructlm.serve.settings import ServeSettings

    quiet_libraries()
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServeSettings(args.max_tokens, args.max_prompt_tokens, key,
                             max_batch=args.max_batch, max_queue=args.max_queue,
                             queue_timeout_s=args.queue_timeout,
                             max_batch_tokens=args.max_batch_tokens)
    serve(args.run, settings, args.host, args.port, args.compare_base, args.trust_remote_code,
          report=_say, device=args.device)
    return 0


# --- wiring ---------------------------------------------------------------------------------

def _say(message: str, err: bool = False) -> None:
    """Progress and results to stdout; warnings (and with `err`, everything) to stderr."""
    to_stderr = err or message.startswith(("warning:", "note:"))
    print(message, file=sys.stderr if to_stderr else sys.stdout, flush=True)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "ask": cmd_ask, "eval": cmd_eval, "compare": cmd_compare,
    "curve": cmd_curve, "inspect": cmd_inspect, "merge": cmd_merge, "export": cmd_export,
    "serve": cmd_serve}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser, commands = build_parser(COMMANDS)
    if argv and argv[0] in commands:
        # Intermixed: options may come after instructions (`ask RUN "..." --json`).
        return commands[argv[0]].parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except InstructlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `instructlm ask ... | head`
        sys.stderr.close()
        return 0
