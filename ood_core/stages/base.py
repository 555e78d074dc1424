"""What a stage is: plan shards from the upstream manifests, run one shard, finalize.

A stage never knows how it is executed (plain loop, Prefect tasks, several workers): the runner
calls ``plan`` once (its result is frozen in ``plan.json``), ``run_shard`` for each unfinished
shard, and ``finalize`` once every shard has its stats marker.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ood_core.config import RunConfig
from ood_core.registry import Registry
from ood_core.secrets import scrub
from ood_core.storage import Sample, StageStore, sha256_bytes
from schemas import ManifestSchema

STAGES: Registry[type[Stage]] = Registry("stage")
STAGE_ORDER = ("sketch", "generate", "elaborate", "finetune")
ID_PROMPT = "a photo of a {}."


@dataclass
class ShardPlan:
    index: int
    items: list[dict]


@dataclass
class ShardOutput:
    rows: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    # extra entries for the shard's stats marker (e.g. generate's batch size and numerics): no
    # clock values, the marker is part of the shard's content
    stats: dict = field(default_factory=dict)
    # wall-clock figures (e.g. generate's throughput): stored beside the shard, not in its content
    timings: dict = field(default_factory=dict)
    # the shard's feature file (storage.features_npz), readable without the images
    features: bytes | None = None

    def add(self, row: dict, files: dict[str, bytes] | None = None) -> None:
        self.rows.append(row)
        if files:
            self.samples.append(Sample(row["key"], files))


def row(key: str, status: str, reason: str, error: str | None = None, **cols: Any) -> dict:
    # error texts may quote an endpoint's answer: never store a key or credential from it
    return {"key": key, "status": status, "reason": reason, "error": scrub(error) if error else error, **cols}


def failure_reason(err: BaseException) -> str:
    """A failed row's reason: the error's own ``reason`` (bad input, endpoint answer) or its type."""
    reason = getattr(err, "reason", None)
    return reason if isinstance(reason, str) and reason else type(err).__name__


def derive_seed(run_seed: int, *parts: Any) -> int:
    """A per-sample seed from the run seed and the sample's identity (stable across runs)."""
    digest = hashlib.sha256(json.dumps([run_seed, *parts], default=str).encode()).hexdigest()
    return int(digest[:8], 16)


def chunk(items: list[dict], size: int, start: int = 0) -> list[ShardPlan]:
    return [ShardPlan(start + i, items[j : j + size]) for i, j in enumerate(range(0, len(items), size))]


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# Per-process memo of what every shard task of a run would otherwise recompute: the dataset
# listing, upstream manifests, text features. Prefect runs a flow's tasks in one process.
_MEMO: dict[tuple, Any] = {}


def memo(key: tuple, compute: Callable[[], Any]) -> Any:
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


class ModelLoadError(RuntimeError):
    """A model could not be loaded: a problem of the whole shard, never of one candidate."""


def is_shard_error(err: BaseException) -> bool:
    """Errors that must fail the shard (to be retried) rather than become a candidate's ``failed`` row."""
    from ood_core.models import RetryableError

    # CUDA out-of-memory is matched by name so that this check needs no torch import
    return isinstance(err, ModelLoadError | RetryableError | MemoryError) or type(err).__name__ == "OutOfMemoryError"


class ModelHub:
    """Loads each model once per process, on first use."""

    _cache: dict[tuple, Any] = {}

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def _get(self, role: str, spec: Any, loader: Callable) -> Any:
        from ood_core.models import resolve_device
        from ood_core.preflight import model_help, model_id

        device = resolve_device(self.cfg.models.device)
        key = (role, spec.model_dump_json(), str(device), self.cfg.models.cache_dir)
        if key not in self._cache:
            try:
                self._cache[key] = loader(spec, device, self.cfg.models.cache_dir)
            except Exception as err:  # noqa: BLE001 - any loader failure (e.g. an UnpicklingError) names the model
                raise ModelLoadError(
                    scrub(f"could not load the {role} model '{model_id(role, spec)}' on {device}: "
                          f"{type(err).__name__}: {err}\n")
                    + model_help(role, spec, self.cfg.models.cache_dir)
                ) from err
        return self._cache[key]

    def load(self, roles: tuple[str, ...]) -> None:
        """Load the named models now (a stage's start), so a bad id fails before any shard work."""
        getters = {"clip": self.clip, "mllm": self.mllm, "diffusion": self.inpainter, "t2i": self.text_to_image,
                   "elaborate_mllm": self.elaborate_mllm}
        for role in roles:
            getters[role]()

    @classmethod
    def release(cls) -> None:
        """Drop every loaded model (between stages, so the next stage's models fit on the GPU)."""
        cls._cache.clear()
        import gc

        gc.collect()
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clip(self):
        from ood_core.models import load_clip

        return self._get("clip", self.cfg.models.clip, load_clip)

    def mllm(self):
        return self._load_mllm(self.cfg.models.mllm)

    def _load_mllm(self, spec):
        from functools import partial

        from ood_core.models import load_mllm

        # every HTTP request goes through the endpoint settings (retries, timeouts, key source)
        return self._get("mllm", spec, partial(load_mllm, endpoint=self.cfg.models.endpoint))

    def inpainter(self):
        from ood_core.models import load_inpainter

        return self._get("diffusion", self.cfg.models.diffusion, load_inpainter)

    def text_to_image(self):
        from ood_core.models import load_text_to_image

        return self._get("t2i", self.cfg.models.t2i, load_text_to_image)

    def elaborate_mllm(self):
        """The MLLM of elaborate: ``elaborate.mllm`` when set, else ``models.mllm``."""
        return self._load_mllm(self.cfg.elaborate.mllm or self.cfg.models.mllm)


