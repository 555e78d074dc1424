"""MM-OOD's far branch: text-to-image generation, multi-round MLLM elaboration, outlier labels.

The elaboration test drives elaborate through the OpenAI-compatible backend against a scripted
server on 127.0.0.1: the test chooses every answer (by image and round) and asserts the outcome.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from ood_core.config import load_config
from ood_core.data import load_id_dataset
from ood_core.pipeline import resolve_keys, run_local
from ood_core.stages.elaborate import parse_outlier_label, parse_yes_no, read_outlier_table
from ood_core.stages.finetune import mix_labels
from ood_core.storage import StageStore

# ---------------------------------------------------------------- pure parsing and mixing


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("yes", "yes"), ("Yes, a cat is visible.", "yes"), ("  **No.**", "no"), ("no", "no"),
        ("maybe", "unclear"), ("", "unclear"), (None, "unclear"), ("Oui", "unclear"),
        ("I cannot help with that.", "unclear"), ("#$%@!", "unclear"), ("yesterday", "unclear"),
    ],
)
def test_yes_no_parsing_is_strict_about_the_first_word(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_outlier_label_parsing():
    assert parse_outlier_label("A jellyfish lamp.", 3) == "jellyfish lamp"
    assert parse_outlier_label("Sure! Here is the label:\n- glass octopus", 3) == "glass octopus"
    assert parse_outlier_label("a very long label with many words", 3) is None
    assert parse_outlier_label("", 3) is None
    assert parse_outlier_label("#$%@ ~~ 123", 3) is None


def test_mix_labels_follows_the_near_ratio():
    near, far = ["n1", "n2", "n3", "n4"], ["f1", "f2", "f3", "f4", "f5", "f6"]
    assert mix_labels(near, far, 0.5) == ["n1", "n2", "n3", "n4", "f1", "f2", "f3", "f4"]
    assert mix_labels(near, far, 0.0) == far
    assert mix_labels(near, far, 1.0) == near
    assert mix_labels(near[:1], far, 0.25) == ["n1", "f1", "f2", "f3"]
    assert mix_labels([], far, 0.5) == far and mix_labels(near, [], 0.5) == near


# ---------------------------------------------------------------- text-to-image
def test_tiny_text_to_image_is_a_4_channel_pipeline_and_batch_independent(tmp_path):
    from ood_core.config import TextToImageSpec
    from ood_core.models import load_text_to_image

    t2i = load_text_to_image(TextToImageSpec(name="tiny://sd-t2i", resolution=32), "cpu", str(tmp_path))
    assert t2i.pipe.unet.config.in_channels == 4
    batch = t2i.generate(["a photo of a volcano.", "a photo of a violin."], [1, 2], steps=2, guidance=7.5)
    alone = t2i.generate(["a photo of a violin."], [2], steps=2, guidance=7.5)
    other = t2i.generate(["a photo of a violin."], [3], steps=2, guidance=7.5)
    assert [im.size for im in batch] == [(32, 32), (32, 32)]
    px = [np.asarray(im, dtype=np.int16) for im in (batch[1], alone[0], other[0])]
    # a sample depends on its seed, not on the batch (up to float rounding of batched kernels)
    assert np.abs(px[0] - px[1]).max() <= 2
    assert np.abs(px[2] - px[1]).mean() > 10 * max(np.abs(px[0] - px[1]).mean(), 0.01)


# ---------------------------------------------------------------- scripted OpenAI-compatible server
class ScriptedMLLM:
    """Answers chosen per (image, round); records every request it received."""

    def __init__(self):
        self.url_to_key: dict[str, str] = {}
        self.script: dict[str, dict[int, str]] = {}
        self.requests: list[tuple[str, int, list[dict]]] = []
        self.lock = threading.Lock()

    def answer(self, body: dict) -> str:
        messages = body["messages"]
        image_url = next(p["image_url"]["url"] for p in messages[0]["content"] if p["type"] == "image_url")
        key = self.url_to_key[image_url]
        rnd = sum(m["role"] == "user" for m in messages)
        with self.lock:
            self.requests.append((key, rnd, messages))
        default = {1: "A colourful abstract picture.", 2: "No.", 3: "glass sculpture"}
        return self.script.get(key, {}).get(rnd, default[rnd])


def _serve(mllm: ScriptedMLLM) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = mllm.answer(body)
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _overrides(model_cache: str, **extra: str) -> dict[str, str]:
    return {
        "models.cache_dir": model_cache,
        "data.images_per_class": "8",
        "sketch.near_per_class": "0",
        "sketch.far_labels": "1",
        "sketch.sources_per_class": "1",
        # cosine hygiene off: the random tiny CLIP's text cosines are meaningless
        "sketch.overlap_cosine": "1.0",
        "sketch.far_extra_labels": "[volcano, jellyfish, lighthouse, violin]",
        "generate.steps": "2",
        "generate.rounds": "1",
        "generate.t2i_steps": "2",
        "generate.images_per_label": "2",
        # boundary and far images only: the scripted MLLM knows each image it judges
        "generate.multi_os": "{blank: 0, interpolations: 0, llm_interpolations: 0, counterfactuals: 0}",
        # CLIP filters off, so the outcome is the MLLM's alone
        "elaborate.max_id_confidence": "1.0",
        "elaborate.dedup_cosine": "1.0",
        "elaborate.unclear": "reject",
        **extra,
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """sketch + generate on a small tiny config, and a scripted server that knows every image."""
    from ood_core.models.mllm import image_data_url

    model_cache = str(tmp_path_factory.mktemp("models"))
    root = str(tmp_path_factory.mktemp("mmood"))
    mllm = ScriptedMLLM()
    server = _serve(mllm)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    over = _overrides(model_cache, **{"elaborate.mllm": f"{{backend: openai, name: scripted-vlm, base_url: {base}}}"})
    cfg = load_config("tiny", over)
    run_local(cfg, root, only=["sketch", "generate"], log=lambda m: None)
    gen = StageStore(root, "generate", resolve_keys(cfg)["generate"])
    rows = gen.read_manifest().to_pylist()
    for key, files in gen.iter_samples():
        mllm.url_to_key[image_data_url(Image.open(io.BytesIO(files["png"])).convert("RGB"))] = key
    yield {"cfg": cfg, "root": root, "rows": rows, "mllm": mllm, "over": over, "base": base}
    server.shutdown()


def test_generate_has_boundary_and_far_rows_with_their_provenance(upstream):
    rows = upstream["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"boundary", "far"}
    far = [r for r in rows if r["kind"] == "far"]
    labels = {r["label"] for r in far}
    assert {"volcano", "jellyfish", "lighthouse", "violin"} <= labels
    for r in far:
        assert r["status"] == "ok" and r["prompt"] == f"a photo of a {r['label']}." and r["prompt_id"] == "photo"
        assert r["model_id"] == "tiny://sd-t2i" and r["seed"] is not None
        assert "seconds" not in r  # wall-clock timings are no content: they are in timings/
    # images_per_label samples per label, each with its own seed
    assert sum(r["label"] == "volcano" for r in far) == 2
    assert len({r["seed"] for r in far}) == len(far)


def test_elaborate_through_scripted_endpoint_keeps_rejects_and_flags_exactly(upstream):
    mllm, rows = upstream["mllm"], upstream["rows"]
    far = [r["key"] for r in rows if r["kind"] == "far"]
    boundary = [r["key"] for r in rows if r["kind"] == "boundary"]
    a_yes, b_ok, c_maybe, d_garbage, e_id, f_leak, g_nolabel = far[:7]
    mllm.script.update({
        a_yes: {2: "Yes."},
        b_ok: {1: "A translucent blob floating in blue water.", 2: "No.", 3: "jellyfish lamp"},
        c_maybe: {2: "maybe"},
        d_garbage: {2: "#$%@ ~~"},
        e_id: {2: "No", 3: "a cat"},
        f_leak: {2: "no", 3: "galaxy"},
        g_nolabel: {2: "No.", 3: ""},
        boundary[0]: {2: "Yes, there is one."},
    })
    cfg = upstream["cfg"]
    run_local(cfg, upstream["root"], only=["elaborate"], log=lambda m: None)
    store = StageStore(upstream["root"], "elaborate", resolve_keys(cfg)["elaborate"])
    out = {r["key"]: r for r in store.read_manifest().to_pylist()}
    assert set(out) == {r["key"] for r in rows}  # every generated image has a row

    # image status and reason
    expected = {a_yes: ("rejected", "id_visible"), c_maybe: ("rejected", "id_visible_unclear"),
                d_garbage: ("rejected", "id_visible_unclear"), boundary[0]: ("rejected", "id_visible")}
    for key, r in out.items():
        assert (r["status"], r["reason"]) == expected.get(key, ("kept", "ok")), key
    assert {k for k, r in out.items() if r["id_visible"] == "unclear"} == {c_maybe, d_garbage}
    assert out[d_garbage]["answer_id_visible"] == "#$%@ ~~"  # the raw answer is kept

    # every row: raw answers, parsed fields, prompt ids, model id; boundary images get two rounds
    for r in out.values():
        assert r["mllm_model"] == "scripted-vlm" and r["answer_describe"] and r["answer_id_visible"] is not None
        n_rounds = 3 if r["kind"] == "far" else 2
        assert len(json.loads(r["prompt_ids"])) == n_rounds
        assert (r["answer_label"] is not None) == (n_rounds == 3)
    classnames = load_id_dataset(cfg.data, cfg.seed).classnames
    assert json.loads(out[boundary[0]]["asked_classes"]) == [classnames[out[boundary[0]]["class_idx"]]]
    assert len(json.loads(out[b_ok]["asked_classes"])) == 3  # far: the CLIP top-k ID classes (tiny: k=3)

    # round-3 labels through sketch's hygiene
    assert (out[b_ok]["elaborated_label"], out[b_ok]["label_status"], out[b_ok]["leakage"]) == (
        "jellyfish lamp", "kept", False)
    assert (out[e_id]["label_status"], out[e_id]["label_reason"]) == ("rejected", "equals_id_class")
    assert (out[f_leak]["elaborated_label"], out[f_leak]["label_status"], out[f_leak]["leakage"]) == (
        "galaxy", "kept", True)
    assert (out[g_nolabel]["label_status"], out[g_nolabel]["label_reason"]) == ("rejected", "no_label_parsed")

    # round 3 was sent with rounds 1-2 in its context
    r3 = [m for key, rnd, m in mllm.requests if key == b_ok and rnd == 3]
    assert len(r3) == 1
    msgs = r3[0]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    text = [" ".join(p.get("text", "") for p in m["content"]) for m in msgs]
    assert text[1] == "A translucent blob floating in blue water." and text[3] == "No."
    assert "Describe" in text[0] and "yes or no" in text[2] and "label" in text[4]
    assert not any(rnd == 3 for key, rnd, _ in mllm.requests if key == boundary[0])

    # the outlier-label table: sketched + elaborated, with origin, fate and leakage
    table = read_outlier_table(store)
    elaborated = {r["image_key"]: r for r in table if r["origin"] == "elaborate"}
    assert set(elaborated) == set(far)
    assert (elaborated[b_ok]["label"], elaborated[b_ok]["status"]) == ("jellyfish lamp", "kept")
    assert elaborated[a_yes]["reason"] == "image_rejected"  # its image showed an ID class
    assert elaborated[f_leak]["leakage"] is True and elaborated[e_id]["reason"] == "equals_id_class"
    sketched = {r["label"] for r in table if r["origin"] == "sketch"}
    assert {"volcano", "jellyfish", "lighthouse", "violin"} <= sketched


def test_unclear_policy_keep_keeps_the_unclear_images(upstream):
    cfg = load_config("tiny", {**upstream["over"], "elaborate.unclear": "keep"})
    run_local(cfg, upstream["root"], only=["elaborate"], log=lambda m: None)
    out = StageStore(upstream["root"], "elaborate", resolve_keys(cfg)["elaborate"]).read_manifest().to_pylist()
    unclear = [r for r in out if r["id_visible"] == "unclear"]
    assert unclear and all(r["status"] == "kept" for r in unclear)


def test_mllm_filter_off_records_the_verdicts_and_applies_only_the_clip_filters(upstream):
    far = [r["key"] for r in upstream["rows"] if r["kind"] == "far"]
    upstream["mllm"].script.update({far[0]: {2: "Yes."}, far[2]: {2: "maybe"}})  # as the test above scripts them
    run_local(upstream["cfg"], upstream["root"], only=["elaborate"], log=lambda m: None)
    on = StageStore(upstream["root"], "elaborate", resolve_keys(upstream["cfg"])["elaborate"])
    by_key = {r["key"]: r for r in on.read_manifest().to_pylist()}
    cfg = load_config("tiny", {**upstream["over"], "elaborate.mllm_filter": "false"})
    assert resolve_keys(cfg)["elaborate"] != on.key  # its own folder
    run_local(cfg, upstream["root"], only=["elaborate"], log=lambda m: None)
    off = StageStore(upstream["root"], "elaborate", resolve_keys(cfg)["elaborate"]).read_manifest().to_pylist()
    assert {r["reason"] for r in off}.isdisjoint({"id_visible", "id_visible_unclear"})
    mllm_rejected = [r for r in off if by_key[r["key"]]["reason"] in ("id_visible", "id_visible_unclear")]
    assert mllm_rejected and all(r["id_visible"] == by_key[r["key"]]["id_visible"] for r in off)
    # what the MLLM did not reject is decided as before
    for r in off:
        if r not in mllm_rejected:
            assert (r["status"], r["reason"]) == (by_key[r["key"]]["status"], by_key[r["key"]]["reason"]), r["key"]


def test_endpoint_down_fails_the_shard_for_a_retry(upstream):
    from ood_core.models import RetryableError

    cfg = load_config("tiny", {**upstream["over"], "elaborate.mllm": "{backend: openai, name: x, "
                               "base_url: 'http://127.0.0.1:9/v1'}"})
    # check=False: the endpoint goes down after the preflight found it (the preflight itself stops an
    # endpoint that is down at the start: tests/test_preflight.py)
    with pytest.raises(RetryableError):
        run_local(cfg, upstream["root"], only=["elaborate"], log=lambda m: None, check=False)
    store = StageStore(upstream["root"], "elaborate", resolve_keys(cfg)["elaborate"])
    assert store.shard_indices() == [] and not store.is_complete()  # no empty success


def test_elaborate_prompt_change_reuses_sketch_and_generate(upstream):
    cfg = upstream["cfg"]
    other = load_config("tiny", {**upstream["over"], "elaborate.describe_prompt": "describe_v2"})
    a, b = resolve_keys(cfg), resolve_keys(other)
    assert a["sketch"] == b["sketch"] and a["generate"] == b["generate"]
    assert a["elaborate"] != b["elaborate"] and a["finetune"] != b["finetune"]
    logs: list[str] = []
    run_local(other, upstream["root"], only=["sketch", "generate", "elaborate"], log=logs.append)
    assert any(m.startswith("[sketch] reused") for m in logs) and any(m.startswith("[generate] reused") for m in logs)
    assert any(m.startswith("[elaborate] done") for m in logs)
    first = [m for key, rnd, m in upstream["mllm"].requests if rnd == 1][-1]
    assert "main object or scene" in first[0]["content"][-1]["text"]  # describe_v2 was asked


def test_more_far_images_per_label_reuses_the_boundary_shards(upstream, monkeypatch):
    from ood_core.stages.generate import BoundaryGenerator

    def no_boundary_work(self, ctx, items):
        raise AssertionError("boundary images were generated again")

    monkeypatch.setattr(BoundaryGenerator, "generate_batch", no_boundary_work)
    cfg = load_config("tiny", {**upstream["over"], "generate.images_per_label": "3"})
    logs: list[str] = []
    run_local(cfg, upstream["root"], only=["sketch", "generate"], log=logs.append)
    assert any(m.startswith("[sketch] reused") for m in logs)
    copied = [m for m in logs if m.startswith("[generate] shard") and "copied from" in m]
    assert copied  # the boundary shards
    rows = StageStore(upstream["root"], "generate", resolve_keys(cfg)["generate"]).read_manifest().to_pylist()
    assert sum(r["label"] == "volcano" for r in rows) == 3
    assert [r["key"] for r in rows if r["kind"] == "boundary"] == [
        r["key"] for r in upstream["rows"] if r["kind"] == "boundary"
    ]
    # (multi_os candidates outside the blank areas are rejected rows of their own)
    assert all(r["status"] == "ok" for r in rows if r["kind"] != "multi_os")


def test_finetune_mm_ood_uses_elaborated_labels_and_far_images_can_train(upstream):
    """EOE scores with the sketched labels, MM-OOD with sketched + elaborated (unscripted: 'glass sculpture')."""
    cfg = upstream["cfg"]
    keys = resolve_keys(cfg)
    run_local(cfg, upstream["root"], only=["elaborate"], log=lambda m: None)  # reused when an earlier test ran it
    table = read_outlier_table(StageStore(upstream["root"], "elaborate", keys["elaborate"]))
    elaborated = {r["label"] for r in table if r["origin"] == "elaborate" and r["status"] == "kept"}
    assert elaborated
    logs: list[str] = []
    res = run_local(cfg, upstream["root"], log=logs.append)["finetune"]["summary"]
    labels = res["outlier_labels"]
    assert {"eoe", "mm_ood"} <= set(res["metrics"])
    # no near labels in this config, so the near/far mix is the far set whole
    assert set(labels["mm_ood"]) - set(labels["eoe"]) == elaborated
    boundary_only = next(m for m in logs if "training adapter" in m)

    mixed = load_config("tiny", {**upstream["over"], "finetune.synthetic_kinds": "[boundary, far]"})
    logs.clear()
    run_local(mixed, upstream["root"], log=logs.append)
    assert any("copied from" in m for m in logs if m.startswith("[finetune] shard"))  # features reused
    both = next(m for m in logs if "training adapter" in m)
    kept = StageStore(upstream["root"], "elaborate", keys["elaborate"]).read_manifest().to_pylist()
    n_boundary = sum(r["status"] == "kept" and r["kind"] == "boundary" for r in kept)
    n_far = sum(r["status"] == "kept" and r["kind"] == "far" for r in kept)
    assert f"({n_boundary} synthetic," in boundary_only and f"({n_boundary + n_far} synthetic," in both
