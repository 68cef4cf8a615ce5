"""`lexi-gguf trace import`: routing traces from other tools (CSV) into the trace format, refused clearly
when ragged or out of range; the imported trace replays through cache-sim."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.caching.trace_import import import_csv
from lexi_gguf.runtime.trace import Trace

E, LAYERS, K = 16, [1, 2, 4], [4, 2, 3]


def routing(n_tok: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.choice(E, k, replace=False).tolist() for k in K] for _ in range(n_tok)]


def write_long(path, route, sep=" ", weights=True):
    lines = ["token,layer,experts,weights,tok_id,prompt"]
    for t, per_layer in enumerate(route):
        for layer, ids in zip(LAYERS, per_layer):
            w = sep.join(f"{1 / len(ids):.4f}" for _ in ids)
            lines.append(f'{t},{layer},"{sep.join(map(str, ids))}",' + (f'"{w}"' if weights else '""') + f",{100 + t},{t // 5}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_long_and_wide_csv_round_trip(tmp_path, capsys):
    route = routing(12)
    src = write_long(tmp_path / "t.csv", route, sep=";")
    out = tmp_path / "t.npz"
    assert cli.main(["trace", "import", str(src), "--n-expert", str(E), "--weights-col", "weights",
                     "--token-id-col", "tok_id", "--seq-col", "prompt", "-o", str(out)]) == 0
    assert "12 tokens x 3 MoE layers (k per layer [4, 2, 3]" in capsys.readouterr().out
    tr = Trace.load(out)
    assert tr.moe_layers.tolist() == LAYERS and tr.counts.tolist() == K and tr.n_expert == E
    assert tr.tokens.tolist() == [100 + t for t in range(12)] and tr.seq.tolist() == [t // 5 for t in range(12)]
    for t in range(12):
        for li, k in enumerate(K):
            assert tr.experts[t, li, :k].tolist() == route[t][li] and (tr.experts[t, li, k:] == -1).all()
            np.testing.assert_allclose(tr.weights[t, li, :k], 1 / k, atol=1e-4)
    # one id a column (what wide tracers write), columns found by a glob in natural order
    wide = tmp_path / "w.csv"
    cols = [f"e{i}" for i in range(12)]        # e10 and e11 must sort after e9
    rows = ["tok,moe," + ",".join(cols)]
    for t, per_layer in enumerate(route):
        rows.append(f"{t},0," + ",".join(str(x) for x in route[t][0] * 3))    # 12 ids: 4 repeated
    wide.write_text("\n".join(rows) + "\n")
    with pytest.raises(LexiError, match="lists an expert twice"):
        import_csv(wide, n_expert=E, token_col="tok", layer_col="moe", experts_col="e*")
    rows = ["tok,moe," + ",".join(cols)] + [f"{t},0," + ",".join(str(x) for x in range(t % 4, t % 4 + 12))
                                             for t in range(6)]
    wide.write_text("\n".join(rows) + "\n")
    tr = import_csv(wide, n_expert=E, token_col="tok", layer_col="moe", experts_col="e*")
    assert tr.experts[5, 0].tolist() == list(range(1, 13)) and tr.counts.tolist() == [12]
    # and it replays through the cache simulator
    assert cli.main(["cache-sim", str(out), "--capacity", "0.25", "--policy", "lru,belady", "--phase", "all"]) == 0
    res = json.loads(out.with_suffix(".cache.json").read_text())
    assert res["n_expert"] == E and res["moe_layers"] == 3


@pytest.mark.parametrize("case", ["ragged", "out_of_range", "missing_layer", "missing_column", "not_numbers", "twice"])
def test_bad_csv_is_refused_by_line(tmp_path, capsys, case):
    route = routing(4)
    src = write_long(tmp_path / "t.csv", route, weights=False)
    lines = src.read_text().splitlines()
    msg = {"ragged": "line 6: layer 2 has 3 experts, 2 on line 3",
           "out_of_range": "line 2: expert id 16 is out of range 0..15",
           "missing_layer": "token 3 has no row for layer(s) [4]",
           "missing_column": "no column 'layer'; the header has token, lyr",
           "not_numbers": "line 4: experts 'a b' is not a list of numbers",
           "twice": "token 0 layer 1 appears twice"}[case]
    if case == "ragged":                        # token 1's layer 2 (file line 6) with 3 experts, not 2
        parts = lines[5].split(",")
        lines[5] = ",".join([*parts[:2], '"0 1 2"', *parts[3:]])
    elif case == "out_of_range":
        lines[1] = lines[1].replace('"', '"16 ', 1)
    elif case == "missing_layer":
        lines = lines[:-1]
    elif case == "missing_column":
        lines[0] = lines[0].replace("layer", "lyr")
    elif case == "not_numbers":
        parts = lines[3].split(",")
        lines[3] = ",".join([*parts[:2], '"a b"', *parts[3:]])
    else:
        lines.insert(2, lines[1])
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.npz"
    assert cli.main(["trace", "import", str(src), "--n-expert", str(E), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_expert_sizes_come_from_a_shape_a_number_or_a_model_and_clock_needs_them(tmp_path, capsys):
    from lexi_gguf.testbeds import shapes
    route = routing(6)
    src = write_long(tmp_path / "t.csv", route)
    base = ["trace", "import", str(src), "--n-expert", str(E)]
    # none given: no sizes stored (not 1 byte each), said once; cache-sim --clock refuses it in one line
    none = tmp_path / "none.npz"
    assert cli.main([*base, "-o", str(none)]) == 0
    assert "no expert sizes" in capsys.readouterr().out
    tr = Trace.load(none)
    assert tr.meta["expert_bytes"] is None and tr.meta["expert_bytes_from"] == "none"
    clock = ["cache-sim", str(none), "--capacity", "0.25", "--policy", "lru", "--phase", "all", "--clock", "nvme",
             "--compute-ms", "0.5"]
    assert cli.main(clock) == 2
    err = capsys.readouterr().err
    assert "has no expert sizes" in err and "--like NAME" in err and "--expert-bytes N" in err
    assert len(err.strip().splitlines()) == 1, err
    assert cli.main(clock[:-4]) == 0                  # the free model (hits) runs without sizes, and says so
    assert "no expert sizes: its MB and stall columns count 1 byte per expert" in capsys.readouterr().out
    # a trace imported before sizes were marked (1 byte per expert, unmarked) is refused the same way
    tr.meta.update(expert_bytes=[1.0] * len(LAYERS))
    del tr.meta["expert_bytes_from"]
    old = tr.save(tmp_path / "old.npz")
    assert cli.main([*clock[:1], str(old), *clock[2:]]) == 2
    assert "has no expert sizes" in capsys.readouterr().err
    # --expert-bytes N: every layer
    given = tmp_path / "given.npz"
    assert cli.main([*base, "--expert-bytes", "5000000", "-o", str(given)]) == 0
    assert Trace.load(given).meta["expert_bytes"] == [5e6] * len(LAYERS)
    assert cli.main([*clock[:1], str(given), *clock[2:], "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["clock"]["rows"]
    capsys.readouterr()
    # --like NAME [--quant Q]: one expert's gate + up + down at that shape and quant mix
    olmoe = shapes.get("olmoe-1b-7b")
    rows = ["token,layer,experts"] + [f"{t},{layer},\"{' '.join(map(str, range(t % 8, t % 8 + 8)))}\""
                                      for t in range(4) for layer in range(olmoe.layers)]
    big = tmp_path / "olmoe.csv"
    big.write_text("\n".join(rows) + "\n")
    for quant, per in (("Q8_0", 2048 * 1024 * 3 // 32 * 34), (None, None)):
        out = tmp_path / f"like-{quant}.npz"
        assert cli.main(["trace", "import", str(big), "--n-expert", "64", "--like", "olmoe-1b-7b",
                         *(["--quant", quant] if quant else []), "-o", str(out)]) == 0
        meta = Trace.load(out).meta
        assert meta["expert_bytes"] == shapes.expert_bytes(olmoe, quant or "Q4_K_M")
        assert meta["expert_bytes_from"] == f"like: olmoe-1b-7b {quant or 'Q4_K_M'}"
        if per:
            assert meta["expert_bytes"] == [float(per)] * olmoe.layers
    capsys.readouterr()
    # refused in one line: a shape that does not fit, two sources, --quant alone, a bad number
    for bad, msg in ((["--like", "olmoe-1b-7b"], "the trace has 3 MoE layers x 16 experts, like: olmoe-1b-7b Q4_K_M 16 x 64"),
                     (["--like", "olmoe-1b-7b", "--expert-bytes", "9"], "give one of --model GGUF, --like NAME or"),
                     (["--quant", "Q8_0"], "--quant goes with --like NAME"),
                     (["--expert-bytes", "0"], "--expert-bytes 0: give the bytes of one expert"),
                     (["--like", "nope"], "no released shape named 'nope'")):
        assert cli.main([*base, *bad, "-o", str(tmp_path / "bad.npz")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
