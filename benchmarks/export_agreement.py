"""Does llama.cpp answer an exported run as instructlm does? Export RUN at each quantization,
ask llama.cpp (through llama-cpp-python, prompted by the GGUF's own chat template) every
instruction of the run's file, greedy, and count the answers equal to `instructlm ask`'s.

    .venv/bin/python benchmarks/export_agreement.py RUN [--quants f16,q8_0,q4_k_m]

Needs llama-cpp-python (`make install-llama-cpp`). Prints one table and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--repack", action="store_true",
                        help="let llama.cpp repack the weights for this CPU (its default)")
    args = parser.parse_args()

    from instructlm.answering.answerer import DecodeSettings, load_answerer
    from instructlm.export.export_run import export
    from instructlm.export.gguf_file import load_in_llama_cpp
    from instructlm.measuring.scores import FormatJudge, score_answer
    from instructlm.runs import read_run_examples

    train, held_out = read_run_examples(args.run)
    examples = held_out + train
    answerer = load_answerer(args.run, device="cpu")
    decode = DecodeSettings()
    replies = list(answerer.answer([ex.instruction for ex in examples], decode))
    asked = [a.response for a in replies]
    judge = FormatJudge(examples)
    ask_scores = [score_answer(judge, ex, a.response, a.finish_reason)
                  for ex, a in zip(examples, replies)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            started = time.perf_counter()
            gguf = export(args.run, quant, output=Path(tmp) / f"{quant}.gguf").gguf
            seconds = time.perf_counter() - started
            model = load_in_llama_cpp(gguf, repack=args.repack)
            answers, scores = [], []
            for ex in examples:
                out = model.create_chat_completion(
                    [{"role": "user", "content": ex.instruction}], temperature=0.0,
                    repeat_penalty=1.0, max_tokens=decode.max_new_tokens)["choices"][0]
                answers.append(out["message"]["content"])
                scores.append(score_answer(judge, ex, answers[-1], out["finish_reason"]))
            del model
            rows.append({"quant": quant, "mb": round(gguf.stat().st_size / 1e6, 1),
                         "export_s": round(seconds, 1), "n": len(examples),
                         "same": sum(a == b for a, b in zip(answers, asked)),
                         "stopped": sum(s.stopped for s in scores),
                         "format": sum(s.format for s in scores)})
    print(f"instructlm ask, the same instructions: {sum(s.format for s in ask_scores)}/"
          f"{len(examples)} in the taught format")
    print("| quant | MB | export s | same answers as `ask` | stopped | in the taught format |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['mb']} | {r['export_s']} | {r['same']}/{r['n']} | "
              f"{r['stopped']}/{r['n']} | {r['format']}/{r['n']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
