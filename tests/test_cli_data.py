"""``msa-fast data synth|inspect`` and ``msa-fast demo`` through ``msa_fast.cli.main``."""
import pickle

import numpy as np
import pytest

from msa_fast.cli import main
from msa_fast.data import load_mmsa


def _synth(path, *extra):
    return main(["data", "synth", "--dataset", "mosi", "--out", str(path), "--n-train", "6", "--n-valid", "3",
                 "--n-test", "4", "--seed", "5", *extra])


def test_synth_then_inspect(tmp_path, capsys):
    path = tmp_path / "mosi.pkl"
    assert _synth(path) == 0
    assert "wrote" in capsys.readouterr().out
    data = load_mmsa(path)
    assert data["train"]["audio"].shape == (6, 375, 5) and len(data["test"]["id"]) == 4
    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for fragment in ("[train] 6 samples", "[valid] 3 samples", "(6, 375, 5)", "float32", "audio_lengths",
                     "regression_labels", "padding right", "text tokens"):
        assert fragment in out, fragment


def test_synth_aligned_sims_rejected(tmp_path, capsys):
    assert _synth(tmp_path / "a.pkl", "--aligned") == 0
    assert load_mmsa(tmp_path / "a.pkl")["train"]["vision"].shape == (6, 50, 20)
    rc = main(["data", "synth", "--dataset", "sims", "--aligned", "--out", str(tmp_path / "s.pkl"), "--n-train", "2",
               "--n-valid", "2", "--n-test", "2"])
    assert rc == 2 and "no aligned version" in capsys.readouterr().err


def test_inspect_malformed_one_line(tmp_path, capsys):
    path = tmp_path / "mosi.pkl"
    _synth(path)
    data = pickle.loads(path.read_bytes())
    data["valid"]["vision_lengths"] = np.full(3, 999)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(data))
    capsys.readouterr()
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "split 'valid'" in err and "key 'vision_lengths'" in err and "[0, 500]" in err


@pytest.mark.parametrize("content", [b"garbage", pickle.dumps({"train": {}})])
def test_inspect_unreadable(tmp_path, capsys, content):
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-fast data: error:") and len(err.strip().splitlines()) == 1


def test_inspect_missing_file(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope.pkl")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "synth", "--help"], ["data", "inspect", "--help"],
                                  ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_demo_quick(capsys):
    assert main(["demo", "--quick", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "ridge on fused (t+a+v)" in out and "fused beats every single modality (MAE and Corr, test): yes" in out


def test_demo_skips_section_with_missing_module(capsys, monkeypatch):
    from msa_fast import demo

    ran = []
    sections = [demo.Section("ok", lambda ctx: ran.append(1)),
                demo.Section("later", lambda ctx: ran.append(2), requires=("msa_fast.not_written_yet",))]
    monkeypatch.setattr(demo, "SECTIONS", sections)
    assert main(["demo", "--quick"]) == 0
    assert ran == [1] and "skipped: module msa_fast.not_written_yet" in capsys.readouterr().out


def test_inspect_padding_option_and_splits(tmp_path, capsys):
    path = tmp_path / "mosi.pkl"
    _synth(path)
    data = pickle.loads(path.read_bytes())
    i = int(np.argmin(data["train"]["audio_lengths"]))
    n = int(data["train"]["audio_lengths"][i])
    assert n < 375
    data["train"]["audio"][i, n:] = 1.0  # junk beyond the length (and data before it): neither padding side
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(pickle.dumps(data))
    capsys.readouterr()
    assert main(["data", "inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "split 'train', key 'audio'" in err and "padding='ignore'" in err
    assert main(["data", "inspect", str(junk), "--padding", "ignore"]) == 0
    assert "padding unchecked" in capsys.readouterr().out
    assert main(["data", "inspect", str(path), "--splits", "test"]) == 0
    out = capsys.readouterr().out
    assert "[test] 4 samples" in out and "[train]" not in out


def test_inspect_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    import os
    import pickle

    from msa_fast.cli import main

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": Evil()}, protocol=4))
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "system" in err and "--trust-pickle" in err
    assert not marker.exists()
