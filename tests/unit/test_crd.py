"""The generated CRD: no drift from the typed spec, structural, accepts the examples, rejects bad jobs."""

from __future__ import annotations

import copy
import glob
import os
from typing import Any

import jsonschema
import pytest
import yaml
from vlm_core import kinds
from vlm_core.spec import SpecError, parse_job
from vlm_operator import crd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRD_FILE = os.path.join(ROOT, "crds", "training.vlm.dev_vlmtrainingjobs.yaml")
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "crds", "examples", "*.yaml")))


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd.document_json_schema())


def test_committed_crd_matches_the_code() -> None:
    with open(CRD_FILE) as f:
        committed = f.read()
    assert committed == crd.render_crd_yaml(), (
        "crds/training.vlm.dev_vlmtrainingjobs.yaml is stale: run "
        "`python -m vlm_operator.crd > crds/training.vlm.dev_vlmtrainingjobs.yaml`"
    )


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural_with_descriptions() -> None:
    schema = _load(CRD_FILE)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "const" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
            for name, prop in node["properties"].items():
                assert "type" in prop, f"{path}.properties.{name} has no type"
    spec = schema["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec
    stage = spec["properties"]["stages"]["items"]
    # kubectl explain shows these
    assert "exactly one of maxSteps or epochs" in stage["properties"]["maxSteps"]["description"]
    assert stage["properties"]["resources"]["properties"]["nodes"]["minimum"] == 0
    assert stage["properties"]["resources"]["properties"]["nodes"]["exclusiveMinimum"] is True
    assert stage["properties"]["trainable"]["nullable"] is True


def test_crd_metadata_columns_and_subresources() -> None:
    doc = _load(CRD_FILE)
    assert doc["metadata"]["name"] == "vlmtrainingjobs.training.vlm.dev"
    names = doc["spec"]["names"]
    assert "vlmjob" in names["shortNames"] and "vlm" in names["categories"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Stage",
        "Phase",
        "Progress",
        "Restarts",
        "Admitted",
        "Age",
        "Message",
    ]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"phase", "currentStage", "stages", "conditions", "observedGeneration", "restarts"} <= set(status)
    stages = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"]
    assert stages["x-kubernetes-list-type"] == "map" and stages["x-kubernetes-list-map-keys"] == ["name"]
    rules = [r["rule"] for r in stages["items"]["x-kubernetes-validations"]]
    assert "self.type == 'curate' || (self.type in ['eval'] || has(self.maxSteps) != has(self.epochs))" in rules


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_examples_pass_the_crd_schema_and_the_typed_spec(path: str) -> None:
    doc = _load(path)
    errors = sorted(str(e.message) for e in _validator().iter_errors(doc))
    assert errors == []
    job = parse_job(doc)
    assert [s.type for s in job.spec.stages][-2:] == ["align", "instruct"] or job.spec.stages[0].type == "align"


def test_there_are_the_two_promised_examples() -> None:
    kinds = {os.path.basename(p): [s["type"] for s in _load(p)["spec"]["stages"]] for p in EXAMPLES}
    assert ["align", "instruct"] in kinds.values()
    assert ["align", "instruct", "dpo"] in kinds.values()
    s3 = next(_load(p) for p in EXAMPLES if _load(p)["spec"]["storage"]["uri"].startswith("s3://"))
    assert s3["spec"]["storage"]["secretRef"]
    gpu = next(_load(p) for p in EXAMPLES if len(_load(p)["spec"]["stages"]) == 3)
    assert max(s["resources"]["nodes"] for s in gpu["spec"]["stages"]) > 1
    assert all(s["resources"]["gpusPerNode"] > 0 for s in gpu["spec"]["stages"])


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()

# (mutation path, value, a fragment the typed spec's error names)
BAD = [
    ("spec.stages", [], "stages"),
    ("spec.stages.0.resources.nodes", 0, "stages[0].resources.nodes"),
    ("spec.stages.0.resources.gpusPerNode", -1, "stages[0].resources.gpusPerNode"),
    ("spec.stages.0.type", "pretrain", "stages[0].type"),
    ("spec.stages.0.data.format", "video", "stages[0].data.format"),
    ("spec.stages.0.data.shards", [], "stages[0].data.shards"),
    ("spec.stages.0.name", "Align_1", "stages[0].name"),
    ("spec.stages.0.batchSize", 8, "stages[0].batchSize"),
    ("spec.stages.0.strategy", "zero9", "stages[0].strategy"),
    ("spec.storage.uri", _DELETE, "storage.uri"),
    ("spec.model", _DELETE, "model"),
    ("spec.image.pullPolicy", "Sometimes", "image.pullPolicy"),
    ("spec.runPolicy.maxRestarts", -1, "runPolicy.maxRestarts"),
    ("spec.stages.0.optimizer.betas", [0.9], "stages[0].optimizer.betas"),
    ("metadata.name", "x" * 41, "metadata.name"),
]


