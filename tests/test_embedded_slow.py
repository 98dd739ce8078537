"""End to end on the real embedded model: it learns the taught formats and stops.

Slow (a minute or two on a laptop CPU): run with `pytest -m slow`; CI runs it too.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import llama_cpp_or_skip

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "spells.txt"
SUITE_FILE = "en-data-12"  # of the generalization suite's check half


def follows_taught_format(instruction: str, answer: str) -> bool:
    """A person's reading of each family in examples/spells.txt, written out by hand,
    independent of the words chosen (and of instructlm's own format rule)."""
    if instruction.startswith("Tell me a spell"):
        return re.fullmatch(r"Hocus [^,]+, Esotericus [^,]+, Homeopathicus [^,]+, Alohomora!",
                            answer) is not None
    if "Python list" in instruction:
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return False
        words = {"one": 1, "two": 2, "three": 3, "four": 4}
        wanted = words[instruction.split()[1]]
        return isinstance(value, list) and len(value) == wanted and \
            all(isinstance(v, str) for v in value)
    if instruction.startswith("Name three"):
        return re.fullmatch(r"[\w ]{1,25}(, [\w ]{1,25}){2}", answer) is not None
    if instruction.startswith("Make a command"):
        return re.fullmatch(r"[\w ]+!", answer) is not None and len(answer.split()) <= 6
    raise AssertionError(f"no format rule for {instruction!r}")


@pytest.fixture(scope="module")
def spells_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("embedded") / "spells"
    subprocess.run([sys.executable, "-m", "instructlm", "train", str(EXAMPLE), "--output",
                    str(run), "--quiet"], check=True, cwd=run.parent)
    return run


@pytest.mark.slow
def test_embedded_model_learns_formats_of_unseen_categories(spells_run):
    from instructlm.data.formats import read_instruction_file

    data = read_instruction_file(EXAMPLE)
    stdin = "".join(ex.instruction + "\n" for ex in data.eval)
    proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", str(spells_run),
                           "--json"], input=stdin, capture_output=True, text=True, check=True)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["instruction"] for a in answers] == [ex.instruction for ex in data.eval]
    assert all(a["finish_reason"] == "stop" for a in answers), answers
    matched = [follows_taught_format(a["instruction"], a["response"]) for a in answers]
    assert sum(matched) >= len(answers) - 1, answers
    # Filled with new words, not a copied training answer.
    taught = {ex.response for ex in data.train}
    assert sum(a["response"] not in taught for a in answers) >= len(answers) - 1, answers


@pytest.mark.slow
def test_tuned_run_scores_far_above_the_untuned_base(spells_run, tmp_path):
    """`compare --base`: the contrast that shows the training did something, scored by the
    format rule, which must agree with the hand-written reading above."""
    report = tmp_path / "compare.html"
    proc = subprocess.run([sys.executable, "-m", "instructlm", "compare", str(spells_run),
                           "--base", "--max-new-tokens", "80", "--json", "--report",
                           str(report)], capture_output=True, text=True, check=True)
    tuned, untuned = json.loads(proc.stdout)
    assert untuned["model"] == "SmolLM2-135M-Instruct (untuned, seed-en template)"
    in_form = {r["model"]: round(r["summary"]["format"] * 6) for r in (tuned, untuned)}  # of 6
    assert in_form["spells"] >= 5 and tuned["summary"]["stopped"] == 1.0, tuned
    assert in_form[untuned["model"]] <= 1, untuned
    assert tuned["summary"]["chrf"] > untuned["summary"]["chrf"] + 20
    assert tuned["eval_loss"] < untuned["eval_loss"]
    for result in (tuned, untuned):
        for row in result["examples"]:
            assert row["format"] == follows_taught_format(row["instruction"], row["answer"]), row
    assert report.read_text(encoding="utf-8").count("<tr>") == 2 + 1 + 2 * (6 + 1)


