"""The single gate: malformed job files, each rejected by `vlmctl validate` naming the field, never with a
traceback; the valid edge cases accepted. The YAML text is what a user would write."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from job_fixtures import GOOD
from vlm_operator import cli


def stage(i: int = 0, **fields: Any):
    def mutate(doc: dict) -> None:
        doc["spec"]["stages"][i].update(fields)
    return mutate


def at(path: str, value: Any):
    """Set a dotted path (stages[0] style indices allowed) in the document."""
    def mutate(doc: dict) -> None:
        node: Any = doc
        keys = path.replace("]", "").replace("[", ".").split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        last = keys[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


# (case id, mutation of GOOD, expected start of one problem line)
CASES: list[tuple[str, Any, str]] = [
    ("lr-inf", at("spec.stages.0.optimizer", {"lr": float("inf")}), "spec.stages[0].optimizer.lr: must be a finite number"),
    ("lr-nan", at("spec.stages.0.optimizer", {"lr": float("nan")}), "spec.stages[0].optimizer.lr: must be a finite number"),
    ("lr-huge", at("spec.stages.0.optimizer", {"lr": 1e30}), "spec.stages[0].optimizer.lr: must be at most 1"),
    ("lr-zero", at("spec.stages.0.optimizer", {"lr": 0}), "spec.stages[0].optimizer.lr: must be > 0"),
    ("lr-string", at("spec.stages.0.optimizer", {"lr": "fast"}), "spec.stages[0].optimizer.lr: must be a number"),
    ("lr-bool", at("spec.stages.0.optimizer", {"lr": True}), "spec.stages[0].optimizer.lr: must be a number"),
    ("mult-inf", at("spec.stages.0.optimizer", {"projectorLrMultiplier": float("inf")}), "spec.stages[0].optimizer.projectorLrMultiplier: must be a finite"),
    ("mult-huge", at("spec.stages.0.optimizer", {"projectorLrMultiplier": 1e9}), "spec.stages[0].optimizer.projectorLrMultiplier: must be at most 1000"),
    ("wd-negative", at("spec.stages.0.optimizer", {"weightDecay": -0.1}), "spec.stages[0].optimizer.weightDecay"),
    ("wd-huge", at("spec.stages.0.optimizer", {"weightDecay": 5}), "spec.stages[0].optimizer.weightDecay"),
    ("betas-one", at("spec.stages.0.optimizer", {"betas": [0.9, 1.0]}), "spec.stages[0].optimizer.betas: each beta"),
    ("betas-three", at("spec.stages.0.optimizer", {"betas": [0.9, 0.99, 0.5]}), "spec.stages[0].optimizer.betas"),
    ("clip-nan", at("spec.stages.0.optimizer", {"gradClip": float("nan")}), "spec.stages[0].optimizer.gradClip: must be a finite"),
    ("epochs-inf", stage(0, maxSteps=None, epochs=float("inf")), "spec.stages[0].epochs: must be a finite number"),
    ("epochs-zero", stage(0, maxSteps=None, epochs=0), "spec.stages[0].epochs"),
    ("epochs-huge", stage(0, maxSteps=None, epochs=1e9), "spec.stages[0].epochs"),
    ("maxsteps-bool", stage(0, maxSteps=True), "spec.stages[0].maxSteps: must be a number"),
    ("maxsteps-string", stage(0, maxSteps="10"), "spec.stages[0].maxSteps: must be a number"),
    ("maxsteps-float", stage(0, maxSteps=10.5), "spec.stages[0].maxSteps"),
    ("maxsteps-negative", stage(0, maxSteps=-1), "spec.stages[0].maxSteps"),
    ("maxsteps-huge", stage(0, maxSteps=10**12), "spec.stages[0].maxSteps: Input should be less than or equal to"),
    ("maxsteps-and-epochs", stage(0, epochs=1), "spec.stages[0].maxSteps: set exactly one"),
    ("neither-steps-nor-epochs", stage(0, maxSteps=None), "spec.stages[0].maxSteps: set exactly one"),
    ("seed-2^70", stage(0, seed=2**70), "spec.stages[0].seed"),
    ("seed-negative", stage(0, seed=-5), "spec.stages[0].seed"),
    ("seed-bool", stage(0, seed=False), "spec.stages[0].seed: must be a number"),
    ("global-2^40", at("spec.stages.0.batch", {"globalSize": 2**40, "microSize": 8}), "spec.stages[0].batch.globalSize: Input should be less than or equal to 65536"),
    ("global-not-multiple", at("spec.stages.0.batch", {"globalSize": 12, "microSize": 8}), "spec.stages[0].batch.globalSize: 12 must be a multiple"),
    ("micro-zero", at("spec.stages.0.batch", {"microSize": 0}), "spec.stages[0].batch.microSize"),
    ("micro-bool", at("spec.stages.0.batch", {"microSize": True}), "spec.stages[0].batch.microSize: must be a number"),
    ("maxlength-zero", at("spec.stages.0.data.maxLength", 0), "spec.stages[0].data.maxLength"),
    ("maxlength-huge", at("spec.stages.0.data.maxLength", 10**9), "spec.stages[0].data.maxLength"),
    ("shards-empty", at("spec.stages.0.data.shards", []), "spec.stages[0].data.shards"),
    ("shards-not-list", at("spec.stages.0.data.shards", "a.tar"), "spec.stages[0].data.shards"),
    ("shards-tar-and-parquet", at("spec.stages.0.data.shards", ["s3://b/hf-0.parquet", "s3://b/a.tar"]),
     "spec.stages[0].data.shards: mixes Parquet files (s3://b/hf-0.parquet) with WebDataset tar shards"),
    ("shard-with-credentials", at("spec.stages.0.data.shards", ["s3://AKIAIOSFODNN7EXAMPLE:abc@b/a.tar"]), "spec.stages[0].data.shards: holds a credential"),
    ("shard-presigned", at("spec.stages.0.data.evalShards", ["https://h/a.tar?X-Amz-Signature=abc"]), "spec.stages[0].data.evalShards: holds a credential"),
    ("format-unknown", at("spec.stages.0.data.format", "captions"), "spec.stages[0].data.format"),
    ("shuffle-negative", at("spec.stages.0.data.shuffleBuffer", -1), "spec.stages[0].data.shuffleBuffer"),
    ("type-unknown", stage(0, type="pretrain"), "spec.stages[0].type"),
    ("dpo-data-caption", at("spec.stages.2.data.format", "caption"), "spec.stages[2].data.format: a dpo stage needs"),
    ("dpo-on-align", stage(0, dpo={"beta": 0.1}), "spec.stages[0].dpo: only valid for type dpo"),
    ("trainable-empty", stage(0, trainable=[]), "spec.stages[0].trainable"),
    ("trainable-unknown", stage(0, trainable=["decoder"]), "spec.stages[0].trainable[0]"),
    ("precision-fp8", stage(0, precision="fp8"), "spec.stages[0].precision"),
    ("stage-name-caps", stage(0, name="Align"), "spec.stages[0].name: must be a lowercase DNS label"),
    ("stage-name-long", stage(0, name="a" * 41), "spec.stages[0].name"),
    ("stage-name-dup", stage(1, name="align"), "spec.stages[1].name: 'align' is used by an earlier stage"),
    ("stage-unknown-field", stage(0, maxStep=3), "spec.stages[0].maxStep: unknown field"),
    ("gc-string", stage(0, gradientCheckpointing="yes"), "spec.stages[0].gradientCheckpointing: must be true or false"),
    ("gc-int", stage(0, gradientCheckpointing=1), "spec.stages[0].gradientCheckpointing: must be true or false"),
    ("every-zero", at("spec.stages.0.checkpoint", {"everySteps": 0}), "spec.stages[0].checkpoint.everySteps"),
    ("keep-zero", at("spec.stages.0.checkpoint", {"keepLast": 0}), "spec.stages[0].checkpoint.keepLast"),
    ("nodes-zero", at("spec.stages.0.resources", {"nodes": 0}), "spec.stages[0].resources.nodes"),
    ("nodes-huge", at("spec.stages.0.resources", {"nodes": 100000}), "spec.stages[0].resources.nodes"),
    ("cpu-lots", at("spec.stages.0.resources", {"cpu": "lots"}), "spec.stages[0].resources.cpu: must be a Kubernetes quantity"),
    ("cpu-zero", at("spec.stages.0.resources", {"cpu": "0"}), "spec.stages[0].resources.cpu: must be greater than zero"),
    ("memory-64Zz", at("spec.stages.0.resources", {"memory": "64Zz"}), "spec.stages[0].resources.memory: must be a Kubernetes quantity"),
    ("memory-negative", at("spec.stages.0.resources", {"memory": "-1Gi"}), "spec.stages[0].resources.memory: must be greater than zero"),
    ("restarts-negative", stage(0, maxRestarts=-1), "spec.stages[0].maxRestarts"),
    ("image-size-zero", at("spec.model.imageSize", 0), "spec.model.imageSize"),
    ("feature-layer-1000", at("spec.model.visionFeatureLayer", 1000), "spec.model.visionFeatureLayer"),
    ("projector-unknown", at("spec.model.projector", "qformer"), "spec.model.projector"),
    ("model-with-credentials", at("spec.model.languageModel", "s3://K:S@bucket/lm"), "spec.model.languageModel: holds a credential"),
    ("model-missing", at("spec.model", {"visionEncoder": "/m/v"}), "spec.model.languageModel: Field required"),
    ("storage-empty", at("spec.storage.uri", ""), "spec.storage.uri: must name a storage location"),
    ("storage-root", at("spec.storage.uri", "/"), "spec.storage.uri: must not be the filesystem root"),
    ("storage-file-root", at("spec.storage.uri", "file:///"), "spec.storage.uri: must not be the filesystem root"),
    ("storage-s3-no-bucket", at("spec.storage.uri", "s3://"), "spec.storage.uri: s3:// needs a bucket"),
    ("storage-memory", at("spec.storage.uri", "memory://x"), "spec.storage.uri: scheme must be one of"),
    ("storage-ftp", at("spec.storage.uri", "ftp://h/x"), "spec.storage.uri: scheme must be one of"),
    ("storage-credentials", at("spec.storage.uri", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@bucket/runs"), "spec.storage.uri: holds a credential"),
    ("endpoint-credentials", at("spec.storage.endpointUrl", "http://admin:hunter2@minio:9000"), "spec.storage.endpointUrl: holds a credential"),
    ("endpoint-not-url", at("spec.storage.endpointUrl", "minio:9000"), "spec.storage.endpointUrl: must be an http(s) URL"),
    ("namespace-Bad_NS", at("metadata.namespace", "Bad_NS"), "metadata.namespace: must be a lowercase DNS label"),
    ("name-caps", at("metadata.name", "Demo"), "metadata.name: must be a lowercase DNS label"),
    ("api-version", at("apiVersion", "training.vlm.dev/v1"), "apiVersion: must be 'training.vlm.dev/v1alpha1'"),
    ("kind", at("kind", "TrainingJob"), "kind: must be 'VLMTrainingJob'"),
    ("stages-empty", at("spec.stages", []), "spec.stages"),
    ("max-restarts-string", at("spec.runPolicy", {"maxRestarts": "3"}), "spec.runPolicy.maxRestarts: must be a number"),
    ("suspend-string", at("spec.suspend", "no"), "spec.suspend: must be true or false"),
    ("ttl-huge", at("spec.runPolicy", {"ttlSecondsAfterFinished": 10**12}), "spec.runPolicy.ttlSecondsAfterFinished"),
    ("toleration-effect", at("spec.runPolicy", {"tolerations": [{"effect": "Sometimes"}]}), "spec.runPolicy.tolerations[0].effect"),
    ("pull-policy", at("spec.image", {"pullPolicy": "Maybe"}), "spec.image.pullPolicy"),
    ("beta-zero", at("spec.stages.2.dpo", {"beta": 0}), "spec.stages[2].dpo.beta"),
]

# Whole files that are not even a job document.
RAW_CASES: list[tuple[str, bytes, str]] = [
    ("duplicate-key", yaml.safe_dump(GOOD).replace("maxSteps: 10", "maxSteps: 10\n    maxSteps: 600000", 1).encode(),
     "not valid YAML: duplicate key 'maxSteps'"),
    ("not-utf8", b"apiVersion: training.vlm.dev/v1alpha1\nkind: \xff\xfe\n", "not UTF-8 text"),
    ("deep-nesting", ("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested too deeply"),
    ("a-list", b"- 1\n- 2\n", "the document must be a mapping"),
    ("empty", b"", "the document must be a mapping"),
    ("two-documents", yaml.safe_dump(GOOD).encode() + b"---\n" + yaml.safe_dump(GOOD).encode(), "not valid YAML"),
    ("tabs", b"apiVersion:\ttraining.vlm.dev/v1alpha1\n\tkind: x\n", "not valid YAML"),
    ("huge", b"# " + b"x" * (2 << 20) + b"\n", "bytes; a job file is at most"),
]


def validate(path: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = cli.main(["validate", path])
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    return str(path)


def test_there_are_more_than_sixty_malformed_cases() -> None:
    assert len(CASES) + len(RAW_CASES) + 2 >= 60


@pytest.mark.parametrize("case,mutate,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_field_is_named(case: str, mutate: Any, expected: str, tmp_path: Path, capsys) -> None:
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    # as YAML text, the way a user writes it (.inf/.nan included)
    rc, _out, err = validate(write(tmp_path, yaml.safe_dump(doc).encode()), capsys)
    assert rc == 1, err
    assert "Traceback" not in err
    assert any(line.strip().startswith(expected) for line in err.splitlines()), err


@pytest.mark.parametrize("case,data,expected", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_malformed_file_is_refused_without_a_traceback(case: str, data: bytes, expected: str, tmp_path: Path,
                                                       capsys) -> None:
    rc, _out, err = validate(write(tmp_path, data), capsys)
    assert rc == 1, err
    assert "Traceback" not in err and expected in err, err


def test_a_directory_and_a_missing_file_are_refused_by_name(tmp_path: Path, capsys) -> None:
    rc, _, err = validate(str(tmp_path), capsys)
    assert rc == 1 and "is a directory" in err
    rc, _, err = validate(str(tmp_path / "nope.yaml"), capsys)
    assert rc == 2 and "no such file" in err


def test_credentials_in_a_job_are_never_echoed(tmp_path: Path, capsys) -> None:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["storage"]["uri"] = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/runs"
    doc["spec"]["storage"]["endpointUrl"] = "http://admin:hunter2@minio:9000"
    for command in ("validate", "render"):
        try:
            cli.main([command, write(tmp_path, yaml.safe_dump(doc).encode())])
        except SystemExit:
            pass
        out = capsys.readouterr()
        for secret in ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMIK7MDENG", "hunter2"):
            assert secret not in out.out + out.err


@pytest.mark.parametrize("variant", ["bom", "crlf", "long-names", "stdin"])
def test_valid_edge_cases_are_accepted(variant: str, tmp_path: Path, capsys, monkeypatch) -> None:
    doc = copy.deepcopy(GOOD)
    if variant == "long-names":
        doc["metadata"]["name"] = "a" * 40
        doc["metadata"]["namespace"] = "n" * 63
        doc["spec"]["stages"][0]["name"] = "s" * 40
    text = yaml.safe_dump(doc)
    data = {"bom": b"\xef\xbb\xbf" + text.encode(), "crlf": text.replace("\n", "\r\n").encode()}.get(variant, text.encode())
    if variant == "stdin":
        import io
        import sys

        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        path = "-"
    else:
        path = write(tmp_path, data)
    rc, out, err = validate(path, capsys)
    assert rc == 0, err
    assert "valid VLMTrainingJob" in out


def test_log_records_are_redacted() -> None:
    import logging

    from vlm_core.redact import RedactingFilter

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "reading %s failed", ("s3://AKIAIOSFODNN7EXAMPLE:pw@b/x",), None)
    assert RedactingFilter().filter(record)
    assert "AKIAIOSFODNN7EXAMPLE" not in record.getMessage() and "s3://***@b/x" in record.getMessage()
