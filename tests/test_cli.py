"""The command line: score and inspect, through CliRunner and as real subprocesses."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    BAD_DUMPS,
    ROOT,
    SAMPLE,
    bad_dump,
    invoke,
    one_line_error,
    random_batch,
    rows_of,
    run_cli,
    write_padded,
)

from rnntool import __version__, rnnt_loss
from rnntool.dump import DumpWriter


@pytest.fixture
def dump(tmp_path):
    """A keyed dump of 6 utterances with stored losses, and its source tensors."""
    x, y, T, U = random_batch(6, 9, 4, 7, seed=21)
    path = tmp_path / "d.h5"
    ids = [f"spk1-utt{i}" for i in range(6)]
    with DumpWriter(path, blank=0, vocab=list("_abcdef")) as w:
        w.add_batch(x, y, T, U, utt_ids=ids, losses=torch.arange(6.0))
    return path, ids, (x, y, T, U)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"rnntool {__version__}"


def test_help_does_not_import_the_engine():
    # --help must stay fast: no torch, numba or h5py behind it.
    code = (
        "import sys; from rnntool.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'score' in r.output and 'inspect' in r.output; "
        "print(sorted(m for m in ('torch', 'numba', 'h5py', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_score_losses_equal_the_engine(dump):
    path, ids, (x, y, T, U) = dump
    result = invoke("score", path, "--format", "tsv", "-q")
    assert result.exit_code == 0, result.output
    rows = rows_of(result.stdout)
    assert [r["utt_id"] for r in rows] == ids  # file order, not batch order
    assert list(rows[0]) == ["utt_id", "T", "U", "loss", "loss_per_frame", "loss_per_token",
                             "stored_loss", "loss_diff"]
    expected = rnnt_loss(x, y, T, U, blank=0, reduction="none")
    for b, r in enumerate(rows):
        assert int(r["T"]) == int(T[b]) and int(r["U"]) == int(U[b])
        assert float(r["loss"]) == pytest.approx(float(expected[b]), abs=2e-6)
        assert float(r["loss_per_frame"]) == pytest.approx(float(expected[b]) / int(T[b]),
                                                           abs=2e-6)
        assert float(r["loss_per_token"]) == pytest.approx(
            float(expected[b]) / max(int(U[b]), 1), abs=2e-6)
        assert float(r["stored_loss"]) == b
        assert float(r["loss_diff"]) == pytest.approx(float(expected[b]) - b, abs=2e-6)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "table"])
def test_score_formats(dump, fmt):
    path, ids, _ = dump
    result = invoke("score", path, "--format", fmt, "-q")
    assert result.exit_code == 0, result.output
    out = result.stdout
    if fmt == "csv":
        assert [r["utt_id"] for r in rows_of(out, "csv")] == ids
    elif fmt == "jsonl":
        assert [json.loads(line)["utt_id"] for line in out.splitlines()] == ids
    elif fmt == "json":
        assert [r["utt_id"] for r in json.loads(out)] == ids
    else:
        assert all(u in out for u in ids) and "loss_per_token" in out


def test_score_selection_and_blank(dump, tmp_path):
    path, ids, _ = dump
    result = invoke("score", path, "--utt", ids[3], "--utt", ids[1], "-f", "tsv", "-q")
    assert [r["utt_id"] for r in rows_of(result.stdout)] == [ids[3], ids[1]]
    result = invoke("score", path, "--utt-list", "-", "-f", "tsv", "-q", input=f"{ids[2]}\n\n")
    assert [r["utt_id"] for r in rows_of(result.stdout)] == [ids[2]]
    lst = tmp_path / "ids.txt"
    lst.write_text(f"{ids[0]}\n{ids[5]}\n")
    result = invoke("score", path, "--utt-list", lst, "-f", "tsv", "-q")
    assert [r["utt_id"] for r in rows_of(result.stdout)] == [ids[0], ids[5]]
    # --blank overrides the file's: a label equal to the new blank is bad input ...
    with h5py.File(path, "r") as f:
        first = int(f[f"utts/{ids[0]}/labels"][0])
    result = invoke("score", path, "--blank", str(first), "-f", "tsv", "-q")
    assert result.exit_code == 2 and "equals blank" in result.stderr
    # ... and an unused token as blank gives the engine's losses with that blank.
    x = torch.randn(2, 4, 3, 5)
    y = torch.tensor([[1, 2], [2, 1]])
    small = tmp_path / "small.h5"
    with DumpWriter(small) as w:
        w.add_batch(x, y, torch.tensor([4, 4]), torch.tensor([2, 2]))
    got = rows_of(invoke("score", small, "--blank", "3", "-f", "tsv", "-q").stdout)
    want = rnnt_loss(x, y, torch.tensor([4, 4]), torch.tensor([2, 2]), blank=3, reduction="none")
    assert [float(r["loss"]) for r in got] == pytest.approx(want.tolist(), abs=2e-6)


def test_score_output_file_is_atomic_and_complete(dump, tmp_path):
    path, ids, _ = dump
    out = tmp_path / "scores.tsv"
    result = invoke("score", path, "-o", out, "-q")
    assert result.exit_code == 0 and result.stdout == ""
    assert [r["utt_id"] for r in rows_of(out.read_text())] == ids  # tsv when not a terminal
    assert sorted(os.listdir(tmp_path)) == ["d.h5", "scores.tsv"]


def test_score_interrupted_leaves_no_output(dump, tmp_path, monkeypatch):
    """Ctrl-C after rows were already streamed into the temporary file: exit 130, no
    output file, no temporary file."""
    import rnntool.score as score_mod

    real = score_mod._score_batches
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first window's rows are out
            raise KeyboardInterrupt
        yield from real(*a, **k)

    monkeypatch.setattr(score_mod, "_score_batches", boom)
    monkeypatch.setattr(score_mod, "WINDOW", 2)  # a window's rows are written, then Ctrl-C
    path, _, _ = dump
    out = tmp_path / "scores.tsv"
    result = invoke("score", path, "-o", out, "--batch-mb", "0")
    assert result.exit_code == 130 and len(calls) == 2
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".rnntool")]


def test_score_nonfinite_loss_exit_1_and_others_written(tmp_path):
    x, y, T, U = random_batch(3, 5, 2, 6, seed=23, mixed=False)
    x[1, 2, 1, 3] = float("nan")
    path = tmp_path / "nan.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c"])
    result = invoke("score", path, "-f", "tsv")
    assert result.exit_code == 1
    rows = rows_of(result.stdout)
    assert [r["loss"] for r in rows][1] == "nan"
    assert all(float(r["loss"]) > 0 for r in rows if r["utt_id"] != "b")
    assert "utterance b: loss is nan" in result.stderr


@pytest.mark.parametrize("how, needle", BAD_DUMPS)
def test_score_bad_dumps(tmp_path, how, needle):
    path = bad_dump(tmp_path / "bad.h5", how)
    out = tmp_path / "out.tsv"
    result = invoke("score", path, "-o", out)
    one_line_error(result, str(path), needle)
    assert not out.exists()


def test_score_bad_files_and_args(dump, tmp_path):
    path, _, _ = dump
    one_line_error(invoke("score", tmp_path / "missing.h5"), "missing.h5: no such file")
    (tmp_path / "x.h5").write_text("hello")
    one_line_error(invoke("score", tmp_path / "x.h5"), "x.h5: not a readable HDF5 file")
    data = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 3])
    one_line_error(invoke("score", tmp_path / "trunc.h5"), "trunc.h5")
    one_line_error(invoke("score", path, "--utt", "nobody"), "no utterance 'nobody'")
    one_line_error(invoke("score", path, "-o", tmp_path / "no" / "dir" / "f.tsv"),
                   "does not exist")
    one_line_error(invoke("score", path, "--format", "xml"), "--format 'xml'")
    x, y, T, U = random_batch(2, 4, 2, 5, seed=8, mixed=False)
    T[1] = 7
    write_padded(tmp_path / "p.h5", x.numpy(), y.numpy(), T.numpy(), U.numpy())
    one_line_error(invoke("score", tmp_path / "p.h5"), "utterance 1: logit_lengths[1] = 7")


def test_score_unwritable_output(dump, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    path, _, _ = dump
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    one_line_error(invoke("score", path, "-o", ro / "f.tsv"), "not writable")


def test_score_padded_layout_matches_keyed(tmp_path, dump):
    path, ids, (x, y, T, U) = dump
    write_padded(tmp_path / "p.h5", x.numpy(), y.clamp(min=0).numpy(), T.numpy(), U.numpy(),
                 utt_ids=ids)
    keyed = rows_of(invoke("score", path, "-f", "tsv", "-q").stdout)
    padded = rows_of(invoke("score", tmp_path / "p.h5", "-f", "tsv", "-q").stdout)
    assert [r["loss"] for r in keyed] == [r["loss"] for r in padded]


def test_inspect(dump, tmp_path):
    path, ids, _ = dump
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    (facts,) = rows_of(result.stdout)
    assert facts["layout"] == "keyed" and facts["utterances"] == "6" and facts["blank"] == "0"
    assert facts["vocab_size"] == "7" and facts["dtypes"] == "float32"
    assert facts["problems"] == "0" and facts["with_stored_loss"] == "6"
    assert facts["kind"] == "full" and facts["vocab"] in ("true", "false")
    result = invoke("inspect", path, "--format", "json")
    (facts,) = json.loads(result.stdout)
    assert (facts["T_min"], facts["T_max"]) == (1, 9) and isinstance(facts["vocab"], bool)
    # Several files, one row each; -o writes the rows, -q hides progress.
    out = tmp_path / "facts.jsonl"
    result = invoke("inspect", path, "-o", out,
                    "-f", "jsonl", "-q")
    assert result.exit_code == 0 and result.stdout == ""
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()] == [str(path)]
    with h5py.File(path, "r+") as f:
        f[f"utts/{ids[0]}/labels"][0] = 0  # utterance 0 has the full U = 4
        f[f"utts/{ids[4]}/logits"][0, 0, 0] = np.nan
    result = invoke("inspect", path)
    assert result.exit_code == 1
    problems = result.stderr.strip().splitlines()
    assert len(problems) == 2
    assert f"utterance {ids[0]}: labels[0] = 0 equals blank" in problems[0]
    assert f"utterance {ids[4]}: 1 NaN or +inf logits" in problems[1]


def test_score_in_a_pipeline_with_head(tmp_path):
    x, y, T, U = random_batch(3000, 2, 1, 3, seed=29, mixed=False)
    path = tmp_path / "many.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U)
    cmd = f"{sys.executable} -m rnntool score {path} --format tsv | head -1"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout == "utt_id\tT\tU\tloss\tloss_per_frame\tloss_per_token\n"
    assert "BrokenPipe" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not SAMPLE.exists(), reason="sample data not built")
def test_score_sample_data_subprocess():
    out = run_cli("score", SAMPLE, "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 24 and all(r["loss"] > 0 for r in rows)
    # The trainer's stored losses came from the same engine.
    assert max(abs(r["loss_diff"]) for r in rows) < 1e-4
    assert "24 utterances, mean loss" in out.stderr


@pytest.mark.parametrize("layout", ["keyed", "padded", "keyed-gzip"])
def test_direct_and_hdf5_reads_agree(tmp_path, layout):
    x, y, T, U = random_batch(5, 9, 4, 7, seed=31, dtype=torch.float16)
    path = tmp_path / "d.h5"
    if layout == "padded":
        write_padded(path, x.numpy(), y.clamp(min=0).numpy(), T.numpy(), U.numpy())
    else:
        with DumpWriter(path, compression="gzip" if "gzip" in layout else None) as w:
            w.add_batch(x, y, T, U)
    from rnntool.dump import DumpReader

    with DumpReader(path) as r:
        raw = [r.info(u).region is not None for u in r.utt_ids]
    assert all(raw) == (layout != "keyed-gzip")
    direct = rows_of(invoke("score", path, "-f", "tsv", "-q").stdout)
    batched = rows_of(invoke("score", path, "-f", "tsv", "-q", "--via-hdf5").stdout)
    assert direct == batched
    assert rows_of(invoke("score", path, "-f", "tsv", "-q", "--no-mmap").stdout) == direct
    expected = rnnt_loss(x, y, T, U, blank=0, reduction="none")
    assert [float(r["loss"]) for r in direct] == pytest.approx(expected.tolist(), abs=1e-5)


def test_device_cuda_without_gpu_is_one_line(dump, monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    path, _, _ = dump
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    one_line_error(invoke("score", path, "--device", "cuda"), "--device cuda: no usable CUDA GPU")


def test_score_on_the_simulated_cuda_backend(dump):
    # conftest turns the simulator on: --device cuda runs the CUDA kernels on CPU tensors.
    path, ids, (x, y, T, U) = dump
    from rnntool import cuda as rcuda

    if not rcuda.SIMULATOR:
        pytest.skip("needs the simulator")
    with rcuda.config(threads_v=4, rows_per_block=2, threads_diag=2):
        rows = rows_of(invoke("score", path, "--device", "cuda", "-f", "tsv", "-q",
                              "--utt", ids[0], "--utt", ids[1]).stdout)
    want = rnnt_loss(x[:2], y[:2], T[:2], U[:2], blank=0, reduction="none")
    assert [float(r["loss"]) for r in rows] == pytest.approx(want.tolist(), abs=2e-5)


def test_log_probs_dump_scores_like_logits(tmp_path):
    x, y, T, U = random_batch(3, 6, 3, 5, seed=51)
    a, b = tmp_path / "logits.h5", tmp_path / "logp.h5"
    with DumpWriter(a) as w:
        w.add_batch(x, y, T, U)
    with DumpWriter(b, input_kind="log_probs") as w:
        w.add_batch(torch.log_softmax(x, -1), y, T, U)
    ra = rows_of(invoke("score", a, "-f", "tsv", "-q").stdout)
    rb = rows_of(invoke("score", b, "-f", "tsv", "-q").stdout)
    assert [float(r["loss"]) for r in ra] == pytest.approx([float(r["loss"]) for r in rb],
                                                           abs=2e-5)


def test_cpu_scoring_never_imports_torch(dump):
    # torch costs a second of start-up and 200 MB; the CPU engine's stages need numpy only.
    path, _, _ = dump
    code = (
        "import sys; from rnntool.cli import app; from typer.testing import CliRunner; "
        f"r = CliRunner().invoke(app, ['score', {str(path)!r}, '-q', '--device', 'cpu']); "
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )
    for extra in ([], ["--via-hdf5"]):
        c = code.replace("'cpu']", "'cpu'" + "".join(f", {e!r}" for e in extra) + "]")
        out = subprocess.run([sys.executable, "-c", c], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- usage errors, help
@pytest.mark.parametrize("args,needle", [
    (["score", "--bogus"], "No such option: --bogus (see 'rnntool score --help')"),
    (["score"], "Missing argument 'FILE'"),
    (["score", "x.h5", "--batch-mb", "many"], "Invalid value for '--batch-mb'"),
    (["frob"], "No such command 'frob'"),
])
def test_a_usage_error_is_one_line_and_exit_2(args, needle):
    """The console script, not click's framed box: one line on stderr, exit 2."""
    result = run_cli(*args)
    one_line_error(result, needle)
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["score", "align", "plot", "grad-check", "inspect",
                                     "compact"])
