"""A model and its tokenizer -> one GGUF file, as llama.cpp reads it.

gguf-py (llama.cpp's own Python package) writes the file, names the tensors and quantizes
to Q8_0; what is done here follows llama.cpp's converter (`convert_hf_to_gguf.py`) for the
families `architectures.py` marks with a `gguf` name. K-quants need llama.cpp's own
quantizer, reached through llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from instructlm.errors import InstructlmError
from instructlm.model.architectures import ARCHITECTURES, UNKNOWN

QUANTS = ("f16", "q8_0", "q4_k_m")
DEFAULT_QUANT = "q8_0"  # written in pure Python, about half of f16's size, near its answers

# llama.cpp splits text into words with the pre-tokenizer it knows by name; it must split as
# the run's tokenizer does, or the model would be asked in tokens it was not trained on.
# Keyed by the tokenizer's own pre-tokenizer description (tokenizer.json).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "use_regex": True},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "use_regex": False}]},
}


def check_exportable(config: Any, tokenizer: Any, quant: str) -> str:
    """llama.cpp's name for the model's family; refuse, before any work, what cannot go."""
    family = ARCHITECTURES.get(getattr(config, "model_type", ""), UNKNOWN).gguf
    if not family:
        raise InstructlmError(
            f"export does not support {config.model_type!r} models yet",
            hint="export supports Llama, Mistral and Qwen2 models; the run itself still "
                 "answers with `instructlm ask` and `serve`")
    pre_tokenizer(tokenizer)
    _rope_theta(config)
    if quant not in QUANTS:
        raise InstructlmError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    if quant == "q4_k_m":
        _llama_cpp()
    return family


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for how the tokenizer splits text into words before BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                       None)
    if backend is None:
        raise InstructlmError("export needs a fast (tokenizers) tokenizer")
    described = json.loads(backend.to_str())
    if (described.get("model") or {}).get("type") != "BPE":
        raise InstructlmError("export supports byte-level BPE tokenizers only (GPT-2's kind)")
    for name, wanted in _PRE_TOKENIZERS.items():
        if _contains(described.get("pre_tokenizer") or {}, wanted):
            return name
    raise InstructlmError("the tokenizer splits words in a way export does not know for llama.cpp",
                          hint="export supports GPT-2's and Qwen2's pre-tokenizers")


def _contains(have: Any, wanted: Any) -> bool:
    """`have` holds every key and value of `wanted` (lists item by item)."""
    if isinstance(wanted, dict):
        return isinstance(have, dict) and all(_contains(have.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(have, list) and len(have) == len(wanted) and \
            all(_contains(h, w) for h, w in zip(have, wanted))
    return have == wanted


def write_gguf(model: Any, tokenizer: Any, chat_template: str, path: Path, quant: str,
               name: str) -> None:
    """Write `model` (and its tokenizer, end token and chat template) to `path`."""
    if quant == "q4_k_m":
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            full = Path(tmp) / "f16.gguf"
            write_gguf(model, tokenizer, chat_template, full, "f16", name)
            _llama_cpp_quantize(full, path)
        return
    import gguf

    family = check_exportable(model.config, tokenizer, quant)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family)
    config = model.config
    writer = gguf.GGUFWriter(path, family)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_parameters(writer, config, quant)
    _add_vocab(writer, tokenizer, config.vocab_size, chat_template)
    for gguf_name, data in _tensors(model, arch, family == "llama"):
        _add_tensor(writer, gguf_name, data, quant)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_parameters(writer: Any, config: Any, quant: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InstructlmError(f"export does not support RoPE scaling ({rope['rope_type']}) yet")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise InstructlmError("the model's config has no rope_theta")
    return float(theta)


def _add_vocab(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str) -> None:
    """Every token by id, as llama.cpp's converter writes a GPT-2-style vocabulary."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    # The end token is the one training appended to every response: where answers stop.
    special.special_token_ids["eos"] = int(tokenizer.eos_token_id)
    # Whether llama.cpp adds BOS or EOS around a prompt: as the run's tokenizer does.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    special.add_special_token["bos"] = len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def _tensors(model: Any, arch: Any, permute_qk: bool):
    """(GGUF name, fp32 numpy array) for every weight; Llama's Q and K rows reordered for
    llama.cpp's rotary embedding, as its converter does."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses the input embedding when there is no output layer
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InstructlmError(f"export does not know where {hf_name} goes in a GGUF")
        data = tensor.detach().float()
        if permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        yield gguf_name, data.numpy()


def _permute(weights: Any, heads: int) -> Any:
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_tensor(writer: Any, name: str, data: Any, quant: str) -> None:
    """Vectors (norms, biases) stay fp32, as llama.cpp keeps them; matrices go to `quant`,
    or to f16 where their rows do not divide into Q8_0's blocks."""
    import gguf
    import numpy as np

    if data.ndim < 2:
        writer.add_tensor(name, data.astype(np.float32))
        return
    q8 = gguf.GGMLQuantizationType.Q8_0
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        return
    writer.add_tensor(name, data.astype(np.float16))


def _llama_cpp_quantize(source: Path, target: Path) -> None:
    """Q4_K_M by llama.cpp's own quantizer (gguf-py has no K-quant writer)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    # llama.cpp logs a line for every tensor (through llama-cpp-python, to sys.stderr): keep
    # them for an error, not for the screen.
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                params) != 0
    if failed:
        said = " / ".join(log.getvalue().splitlines()[-3:])
        raise InstructlmError(f"llama.cpp could not quantize {source.name} to Q4_K_M",
                              hint=f"llama.cpp said: {said}")


def load_in_llama_cpp(path: Path, n_threads: int = 2, repack: bool = False,
                      **options: Any) -> Any:
    """An exported file in llama.cpp itself (llama-cpp-python's `Llama`), to check the export.

    Without `repack`, as `llama-cli --no-repack` loads it: the weights stay in the file's
    types. Repacked for the CPU, Q8_0 takes ggml's AMX path where the CPU has AMX, which
    crashes on some machines (ggml-org/llama.cpp#20824) and rounds differently on others.
    """
    llama_cpp = _llama_cpp()
    bindings = llama_cpp.llama_cpp  # the C functions, the module `Llama` calls them through
    defaults = bindings.llama_model_default_params

    def params() -> Any:
        chosen = defaults()
        chosen.use_extra_bufts = repack
        return chosen

    # `Llama` takes its model parameters from this function and has no argument for this one.
    bindings.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), **{"n_ctx": 1024, "n_threads": n_threads,
                                             "verbose": False, **options})
    finally:
        bindings.llama_model_default_params = defaults


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise InstructlmError("--quant q4_k_m needs llama.cpp's quantizer",
                              hint="pip install llama-cpp-python (it builds llama.cpp from "
                                   "source: about 20 minutes on 2 cores), or export f16 or "
                                   "q8_0") from None
    return llama_cpp
