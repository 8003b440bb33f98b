"""The container files: the image starts the service the way the tests do, runs as non-root with a health
check, passes hadolint; compose gives Redis AOF and points the service at it. (No Docker engine runs here.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_image_starts_the_service_as_the_tests_do(project_root):
    steps = instructions((project_root / "Dockerfile").read_text())
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    cmd = [arg for op, arg in final if op == "CMD"][-1]
    assert json.loads(cmd) == ["python", "-m", "service", "serve"]  # what tests/faults and `make run` start
    assert "/healthz" in [arg for op, arg in final if op == "HEALTHCHECK"][-1]
    user = [arg for op, arg in final if op == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    env = " ".join(arg for op, arg in final if op == "ENV")
    assert re.search(r"WEB_WORKERS=([2-9]|\d\d)", env), "the image serves with several worker processes"
    assert "slim" in [arg for op, arg in final if op == "FROM"][-1]
    assert not any("test" in arg for op, arg in final if op == "RUN"), "runtime dependencies only"


def test_hadolint_passes(project_root):
    hadolint = shutil.which("hadolint") or str(project_root / ".venv" / "bin" / "hadolint")
    run = subprocess.run([hadolint, "Dockerfile"], cwd=project_root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_runs_redis_with_aof_and_the_service_on_it(project_root):
    compose = yaml.safe_load((project_root / "docker-compose.yml").read_text())["services"]
    redis_cmd = " ".join(compose["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync always" in redis_cmd
    app = compose["microtasks"]
    assert app["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "command" not in app  # the image's own start command
