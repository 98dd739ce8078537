"""`instructlm export`: the GGUF holds the run's model, tokenizer, end token and prompt, read
back by transformers' own GGUF loader and by llama.cpp; the Modelfile asks Ollama the same
prompt."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, llama_cpp_or_skip, make_tiny_tokenizer, tiny_settings

from instructlm.answering.answerer import load_answerer
from instructlm.cli import main
from instructlm.data.formats import Example
from instructlm.data.templates import NAMED_TEMPLATES, parse_template, render_prompt
from instructlm.errors import InstructlmError
from instructlm.export.export_run import export
from instructlm.export.exported_prompt import gguf_chat_template, ollama_template
from instructlm.export.gguf_file import pre_tokenizer, write_gguf
from instructlm.model.architectures import ARCHITECTURES
from instructlm.training.train import train

INSTRUCTIONS = ["Name three fruits.", "Say hello.", 'A "quoted" {{word}} and \\ here.']


def read_back(path: Path):
    """The GGUF as transformers' own loader reads it: model, tokenizer, metadata."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fields = GGUFReader(path).fields
    meta = {key: fields[key].contents() for key in fields if not key.startswith("tokenizer.ggml.t")
            and not key.startswith("tokenizer.ggml.merges")}
    return model, tokenizer, meta


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("quant, tolerance", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_exported_run_gives_the_runs_logits_within_the_quantizations_error(
        tiny_run, tmp_path, quant, tolerance):
    exported = export(tiny_run, quant, output=tmp_path / f"facts-{quant}.gguf")
    model, tokenizer, meta = read_back(exported.gguf)
    run = load_answerer(str(tiny_run), device="cpu")
    for text in ["Below is an instruction. Name three fruits.", CORPUS[2]]:
        ids = run.tokenizer(text)["input_ids"]
        assert tokenizer(text)["input_ids"] == ids
        want = logits(run.model, ids)
        got = logits(model, ids)
        assert (got - want).abs().max() <= tolerance * want.abs().max(), quant
    assert meta["tokenizer.ggml.eos_token_id"] == run.tokenizer.eos_token_id
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"


def test_q8_0_is_about_half_the_size_of_f16(tiny_run, tmp_path):
    sizes = {q: export(tiny_run, q, output=tmp_path / f"{q}.gguf").gguf.stat().st_size
             for q in ("f16", "q8_0")}
    assert sizes["q8_0"] < 0.75 * sizes["f16"], sizes


GGUF_FAMILIES = sorted(t for t, a in ARCHITECTURES.items() if a.gguf)


def random_family_model(model_type: str, tokenizer):
    """A tiny random model of the family, with random biases so that a lost one shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=model_type != "mistral")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def with_pre_tokenizer(pre):
    """The tiny tokenizer, splitting words another way before its merges."""
    from transformers import PreTrainedTokenizerFast

    backend = make_tiny_tokenizer().backend_tokenizer
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                   pad_token="<pad>")


def qwen2_style_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    from instructlm.export.gguf_file import _QWEN2_SPLIT

    return with_pre_tokenizer(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))


@pytest.mark.parametrize("model_type", GGUF_FAMILIES)
def test_every_family_marked_for_gguf_reads_back_the_same(model_type, tmp_path):
    """Q and K stored permuted (Llama's families), biases (Qwen2), tied output layers: the
    logits come back as they were."""
    tokenizer = make_tiny_tokenizer()
    model = random_family_model(model_type, tokenizer)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(model, tokenizer, "", path, "f16", "tiny")
    back, _, meta = read_back(path)
    ids = tokenizer(CORPUS[0])["input_ids"]
    want = logits(model, ids)
    assert (logits(back, ids) - want).abs().max() <= 2e-3 * want.abs().max()
    assert meta["general.architecture"] == ARCHITECTURES[model_type].gguf


@pytest.mark.parametrize("model_type", GGUF_FAMILIES)
def test_llama_cpp_reads_every_family_as_transformers_runs_it(model_type, tmp_path):
    """llama.cpp itself, not a loader that might undo our own mistake: it splits the text
    into the same tokens (GPT-2's words, and Qwen2's for Qwen2) and computes the same
    logits, so the tensors, their permutation, biases and tied output layer are right."""
    llama_cpp_or_skip()
    from instructlm.export.gguf_file import load_in_llama_cpp

    tokenizer = qwen2_style_tokenizer() if model_type == "qwen2" else make_tiny_tokenizer()
    model = random_family_model(model_type, tokenizer)
    path = tmp_path / f"{model_type}.gguf"
    write_gguf(model, tokenizer, "", path, "f16", "tiny")
    cpp = load_in_llama_cpp(path, logits_all=True)
    for text in CORPUS[:3] + ["Numbers 12345 and  two   spaces,\nnew lines; 'quotes' it's"]:
        ids = tokenizer(text)["input_ids"]
        assert cpp.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        cpp.reset()
        cpp.eval(ids)
        got = torch.tensor(cpp.scores[:len(ids)])
        want = logits(model, ids)
        assert (got - want).abs().max() <= 5e-3 * want.abs().max(), (text, model_type)


def test_qwen2s_pre_tokenizer_is_named_for_llama_cpp():
    from tokenizers import pre_tokenizers

    assert pre_tokenizer(make_tiny_tokenizer()) == "gpt-2"
    assert pre_tokenizer(qwen2_style_tokenizer()) == "qwen2"
    with pytest.raises(InstructlmError, match="splits words"):
        pre_tokenizer(with_pre_tokenizer(pre_tokenizers.Whitespace()))


@pytest.mark.parametrize("spec", ["seed-en", "seed-de", "chat",
                                  "Q: {instruction}\\n\\tA \"{{{{quoted}}}}\" \\\\ {{% x %}}: "])
def test_the_gguf_and_ollama_templates_render_the_runs_prompt(spec):
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer = make_tiny_tokenizer()
    template = NAMED_TEMPLATES.get(spec) or parse_template(spec)
    jinja = gguf_chat_template(template, tokenizer)
    go = ollama_template(template, tokenizer)
    for instruction in INSTRUCTIONS:
        want = render_prompt(template, Example(instruction, ""), tokenizer)
        messages = [{"role": "user", "content": instruction}]
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=jinja,
                                            add_generation_prompt=True)
        assert rendered[0] == want
        assert render_go(go, instruction) == want


def render_go(template: str, prompt: str) -> str:
    """A small reading of Go's text/template, as Ollama renders a Modelfile's TEMPLATE: text,
    `{{ .Prompt }}`, and actions that print a string literal."""
    def action(match: re.Match) -> str:
        inside = match.group(1).strip()
        if inside == ".Prompt":
            return prompt
        if inside.startswith('"'):
            return json.loads(inside)  # Go's string literals escape as JSON's do here
        raise AssertionError(f"action not understood: {inside}")
    return re.sub(r"\{\{(.*?)\}\}", action, template, flags=re.S)


def test_export_command_writes_the_gguf_and_an_ollama_modelfile(tiny_run, tmp_path, capsys):
    folder = tmp_path / "ollama"
    assert main(["export", str(tiny_run), "--ollama", str(folder)]) == 0
    out = capsys.readouterr().out
    gguf = folder / f"{tiny_run.name}-q8_0.gguf"
    assert gguf.is_file() and str(gguf) in out and "ollama create" in out
    text = (folder / "Modelfile").read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"FROM ./{gguf.name}"
    assert 'PARAMETER stop "<eos>"' in text and "PARAMETER temperature 0" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    run = load_answerer(str(tiny_run), device="cpu")
    want = render_prompt(run.template, Example("Say hello.", ""), run.tokenizer)
    assert render_go(template, "Say hello.") == want
    _, _, meta = read_back(gguf)
    rendered = meta["tokenizer.chat_template"]
    assert "Say hello" not in rendered and "{{ messages[-1]['content'] }}" in rendered
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert f"ollama create {tiny_run.name} -f Modelfile" in readme
    assert f"llama-cli -m {gguf.name} " in readme and "`<eos>`" in readme


def test_export_into_a_new_folder_with_the_gguf_written_elsewhere(tiny_run, tmp_path,
                                                                  monkeypatch):
    """The --ollama folder need not exist; FROM finds the GGUF wherever --output put it: by
    its absolute path outside the folder, by a relative one inside it."""
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "model.gguf"
    assert main(["export", str(tiny_run), "--quant", "f16", "--output", str(elsewhere),
                 "--ollama", "new/ollama"]) == 0
    modelfile = tmp_path / "new" / "ollama" / "Modelfile"
    source = modelfile.read_text(encoding="utf-8").splitlines()[0].removeprefix("FROM ")
    assert Path(source).is_absolute() and Path(source).samefile(elsewhere)
    assert (modelfile.parent / "README.md").is_file()
    assert main(["export", str(tiny_run), "--quant", "f16", "--output",
                 "newer/ollama/sub/model.gguf", "--ollama", "newer/ollama"]) == 0
    modelfile = tmp_path / "newer" / "ollama" / "Modelfile"
    source = modelfile.read_text(encoding="utf-8").splitlines()[0].removeprefix("FROM ")
    assert source == "./sub/model.gguf" and (modelfile.parent / source).is_file()


def test_a_lora_run_is_merged_on_the_way(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text("Say hello.#Hello!\nName a fruit.#Apple\n",
                                        encoding="utf-8")
    run = train(tmp_path / "facts.txt", tmp_path / "lora",
                tiny_settings(tiny_base, lora=True, lr=1e-2, epochs=3),
                report=lambda m: None, progress=False)
    exported = export(run, "f16")
    assert exported.gguf == tmp_path / "lora-f16.gguf"
    model, _, _ = read_back(exported.gguf)
    merged = load_answerer(str(run), device="cpu")
    ids = merged.tokenizer("Say hello.")["input_ids"]
    want = logits(merged.model, ids)
    assert (logits(model, ids) - want).abs().max() <= 2e-3 * want.abs().max()


def test_what_cannot_be_exported_is_refused_before_any_work(tiny_run, tmp_path, capsys,
                                                            monkeypatch):
    assert main(["export", str(tmp_path)]) == 2
    assert "is not a trained run" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--output", str(tmp_path / "x.bin")]) == 2
    assert "ends in .gguf" in capsys.readouterr().err
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"earlier export")
    assert main(["export", str(tiny_run), "--output", str(taken)]) == 2
    assert "--force" in capsys.readouterr().err and taken.read_bytes() == b"earlier export"
    config = json.loads((tiny_run / "config.json").read_text())
    other = tmp_path / "gpt2-run"
    other.mkdir()
    for name in tiny_run.iterdir():
        if name.is_file() and name.name != "model.safetensors":
            (other / name.name).write_bytes(name.read_bytes())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert main(["export", str(other)]) == 2  # no weights there: refused before loading them
    assert "does not support 'gpt2' models yet" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where it is not installed
    assert main(["export", str(tiny_run), "--quant", "q4_k_m", "-o", str(tmp_path / "q.gguf")]) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == ["taken.gguf"]