@dataclass
class StageContext:
    cfg: RunConfig
    store: StageStore
    upstream: dict[str, StageStore]
    log: Callable[[str], None] = print

    @cached_property
    def models(self) -> ModelHub:
        return ModelHub(self.cfg)

    @cached_property
    def dataset(self):
        from ood_core.data import load_id_dataset
        from ood_core.identity import data_identity

        # per data identity: a new listing (a new run on changed data) is a new dataset; only the
        # files a stage uses have their headers read (a bad one fails where it is used)
        key = ("dataset", self.cfg.data.model_dump_json(), self.cfg.seed, data_identity(self.cfg.data, self.cfg.seed))
        return memo(key, lambda: load_id_dataset(self.cfg.data, self.cfg.seed, probe="used"))

    @cached_property
    def records(self) -> dict:
        return {r.key: r for r in self.dataset.records}

    def text_features(self, texts: list[str]):
        """CLIP text features, computed once per process for the same model and texts."""
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        key = ("text", self.cfg.models.clip.model_dump_json(), digest)
        return memo(key, lambda: self.models.clip().encode_texts(texts))

    @cached_property
    def id_text_features(self):
        return self.text_features([ID_PROMPT.format(c) for c in self.dataset.classnames])

    def upstream_rows(self, stage: str, **where: Any) -> list[dict]:
        """Manifest rows of an upstream stage matching ``column=value`` filters, in shard order."""
        store = self.upstream[stage]
        # a complete stage folder is immutable; its _SUCCESS bytes identify this version of it
        key = ("manifest", store.url(), sha256_bytes(store.read_bytes(store.success_path())))
        rows = memo(key, lambda: store.read_manifest().to_pylist())
        return [r for r in rows if all(r.get(k) == v for k, v in where.items())]

    @cached_property
    def negatives(self) -> tuple[list[str], list[str]]:
        """Kept negative labels and their prompts (nouns and adjectives have their own template)."""
        from ood_core.lexicon import ADJ_TEMPLATE, NOUN_TEMPLATE

        rows = self.upstream_rows("sketch", kind="negative", status="kept")
        labels = [r["text"] for r in rows]
        prompts = [(ADJ_TEMPLATE if r["key"].startswith("neg_a") else NOUN_TEMPLATE).format(r["text"]) for r in rows]
        return labels, prompts

    @cached_property
    def negative_text_features(self):
        return self.text_features(self.negatives[1])


class Stage:
    """Base class: subclasses set ``name``, ``schema``, ``upstream`` and implement the hooks."""

    name: str
    schema: ManifestSchema
    upstream: tuple[str, ...] = ()
    # models loaded at the start of the stage (when it has shards to run): roles of ModelHub.load
    models: tuple[str, ...] = ()
    # upstream stages whose folders of earlier generation rounds this stage reads too (as
    # ``<stage>@<round>`` upstream entries), over ``window_size`` rounds
    round_window: tuple[str, ...] = ()

    def window_size(self, cfg: RunConfig) -> int:
        """How many generation rounds, this one included, the ``round_window`` stages are read from."""
        return 1

    def config_slice(self, cfg: RunConfig) -> dict:
        """The part of the config that determines this stage's output (goes into the key)."""
        raise NotImplementedError

    def shard_slice(self, cfg: RunConfig) -> dict | None:
        """The part of the config the shards depend on, when narrower than ``config_slice``.

        Folders whose shard slices (and upstream keys) are equal share their finished shards:
        e.g. finetune's CLIP feature cache does not depend on the training hyperparameters.
        """
        return None

    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        raise NotImplementedError

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        raise NotImplementedError

    def finalize(self, ctx: StageContext) -> dict:
        """Stage-level step after all shards (training, reports); returns a summary."""
        return {}

    def listed_bad_inputs(self, ctx: StageContext) -> list:
        """Input files this stage's listing left out (``data.BadInput``), for its bad_inputs table."""
        return []


def guarded(out: ShardOutput, key: str, fn: Callable[[], None], **cols: Any) -> None:
    """Run one candidate; a failure becomes a ``failed`` row instead of losing the shard."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - every candidate gets a row, failures included
        if is_shard_error(err):
            raise
        out.add(row(key, "failed", failure_reason(err), f"{type(err).__name__}: {err}", **cols))


def check_not_all_failed(stage: str, shard: ShardPlan, out: ShardOutput) -> None:
    """A shard where every candidate failed is a systematic problem: fail loudly so it reruns."""
    failed = [r for r in out.rows if r["status"] == "failed"]
    if out.rows and len(failed) == len(out.rows):
        raise RuntimeError(
            f"{stage} shard {shard.index}: all {len(failed)} candidates failed; first error: {failed[0]['error']}"
        )