def test_help_names_metavars_a_shell_user_reads(command):
    """``--help`` shows FILE, ID, N..., never Python types such as <list[Path]> or <str>."""
    text = invoke(command, "--help").stdout
    assert "FILE" in text
    for python_type in ("<list[", "<str>", "<int>", "<Path>", "{inputs}", "<bool>"):
        assert python_type not in text, (command, python_type)


# --------------------------------------------------------------------------- workflows (issue 12)
def many_small(path, n=2000, V=16):
    rng = np.random.default_rng(5)
    with DumpWriter(path, blank=0) as w:
        for k in range(n):
            T, U = int(rng.integers(10, 30)), int(rng.integers(1, 6))
            w.add(f"utt{k:05d}", rng.standard_normal((T, U + 1, V)).astype(np.float32),
                  rng.integers(1, V, U))
    return path


def test_score_streams_rows_before_the_run_ends(tmp_path):
    """The header and first row of a 2000-utterance dump arrive while the process is
    still scoring (rows are written in input order as windows finish)."""
    path = many_small(tmp_path / "many.h5")
    proc = subprocess.Popen([sys.executable, "-m", "rnntool", "score", str(path), "-f", "tsv",
                             "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        header = proc.stdout.readline()
        first = proc.stdout.readline()
        still_running = proc.poll() is None
        rest = proc.stdout.read()
    finally:
        proc.wait(timeout=300)
    assert header.startswith("utt_id\t") and first.startswith("utt00000\t")
    assert still_running, "the first row came only after the whole run"
    assert proc.returncode == 0
    assert len(rest.splitlines()) == 1999


def test_several_inputs_carry_a_file_column_and_score_each_selection_once(dump, tmp_path):
    path, ids, _ = dump
    other = tmp_path / "copy.h5"
    other.write_bytes(path.read_bytes())
    result = invoke("score", path, other, "--utt", ids[1], "--utt", ids[1], "-f", "tsv")
    assert result.exit_code == 0, result.output
    rows = rows_of(result.stdout)
    assert [(r["file"], r["utt_id"]) for r in rows] == [(str(path), ids[1]), (str(other), ids[1])]
    assert f"{path}:{ids[1]}" in result.stderr and f"{other}:{ids[1]}" in result.stderr
    # One input given twice (by another name too) is read once; no file column then.
    link = tmp_path / "link.h5"
    link.symlink_to(path)
    rows = rows_of(invoke("score", path, link, "--utt", ids[1], "-f", "tsv").stdout)
    assert len(rows) == 1 and "file" not in rows[0]


@pytest.mark.parametrize("kind", ["full", "lattice"])
def test_skip_bad_scores_the_others_and_exits_1(tmp_path, kind):
    x, y, T, U = random_batch(4, 5, 2, 6, seed=41, mixed=False)
    path = tmp_path / "d.h5"
    with DumpWriter(path, blank=0, kind=kind) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c", "d"])
    with h5py.File(path, "r+") as f:
        f["utts/b/labels"][0] = 0  # a label equal to blank
        if kind == "lattice":
            f["utts/d/blank_lp"][0, 0] = np.nan
    stop = invoke("score", path, "-f", "tsv")
    one_line_error(stop, "utterance b", "equals blank")
    result = invoke("score", path, "-f", "tsv", "--skip-bad")
    assert result.exit_code == 1
    kept = ["a", "c"] if kind == "lattice" else ["a", "c", "d"]
    assert [r["utt_id"] for r in rows_of(result.stdout)] == kept
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("rnntool:")]
    assert any("utterance b" in ln and "equals blank" in ln for ln in lines)
    if kind == "lattice":
        assert any("utterance d" in ln and "nan" in ln for ln in lines)


def test_an_empty_dump_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_group("utts")
    result = invoke("compact", path, "-o", tmp_path / "lat.h5")
    assert result.exit_code == 1 and not (tmp_path / "lat.h5").exists()
    for cmd in ("score", "align", "inspect"):
        result = invoke(cmd, path, "-f", "tsv")
        assert result.exit_code == 1, (cmd, result.output)
        assert f"{path}: the dump holds no utterances" in result.stderr


@pytest.mark.parametrize("command", ["score", "align", "grad-check"])
def test_rows_stay_on_stdout_while_a_progress_bar_is_live(command):
    """stderr a terminal (the bar is drawn), stdout a pipe: every row still goes to stdout
    (rich's live display would otherwise capture stdout onto the bar's console)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rnntool", command, str(SAMPLE), "--utt",
                             "utt001", "-f", "tsv"], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
    os.close(slave)
    seen = b""
    while proc.poll() is None or select.select([master], [], [], 0)[0]:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    out = proc.stdout.read().decode()
    os.close(master)
    assert proc.wait() == 0, seen.decode(errors="replace")
    rows = rows_of(out)
    assert rows and all(r["utt_id"] == "utt001" for r in rows)
    assert "utt001\t" not in seen.decode(errors="replace")
