"""Every class of bad input, for every subcommand: one line on stderr naming the file, node or key, exit
code 2, no traceback and no output written; and a seeded fuzz of a valid model through the CLI that
only ever ends in exit 0 or 2."""
from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_graphs import save_small_classifier

from tpusim.cli import main
from tpusim.workloads import workload_file

REPO = Path(__file__).resolve().parents[1]
TPU_V1 = str(REPO / "configs" / "tpu_v1.yaml")
UNWRITABLE = Path("/sys/tpusim-out")  # even root cannot create files in sysfs

COMMANDS = {
    "run": ["run", "CONFIG", "--model", "MODEL", "--out", "OUTDIR", "--no-progress", "--eval-samples", "1"],
    "compile": ["compile", "CONFIG", "--model", "MODEL", "-o", "OUTFILE"],
    "quantize": ["quantize", "CONFIG", "--model", "MODEL", "-o", "OUTFILE", "--no-progress"],
    "compare": ["compare", "CONFIG", "--model", "MODEL", "--out", "OUTDIR", "--no-progress", "--baseline", "none",
                "--weights", "per-tensor", "--calibration", "minmax", "--eval-samples", "1"],
    "sweep": ["sweep", "CONFIG", "--model", "MODEL", "--out", "OUTDIR", "--jobs", "1"],
    "check": ["check", "MODEL"],
    "workloads build": ["workloads", "build", "tiny_cnn", "-o", "OUTFILE"],
}
USES = {  # which placeholders each command has
    name: {a for a in argv if a in ("CONFIG", "MODEL", "OUTDIR", "OUTFILE")} for name, argv in COMMANDS.items()
}


