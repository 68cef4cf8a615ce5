"""Hugging Face checkpoint -> GGUF with the pinned llama.cpp's own converter (convert_hf_to_gguf.py),
never a converter of ours."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .. import LexiError


def convert_to_gguf(model_dir: str | Path, out: str | Path, llama_cpp_dir: Path, outtype: str = "f32",
                    extra: tuple[str, ...] = ()) -> Path:
    """Run the pinned llama.cpp's own convert_hf_to_gguf.py (`extra`: more of its options, e.g.
    --split-max-tensors N, which writes OUT-00001-of-0000N.gguf, ... instead of OUT)."""
    script = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(out), "--outtype", outtype, *extra]
    if _lacks_mtp(Path(model_dir)):
        cmd.append("--no-mtp")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise LexiError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
    return Path(out)


def _lacks_mtp(model_dir: Path) -> bool:
    """A checkpoint of an arch whose converter wants its multi-token-prediction block, without one (tiny
    test models, pruned checkpoints): convert without it instead of failing."""
    from ..method.archs import spec_for
    from ..method.weights import SafetensorsSource, load_config
    try:
        spec = spec_for(load_config(model_dir).get("model_type"))
    except LexiError:
        return False
    if spec is None or not spec.mtp_prefix:
        return False
    names = SafetensorsSource(model_dir).weight_map
    return not any(n.startswith((spec.mtp_prefix, "model." + spec.mtp_prefix)) for n in names)
