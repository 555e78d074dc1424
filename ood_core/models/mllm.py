"""Multimodal LLM clients: local transformers models or an OpenAI-compatible HTTP endpoint.

A message is ``{"role": "system"|"user"|"assistant", "content": [part, ...]}`` with parts
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image.Image}``.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ood_core.models import MLLM_BACKENDS, RetryableError, resolve_name


@runtime_checkable
class MLLMClient(Protocol):
    """Anything that answers a multimodal chat with a string."""

    def chat(self, messages: list[dict], *, max_new_tokens: int | None = None, seed: int = 0) -> str: ...


def _normalise(messages: list[dict]) -> list[dict]:
    """Accept ``content`` given as a plain string too."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": list(content)})
    return out


# ---------------------------------------------------------------- transformers
class TransformersMLLM:
    """A local vision-language model (LLaVA-1.5, Qwen2-VL, ...) via AutoModelForImageTextToText."""

    def __init__(
        self, model: Any, processor: Any, device: torch.device, max_new_tokens: int, temperature: float
    ):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def chat(self, messages: list[dict], *, max_new_tokens: int | None = None, seed: int = 0) -> str:
        """Generate a reply; greedy when temperature is 0, else sampled with a ``seed``-ed RNG."""
        messages = _normalise(messages)
        images = [p["image"].convert("RGB") for m in messages for p in m["content"] if p["type"] == "image"]
        # Render the template to text and run the processor ourselves: this works the same for
        # every processor and keeps images in message order.
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(self.device)
        tok = getattr(self.processor, "tokenizer", self.processor)
        gen: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or self.max_new_tokens,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        # generate() has no generator argument, so sampling is made reproducible by seeding
        # inside a forked RNG (the caller's global RNG state is left untouched).
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        return tok.decode(new, skip_special_tokens=True).strip()


@MLLM_BACKENDS.register("transformers")
def load_transformers_mllm(spec, device: torch.device, cache_dir: str) -> TransformersMLLM:
    """Load ``spec.name`` (hub id, local dir or ``tiny://llava``) with AutoProcessor + AutoModel."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_name(spec.name, cache_dir)
    # Real hub ids download into cache_dir; local dirs (incl. tiny) ignore it.
    processor = AutoProcessor.from_pretrained(path, cache_dir=cache_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, cache_dir=cache_dir, dtype=dtype)
    return TransformersMLLM(model, processor, device, spec.max_new_tokens, spec.temperature)


# ---------------------------------------------------------------- openai-compatible
def image_data_url(image: Image.Image) -> str:
    """PNG data URL of ``image`` as OpenAI-style chat APIs accept."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIMLLM:
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, Ollama, ...)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        max_new_tokens: int,
        temperature: float,
        timeout: float = 300.0,
    ):
        import httpx

        base = base_url.rstrip("/")
        # Accept both ".../v1" and the bare server root.
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    @staticmethod
    def to_openai_messages(messages: list[dict]) -> list[dict]:
        """Convert our message format to OpenAI chat content parts."""
        out = []
        for m in _normalise(messages):
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"type": "text", "text": p["text"]})
                elif p["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(p["image"])}})
                else:
                    raise ValueError(f"unsupported content part type {p['type']!r}")
            out.append({"role": m["role"], "content": parts})
        return out

    def chat(self, messages: list[dict], *, max_new_tokens: int | None = None, seed: int = 0) -> str:
        """POST the conversation and return the first choice's text."""
        import httpx

        body = {
            "model": self.model,
            "messages": self.to_openai_messages(messages),
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
            "seed": seed,
        }
        try:
            resp = self._client.post(self.url, json=body)
            resp.raise_for_status()
            data = resp.json()
            return data["choices"][0]["message"]["content"] or ""
        except httpx.HTTPStatusError as err:
            code = err.response.status_code
            # 429 and 5xx pass: retry the shard; other 4xx mean a bad request or model name
            kind = RetryableError if code == 429 or code >= 500 else RuntimeError
            raise kind(f"MLLM endpoint {self.url} returned HTTP {code}: {err.response.text[:500]}") from err
        except httpx.HTTPError as err:
            raise RetryableError(f"MLLM endpoint {self.url} failed: {type(err).__name__}: {err}") from err
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise RuntimeError(f"MLLM endpoint {self.url} returned an unexpected response: {err!r}") from err

    def close(self) -> None:
        self._client.close()


@MLLM_BACKENDS.register("openai")
def load_openai_mllm(spec, device: torch.device, cache_dir: str) -> OpenAIMLLM:
    """Client for ``spec.base_url``; the API key is read from env var ``spec.api_key_env`` if set."""
    if not spec.base_url:
        raise ValueError(
            "models.mllm.base_url is required for the 'openai' backend (e.g. http://host:8000/v1)"
        )
    api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    return OpenAIMLLM(spec.base_url, spec.name, api_key, spec.max_new_tokens, spec.temperature)


# ---------------------------------------------------------------- multi-turn, batched
def chat_batch(
    client: MLLMClient, conversations: list[list[dict]], *, seeds: list[int], max_new_tokens: int | None = None
) -> list[str | Exception]:
    """One reply per conversation (each a full multi-turn message list), in order.

    A client may answer many conversations at once with its own ``chat_batch`` method; otherwise
    they are sent one by one. A conversation's own error (a bad request, an image the model cannot
    take) is returned in its place, so one bad image does not lose the others; passing failures
    (:class:`RetryableError`, e.g. the endpoint is down) are raised, so the shard is retried.
    """
    native = getattr(client, "chat_batch", None)
    if native is not None:
        return native(conversations, seeds=seeds, max_new_tokens=max_new_tokens)
    out: list[str | Exception] = []
    for conv, seed in zip(conversations, seeds, strict=True):
        try:
            out.append(client.chat(conv, max_new_tokens=max_new_tokens, seed=seed))
        except RetryableError:
            raise
        except Exception as err:  # noqa: BLE001 - returned in place of this conversation's reply
            if type(err).__name__ == "OutOfMemoryError":
                raise
            out.append(err)
    return out
