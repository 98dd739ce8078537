"""Does llama.cpp's own chat code render an exported run's prompt exactly as the run does?

`llama-cli` (which turns on its own Jinja engine by default) renders a chat with the GGUF's
chat template; `render_prompt` (render.cpp, built from llama.cpp's source) does the same for
one user message. For every named template, a custom one, and a few awkward instructions
(quotes, braces, a backslash, German letters, a line break), this writes a small GGUF with
the embedded model's tokenizer and the template instructlm exports, and compares llama.cpp's
rendering with instructlm's own prompt. Build and run (README.md beside this file):

    .venv/bin/python benchmarks/llama_cpp_prompt/check.py PATH/TO/render_prompt
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

INSTRUCTIONS = ["Name three fruits.", "Schreib Tennis in Großbuchstaben.",
                'A "quoted" {{word}} and \\ here {% x %}.', "Two\nlines, trailing space "]
CUSTOM = 'Q: {instruction}\\n\\tA "{{{{quoted}}}}" \\\\ {{% x %}}: '


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("render_prompt", help="the program built from render.cpp")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructlm.data.formats import Example
    from instructlm.data.templates import NAMED_TEMPLATES, parse_template, render_prompt
    from instructlm.export.exported_prompt import gguf_chat_template
    from instructlm.export.gguf_file import write_gguf
    from instructlm.model.base import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base("embedded"))
    torch.manual_seed(0)  # the weights do not matter: llama.cpp reads only the vocabulary
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True))
    alike = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        gguf, message = Path(tmp) / "prompt.gguf", Path(tmp) / "message.txt"
        for spec in ["seed-en", "seed-de", "chat", CUSTOM]:
            template = NAMED_TEMPLATES.get(spec) or parse_template(spec)
            write_gguf(model, tokenizer, gguf_chat_template(template, tokenizer), gguf, "f16",
                       "prompt")
            for instruction in INSTRUCTIONS:
                want = render_prompt(template, Example(instruction, ""), tokenizer)
                message.write_text(instruction, encoding="utf-8")
                got = subprocess.run([args.render_prompt, str(gguf), str(message)],
                                     capture_output=True, text=True, encoding="utf-8")
                same = got.returncode == 0 and got.stdout == want
                alike += same
                total += 1
                print(f"{'alike' if same else 'DIFFERENT'}: {template.name} {instruction!r}")
                if not same:
                    print(f"  instructlm: {want!r}\n  llama.cpp:  {got.stdout!r}")
    print(f"{alike}/{total} prompts rendered alike by llama.cpp and instructlm")


if __name__ == "__main__":
    main()
