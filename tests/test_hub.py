import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyVideoProcessor
from selfy_hf.evaluation import motion_label_names
from selfy_hf.flops import count_complexity
from selfy_hf.hub import (
    CITATION,
    check_remote_code,
    main,
    normalise_results,
    push_to_hub,
    render_run_card,
    validate_model_card,
    write_model_card,
)

SIZE = 32
TOKEN = "hf_fake_token"
CODE_FILES = [
    "configuration_selfy.py",
    "modeling_selfy.py",
    "native_extraction.py",
    "native_training.py",
    "native_winograd.py",
    "stss.py",
    "video_io.py",
    "video_processing_selfy.py",
]
RESULTS = {
    "validation": {
        "1x1": {"top1": 0.5, "top5": 0.875, "mean_class_accuracy": 0.45, "num_samples": 8},
        "2x3": {"top1": 0.625, "top5": 1.0, "mean_class_accuracy": 0.6, "num_samples": 8},
    }
}


class FakeHub:
    """The Hub endpoints that `create_repo`, `upload_folder`/`create_commit` (metadata validation, preupload, LFS
    batch, basic LFS transfer and verification, ndjson commit) and `ModelCard.load` call, served to
    huggingface_hub's own HTTP client through an `httpx2.MockTransport`. Safetensors files are declared LFS."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_paths: set[str] = set()
        self.validated_cards: list[str] = []
        self.requests: list[str] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        write = request.method in ("POST", "PUT") and not path.startswith("/lfs-")
        if write and request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx2.Response(401, json={"error": "Invalid credentials"})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}"
            url = f"https://huggingface.co/{repo_id}"
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": url})
            self.repos[repo_id], self.commits[repo_id] = {}, []
            return httpx2.Response(200, json={"url": url})
        if path == "/api/validate-yaml":
            content = json.loads(request.content)["content"]
            self.validated_cards.append(content)
            try:
                ModelCard(content, ignore_metadata_errors=False)
            except ValueError as error:
                return httpx2.Response(400, json={"errors": [{"message": str(error)}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", path):
            files = json.loads(request.content)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                for f in files
            ]
            return httpx2.Response(
                200, json={"files": [{**m, "shouldIgnore": False, "oid": None} for m in modes]}
            )
        if re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
            objects = json.loads(request.content)["objects"]
            actions = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {
                        "upload": {"href": f"https://huggingface.co/lfs-upload/{o['oid']}"},
                        "verify": {"href": "https://huggingface.co/lfs-verify"},
                    },
                }
                for o in objects
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": actions})
        if match := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            data = request.read()
            assert hashlib.sha256(data).hexdigest() == match[1]
            self.lfs_objects[match[1]] = data
            return httpx2.Response(200)
        if path == "/lfs-verify":
            body = json.loads(request.content)
            ok = len(self.lfs_objects.get(body["oid"], b"")) == body["size"]
            return httpx2.Response(200 if ok else 404, json={})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            return self._commit(match[1], request.read())
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path):
            files = self.repos.get(match[1], {})
            if match[2] not in files:
                headers = {"x-error-code": "EntryNotFound", "x-error-message": "Entry not found"}
                return httpx2.Response(404, headers=headers, json={"error": "Entry not found"})
            return httpx2.Response(
                200,
                headers={"x-repo-commit": self.commits[match[1]][-1], "etag": '"etag"'},
                content=files[match[2]],
            )
        return httpx2.Response(500, json={"error": f"the fake Hub does not serve {request.method} {path}"})

    def _commit(self, repo_id: str, body: bytes) -> httpx2.Response:
        files = self.repos[repo_id]
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                files[item["value"]["path"]] = self.lfs_objects[item["value"]["oid"]]
                self.lfs_paths.add(item["value"]["path"])
        commit = hashlib.sha1(body).hexdigest()
        self.commits[repo_id].append(commit)
        return httpx2.Response(
            200,
            json={
                "commitUrl": f"https://huggingface.co/{repo_id}/commit/{commit}",
                "commitOid": commit,
                "pullRequestUrl": None,
            },
        )


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(
        constants, "HF_HUB_OFFLINE", False
    )  # the network is the fake: "online" for this process
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the Xet protocol runs in Rust, beyond httpx
    _http.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle), follow_redirects=True)
    )
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def tiny_model(num_labels: int = 8, **labels) -> SelfyForVideoClassification:
    torch.manual_seed(0)
    return SelfyForVideoClassification(
        SelfyConfig.from_preset("selfynet-tiny", num_labels=num_labels, **labels)
    ).eval()


def tiny_processor() -> SelfyVideoProcessor:
    return SelfyVideoProcessor(num_frames=8, crop_size=SIZE, size={"shortest_edge": SIZE})


def saved_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """What a training run leaves: the model, the processor, its settings, logs, curves and checkpoints."""
    names = motion_label_names()
    model = tiny_model(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    directory = tmp_path / "run"
    model.save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    settings = {"model_preset": "selfynet-tiny", "dataset": None, "epochs": 2, "crop_size": SIZE, "seed": 0}
    (directory / "training_config.json").write_text(json.dumps(settings))
    validation = {"top1": 0.75, "top5": 1.0, "mean_class_accuracy": 0.75, "num_samples": 16}
    (directory / "log.jsonl").write_text(json.dumps({"step": 4, "validation": validation}) + "\n")
    (directory / "training_curves.png").write_bytes(b"\x89PNG fake")
    (directory / "checkpoints" / "step-4").mkdir(parents=True)
    (directory / "checkpoints" / "step-4" / "optimizer.bin").write_bytes(b"state")
    return directory


def test_model_card_content_and_metadata(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    robustness = {"occlusion": [{"severity": 0.0, "top1": 0.5}, {"severity": 1.0, "top1": 0.25}]}
    path = write_model_card(
        tmp_path,
        model,
        processor,
        dataset_name="Something-Something V1",
        dataset_id="org/something-something-v1",
        results=RESULTS,
        training_args={"recipe": "official", "epochs": 50, "learning_rate": None},
        base_model="timm/resnet18.a1_in1k",
        robustness=robustness,
        repo_id="org/selfynet-tiny",
    )
    text = path.read_text()
    at_224, at_32 = count_complexity(model, image_size=224), count_complexity(model, image_size=SIZE)
    offsets, window = model.config.selfy_temporal_offsets, model.config.selfy_window_size
    for expected in (
        "TSM ResNet",
        "after stage 2 (`layer2`, the paper's res3)",
        f"({len(offsets)}, {window}, {window}), temporal offsets {offsets}",
        "four 1x3x3 convolutions over (L, U, V)",
        "fusing the L offsets",
        f"{at_224.gmacs:.2f} GMACs at 224x224",
        f"{at_32.gmacs:.3f} GMACs at the trained 32x32",
        f"{at_224.mparams:.2f} M",
        "| validation | 2x3 | 62.50 | 100.00 | 60.00 | 8 |",
        "| `recipe` | official |",
        "| occlusion | 50.0 | 25.0 |",
        'from_pretrained("org/selfynet-tiny", trust_remote_code=True)',
        "pages     = {13065--13075}",
        "Kwon, Heeseung and Kim, Manjin and Kwak, Suha and Cho, Minsu",
        "Intended use and limitations",
    ):
        assert expected in text, expected
    assert "learning_rate" not in text  # unset settings are left out
    assert CITATION in text
    card = ModelCard.load(path)  # huggingface_hub's own parser, as the Hub reads the metadata
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == (
        "transformers",
        "video-classification",
        "apache-2.0",
    )
    assert data.datasets == ["org/something-something-v1"] and data.base_model == "timm/resnet18.a1_in1k"
    assert data.model_name == "selfynet-tiny"
    found = {
        (r.dataset_split, r.metric_config, r.metric_name.split(" (")[0]): r.metric_value
        for r in data.eval_results
    }
    assert found == {
        ("validation", "1x1", "Top-1 accuracy"): 0.5,
        ("validation", "1x1", "Top-5 accuracy"): 0.875,
        ("validation", "2x3", "Top-1 accuracy"): 0.625,
        ("validation", "2x3", "Top-5 accuracy"): 1.0,
    }
    assert {(r.task_type, r.dataset_type, r.dataset_name) for r in data.eval_results} == {
        ("video-classification", "org/something-something-v1", "Something-Something V1")
    }


def test_invalid_card_metadata_is_rejected(tmp_path):
    text = write_model_card(tmp_path, tiny_model(), dataset_name="toy", results=RESULTS).read_text()
    assert validate_model_card(text).data.eval_results
    for old, new, problem in (
        ("pipeline_tag: video-classification", "pipeline_tag: image-classification", "pipeline_tag"),
        ("value: 0.625", "value: 62.5", "fraction"),
        ("library_name: transformers", "library_name: timm", "library_name"),
        ("- task:", "- tsk:", "does not parse"),
    ):
        assert old in text
        with pytest.raises(ValueError, match=problem):
            validate_model_card(text.replace(old, new, 1))


def test_results_shapes_are_normalised():
    flat = {"top1": 0.5, "top5": 0.9}
    assert normalise_results(flat, default_views="2x1") == {"validation": {"2x1": flat}}
    assert normalise_results({"1x1": flat, "2x3": flat}) == {"validation": {"1x1": flat, "2x3": flat}}
    assert normalise_results({"test": flat}) == {"test": {"1x1": flat}}
    assert normalise_results(RESULTS) == RESULTS and normalise_results(None) == {}
    with pytest.raises(ValueError, match="views like"):
        normalise_results({"test": {"one view": flat}})


def test_remote_code_check(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    assert check_remote_code(tmp_path) == CODE_FILES
    source = (tmp_path / "video_io.py").read_text()
    (tmp_path / "video_io.py").write_text("import av\n" + source)
    with pytest.raises(ValueError, match="video_io.py imports 'av' at module level"):
        check_remote_code(tmp_path)
    (tmp_path / "video_io.py").write_text(source)
    (tmp_path / "stss.py").unlink()
    with pytest.raises(ValueError, match=r"stss\.py is missing"):
        check_remote_code(tmp_path)


def test_run_card_from_training_and_evaluation_outputs(run_dir, tmp_path):
    copy = tmp_path / "model_cards" / "selfynet-tiny-motion.md"
    path = render_run_card(run_dir, copy_to=copy, repo_id="org/selfynet-tiny-motion")
    text = path.read_text()
    assert path == run_dir / "README.md" and copy.read_text() == text
    assert "SELFY synthetic motion" in text and "This checkpoint is a demonstration" in text
    assert "| validation | 1x1 | 75.00 | 100.00 | 75.00 | 16 |" in text  # the last validation of log.jsonl
    report = {
        "split": "validation",
        "models": {"run": {"source": str(run_dir), "views": RESULTS["validation"], "robustness": None}},
    }
    (run_dir / "evaluation").mkdir()
    (run_dir / "evaluation" / "results.json").write_text(json.dumps(report))
    text = render_run_card(run_dir).read_text()
    assert "| validation | 2x3 | 62.50 |" in text and "75.00" not in text


def lay_out_hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """The layout `hf_hub_download` leaves: content-addressed blobs, a snapshot of links per commit, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


RELOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    mode, video_path, out_path = sys.argv[1:]
    if mode == "remote":
        # Without selfy_hf: drop every path it could be imported from (the editable install's src/).
        sys.path[:] = [p for p in sys.path if not (Path(p or ".").resolve() / "selfy_hf").is_dir()]
        assert importlib.util.find_spec("selfy_hf") is None
    else:
        import selfy_hf  # noqa: F401
    import numpy as np
    import torch
    from transformers import AutoModelForVideoClassification, AutoVideoProcessor

    remote = mode == "remote"
    model = AutoModelForVideoClassification.from_pretrained("org/selfynet-tiny", trust_remote_code=remote).eval()
    processor = AutoVideoProcessor.from_pretrained("org/selfynet-tiny", trust_remote_code=remote)
    pixel_values = processor(np.load(video_path), num_clips=2, num_crops=3)["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    torch.save({"pixel_values": pixel_values, "logits": logits}, out_path)
    print(json.dumps({"model": type(model).__module__, "selfy_hf": "selfy_hf" in sys.modules}))
    """
)


def test_push_uploads_through_the_commit_api_and_reloads_offline(fake_hub, run_dir, tmp_path):
    info = push_to_hub(run_dir, "org/selfynet-tiny", token=TOKEN, private=True, commit_message="Add SELFY")
    assert info.oid == fake_hub.commits["org/selfynet-tiny"][-1]
    uploaded = fake_hub.repos["org/selfynet-tiny"]
    model = SelfyForVideoClassification.from_pretrained(run_dir).eval()
    processor = SelfyVideoProcessor.from_pretrained(run_dir)
    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    processor.save_pretrained(reference)
    expected = saved_files(reference)
    assert set(uploaded) == set(expected) | {"README.md"}  # no checkpoints, logs or curves
    assert all(uploaded[name] == data for name, data in expected.items())
    assert set(CODE_FILES) <= set(uploaded) and fake_hub.lfs_paths == {"model.safetensors"}
    assert set(fake_hub.validated_cards) == {uploaded["README.md"].decode()}  # the Hub checks its metadata
    assert "org/selfynet-tiny" in validate_model_card(uploaded["README.md"].decode()).text

    cache = tmp_path / "hub_cache"
    lay_out_hub_cache(cache, "org/selfynet-tiny", info.oid, uploaded)
    video = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE + 8, 3), dtype=np.uint8)
    np.save(tmp_path / "video.npy", video)
    expected_pixels = processor(video, num_clips=2, num_crops=3)["pixel_values"]
    with torch.no_grad():
        expected_logits = model(pixel_values=expected_pixels).logits
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
    )
    runs = {
        mode: subprocess.Popen(
            [
                sys.executable,
                "-c",
                RELOAD_SCRIPT,
                mode,
                str(tmp_path / "video.npy"),
                str(tmp_path / f"{mode}.pt"),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("package", "remote")
    }
    for mode, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        loaded = json.loads(stdout.strip().splitlines()[-1])
        outputs = torch.load(tmp_path / f"{mode}.pt")
        torch.testing.assert_close(outputs["pixel_values"], expected_pixels, rtol=0, atol=0)
        torch.testing.assert_close(outputs["logits"], expected_logits, rtol=1e-5, atol=1e-6)
        if mode == "remote":
            assert loaded == {"model": loaded["model"], "selfy_hf": False}
            assert loaded["model"].startswith("transformers_modules.")
        else:
            assert loaded == {"model": "selfy_hf.modeling_selfy", "selfy_hf": True}


def test_transformers_push_to_hub_uploads_the_code(fake_hub):
    model, processor = tiny_model(), tiny_processor()
    model.push_to_hub("org/plain-push", token=TOKEN)
    processor.push_to_hub("org/plain-push", token=TOKEN)
    uploaded = fake_hub.repos["org/plain-push"]
    assert {"config.json", "model.safetensors", "video_preprocessor_config.json", *CODE_FILES} <= set(
        uploaded
    )
    auto_map = json.loads(uploaded["config.json"])["auto_map"]
    assert auto_map["AutoModelForVideoClassification"] == "modeling_selfy.SelfyForVideoClassification"
    assert "video_processing_selfy.SelfyVideoProcessor" in uploaded["video_preprocessor_config.json"].decode()


def test_command_line(fake_hub, run_dir, tmp_path, capsys):
    card = tmp_path / "cards" / "run.md"
    main(["--model", str(run_dir), "--repo-id", "org/cli", "--dry-run", "--card-output", str(card)])
    printed = capsys.readouterr().out
    assert "would upload" in printed and "modeling_selfy.py" in printed and "checkpoints" not in printed
    assert "org/cli" in card.read_text() and "org/cli" not in fake_hub.repos
    main(
        [
            "--model",
            str(run_dir),
            "--repo-id",
            "org/cli",
            "--token",
            TOKEN,
            "--include",
            "training_curves.png",
        ]
    )
    assert fake_hub.repos["org/cli"]["training_curves.png"] == b"\x89PNG fake"
    assert "pushed to" in capsys.readouterr().out
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(run_dir, "no-owner", token=TOKEN)


def test_card_template_is_package_data():
    """The template lives in model_cards/ and ships inside the package (wheels included) through a symlink, read
    with importlib.resources: one text, two ways in."""
    import fnmatch
    from importlib import resources

    from selfy_hf.hub import TEMPLATE_RESOURCE, card_template

    tomllib = pytest.importorskip("tomllib")
    template = resources.files("selfy_hf").joinpath(TEMPLATE_RESOURCE)
    assert template.is_file() and card_template() == template.read_text(encoding="utf-8")
    assert "{{ card_data }}" in card_template()
    repo = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(TEMPLATE_RESOURCE, pattern) for pattern in package_data["selfy_hf"])
    source = repo / "src" / "selfy_hf" / TEMPLATE_RESOURCE
    assert source.is_symlink() and source.resolve() == (repo / "model_cards" / "template.md").resolve()
