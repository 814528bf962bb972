"""The deployment files of infra/ and the ImageNet job files: they parse, and every ``daam-pipeline`` command they
run names a command, options and a job file that exist; infra/capacity.py's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import timm
import yaml

from pipeline.cli import main
from pipeline.config import expand_shards, load_job

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", "2>", "2>&1"}
_DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")


def _load_capacity():
    spec = importlib.util.spec_from_file_location("infra_capacity", INFRA / "capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


capacity = _load_capacity()


def invocations(command: str) -> list[list[str]]:
    """The ``daam-pipeline ...`` words of a shell command, also inside quoted commands (``ray exec "..."``)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = []
    current: list[str] | None = None
    for token in [*lexer, ";"]:
        if token in _SHELL_OPERATORS or set(token) <= set("();<>|&"):
            if current and len(current) > 1:
                found.append(current)
            current = None
        elif current is not None:
            current.append(token)
        elif token == "daam-pipeline":
            current = [token]
        elif "daam-pipeline " in token:
            found += invocations(token)
    return found


def shell_lines(text: str) -> list[str]:
    """Logical lines of a shell text: continuations joined, comments and blank lines dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def yaml_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in yaml_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in yaml_strings(value)]
    return [node] if isinstance(node, str) else []


def dockerfile_invocations(text: str) -> list[list[str]]:
    """RUN commands (shell form) and ENTRYPOINT + CMD (exec form)."""
    found: list[list[str]] = []
    exec_form: dict[str, list[str]] = {}
    for line in shell_lines(text):
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "RUN":
            found += invocations(rest)
        elif instruction in ("ENTRYPOINT", "CMD"):
            exec_form[instruction] = json.loads(rest)
    if exec_form.get("ENTRYPOINT") == ["daam-pipeline"]:
        found.append(["daam-pipeline", *exec_form.get("CMD", [])])
    return found


def parse_cli(words: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Parse ``daam-pipeline ...`` words with the real click CLI: an unknown command or option, a missing option
    value, a missing or extra argument, a value outside a choice raise click.UsageError. Other values are not
    converted (paths need not exist). ``${VAR:-default}`` becomes its default and ``$@`` (the script's own
    arguments) is dropped.

    Returns:
        The command name (None for group options alone) and its parsed parameters.
    """
    assert words[0] == "daam-pipeline"
    words = [_DEFAULT.sub(r"\1", w) for w in words[1:] if w != "$@"]
    ctx = click.Context(main, info_name="daam-pipeline")
    _, rest, _ = main.make_parser(ctx).parse_args(words)
    if not rest:
        return None, {}
    name, *args = rest
    command = main.get_command(ctx, name)
    if command is None:
        raise click.UsageError(f"no such command {name!r}")
    params, extra, _ = command.make_parser(click.Context(command, info_name=name, parent=ctx)).parse_args(args)
    if extra:
        raise click.UsageError(f"{name}: unexpected extra arguments {extra}")
    # click leaves a missing argument out or marks it with a sentinel: a given one is a string (or strings)
    missing = [p.name for p in command.params if p.required and not isinstance(params.get(p.name), str | list)]
    if missing:
        raise click.UsageError(f"{name}: missing {missing}")
    for param in command.params:
        if isinstance(param.type, click.Choice) and isinstance(params.get(param.name), str):
            param.type.convert(params[param.name], param, None)  # BadParameter is a UsageError
    return name, params


def infra_invocations() -> dict[str, list[list[str]]]:
    found = {
        "Dockerfile": dockerfile_invocations((INFRA / "Dockerfile").read_text()),
        "slurm.sbatch": [w for line in shell_lines((INFRA / "slurm.sbatch").read_text()) for w in invocations(line)],
    }
    for path in INFRA.glob("*.yaml"):
        docs = yaml.safe_load_all(path.read_text())
        found[path.name] = [w for doc in docs for s in yaml_strings(doc) for w in invocations(s)]
    readme = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", readme, flags=re.S)
    found["README.md"] = [w for block in blocks for line in shell_lines(block) for w in invocations(line)]
    return found