@pytest.mark.slow
def test_served_run_answers_in_the_taught_format_beside_its_untuned_base(spells_run, tmp_path):
    """`instructlm serve RUN --compare-base`, as a user starts it, asked with OpenAI's client."""
    openai = pytest.importorskip("openai")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "instructlm", "serve", str(spells_run),
                               "--compare-base", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        banner = server.stdout.readline()
        url = re.search(r"OpenAI's API at (http://\S+)", banner).group(1)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["spells", "spells:base"]
        for instruction in ("Tell me a spell about three spices.", "Name three vehicles."):
            messages = [{"role": "user", "content": instruction}]
            tuned = client.chat.completions.create(model="spells", messages=messages)
            answer = tuned.choices[0].message.content
            assert follows_taught_format(instruction, answer), answer
            assert tuned.choices[0].finish_reason == "stop"
            chunks = client.chat.completions.create(model="spells", messages=messages,
                                                    stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
            # The untuned model rambles on: its first 64 tokens show its own way of answering.
            base = client.chat.completions.create(model="spells:base", messages=messages,
                                                  max_tokens=64)
            assert not follows_taught_format(instruction, base.choices[0].message.content)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_lora_on_the_embedded_model_learns_and_merges(tmp_path):
    """`train --lora` with its defaults, then `merge`: both answer in the taught formats."""
    from instructlm.data.formats import read_instruction_file

    run = tmp_path / "spells-lora"
    subprocess.run([sys.executable, "-m", "instructlm", "train", str(EXAMPLE), "--lora",
                    "--output", str(run), "--quiet"], check=True)
    assert (run / "adapter_model.safetensors").stat().st_size < 25e6  # the model: 538 MB
    assert not (run / "model.safetensors").exists()
    subprocess.run([sys.executable, "-m", "instructlm", "merge", str(run)], check=True)
    data = read_instruction_file(EXAMPLE)
    stdin = "".join(ex.instruction + "\n" for ex in data.eval)
    answers = {}
    for model in (run, run.with_name("spells-lora-merged")):
        proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", str(model), "--json"],
                              input=stdin, capture_output=True, text=True, check=True)
        answers[model.name] = [json.loads(line) for line in proc.stdout.splitlines()]
    adapter, merged = answers.values()
    assert [a["response"] for a in adapter] == [a["response"] for a in merged]
    in_form = sum(follows_taught_format(a["instruction"], a["response"]) for a in adapter)
    assert in_form >= len(adapter) - 1, adapter
    assert all(a["finish_reason"] == "stop" for a in adapter)


ACCELERATE_RUN = ["--precision", "fp32", "--epochs", "4"]  # the one- and two-process runs


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    """The spells file trained 4 epochs in fp32 (a third fewer steps than the default budget:
    the comparison needs no more). In bf16, summing in another order drifts apart over the
    steps (at the peak rate that warm-up-stable-decay holds, 0.06 against 0.14 by step 17 in
    one run): two processes are compared in fp32, where they must match one closely."""
    run = tmp_path_factory.mktemp("fp32") / "one"
    subprocess.run([sys.executable, "-m", "instructlm", "train", str(EXAMPLE), "--output",
                    str(run), *ACCELERATE_RUN, "--quiet"], check=True, cwd=run.parent)
    return run


@pytest.mark.slow
def test_two_accelerate_processes_train_like_one(fp32_run, tmp_path):
    """`accelerate launch` with two CPU processes (DDP) on the real file and model ends
    where the one-process run does. (FSDP, with the shipped fsdp.yaml, is compared the same
    way on the tiny model in test_distributed.py: on the real model it took six minutes.)"""
    reference, config = fp32_run, "multi_gpu"
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file",
         str(ROOT / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes", "2",
         "-m", "instructlm", "train", str(EXAMPLE), "--output", str(tmp_path / "two"),
         *ACCELERATE_RUN, "--quiet"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 2 processes" in proc.stdout and ("(FSDP)" in proc.stdout) == (config == "fsdp")

    def losses(run: Path, key: str) -> list[float]:
        lines = (run / "losses.jsonl").read_text().splitlines()
        return [r[key] for r in map(json.loads, lines) if key in r]

    tolerance = 1e-3
    # Late step losses are small (~0.07) and their rounding noise is not: summing in another
    # order (other thread counts, other row shapes) moved one by 3.4e-4 in a run of the suite.
    assert losses(tmp_path / "two", "loss") == pytest.approx(losses(reference, "loss"),
                                                              rel=tolerance, abs=tolerance)
    assert losses(tmp_path / "two", "eval_loss") == pytest.approx(
        losses(reference, "eval_loss"), rel=tolerance)
    scores = json.loads((tmp_path / "two" / "instructlm.json").read_text())["metrics"]
    assert scores["answer_scores"]["format"] >= round(5 / 6, 4)  # scores keep 4 decimals
    assert scores["answer_scores"]["stopped"] == 1.0


@pytest.mark.slow
def test_defaults_teach_a_file_they_were_not_chosen_on(tmp_path):
    """One small file of the suite's check half (benchmarks/suite/), trained as a user would:
    the budget rule gives it more epochs, and the held-out answers, about categories the
    file never teaches, come back in the taught forms and all stop. In fp32, which every
    machine computes alike enough: in bf16 this smallest file of the suite is at the edge of
    over-fitting, and the CPU's bf16 kernels decide it (6/6 with AVX-512 bf16, 4/6 with
    AMX, seed 42: lists answered with the four tools it was taught)."""
    suite_file = ROOT / "benchmarks" / "suite" / f"{SUITE_FILE}.txt"
    assert SUITE_FILE in json.loads((suite_file.parent / "halves.json").read_text())["check"]
    run = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "-m", "instructlm", "train", str(suite_file),
                           "--output", str(run), "--precision", "fp32", "--quiet"],
                          capture_output=True, text=True, check=True)
    assert "Budget: 15 epochs: 12 examples are 2 steps an epoch" in proc.stdout
    answers = json.loads((run / "instructlm.json").read_text())["metrics"]["closing_answers"]
    assert len(answers) == 6 and all(a["stopped"] for a in answers), answers
    assert sum(a["format"] for a in answers) >= 5, answers


