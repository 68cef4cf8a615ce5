"""Every file lexi-gguf writes is read back and checked before it is renamed; a malformed file is refused
naming the byte offset and the field; a file at another legal alignment is copied at that alignment."""
from __future__ import annotations

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.gguf import check, verify, writer
from lexi_gguf.gguf.reader import gguf_py, model_info


def _rewrite(src, out, *, alignment: int | None = None, pad_key_len: int = 0):
    """src rewritten by gguf-py alone (as gguf_new_metadata.py would), at a custom alignment and with a
    padding key that moves the end of the header."""
    gguf = gguf_py()
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch=arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for f in r.fields.values():
        if f.name in ("general.architecture", "general.alignment") or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    if pad_key_len:
        w.add_string("test.padding", "x" * pad_key_len)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return out


def test_apply_keeps_a_64_byte_alignment(converted, tmp_path):
    # find a padding that makes the end of the header pad to different places at 32 and 64 bytes
    for pad in range(0, 64):
        src = _rewrite(converted, tmp_path / "a64.gguf", alignment=64, pad_key_len=pad)
        lay = check.scan(src, regions=True)
        end = max(r.offset + r.size for r in lay.regions)
        if -(-end // 32) * 32 != -(-end // 64) * 64:
            break
        src.unlink()
    else:
        pytest.fail("no padding made 32- and 64-byte alignment differ")
    assert lay.alignment == 64 and lay.data_start % 64 == 0
    out = tmp_path / "out.gguf"
    info = model_info(src)
    k = ",".join("2" if i in info.moe_layers else "0" for i in range(info.block_count))
    assert cli.main(["apply", str(src), "-o", str(out), "--k", k]) == 0
    a, b = gguf_py().GGUFReader(src), gguf_py().GGUFReader(out)
    assert b.alignment == 64 and b.fields["general.alignment"].contents() == 64
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and tb.data_offset % 64 == 0
        assert np.array_equal(ta.data.view(np.uint8), tb.data.view(np.uint8)), ta.name
    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(out, n_ctx=32, n_threads=2)       # stock-format file: llama.cpp loads it
    llm.close()


def test_a_tensor_written_wrong_is_caught_and_nothing_is_kept(converted, tmp_path, monkeypatch):
    gguf = gguf_py()
    original = gguf.GGUFWriter.write_tensor_data
    hit = []

    def corrupting(self, tensor, **kw):
        if not hit and tensor.nbytes > 64:       # the first real tensor: one byte differs on disk
            hit.append(True)
            tensor = np.array(tensor, copy=True)
            tensor.reshape(-1).view(np.uint8)[7] ^= 0x40
            original(self, tensor, **kw)
            return
        original(self, tensor, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", corrupting)
    out = tmp_path / "bad.gguf"
    with pytest.raises(verify.WriteCheckError, match=r"tensor '.*': its bytes at file offset [0-9,]+[.][.] differ"):
        writer.copy_with_metadata(converted, out, {}, progress=False)
    assert hit and list(tmp_path.iterdir()) == []      # no output, no temp file


def test_a_key_written_wrong_is_caught(converted, tmp_path, monkeypatch):
    gguf = gguf_py()
    T = gguf.GGUFValueType
    original = gguf.GGUFWriter.add_key_value

    def shifted(self, key, val, vtype, sub_type=None, **kw):
        if key == "lexi.total":
            val = val + 1
        return original(self, key, val, vtype, sub_type=sub_type, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "add_key_value", shifted)
    with pytest.raises(verify.WriteCheckError, match="key 'lexi.total' reads back as 8, meant 7"):
        writer.copy_with_metadata(converted, tmp_path / "o.gguf", {"lexi.total": (7, T.UINT32, None)}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_malformed_files_are_refused_naming_offset_and_field(converted, tmp_path, capsys):
    data = converted.read_bytes()
    lay = check.scan(converted, regions=True)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:lay.tensors[-1].offset + 5])
    with pytest.raises(check.MalformedGGUF, match=r"at byte [\d,]+ \(tensor '.*': data\).*truncated"):
        check.scan(cut)
    # a key name that is not UTF-8 (was a UnicodeDecodeError traceback in apply)
    name = next(r for r in lay.regions if r.kind == "text" and r.what.startswith("key 3 of"))
    bad = bytearray(data)
    bad[name.offset] = 0xFF
    flipped = tmp_path / "flipped.gguf"
    flipped.write_bytes(bytes(bad))
    info = model_info(converted)
    k = ",".join("1" if i in info.moe_layers else "0" for i in range(info.block_count))
    assert cli.main(["apply", str(flipped), "-o", str(tmp_path / "o.gguf"), "--k", k]) == 2
    err = capsys.readouterr().err
    assert f"at byte {name.offset:,} (key 3 of" in err and "not valid UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()


def test_a_short_counts_array_is_one_clear_line(converted, tmp_path, capsys):
    """was an IndexError in inspect; the loader's own words: 'has 3 entries, expected 4'."""
    from lexi_gguf.testbeds.mutate import lexi_cases
    case = next(c for c in lexi_cases(converted, tmp_path) if c.kind == "counts-one-short")
    assert cli.main(["inspect", case.file]) == 2
    err = capsys.readouterr().err
    assert "lexi.expert_used_count has 3 entries, expected 4 (block_count)" in err
    assert "lexi-gguf apply" in err


def test_our_own_bug_is_not_blamed_on_the_download(converted, monkeypatch):
    from lexi_gguf.gguf import reader

    class Broken:
        def __init__(self, *a, **kw):
            raise KeyError("a bug of ours")
    monkeypatch.setattr(reader, "_reader_class", lambda: Broken)
    with pytest.raises(LexiError, match="lexi-gguf bug") as e:
        reader.open_one(converted)
    assert "re-download" not in str(e.value)
