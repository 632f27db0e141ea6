"""vlmctl's dry run and sub-command wiring, as a user calls them."""

import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
VLMCTL = [sys.executable, "-m", "vlm_operator.cli"]


def test_render_prints_every_stage_object_as_yaml():
    out = subprocess.run([*VLMCTL, "render", str(ROOT / "crds/examples/align-instruct-s3.yaml"), "-n", "team-a"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"] * 2
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    job = docs[3]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"]
                       + job["spec"]["template"]["spec"]["containers"][0].get("args", []))
    assert "torchrun" in command and "--nnodes=2" in command and "-m vlm_trainer" in command


def test_render_rejects_an_invalid_job_by_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((ROOT / "crds/examples/align-instruct-s3.yaml").read_text())
    doc["spec"]["stages"][0]["resources"]["nodes"] = 0
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([*VLMCTL, "render", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "spec.stages[0].resources.nodes" in out.stderr and out.stdout == ""


def test_operator_subcommand_has_its_own_help():
    out = subprocess.run([*VLMCTL, "operator", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--liveness-port" in out.stdout


def test_render_uses_the_jobs_own_namespace_unless_n_overrides_it(tmp_path):
    doc = yaml.safe_load((ROOT / "crds/examples/align-instruct-s3.yaml").read_text())
    doc["metadata"]["namespace"] = "team-b"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    for extra, want in (([], "team-b"), (["-n", "team-c"], "team-c")):
        out = subprocess.run([*VLMCTL, "render", str(path), *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out.stdout)} == {want}


def _validate(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VLMCTL, "validate", str(path)], capture_output=True, text=True, timeout=60)


def test_validate_reads_numbers_as_kubectl_does(tmp_path):
    text = (ROOT / "crds/examples/align-instruct-s3.yaml").read_text()
    for lr in ("1e-3", "1.0e-5", "5e-6"):
        doc = yaml.safe_load(text)
        doc["spec"]["stages"][0].setdefault("optimizer", {})["lr"] = "LR"
        path = tmp_path / f"lr-{lr}.yaml"
        path.write_text(yaml.safe_dump(doc).replace("lr: LR", f"lr: {lr}"))
        assert f"lr: {lr}\n" in path.read_text()  # unquoted, as a user writes it
        out = _validate(path)
        assert out.returncode == 0, out.stderr
        assert "valid VLMTrainingJob" in out.stdout


def test_validate_refuses_an_alias_bomb_and_an_unknown_scheme_by_field_without_a_traceback(tmp_path):
    doc = yaml.safe_load((ROOT / "crds/examples/align-instruct-s3.yaml").read_text())
    bomb = "  labels:\n    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    text = yaml.safe_dump(doc, sort_keys=False)
    path = tmp_path / "bomb.yaml"
    path.write_text(text.replace("metadata:\n", "metadata:\n" + bomb, 1))
    out = _validate(path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "metadata.labels.a8: YAML aliases expand this value to" in out.stderr
    doc["spec"]["stages"][0]["data"]["shards"] = ["nosuchscheme://x/y.tar"]
    path = tmp_path / "scheme.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = _validate(path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "spec.stages[0].data.shards: unknown URI scheme nosuchscheme://" in out.stderr and "s3://" in out.stderr
