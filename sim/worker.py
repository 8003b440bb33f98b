"""A QA worker (`python -m service worker`) whose schema suite takes SIM_SECONDS_PER_DOCUMENT per document,
as an operator's slow worker would: runs can outlive a short QA_LEASE and be delivered to two workers."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.cli.operator import main  # noqa: E402
from service.qa import suites  # noqa: E402


class SlowSchema(suites.SchemaSuite):
    def run(self, docs, k8s_version, strict):
        time.sleep(len(docs) * float(os.environ.get("SIM_SECONDS_PER_DOCUMENT", "0.01")))
        return super().run(docs, k8s_version, strict)


if __name__ == "__main__":
    suites.register(SlowSchema())
    sys.exit(main(["worker"]))