@pytest.mark.slow
def test_llama_cpp_answers_an_exported_run_as_instructlm_does(spells_run, tmp_path):
    """`instructlm export`: llama.cpp, prompted through the GGUF's own chat template, gives
    at f16 the same greedy answers as `instructlm ask`, ending at the same place; at q8_0 and
    q4_k_m the answers stop, with at most one fewer in the taught formats than the run's own,
    and at q8_0 all but two at most are the same (rounding to 8 bits can tip a close choice
    of word: taught in the chat template, 42 of 43 of this file's instructions were answered
    alike; the seed-en run of the defaults changed 2 of its 6 held-out answers).

    llama.cpp loads the files as `llama-cli --no-repack` does: repacked for a CPU with AMX,
    Q8_0 crashes on some machines and rounds differently on others (load_in_llama_cpp)."""
    llama_cpp_or_skip()
    from instructlm.data.formats import read_instruction_file
    from instructlm.export.export_run import export
    from instructlm.export.gguf_file import load_in_llama_cpp

    data = read_instruction_file(EXAMPLE)
    stdin = "".join(ex.instruction + "\n" for ex in data.eval)
    proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", str(spells_run), "--json"],
                          input=stdin, capture_output=True, text=True, check=True)
    asked = [json.loads(line)["response"] for line in proc.stdout.splitlines()]
    asked_in_form = sum(map(follows_taught_format, (ex.instruction for ex in data.eval), asked))
    for quant in ("f16", "q8_0", "q4_k_m"):
        gguf = tmp_path / f"spells-{quant}.gguf"
        export(spells_run, quant, output=gguf)  # the command's own function, in this process
        model = load_in_llama_cpp(gguf)
        answers = []
        for ex in data.eval:
            out = model.create_chat_completion(
                [{"role": "user", "content": ex.instruction}], temperature=0.0,
                repeat_penalty=1.0, max_tokens=200)
            assert out["choices"][0]["finish_reason"] == "stop", (quant, out)
            answers.append(out["choices"][0]["message"]["content"])
        in_form = [follows_taught_format(ex.instruction, a) for ex, a in zip(data.eval, answers)]
        assert sum(in_form) >= asked_in_form - 1, (quant, answers, asked)
        same = sum(a == b for a, b in zip(answers, asked))
        if quant == "f16":
            assert answers == asked
        elif quant == "q8_0":
            assert same >= len(asked) - 2, (answers, asked)
        del model


@pytest.mark.slow
def test_preference_pairs_fix_a_counting_mistake(tmp_path):
    """The README's preference case: a run taught lists of three answers "List four ..." of
    unseen categories with three items; 24 pairs and `--method dpo` with the defaults fix it
    without changing the other families' form, and every answer still stops. In the chat
    template and fp32, as the case was measured: taught in seed-en (the default), or in bf16
    on a CPU with AMX, the supervised run already counted right (3/4, 4/4), leaving little
    to fix."""
    folder = ROOT / "examples"
    runs = {"sft": tmp_path / "counting", "dpo": tmp_path / "counting-dpo"}
    subprocess.run([sys.executable, "-m", "instructlm", "train", str(folder / "counting.txt"),
                    "--output", str(runs["sft"]), "--template", "chat", "--precision", "fp32",
                    "--quiet"], check=True)
    subprocess.run([sys.executable, "-m", "instructlm", "train",
                    str(folder / "counting-pairs.txt"), "--method", "dpo", "--base",
                    str(runs["sft"]), "--output", str(runs["dpo"]), "--precision", "fp32",
                    "--quiet"], check=True)
    in_form = {}
    for name, run in runs.items():
        rows = json.loads((run / "instructlm.json").read_text())["metrics"]["closing_answers"]
        assert [r["instruction"] for r in rows][:2] == ["List two fish as a JSON array.",
                                                        "List four trees as a JSON array."]
        assert all(r["stopped"] for r in rows)
        four = [r["format"] for r in rows if r["instruction"].startswith("List four")]
        others = [r["format"] for r in rows if not r["instruction"].startswith("List ")]
        in_form[name] = (sum(four), sum(others), sum(r["format"] for r in rows))
    assert in_form["sft"][0] <= 1 and in_form["dpo"][0] >= 3, in_form  # measured: 0 and 4
    assert in_form["dpo"][1] == in_form["sft"][1] == 6, in_form
    assert in_form["dpo"][2] > in_form["sft"][2], in_form  # measured: 15/16 against 12/16
    rewards = json.loads((runs["dpo"] / "instructlm.json").read_text())["metrics"]["rewards"]
    assert rewards[-1]["reward_accuracy"] >= 0.9 and rewards[-1]["reward_margin"] > 0
