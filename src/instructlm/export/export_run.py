"""`instructlm export`: a run as one GGUF file for llama.cpp, LM Studio and Ollama, with the
prompt it was taught and the token that ends its answers.

What cannot be exported is refused from the run's config and tokenizer, before the weights
are loaded. A LoRA run is merged on the way. Files are written beside their place and
renamed in, so an interrupted export leaves no half file, and an earlier export stays whole.
"""

from __future__ import annotations

import errno
import os
from contextlib import ExitStack, suppress
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
        if path is not None:
            _check_place(path, force)
    _check_before_loading(run, info, quant)

    answerer = load_answerer(str(run), device="cpu")  # a LoRA run comes merged
    model, tokenizer, template = answerer.model, answerer.tokenizer, answerer.template
    end_token = (tokenizer.convert_ids_to_tokens(int(tokenizer.eos_token_id))
                 if info["settings"].get("end_token", True) else None)
    texts = {}  # the Ollama folder's files, made before anything is written: they can be refused
    if modelfile_path is not None:
        source = gguf_from(modelfile_path.parent, gguf_path)
        texts[modelfile_path] = modelfile(source if Path(source).is_absolute() else f"./{source}",
                                          template, tokenizer, end_token,
                                          DecodeSettings().max_new_tokens)
        texts[modelfile_path.with_name(README)] = _readme(run, info, source, quant, end_token)
    made, writing = _missing_folders([gguf_path, *texts]), gguf_path
    try:
        with ExitStack() as renames:  # every file whole before any takes its place
            write_gguf(model, tokenizer, gguf_chat_template(template, tokenizer),
                       _beside(renames, gguf_path), quant, run.name)
            for writing, text in texts.items():
                _beside(renames, writing).write_text(text, encoding="utf-8")
    except BaseException as err:
        for folder in made:  # empty by now: the partial files are gone
            with suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise _write_error(err, writing) from None
        raise
    return Exported(gguf_path, modelfile_path, end_token)


def _beside(renames: ExitStack, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return renames.enter_context(file_written_beside(path))


def _missing_folders(paths: list[Path]) -> list[Path]:
    """The folders that writing `paths` will make, deepest first."""
    missing = {folder for path in paths for folder in path.parents if not folder.exists()}
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)


def _check_place(path: Path, force: bool) -> None:
    """Refuse, before the model is loaded, a place that cannot take the file `path`."""
    if path.is_dir():
        raise InstructlmError(f"{path} is a folder, not a file",
                              hint="give the file's name, ending in .gguf, or another --ollama")
    if path.exists() and not force:
        raise InstructlmError(f"{path} exists", hint="use --force to replace it")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not folder.is_dir():
        raise InstructlmError(f"{path} cannot be written: {folder} is a file, not a folder",
                              hint="choose another --output or --ollama")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InstructlmError(f"{path} cannot be written: no permission to write in {folder}",
                              hint="choose a folder you can write to")


def _write_error(err: OSError, path: str | Path) -> InstructlmError:
    """An OSError while writing, said plainly; nothing partial is left by then."""
    if err.errno == errno.ENOSPC:
        return InstructlmError(f"the disk is full: {path} could not be written; nothing of "
                               "this export was left, and earlier files are unchanged",
                               hint="free some space and export again")
    return InstructlmError(f"{path} could not be written: {err.strerror or err}; nothing of "
                           "this export was left, and earlier files are unchanged")


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

