"""kvserve's fast GGUF reader against gguf-py's GGUFReader on the default model's file."""

import numpy as np
import pytest
from gguf import GGUFReader

from kvserve.gguf_file import GGUFFile
from kvserve.model_files import default_model_path


def test_fields_and_tensors_equal_gguf_py_on_the_default_model():
    path = default_model_path()
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key] == field.contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.n_bytes, a.n_elements) == \
            (b.name, b.tensor_type, b.n_bytes, b.n_elements)
        assert list(a.shape) == list(b.shape)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("cut", [3, 24, 5000, -1000])
def test_a_truncated_file_is_a_value_error(tmp_path, cut):
    data = open(default_model_path(), "rb").read()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut])
    with pytest.raises(ValueError):
        GGUFFile(str(bad))
