"""A worker process with two extra suites registered the way an operator plugs one in (used by tests):
`slow` sleeps before validating, `explode` fails like broken infrastructure."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from service.cli.operator import main  # noqa: E402
from service.qa import suites  # noqa: E402


class SlowSuite(suites.SchemaSuite):
    id = "slow"
    description = "schema, after a pause (tests)"

    def run(self, docs, k8s_version, strict):
        time.sleep(float(__import__("os").environ.get("SLOW_SUITE_SECONDS", "3")))
        return super().run(docs, k8s_version, strict)


class ExplodingSuite(suites.SchemaSuite):
    id = "explode"
    description = "always fails like broken infrastructure (tests)"

    def run(self, docs, k8s_version, strict):
        raise OSError("disk on fire")


if __name__ == "__main__":
    suites.register(SlowSuite())
    suites.register(ExplodingSuite())
    sys.exit(main(["worker"]))
