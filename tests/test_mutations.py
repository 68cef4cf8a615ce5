"""The seeded mutation campaign (bench/mutations.py, lexi_gguf/testbeds/mutate.py): damaged copies of a converted model through
inspect, apply, relayout, chat, serve's load, bench and trace. No traceback, signal, C++ abort or hang
reaches the user, a refusal leaves nothing behind, no command exits 0 with a bad file, and no command
that reads the lexi keys accepts damaged ones. LEXI_MUTATIONS=N runs N byte flips (default 60) and the
heavy commands on every case."""
from __future__ import annotations

import json
import os

from bench.mutations import FAILURES, campaign


def test_mutation_campaign(converted, tmp_path_factory):
    flips = int(os.environ.get("LEXI_MUTATIONS", "60"))
    res = campaign(converted, tmp_path_factory.mktemp("mutations"), seed=0, flips=flips,
                   heavy_every=1 if "LEXI_MUTATIONS" in os.environ else 4, timeout=120, progress=False)
    print(json.dumps({k: v for k, v in res.items() if k != "failures"}, indent=1))
    assert res["cases"] >= 200 and res["runs"] >= 600
    assert set(res["commands"]) == {"inspect", "apply", "relayout", "chat", "serve", "bench", "trace"}
    assert res["failures"] == [], json.dumps(res["failures"][:5], indent=1)
    # the campaign can fail: every lexi case is refused by every command that reads the lexi keys
    lexi = {k: v for k, v in res["by_mutation"].items() if k.startswith("lexi:")}
    assert len(lexi) >= 25
    for kind, outcomes in lexi.items():
        assert outcomes.get("refused", 0) >= 6, (kind, outcomes)
    assert not set().union(*res["by_command"].values()) & set(FAILURES)
