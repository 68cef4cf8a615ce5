"""lexi.weight_norm = base (issue 13): a layer running fewer experts than trained divides their weights
by the trained top-k mass instead of their own sum. The runtime equals transformers with its routers
patched the same way (fidelity bar), renorm stays bit-identical to a file without the key, archs that
do not normalise are untouched, the profile follows the mode, and bad values are loader errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lexi_gguf.gguf import keys
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.method.archs import Routing
from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.method.profile import weights_for_k
from lexi_gguf.testbeds.tinymodels import hf_set_top_k

from conftest import TOKENS, f32_logits

COUNTS = [1, 4, 2, 3]     # base k 4: layers 0, 2, 3 run fewer


def _base_norm_router(mod, k_base):
    """transformers' TopKRouter, weighting its top_k by the trained top-k mass (the runtime's base mode)."""
    def forward(hidden_states):
        hs = hidden_states.reshape(-1, mod.hidden_dim)
        logits = torch.nn.functional.linear(hs, mod.weight)
        probs = logits.float().softmax(-1)
        denom = probs.topk(k_base, dim=-1).values.sum(-1, keepdim=True)
        val, idx = probs.topk(mod.top_k, dim=-1)
        return logits, (val / denom).to(logits.dtype), idx
    return forward


def _hf_logits(hf_dir, counts, base: bool):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_set_top_k(model, counts)
    if base:
        routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
        assert routers, "no TopKRouter in this transformers model"
        for m in routers:
            m.forward = _base_norm_router(m, model.config.num_experts_per_tok)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_base_mode_equals_patched_reference(arch, tiny_checkpoint, tiny_gguf, tmp_path):
    src = tiny_gguf(arch)
    info = model_info(src)
    base_file = copy_with_metadata(src, tmp_path / "base.gguf",
                                   lexi_metadata(info, COUNTS, "manual", weight_norm="base"), progress=False)
    renorm_file = copy_with_metadata(src, tmp_path / "renorm.gguf", lexi_metadata(info, COUNTS, "manual"), progress=False)
    ref = _hf_logits(tiny_checkpoint(arch), COUNTS, base=True)
    for got in (f32_logits(base_file), f32_logits(renorm_file, **{keys.WEIGHT_NORM: "base"})):
        assert np.abs(got - ref).max() <= 1e-3
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    renorm = f32_logits(renorm_file)
    assert np.abs(renorm - ref).max() > 1e-2                     # the modes really differ at these counts
    assert np.abs(renorm - _hf_logits(tiny_checkpoint(arch), COUNTS, base=False)).max() <= 1e-3
    # renorm, written or overridden, is bit-identical to today's file
    assert np.array_equal(f32_logits(base_file, **{keys.WEIGHT_NORM: "renorm"}), renorm)


def test_base_mode_leaves_non_normalising_archs_and_full_k_alone(tiny_gguf, tmp_path):
    src = tiny_gguf("olmoe")                                     # does not normalise top-k
    info = model_info(src)
    f = copy_with_metadata(src, tmp_path / "o.gguf", lexi_metadata(info, COUNTS, "manual"), progress=False)
    assert np.array_equal(f32_logits(f, **{keys.WEIGHT_NORM: "base"}), f32_logits(f))
    mix = tiny_gguf("mixtral")                                   # at the trained k, base == renorm
    assert np.array_equal(f32_logits(mix, **{keys.WEIGHT_NORM: "base"}), f32_logits(mix))


def test_profile_follows_the_mode():
    r = Routing("softmax", True)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert torch.allclose(weights_for_k(p, r, 2), torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    assert torch.allclose(weights_for_k(p, r, 2, "base"), torch.tensor([[0.4, 0.3]]))
    olmoe = Routing("softmax", False)
    assert torch.equal(weights_for_k(p, olmoe, 2, "base"), weights_for_k(p, olmoe, 2))


def test_bad_weight_norm_is_a_loader_error(tiny_gguf, tmp_path):
    src = tiny_gguf("mixtral")
    with pytest.raises(runtime.ModelLoadError, match="lexi.weight_norm = 'half' is not 'renorm' or 'base'"):
        f32_logits(src, **{keys.WEIGHT_NORM: "half"})


def test_apply_writes_and_profiles_the_mode(tiny_gguf, tmp_path, capsys):
    import json

    from lexi_gguf import cli
    src = tiny_gguf("mixtral")
    out = tmp_path / "b.gguf"
    assert cli.main(["apply", str(src), "-o", str(out), "--budget", "0.5", "--weight-norm", "base",
                     "--samples", "1024"]) == 0
    assert model_info(out).lexi[keys.WEIGHT_NORM] == "base"
    renorm = tmp_path / "r.gguf"
    assert cli.main(["apply", str(src), "-o", str(renorm), "--budget", "0.5", "--samples", "1024"]) == 0
    assert keys.WEIGHT_NORM not in model_info(renorm).lexi              # renorm files are written as before
    sens = tmp_path / "s.json"                                         # a table profiled for renorm
    sens.write_text(json.dumps({"settings": {"weight_norm": "renorm"}}))
    assert cli.main(["apply", str(src), "-o", str(tmp_path / "x.gguf"), "--budget", "0.5", "--weight-norm", "base",
                     "--sensitivity", str(sens)]) == 2
    assert "profiled with weight norm 'renorm', not 'base'" in capsys.readouterr().err
    # the stored table keeps its mode: re-applying the base file in the default mode profiles anew (the
    # renorm table, as r.gguf's), where it used to reuse the base table; in base mode it reuses it
    dev = lambda f: list(model_info(f).lexi[keys.SENS_DEVIATION])
    assert model_info(out).lexi[keys.SENS_WEIGHT_NORM] == "base" and dev(out) != dev(renorm)
    again = tmp_path / "again.gguf"
    assert cli.main(["apply", str(out), "-o", str(again), "--budget", "0.5", "--samples", "1024"]) == 0
    assert dev(again) == dev(renorm) and model_info(again).lexi[keys.SENS_WEIGHT_NORM] == "renorm"
    again_base = tmp_path / "again-base.gguf"
    assert cli.main(["apply", str(out), "-o", str(again_base), "--budget", "0.5", "--weight-norm", "base"]) == 0
    assert dev(again_base) == dev(out)
