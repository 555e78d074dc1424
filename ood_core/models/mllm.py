"""Multimodal LLM clients: local transformers models or an OpenAI-compatible HTTP endpoint.

A message is ``{"role": "system"|"user"|"assistant", "content": [part, ...]}`` with parts
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image.Image}``.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ood_core.config import EndpointConfig
from ood_core.models import MLLM_BACKENDS, RetryableError, resolve_name
from ood_core.secrets import resolve_api_key, scrub


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
def load_transformers_mllm(spec, device: torch.device, cache_dir: str, **_: Any) -> TransformersMLLM:
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
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, Ollama, ...).

    Every request goes through :class:`~ood_core.models.endpoint.EndpointTransport` (retries,
    bounded in-flight requests, timeout, circuit breaker, scrubbed errors) via :meth:`_complete`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        max_new_tokens: int,
        temperature: float,
        timeout: float | None = None,
        endpoint: EndpointConfig | None = None,
    ):
        from ood_core.models.endpoint import EndpointTransport

        endpoint = endpoint or EndpointConfig()
        if timeout is not None:
            endpoint = endpoint.model_copy(update={"timeout": timeout})
        base = base_url.rstrip("/")
        # Accept both ".../v1" and the bare server root.
        url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.transport = EndpointTransport(url, api_key, endpoint)
        self.url = self.transport.url  # without credentials: safe in messages
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

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
        body = {
            "model": self.model,
            "messages": self.to_openai_messages(messages),
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
            "seed": seed,
        }
        return self._complete(body)

    def _complete(self, body: dict) -> str:
        """Send one chat-completions request body; the reply text, or EndpointRequestError / EndpointDown."""
        from ood_core.models.endpoint import EndpointRequestError

        data = self.transport.post_json(body)
        if isinstance(data, dict) and data.get("error"):
            err = data["error"]
            detail = err.get("message", err) if isinstance(err, dict) else err
            raise EndpointRequestError("error_object", f"MLLM endpoint {self.url} answered with an error: {detail}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise EndpointRequestError(
                "bad_response", f"MLLM endpoint {self.url} returned an unexpected response ({err!r}): {str(data)[:200]}"
            ) from None
        if not isinstance(content, str) or not content.strip():
            # never an empty success: a candidate without a reply is a failed row
            raise EndpointRequestError("empty_reply", f"MLLM endpoint {self.url} returned no text ({content!r})")
        return scrub(content, known_only=True)

    def close(self) -> None:
        self.transport.close()


@MLLM_BACKENDS.register("openai")
def load_openai_mllm(spec, device: torch.device, cache_dir: str, endpoint: EndpointConfig | None = None) -> OpenAIMLLM:
    """Client for ``spec.base_url``; the API key comes from ``endpoint.api_key_secret`` (a secret
    store, see :mod:`ood_core.secrets`) or the environment variable ``spec.api_key_env``."""
    if not spec.base_url:
        raise ValueError(
            "models.mllm.base_url is required for the 'openai' backend (e.g. http://host:8000/v1)"
        )
    endpoint = endpoint or EndpointConfig()
    api_key = resolve_api_key(spec.api_key_env, endpoint.api_key_secret)
    return OpenAIMLLM(spec.base_url, spec.name, api_key, spec.max_new_tokens, spec.temperature, endpoint=endpoint)


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
    from ood_core.models.endpoint import EndpointRequestError

    out: list[str | Exception] = []
    for conv, seed in zip(conversations, seeds, strict=True):
        try:
            out.append(client.chat(conv, max_new_tokens=max_new_tokens, seed=seed))
        except RetryableError:
            raise
        except EndpointRequestError as err:
            # an empty answer is an answer (parsed as unclear / no label), as from a local model
            out.append("" if err.reason == "empty_reply" else err)
        except Exception as err:  # noqa: BLE001 - returned in place of this conversation's reply
            if type(err).__name__ == "OutOfMemoryError":
                raise
            out.append(err)
    return out