@pytest.mark.parametrize("path,value,field", BAD, ids=[b[0] + "=" + repr(b[1])[:12] for b in BAD])
def test_planted_bad_jobs_are_rejected_by_both(path: str, value: Any, field: str) -> None:
    good = _load(EXAMPLES[0])
    bad = _set(good, path, value)
    assert list(_validator().iter_errors(bad)), f"the CRD schema accepted {path}={value!r}"
    with pytest.raises(SpecError) as err:
        parse_job(bad)
    assert any(field in p for p in err.value.problems), err.value.problems


def test_to_json_schema_nullable_and_bounds() -> None:
    converted = crd.to_json_schema(
        {"type": "integer", "nullable": True, "minimum": 0, "exclusiveMinimum": True}
    )
    v = jsonschema.Draft4Validator(converted)
    assert v.is_valid(None) and v.is_valid(1)
    assert not v.is_valid(0)


def test_module_entry_point_writes_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main([]) == 0
    assert capsys.readouterr().out == crd.render_crd_yaml()


def _cel_rules(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    stage = schema["properties"]["spec"]["properties"]["stages"]["items"]
    return [(r["rule"], r) for r in stage["x-kubernetes-validations"]]


def _eval_cel(rule: str, value: Any) -> bool:
    import celpy  # cel-python: Google's CEL, evaluated as the API server would

    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))


def test_cel_rules_accept_every_example_stage() -> None:
    schema = crd.openapi_schema()
    for path in EXAMPLES:
        for stage in _load(path)["spec"]["stages"]:
            for rule, _ in _cel_rules(schema):
                assert _eval_cel(rule, stage), f"{os.path.basename(path)} stage {stage['name']}: {rule}"
    uri_rule = schema["properties"]["spec"]["properties"]["storage"]["properties"]["uri"][
        "x-kubernetes-validations"
    ][0]
    for uri in ("s3://b/x", "gs://b", "file:///tmp/x", "/data/runs"):
        assert _eval_cel(uri_rule["rule"], uri), uri
    assert not _eval_cel(uri_rule["rule"], "ftp://host/x")


# (stage mutation, the CEL rule message that must reject it) — rules the types alone cannot express
CEL_BAD = [
    ({"maxSteps": 5, "epochs": 1}, "exactly one of maxSteps or epochs"),
    ({"maxSteps": None, "epochs": None}, "exactly one of maxSteps or epochs"),
    ({"dpo": {"beta": 0.2}}, "dpo: only valid for type dpo"),
    ({"type": "dpo"}, "preference"),
    ({"trainable": []}, "at least one part must train"),
    ({"batch": {"globalSize": 100, "microSize": 32}}, "multiple of batch.microSize"),
    ({"input": {"shards": ["raw.tar"]}}, "only valid for type curate"),
    ({"data": {"fromStage": "curate", "shards": ["a.tar"], "format": "caption"}}, "exactly one of data.shards, data.fromStage or data.sources"),
]


@pytest.mark.parametrize("mutation,message", CEL_BAD, ids=[m for _, m in CEL_BAD])
def test_cel_rules_reject_what_the_typed_spec_rejects(mutation: dict[str, Any], message: str) -> None:
    doc = _load(EXAMPLES[0])
    stage = doc["spec"]["stages"][0]
    for k, v in mutation.items():
        if v is None:
            stage.pop(k, None)
        else:
            stage[k] = v
    failing = [r["message"] for rule, r in _cel_rules(crd.openapi_schema()) if not _eval_cel(rule, stage)]
    assert any(message in m for m in failing), failing
    with pytest.raises(SpecError):
        parse_job(doc)


def _curate_stage() -> dict[str, Any]:
    doc = _load(os.path.join(ROOT, "crds", "examples", "curate-align-instruct.yaml"))
    return doc["spec"]["stages"][0]


@pytest.mark.parametrize("field", ["optimizer", "maxSteps", "batch", "strategy", "data"])
def test_cel_rules_reject_a_curate_stage_with_training_fields(field: str) -> None:
    stage = {**_curate_stage(), field: {"shards": ["a.tar"], "format": "caption"} if field == "data" else
             {"lr": 0.1} if field == "optimizer" else 3 if field == "maxSteps" else
             {"globalSize": 8} if field == "batch" else "ddp"}
    failing = [r["message"] for rule, r in _cel_rules(crd.openapi_schema()) if not _eval_cel(rule, stage)]
    assert f"{field}: a curate stage has no training fields" in failing


def test_the_merged_stage_schema_documents_both_kinds() -> None:
    item = crd.spec_schema()["properties"]["stages"]["items"]
    props = item["properties"]
    assert sorted(props["type"]["enum"]) == sorted(kinds.STAGE_TYPES)  # every row of the table, nothing else
    assert item["required"] == ["name", "type"]  # data is required for training kinds by a CEL rule
    # kubectl explain documents the curate fields too, down to the thresholds
    near = props["filters"]["properties"]["nearDedup"]["properties"]["maxDistance"]
    assert "bits" in near["description"] and near["default"] == 10
    assert "fromStage" in props["data"]["properties"] and props["data"]["properties"]["fromStage"]["description"]
    assert "default" not in props["strategy"]  # a training-only default would be stamped onto curate stages