def test_the_cli_parser_rejects_what_click_rejects():
    assert parse_cli(shlex.split("daam-pipeline -v run jobs/x.yaml --address auto --set a=1 --set b=2")) == (
        "run",
        {"job_file": "jobs/x.yaml", "address": "auto", "sets": ["a=1", "b=2"]},
    )
    assert parse_cli(["daam-pipeline", "run", "${JOB_FILE:-jobs/d.yaml}", "$@"])[1]["job_file"] == "jobs/d.yaml"
    assert parse_cli(["daam-pipeline", "--help"]) == (None, {})
    for bad in (
        "daam-pipeline run jobs/x.yaml --adress auto",
        "daam-pipeline runn jobs/x.yaml",
        "daam-pipeline run jobs/x.yaml --address",
        "daam-pipeline run",
        "daam-pipeline run a.yaml b.yaml",
        "daam-pipeline --verbosity run a.yaml",
        "daam-pipeline shard src out --kind imagenet",
    ):
        with pytest.raises(click.UsageError):
            parse_cli(shlex.split(bad))


def test_invocations_are_found_in_shell_and_quoted_commands():
    assert invocations("cd /x && daam-pipeline run a.yaml --address auto; echo done") == [
        ["daam-pipeline", "run", "a.yaml", "--address", "auto"]
    ]
    assert invocations('ray exec c.yaml "cd /x && daam-pipeline validate j.yaml"') == [
        ["daam-pipeline", "validate", "j.yaml"]
    ]
    assert invocations("image: registry/daam-pipeline:0.1.0") == []


def test_every_yaml_file_parses():
    files = sorted(INFRA.glob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "kuberay-rayjob.yaml"}
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(doc, dict) for doc in docs), path


def test_every_daam_pipeline_command_exists_and_names_an_existing_job():
    found = infra_invocations()
    for name in ("Dockerfile", "slurm.sbatch", "kuberay-rayjob.yaml", "ray-cluster.yaml", "README.md"):
        assert found[name], f"no daam-pipeline command found in infra/{name}"
    jobs = set()
    for name, words_list in found.items():
        for words in words_list:
            try:
                command, params = parse_cli(words)
            except click.UsageError as e:
                pytest.fail(f"infra/{name}: {shlex.join(words)}: {e}")
            if command in ("run", "validate"):
                match = re.search(r"(?:^|/)jobs/([\w.-]+\.yaml)$", params["job_file"])
                assert match, f"infra/{name}: {params['job_file']} is not a file of jobs/"
                assert (ROOT / "jobs" / match[1]).is_file(), f"infra/{name}: jobs/{match[1]} does not exist"
                jobs.add(match[1])
    assert {"deit.yaml", "dino.yaml"} <= jobs


