"""Recognising file kinds before anything is read (customedit_core/single_file.py)."""
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from customedit_core import single_file as sf


def safetensors_with_header_length_low_byte(tmp_path, low: int):
    """A valid safetensors file whose 8-byte header length starts with the byte `low`."""
    for pad in range(0, 600):
        path = tmp_path / f"t{pad}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == low:
            return path
        path.unlink()
    raise AssertionError("no padding gave that header length")


def test_safetensors_whose_header_length_starts_with_the_pickle_byte_is_safetensors(tmp_path):
    path = safetensors_with_header_length_low_byte(tmp_path, 0x80)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert sf._sniff(str(path)) == "safetensors" and not sf.is_pickle(str(path))


def test_pickles_are_still_recognised(tmp_path):
    p = tmp_path / "model.safetensors"              # a pickle behind a safetensors name
    p.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    assert sf.is_pickle(str(p))
    z = tmp_path / "zipped"
    z.write_bytes(b"PK\x03\x04" + b"\0" * 20)
    assert sf.is_pickle(str(z))
    with pytest.raises(ValueError, match="pickle"):
        sf.read(str(p))
