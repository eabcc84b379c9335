"""examples/train_resnet.py with every fused op it runs checked (tests/model_checks.py
FusedOpAudit): `python tests/audited_example.py ARGS` is `python examples/train_resnet.py ARGS`
under the audit, for runs in processes of their own (test_sync runs it under torchrun).
Prints how many fused op calls this process checked; exits as the example does."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_checks import FusedOpAudit
from test_example import load_example


def main(argv: list[str]) -> int:
    with FusedOpAudit() as audit:
        code = load_example().main(argv)
    rank = os.environ.get("RANK", "0")
    print(f"rank {rank}: {sum(audit.calls.values())} fused op calls within their bounds ({audit.calls})",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
