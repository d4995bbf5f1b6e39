"""Restricted unpickling of MMSA / MAG pickles (msa_fast.data.safe_pickle): data loads, code is refused."""
import base64
import builtins
import collections
import io
import os
import pickle
import warnings

import numpy as np
import pytest

from msa_fast.data import UnsafePickleError, load_mmsa, read_mag, safe_load, safe_loads, save_mmsa, synthetic, to_mag

# Written by numpy 1.26.4 (module paths numpy.core.*, as in real MMSA files) from
#   {"train": {"audio": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "id": np.array(["v$_$0"], dtype=object),
#              "raw_text": np.array(["hi there"], dtype=object), "lens": np.array([2], dtype=np.int64),
#              "label": np.float64(0.5), "nc": np.arange(16.0).reshape(4, 4)[::2]}}
NUMPY1_PICKLES = {
    2: (
        "gAJ9cQBYBQAAAHRyYWlucQF9cQIoWAUAAABhdWRpb3EDY251bXB5LmNvcmUubXVsdGlhcnJheQpfcmVjb25zdHJ1Y3QKcQRjbnVt"
        "cHkKbmRhcnJheQpxBUsAhXEGY19jb2RlY3MKZW5jb2RlCnEHWAEAAABicQhYBgAAAGxhdGluMXEJhnEKUnELh3EMUnENKEsBSwFL"
        "AksDh3EOY251bXB5CmR0eXBlCnEPWAIAAABmNHEQiYiHcRFScRIoSwNYAQAAADxxE05OTkr/////Sv////9LAHRxFGKJaAdYGwAA"
        "AAAAAAAAAMKAPwAAAEAAAEBAAADCgEAAAMKgQHEVaAmGcRZScRd0cRhiWAIAAABpZHEZaARoBUsAhXEaaAuHcRtScRwoSwFLAYVx"
        "HWgPWAIAAABPOHEeiYiHcR9ScSAoSwNYAQAAAHxxIU5OTkr/////Sv////9LP3RxImKJXXEjWAUAAAB2JF8kMHEkYXRxJWJYCAAA"
        "AHJhd190ZXh0cSZoBGgFSwCFcSdoC4dxKFJxKShLAUsBhXEqaCCJXXErWAgAAABoaSB0aGVyZXEsYXRxLWJYBAAAAGxlbnNxLmgE"
        "aAVLAIVxL2gLh3EwUnExKEsBSwGFcTJoD1gCAAAAaThxM4mIh3E0UnE1KEsDaBNOTk5K/////0r/////SwB0cTZiiWgHWAgAAAAC"
        "AAAAAAAAAHE3aAmGcThScTl0cTpiWAUAAABsYWJlbHE7Y251bXB5LmNvcmUubXVsdGlhcnJheQpzY2FsYXIKcTxoD1gCAAAAZjhx"
        "PYmIh3E+UnE/KEsDaBNOTk5K/////0r/////SwB0cUBiaAdYCQAAAAAAAAAAAMOgP3FBaAmGcUJScUOGcURScUVYAgAAAG5jcUZo"
        "BGgFSwCFcUdoC4dxSFJxSShLAUsCSwSGcUpoP4loB1hBAAAAAAAAAAAAAAAAAAAAAADDsD8AAAAAAAAAQAAAAAAAAAhAAAAAAAAA"
        "IEAAAAAAAAAiQAAAAAAAACRAAAAAAAAAJkBxS2gJhnFMUnFNdHFOYnVzLg=="
    ),
    4: (
        "gASVOgIAAAAAAAB9lIwFdHJhaW6UfZQojAVhdWRpb5SMFW51bXB5LmNvcmUubXVsdGlhcnJheZSMDF9yZWNvbnN0cnVjdJSTlIwF"
        "bnVtcHmUjAduZGFycmF5lJOUSwCFlEMBYpSHlFKUKEsBSwFLAksDh5RoB4wFZHR5cGWUk5SMAmY0lImIh5RSlChLA4wBPJROTk5K"
        "/////0r/////SwB0lGKJQxgAAAAAAACAPwAAAEAAAEBAAACAQAAAoECUdJRijAJpZJRoBmgJSwCFlGgLh5RSlChLAUsBhZRoEIwC"
        "TziUiYiHlFKUKEsDjAF8lE5OTkr/////Sv////9LP3SUYoldlIwFdiRfJDCUYXSUYowIcmF3X3RleHSUaAZoCUsAhZRoC4eUUpQo"
        "SwFLAYWUaB+JXZSMCGhpIHRoZXJllGF0lGKMBGxlbnOUaAZoCUsAhZRoC4eUUpQoSwFLAYWUaBCMAmk4lImIh5RSlChLA2gUTk5O"
        "Sv////9K/////0sAdJRiiUMIAgAAAAAAAACUdJRijAVsYWJlbJRoBIwGc2NhbGFylJOUaBCMAmY4lImIh5RSlChLA2gUTk5OSv//"
        "//9K/////0sAdJRiQwgAAAAAAADgP5SGlFKUjAJuY5RoBmgJSwCFlGgLh5RSlChLAUsCSwSGlGg9iUNAAAAAAAAAAAAAAAAAAADw"
        "PwAAAAAAAABAAAAAAAAACEAAAAAAAAAgQAAAAAAAACJAAAAAAAAAJEAAAAAAAAAmQJR0lGJ1cy4="
    ),
    5: (
        "gAWVVQIAAAAAAAB9lIwFdHJhaW6UfZQojAVhdWRpb5SMEm51bXB5LmNvcmUubnVtZXJpY5SMC19mcm9tYnVmZmVylJOUKJYYAAAA"
        "AAAAAAAAAAAAAIA/AAAAQAAAQEAAAIBAAACgQJSMBW51bXB5lIwFZHR5cGWUk5SMAmY0lImIh5RSlChLA4wBPJROTk5K/////0r/"
        "////SwB0lGJLAUsCSwOHlIwBQ5R0lFKUjAJpZJSMFW51bXB5LmNvcmUubXVsdGlhcnJheZSMDF9yZWNvbnN0cnVjdJSTlGgIjAdu"
        "ZGFycmF5lJOUSwCFlEMBYpSHlFKUKEsBSwGFlGgKjAJPOJSJiIeUUpQoSwOMAXyUTk5OSv////9K/////0s/dJRiiV2UjAV2JF8k"
        "MJRhdJRijAhyYXdfdGV4dJRoF2gZSwCFlGgbh5RSlChLAUsBhZRoIYldlIwIaGkgdGhlcmWUYXSUYowEbGVuc5RoBiiWCAAAAAAA"
        "AAACAAAAAAAAAJRoCowCaTiUiYiHlFKUKEsDaA5OTk5K/////0r/////SwB0lGJLAYWUaBF0lFKUjAVsYWJlbJRoFYwGc2NhbGFy"
        "lJOUaAqMAmY4lImIh5RSlChLA2gOTk5OSv////9K/////0sAdJRiQwgAAAAAAADgP5SGlFKUjAJuY5RoF2gZSwCFlGgbh5RSlChL"
        "AUsCSwSGlGg9iUNAAAAAAAAAAAAAAAAAAADwPwAAAAAAAABAAAAAAAAACEAAAAAAAAAgQAAAAAAAACJAAAAAAAAAJEAAAAAAAAAm"
        "QJR0lGJ1cy4="
    ),
}