def test_kuberay_rayjob_runs_the_job_on_one_gpu_per_worker_pod():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all((INFRA / "kuberay-rayjob.yaml").read_text())}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    # KubeRay splices the entrypoint into its own shell command line: it must be one plain command
    (words,) = invocations(job["spec"]["entrypoint"])
    assert shlex.split(job["spec"]["entrypoint"]) == words
    command, params = parse_cli(words)
    assert (command, params["address"]) == ("run", "auto") and params["job_file"].startswith("/opt/daam-pipeline/")
    assert params["sets"] == ["output.path=/opt/daam-pipeline/out/dino"]
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        pods.append(spec)
        for container in spec["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    for spec in pods:
        volumes = {v["name"] for v in spec["volumes"]}
        mounts = [m for c in spec["containers"] for m in c["volumeMounts"]]
        assert {m["name"] for m in mounts} <= volumes
        assert "/opt/daam-pipeline/data" in {m["mountPath"] for m in mounts}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    images = {c["image"] for spec in pods for c in spec["containers"]}
    assert len(images) == 1


def test_ray_cluster_has_gpu_workers_of_fixed_size():
    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    assert config["provider"]["type"] in ("aws", "gcp")
    workers = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(n["min_workers"] == n["max_workers"] > 0 for n in workers)
    assert config["max_workers"] == sum(n["max_workers"] for n in workers)
    assert config["file_mounts"] and config["setup_commands"]


def test_slurm_script_starts_head_and_workers_with_srun():
    text = (INFRA / "slurm.sbatch").read_text()
    lines = shell_lines(text)
    assert any(line.lstrip().startswith("srun") and "ray start --head" in line for line in lines)
    assert any(line.lstrip().startswith("srun") and 'ray start --address="$head_address"' in line for line in lines)
    (words,) = [w for line in lines for w in invocations(line)]
    assert parse_cli(words)[1]["address"] == "$head_address"


@pytest.mark.parametrize(
    ("job", "model", "mode", "units"),
    [
        ("deit.yaml", "deit_small_patch16_224", "supervised", 50),
        ("dino.yaml", "vit_small_patch8_224.dino", "self-supervised", 50),
    ],
)
def test_imagenet_jobs_load(job, model, mode, units):
    loaded = load_job(ROOT / "jobs" / job)
    assert (loaded.model.name, loaded.mode, loaded.batch_size, loaded.dtype) == (model, mode, 128, "bfloat16")
    assert timm.is_model(loaded.model.name)
    assert loaded.data.preprocess == "resize" and loaded.model.checkpoint.endswith(".pth")
    urls = loaded.shard_urls()
    assert len(urls) == units and urls[0] == str(ROOT / "data" / "imagenet" / "val" / "shard-000000.tar")
    if mode == "self-supervised":
        assert loaded.model.num_classes == 0
        assert (loaded.bank.k, loaded.bank.temperature) == (20, 0.07)
        bank = expand_shards(loaded.bank.shards, "bank.shards")
        assert len(bank) == 1282 and bank[-1].endswith("train/shard-001281.tar")  # 1,281,167 images / 1,000


def test_makespan_follows_dynamic_dispatch():
    # 1,282 units (1,281 of 1,000 images, one of 167) on 64 GPUs at 2,000 img/s with 0.5 s overhead per unit:
    # 20 full rounds, then unit 1,281 (full) on one GPU: 21 x (0.5 + 0.5) s.
    est = capacity.estimate(1_281_167, 64, 2000.0, samples_per_shard=1000, overhead_s=0.5)
    assert est.units == 1282 and est.hours * 3600 == pytest.approx(21.0)
    assert est.gpu_hours == pytest.approx(64 * 21.0 / 3600)
    # 50 units on 8 GPUs: 7 rounds of 1 s; on 64 GPUs one round, 14 GPUs idle but held.
    assert capacity.estimate(50_000, 8, 1000.0).hours * 3600 == pytest.approx(7.0)
    assert capacity.estimate(50_000, 64, 1000.0, startup_s=30).hours * 3600 == pytest.approx(31.0)
    # the short last unit lands on the first GPU that frees up
    assert capacity.makespan_s([1000, 1000, 1000, 500], 2, 1000.0) == pytest.approx(2.0)
    assert capacity.makespan_s([1000, 1000, 1000], 2, 1000.0) == pytest.approx(2.0)
    assert capacity.makespan_s([1000] * 3, 4, 500.0, overhead_s=1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        capacity.makespan_s([1000], 0, 1000.0)


def test_capacity_table_from_the_command_line():
    table = capacity.main(
        ["--throughput", "m=2000", "--efficiency", "0.5", "--gpus", "8", "--split", "val=50000", "--startup-s", "0"]
    )
    # 1,000 img/s per GPU: 50 shards on 8 GPUs take 7 rounds of 1 s
    assert table.splitlines()[2] == "| m | 1,000 | val | 50,000 | 50 | 8 | 7.0 s | 0.0019 | 0.016 |"
    table = capacity.main(["--throughput", "m=1000:2000", "--efficiency", "1", "--gpus", "1", "--split", "a=7200000"])
    # 7.2 M images on one GPU: 2 h at 1,000 img/s, 1 h at 2,000 img/s
    assert (
        table.splitlines()[2]
        == "| m | 1,000 - 2,000 | a | 7,200,000 | 7,200 | 1 | 60 min - 2.0 h | 1.0 - 2.0 | 1.0 - 2.0 |"
    )
    capped = capacity.main(
        [
            "--throughput",
            "m=2000",
            "--efficiency",
            "1",
            "--gpus",
            "1",
            "--split",
            "a=7200000",
            "--cpus-per-gpu",
            "4",
            "--decode-rate",
            "250",
        ]
    )
    assert "| m | 1,000 | a |" in capped and "| 2.0 h |" in capped
    written = ["--throughput", "m=7000", "--efficiency", "1", "--gpus", "1", "--split", "a=7200000"]
    assert "| m | 6,000 | a |" in capacity.main([*written, "--write-rate", "3000"])  # two writer threads
    assert "| m | 3,000 | a |" in capacity.main([*written, "--write-rate", "3000", "--writer-threads", "1"])
    with pytest.raises(SystemExit):
        capacity.main(["--cpus-per-gpu", "4"])


def test_readme_tables_are_the_scripts_output():
    readme = (INFRA / "README.md").read_text()
    assert capacity.main([]) in readme
    command = re.search(r"Output of `python infra/capacity.py (--[^`]+)`", readme)
    assert command and capacity.main(shlex.split(command[1])) in readme
