"""`instructlm export`: a run as one GGUF file for llama.cpp, LM Studio and Ollama, with the
prompt it was taught and the token that ends its answers.

What cannot be exported is refused from the run's config and tokenizer, before the weights
are loaded. A LoRA run is merged on the way. Files are written beside their place and
renamed in, so an interrupted export leaves no half file, and an earlier export stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructlm.errors import InstructlmError
from instructlm.export.exported_prompt import gguf_chat_template, modelfile
from instructlm.export.gguf_file import DEFAULT_QUANT, check_exportable, write_gguf
from instructlm.folders import file_written_beside

MODELFILE = "Modelfile"
README = "README.md"  # beside the Modelfile: what the export is and how to run it


@dataclass(frozen=True)
class Exported:
    gguf: Path
    modelfile: Path | None
    end_token: str | None  # None: the run was trained without one, and will not stop


def export(run: str | Path, quant: str = DEFAULT_QUANT, output: str | Path | None = None,
           ollama: str | Path | None = None, force: bool = False) -> Exported:
    from instructlm.answering.answerer import DecodeSettings, load_answerer
    from instructlm.runs import is_run, read_run_info

    run = Path(run)
    if not is_run(run):
        raise InstructlmError(f"{run} is not a trained run",
                              hint="export takes a folder written by `instructlm train`")
    info = read_run_info(run)
    gguf_path, modelfile_path = _places(run, quant, output, ollama)
    for path in (gguf_path, modelfile_path):
        if path is not None and path.exists() and not force:
            raise InstructlmError(f"{path} exists", hint="use --force to replace it")
    _check_before_loading(run, info, quant)

    answerer = load_answerer(str(run), device="cpu")  # a LoRA run comes merged
    model, tokenizer, template = answerer.model, answerer.tokenizer, answerer.template
    chat_template = gguf_chat_template(template, tokenizer)
    end_token = (tokenizer.convert_ids_to_tokens(int(tokenizer.eos_token_id))
                 if info["settings"].get("end_token", True) else None)
    if modelfile_path is not None:  # made before anything is written: it can be refused
        source = gguf_from(modelfile_path.parent, gguf_path)
        text = modelfile(source if Path(source).is_absolute() else f"./{source}", template,
                         tokenizer, end_token, DecodeSettings().max_new_tokens)
        readme = _readme(run, info, source, quant, end_token)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with file_written_beside(gguf_path) as partial:
        write_gguf(model, tokenizer, chat_template, partial, quant, run.name)
    if modelfile_path is not None:
        modelfile_path.parent.mkdir(parents=True, exist_ok=True)
        with file_written_beside(modelfile_path) as partial:
            partial.write_text(text, encoding="utf-8")
        with file_written_beside(modelfile_path.with_name(README)) as partial:
            partial.write_text(readme, encoding="utf-8")
    return Exported(gguf_path, modelfile_path, end_token)


def gguf_from(folder: Path, gguf: Path) -> str:
    """The GGUF as seen from the Modelfile's `folder`: a relative path when it lies inside
    the folder (which can then be moved whole), else its absolute path (a path through `..`
    would break as soon as either is moved)."""
    folder, gguf = folder.resolve(), gguf.resolve()
    if gguf.is_relative_to(folder):
        return gguf.relative_to(folder).as_posix()
    return str(gguf)


def _readme(run: Path, info: dict[str, Any], gguf: str, quant: str,
            end_token: str | None) -> str:
    """What the exported folder holds, where it came from, and how to run it."""
    from instructlm import __version__

    data, name = info["data"], run.name.lower()
    stops = (f"Its answers end with `{end_token}`, the token its training appended to every "
             "response." if end_token else "It was trained without an end token (the "
             "tutorial's way): its answers run on to the token limit.")
    return "\n".join([
        f"# {run.name} ({quant})", "",
        f"`{info['base']['name']}` taught the instructions of `{Path(data['file']).name}` "
        f"({data['n_train']} training examples) with instructlm {info['instructlm_version']}, "
        f"template `{info['template']['name']}`; exported by instructlm {__version__}. "
        f"The GGUF holds the model, its tokenizer and a chat template that renders the "
        f"prompt it was taught with. {stops}", "",
        "## Ollama", "",
        f"    ollama create {name} -f Modelfile",
        f"    ollama run {name} \"your instruction\"", "",
        "The Modelfile asks for greedy answers, as `instructlm ask` gives them.", "",
        "## llama.cpp", "",
        f"    llama-cli -m {gguf} -cnv --temp 0", "",
        "## LM Studio", "",
        f"Load `{gguf}`: it reads the chat template and the end token from the file.", ""])


def _places(run: Path, quant: str, output: str | Path | None,
            ollama: str | Path | None) -> tuple[Path, Path | None]:
    """Where the GGUF (and the Modelfile) go: `--output`, else beside the run, or in the
    `--ollama` folder."""
    if output is not None and not str(output).endswith(".gguf"):
        raise InstructlmError(f"--output {output}: a GGUF file's name ends in .gguf")
    name = f"{run.name}-{quant}.gguf"
    if ollama is not None:
        folder = Path(ollama)
        return (Path(output) if output else folder / name), folder / MODELFILE
    return (Path(output) if output else run.with_name(name)), None


def _check_before_loading(run: Path, info: dict[str, Any], quant: str) -> None:
    """Refuse what cannot be exported from the config and tokenizer alone."""
    from transformers import AutoConfig

    from instructlm.model.adapters import is_adapter_run
    from instructlm.model.base import load_tokenizer, resolve_base

    trust = info["settings"].get("trust_remote_code", False)
    source = resolve_base(info["base"]["spec"]) if is_adapter_run(run) else str(run)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    check_exportable(config, load_tokenizer(str(run)), quant)