def _numpy1(protocol):
    return base64.b64decode("".join(NUMPY1_PICKLES[protocol]))


@pytest.mark.parametrize("protocol", sorted(NUMPY1_PICKLES))
def test_numpy1_pickles_load_without_warnings(protocol):
    raw = _numpy1(protocol)
    assert b"numpy.core" in raw
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 warns on numpy.core access; the safe loader resolves it directly
        data = safe_loads(raw)
    d = data["train"]
    np.testing.assert_array_equal(d["audio"], np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    assert d["audio"].dtype == np.float32
    assert d["id"].dtype == object and list(d["id"]) == ["v$_$0"] and list(d["raw_text"]) == ["hi there"]
    assert d["lens"].dtype == np.int64 and d["lens"][0] == 2
    assert isinstance(d["label"], np.float64) and d["label"] == 0.5
    np.testing.assert_array_equal(d["nc"], np.arange(16.0).reshape(4, 4)[::2])


OBJECTS = {
    "float32": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "object_str": np.array(["a b", "c$_$1", ""], dtype=object),
    "object_2d": np.array([["x", "y"], ["z", "w"]], dtype=object),
    "unicode": np.array(["ab", "cde"]),
    "bytes_arr": np.array([b"ab", b"c"]),
    "int64": np.arange(5, dtype=np.int64),
    "bool": np.array([True, False]),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "strided": np.arange(16.0).reshape(4, 4)[::2, ::3],
    "big_endian": np.arange(3, dtype=">f4"),
    "structured": np.zeros(2, dtype=[("a", "f4"), ("b", "i8")]),
    "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
    "zero_d": np.array(3.5),
    "empty": np.zeros((0, 3), np.float32),
    "empty_object": np.array([], dtype=object),
    "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.str_("s"), np.float64(np.inf)],
    "dtype": np.dtype("float32"),
    "builtins": {"set": {1, 2}, "frozenset": frozenset("ab"), "complex": 1 + 2j, "bytes": b"\x00\xff",
                 "bytearray": bytearray(b"xy"), "tuple": (1, "a", None), "float": 1e300, "nested": [[{}]]},
    "ordered": collections.OrderedDict(b=1, a=2),
}


def _equal(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_numpy_and_builtin_data_roundtrip(name, protocol):
    raw = pickle.dumps(OBJECTS[name], protocol=protocol)
    _equal(pickle.loads(raw), safe_loads(raw))  # exactly what the stock unpickler gives


class _Payload:
    """Unpickling calls ``func(*args)``: the classic code-execution pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(target):
    code = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "os.system": _Payload(os.system, f"touch {target}"),
        "builtins.exec": _Payload(builtins.exec, code),
        "builtins.eval": _Payload(builtins.eval, code),
        "builtins.open": _Payload(builtins.open, str(target), "w"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "builtins.open"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_pickles_refused(tmp_path, kind, protocol):
    target = tmp_path / "pwned"
    payload = _payloads(target)[kind]
    # hidden deep inside an MMSA-looking dict, inside an object array's elements
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = "fine", payload
    data = {"train": {"audio": np.zeros((1, 2, 3), np.float32), "id": arr}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        safe_load(path)
    msg = str(err.value)
    module, name = payload.func.__module__, payload.func.__name__
    if module == "builtins" and protocol < 3:
        module = "__builtin__"  # protocols 0-2 write Python 2 names
    assert f"'{module}.{name}'" in msg and str(path) in msg
    assert "trusted=True" in msg and "--trust-pickle" in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)
    assert not target.exists()


def test_refused_by_load_mmsa_and_read_mag_trusted_loads(tmp_path):
    target = tmp_path / "written"
    small = synthetic("mosi", 3, 2, 2, seed=0)
    evil = dict(small, extra=_Payload(builtins.exec, f"open({str(target)!r}, 'w').write('x')"))
    path = tmp_path / "evil.pkl"
    save_mmsa(evil, path)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        load_mmsa(path)
    assert not target.exists()
    data = load_mmsa(path, trusted=True)  # the user vouches for the file: full unpickler, the payload runs
    assert target.exists() and set(data) == {"train", "valid", "test"}

    target.unlink()
    mag = to_mag(load_mmsa(synthetic("mosi", 3, 2, 2, seed=0, aligned=True)))
    mag["dev"][0] = (mag["dev"][0][0], mag["dev"][0][1], _Payload(os.system, f"touch {target}"))
    mag_path = tmp_path / "evil_mag.pkl"
    mag_path.write_bytes(pickle.dumps(mag, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system"):
        read_mag(mag_path)
    assert not target.exists()
    read_mag(mag_path, trusted=True)  # os.system returns 0, which becomes the segment id "0"
    assert target.exists()


def test_trusted_safe_load_runs_payload(tmp_path):
    target = tmp_path / "ran"
    raw = pickle.dumps(_Payload(builtins.open, str(target), "w"), protocol=4)
    with pytest.raises(UnsafePickleError):
        safe_loads(raw)
    assert not target.exists()
    safe_loads(raw, trusted=True).close()
    assert target.exists()


def test_codecs_encode_only_latin1():
    assert safe_loads(pickle.dumps(b"\x00\x80\xff", protocol=2)) == b"\x00\x80\xff"
    crafted = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(crafted) == "k"  # the stock unpickler would call any codec
    with pytest.raises(UnsafePickleError, match="rot13"):
        safe_loads(crafted)


def test_unknown_numpy_and_other_globals_refused():
    for obj in (np.random.default_rng(0), np.ma.array([1, 2], mask=[0, 1]), collections.Counter("ab"),
                np.testing.assert_array_equal):
        with pytest.raises(UnsafePickleError):
            safe_loads(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("dataset,kwargs", [("mosi", {}), ("mosi", {"aligned": True}), ("sims", {})])
def test_synthetic_pickles_roundtrip_safely(tmp_path, dataset, kwargs):
    data = synthetic(dataset, 5, 3, 3, seed=1, **kwargs)
    path = tmp_path / "syn.pkl"
    save_mmsa(data, path)
    with open(path, "rb") as f:
        _equal(data, safe_load(f))  # file object
    _equal(data, safe_load(path))  # path
    loaded = load_mmsa(path)
    for split in data:
        np.testing.assert_array_equal(loaded[split]["text_bert"], data[split]["text_bert"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_mag_pickles_roundtrip_safely(tmp_path, protocol):
    data = load_mmsa(synthetic("mosi", 4, 3, 3, seed=2, aligned=True))
    mag = to_mag(data)
    path = tmp_path / "mag.pkl"
    path.write_bytes(pickle.dumps(mag, protocol=protocol))
    raw = safe_load(path)
    (words, visual, acoustic), label, segment = raw["train"][0]
    assert isinstance(words, list) and visual.dtype == np.float32 and label.shape == (1, 1)
    back, direct = read_mag(path), read_mag(mag)
    for split in back:
        for key in ("text_bert", "audio", "vision", "regression_labels"):
            np.testing.assert_array_equal(back[split][key], direct[split][key])


def test_python2_style_names_and_file_objects():
    # protocol 0 names builtins as __builtin__ (Python 2 layout)
    raw = pickle.dumps({"s": {1}, "c": 2j}, protocol=0)
    assert b"__builtin__" in raw
    assert safe_load(io.BytesIO(raw)) == {"s": {1}, "c": 2j}