def _case(kind: str, tmp: Path) -> tuple[dict[str, str], list[str], str]:
    """(placeholder replacements, extra arguments, expected message) for one class of bad input."""
    model = save_small_classifier(tmp / "small.onnx")
    good = {"CONFIG": TPU_V1, "MODEL": str(model), "OUTDIR": str(tmp / "out"), "OUTFILE": str(tmp / "out.onnx")}
    extra: list[str] = []
    if kind == "missing config":
        good["CONFIG"], message = str(tmp / "absent.yaml"), "absent.yaml: no such config file"
    elif kind == "model given as config":
        good["CONFIG"], message = str(model), "small.onnx: not a YAML config file"
    elif kind == "bad config value":
        extra, message = ["--set", "array.rows=0"], "array.rows: must be >= 1"
    elif kind == "unknown config key":
        extra, message = ["--set", "array.banks=2"], "array.banks: unknown key"
    elif kind == "copied config, missing table":
        config = tmp / "mine.yaml"
        config.write_text(Path(TPU_V1).read_text().replace("energy/horowitz45.yaml", "energy/absent.yaml"))
        good["CONFIG"], message = str(config), "energy.table: no such energy table file 'energy/absent.yaml'"
    elif kind == "missing model":
        good["MODEL"], message = str(tmp / "absent.onnx"), "absent.onnx: no such model file"
    elif kind == "corrupt model":
        data = model.read_bytes()
        (tmp / "cut.onnx").write_bytes(data[: len(data) // 2])
        good["MODEL"], message = str(tmp / "cut.onnx"), "cut.onnx: not a readable ONNX model"
    elif kind == "folder as model":
        (tmp / "folder.onnx").mkdir()
        good["MODEL"], message = str(tmp / "folder.onnx"), "folder.onnx: is a folder"
    elif kind == "unknown workload":
        good["MODEL"], message = "resnet5O", "resnet5O: not a file and not a built-in workload"
    elif kind == "unsupported op":
        m = onnx.load(str(model))
        m.graph.node[1].op_type = "Celu"
        onnx.save(m, str(tmp / "celu.onnx"))
        good["MODEL"], message = str(tmp / "celu.onnx"), "unsupported ops: Celu x1"
    elif kind == "out is a file":
        (tmp / "taken").write_text("keep me")
        good["OUTDIR"], message = str(tmp / "taken"), "taken: is a file, not a folder"
        good["OUTFILE"] = str(tmp / "taken" / "x.onnx")
    elif kind == "out is a folder":
        (tmp / "dir.onnx").mkdir()
        good["OUTFILE"], message = str(tmp / "dir.onnx"), "dir.onnx: is a folder, not a file"
        good["OUTDIR"] = str(tmp / "nothing")  # (not this class for folder outputs: skipped below)
    elif kind == "out under a file":
        (tmp / "plain").write_text("keep me")
        good["OUTDIR"] = str(tmp / "plain" / "sub")
        good["OUTFILE"], message = str(tmp / "plain" / "x.onnx"), "plain is a file, not a folder"
    elif kind == "out unwritable":
        good["OUTDIR"], good["OUTFILE"] = str(UNWRITABLE / "out"), str(UNWRITABLE / "x.onnx")
        message = "cannot write in"
    elif kind == "integer calibration data":
        np.save(tmp / "pixels.npy", np.zeros((4, 3, 8, 8), np.uint8))
        extra, message = ["--calib-data", str(tmp / "pixels.npy")], "pixels.npy: dtype uint8: expected float inputs"
    else:
        raise AssertionError(kind)
    return good, extra, message


APPLIES = {
    "missing config": {"CONFIG"}, "model given as config": {"CONFIG"}, "bad config value": {"CONFIG"},
    "unknown config key": {"CONFIG"}, "copied config, missing table": {"CONFIG"},
    "missing model": {"MODEL"}, "corrupt model": {"MODEL"}, "folder as model": {"MODEL"},
    "unknown workload": {"MODEL"}, "unsupported op": {"MODEL"},
    "out is a file": {"OUTDIR"}, "out is a folder": {"OUTFILE"}, "out under a file": {"OUTDIR", "OUTFILE"},
    "out unwritable": {"OUTDIR", "OUTFILE"}, "integer calibration data": {"CALIB"},
}
CALIBRATING = {"run", "quantize", "compare"}
CASES = [(command, kind) for command in COMMANDS for kind, needs in APPLIES.items()
         if (needs & USES[command]) or ("CALIB" in needs and command in CALIBRATING)]
# `workloads build` takes no --set; `check` takes no config
CASES = [(c, k) for c, k in CASES if not (c == "workloads build" and k in ("bad config value", "unknown config key"))]


@pytest.mark.parametrize("command, kind", CASES, ids=[f"{c}: {k}" for c, k in CASES])
def test_bad_input_catalogue(tmp_path, capsys, command, kind):
    if kind == "out unwritable" and not UNWRITABLE.parent.is_dir():
        pytest.skip("no sysfs here")
    good, extra, message = _case(kind, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [good.get(a, a) for a in COMMANDS[command]] + extra
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tpusim: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_eval_samples_must_be_positive(tmp_path, capsys, command, value):
    argv = [a for a in COMMANDS[command]]
    argv[argv.index("--eval-samples") + 1] = value
    argv = [{"CONFIG": TPU_V1, "MODEL": "tiny_cnn", "OUTDIR": str(tmp_path / "out")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--eval-samples: expected a positive integer" in err and "Traceback" not in err
    assert err.startswith("tpusim: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["run"], "tpusim run: the following arguments are required: config, --model (see tpusim run --help)"),
    (["bogus"], "tpusim: argument COMMAND: invalid choice: 'bogus'"),
    (["run", TPU_V1, "--model", "tiny_cnn", "--weights", "per-row"], "argument --weights: invalid choice: 'per-row'"),
])
def test_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("tpusim: error: ") and err.count("\n") == 1 and message in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("tpusim ")


def test_a_copied_config_uses_the_shipped_energy_table(tmp_path, capsys):
    mine = tmp_path / "my.yaml"
    shutil.copy(TPU_V1, mine)
    assert main(["run", str(mine), "--model", str(save_small_classifier(tmp_path / "m.onnx")), "--out", str(tmp_path / "out"),
                 "--no-quantize", "--no-progress"]) == 0
    assert "horowitz45.yaml" in (tmp_path / "out" / "config.yaml").read_text()


def test_outputs_honour_the_umask(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        assert main(["run", TPU_V1, "--model", str(save_small_classifier(tmp_path / "m.onnx")), "--out", str(tmp_path / "out"),
                     "--no-quantize", "--no-progress"]) == 0
        assert main(["workloads", "build", "tiny_cnn", "-o", str(tmp_path / "t.onnx")]) == 0
        os.umask(0o077)
        assert main(["compile", TPU_V1, "--model", str(tmp_path / "t.onnx"), "-o", str(tmp_path / "t.txt")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "t.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------------
# Fuzz: mutate a valid model (seeded) and run it through the CLI; exit 0 or 2, never a traceback.


def _mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    base = onnx.load(str(workload_file("tiny_cnn")))
    raw = base.SerializeToString()
    mutants = []
    kinds = ["flip bytes", "drop initializer", "wrong dim", "dangling input", "unknown op", "absurd attribute",
             "absurd weight"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        m = copy.deepcopy(base)
        nodes = list(m.graph.node)
        node = rng.choice(nodes)
        if kind == "flip bytes":
            data = bytearray(raw)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            mutants.append((kind, bytes(data)))
            continue
        if kind == "drop initializer":
            m.graph.initializer.remove(rng.choice(list(m.graph.initializer)))
        elif kind == "wrong dim":
            init = rng.choice([t for t in m.graph.initializer if len(t.dims)])
            array = numpy_helper.to_array(init)
            axis = rng.randrange(array.ndim)
            grown = np.concatenate([array, np.take(array, [0], axis=axis)], axis=axis)
            init.CopyFrom(numpy_helper.from_array(grown, init.name))
        elif kind == "dangling input":
            node.input[rng.randrange(len(node.input))] = "nowhere"
        elif kind == "unknown op":
            node.op_type = rng.choice(["FooBar", "Conv2D", "Relu6"])
        elif kind == "absurd attribute":
            candidates = [n for n in nodes if n.attribute] or nodes
            node = rng.choice(candidates)
            name = rng.choice([a.name for a in node.attribute] or ["axis"])
            value = rng.choice([0, -7, 10**9, [0, 0], [-3, -3, -3, -3], [10**6, 10**6], 2.5e38, "x"])
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute(name, value)])
        elif kind == "absurd weight":
            init = rng.choice([t for t in m.graph.initializer if numpy_helper.to_array(t).size > 4])
            array = numpy_helper.to_array(init).copy()
            array.flat[rng.randrange(array.size)] = rng.choice([np.inf, -np.inf, np.nan, 3.9e37, -1e30])
            init.CopyFrom(numpy_helper.from_array(array, init.name))
        mutants.append((kind, m.SerializeToString()))
    return mutants


MUTANTS = _mutants(seed=20240611, count=35)


@pytest.mark.parametrize("index", range(len(MUTANTS)), ids=[f"{i}-{k}" for i, (k, _) in enumerate(MUTANTS)])
def test_fuzzed_models_exit_0_or_2(tmp_path, capsys, index):
    kind, data = MUTANTS[index]
    path = tmp_path / "mutant.onnx"
    path.write_bytes(data)
    out = tmp_path / "out"
    code = main(["run", TPU_V1, "--model", str(path), "--out", str(out), "--no-progress", "--eval-samples", "1",
                 "--set", "quant.calibration_samples=2"])  # any exception escaping main is a traceback: fails here
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.splitlines()[-1].startswith("tpusim: error: ") and "Traceback" not in err
        assert not out.exists()


def _with_weight(tmp_path: Path, name: str, index: tuple, value: float) -> Path:
    m = onnx.load(str(workload_file("tiny_cnn")))
    (init,) = [t for t in m.graph.initializer if t.name == name]
    array = numpy_helper.to_array(init).copy()
    array[index] = value
    init.CopyFrom(numpy_helper.from_array(array, name))
    path = tmp_path / "absurd.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("name, index, value, message", [
    ("stem.bn.running_mean", (0,), np.inf, "layer 'stem.conv': NaN or inf in its bias"),
    ("down.conv.weight", (8, 11, 1, 1), np.nan, "layer 'down.conv': NaN or inf in its weights"),
    ("down.conv.weight", (8, 11, 1, 1), -3.9e37, "layer 'down.conv': requantization multipliers must be finite"),
])
def test_absurd_weights_are_one_line_naming_the_layer(tmp_path, capsys, name, index, value, message):
    path = _with_weight(tmp_path, name, index, value)
    code = main(["run", TPU_V1, "--model", str(path), "--out", str(tmp_path / "out"), "--no-progress",
                 "--eval-samples", "1", "--set", "quant.calibration_samples=2"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.splitlines()[-1].startswith("tpusim: error: ")
    assert not (tmp_path / "out").exists()
