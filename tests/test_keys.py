"""Stage keys hold content, not infrastructure: where data lives or a model is served is not in them."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from ood_core import dataset_index
from ood_core.config import load_config
from ood_core.pipeline import resolve_keys, run_local
from ood_core.stages import STAGE_ORDER


def _img(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)


def _dataset(base):
    for c, name in enumerate(["cat", "dog"]):
        for i in range(6):
            _img(base / "id" / "train" / name / f"{i}.png", 10 * c + i)
    for i in range(4):
        _img(base / "ood" / "Noise" / f"{i}.png", 100 + i)
    return base


def _overrides(base, models):
    return {
        "models.cache_dir": str(models),
        "data.id_source": "imagefolder",
        "data.root": str(base / "id"),
        "data.ood_root": str(base / "ood"),
        "data.ood_sets": "[Noise]",
        "data.images_per_class": "6",
        # random pixels and a random tiny CLIP: keep every synthetic image so finetune has data
        "elaborate.max_id_confidence": "1.0",
        "elaborate.dedup_cosine": "1.0",
    }


def test_moved_data_has_the_same_keys_and_an_edited_file_does_not(tmp_path):
    a = _dataset(tmp_path / "a")
    keys = resolve_keys(load_config("tiny", _overrides(a, tmp_path / "m")))
    b = tmp_path / "mnt" / "elsewhere"
    shutil.copytree(a, b)
    assert resolve_keys(load_config("tiny", _overrides(b, tmp_path / "other-cache"))) == keys
    _img(b / "id" / "train" / "dog" / "3.png", 999)  # same name, other content (other size)
    (b / "id" / "train" / "dog" / "3.png").write_bytes((b / "id" / "train" / "dog" / "3.png").read_bytes() + b"\0")
    dataset_index.forget()  # the data is listed once per run; a new run lists it anew
    changed = resolve_keys(load_config("tiny", _overrides(b, tmp_path / "m")))
    assert changed["sketch"] != keys["sketch"]


@pytest.mark.slow
def test_moved_data_root_reuses_every_stage(tmp_path):
    a = _dataset(tmp_path / "a")
    out = str(tmp_path / "out")
    run_local(load_config("tiny", _overrides(a, tmp_path / "m")), out, log=lambda m: None)
    b = tmp_path / "moved"
    shutil.move(str(a), str(b))
    lines: list[str] = []
    results = run_local(load_config("tiny", _overrides(b, tmp_path / "m")), out, log=lines.append)
    assert [ln for ln in lines if "reused" in ln] == [ln for ln in lines], lines
    assert set(results) == set(STAGE_ORDER) and len(lines) == len(STAGE_ORDER)


class _Chat(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "1. beach\n2. desert\n3. forest"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def _serve():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_changed_endpoint_url_reuses_sketch(tmp_path):
    first, url1 = _serve()
    second, url2 = _serve()
    try:
        def cfg(url, name="served-model"):
            return load_config(
                "tiny",
                {
                    "models.cache_dir": str(tmp_path / "m"),
                    "models.mllm.backend": "openai",
                    "models.mllm.base_url": url,
                    "models.mllm.name": name,
                },
            )

        out = str(tmp_path / "out")
        run_local(cfg(url1), out, only=["sketch"], log=lambda m: None)
        assert _Chat.calls > 0
        calls = _Chat.calls
        lines: list[str] = []
        run_local(cfg(url2), out, only=["sketch"], log=lines.append)
        assert any(ln.startswith("[sketch] reused") for ln in lines) and _Chat.calls == calls
        # the model behind the endpoint is content: another name is another key
        assert resolve_keys(cfg(url2, "other-model"))["sketch"] != resolve_keys(cfg(url2))["sketch"]
    finally:
        first.shutdown()
        second.shutdown()
