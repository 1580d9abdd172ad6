"""Bad input anywhere gets one line saying what is wrong, exit code 2 (st.error in the app), never a
traceback: flags, prompts files, TOML configs, damaged studies, URL parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.study import layout
from explorer.cli import main as msif
from explorer.server import STUDY_ENV
from precompute.cli import main as build

APP = str(Path(__file__).resolve().parents[1] / "explorer" / "app.py")
CONFIG = Path(__file__).resolve().parents[1] / "assets" / "configs" / "pythia-70m-deduped-dolly.toml"


@pytest.fixture
def study(tiny_study, tmp_path) -> Path:
    copy = tmp_path / "study"
    shutil.copytree(tiny_study, copy)
    return copy


def _one_line_error(capsys, says: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("msif"), err
    assert says in err, err
    return captured.out


def _prompts(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


MINIMAL = ('[models]\nbase = "a"\nfinetuned = "b"\n[pretraining]\npath = "d.jsonl"\n'
           '[finetuning]\npath = "r.jsonl"\n')
LONG_PROMPT = " ".join(["word"] * 400)  # fits the character limit, not the tiny study's 128 tokens

QUERY_CASES = {  # id -> (arguments after --study STUDY, prompts file content or None, what the message says)
    "prompts file is a directory": (["--prompts-file", "{tmp}"], None, "is a directory"),
    "prompts file missing": (["--prompts-file", "{tmp}/nope.jsonl"], None, "No such file"),
    "prompts file not UTF-8": (["--prompts-file", "{file}"], b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n',
                               "prompts.jsonl:2: not UTF-8"),
    "answer not a string": (["--prompts-file", "{file}"], '{"prompt": "hi", "answer": 3}\n',
                            'prompts.jsonl:1: "answer" must be a string'),
    "line not JSON": (["--prompts-file", "{file}"], '{"prompt": "hi"}\nnot json\n', "prompts.jsonl:2: not JSON"),
    "line a JSON list": (["--prompts-file", "{file}"], '["hi"]\n', "prompts.jsonl:1: expected an object"),
    "prompt missing": (["--prompts-file", "{file}"], '{"question": "hi"}\n', 'with a "prompt" string'),
    "prompt a number": (["--prompts-file", "{file}"], '{"prompt": 7}\n', 'with a "prompt" string'),
    "prompts file empty": (["--prompts-file", "{file}"], "\n\n", "holds no prompts"),
    "empty prompt on line 2": (["--prompts-file", "{file}", "--answer", "x"], '{"prompt": "hi"}\n{"prompt": " "}\n',
                               "prompts.jsonl:2: the prompt is empty"),
    "prompt over the character limit": (["--prompts-file", "{file}", "--answer", "x"],
                                        json.dumps({"prompt": "x" * 9000}) + "\n", "the limit is 8000"),
    "prompt over the context": (["--prompt", LONG_PROMPT, "--answer", "In Ostgate."], None,
                                "does not fit the study's context of 128 tokens"),
    "prompt over the context, model answers": (["--prompt", LONG_PROMPT], None, "plus a generated answer of up to"),
    "answer over the context": (["--prompt", "hi", "--answer", LONG_PROMPT], None, "does not fit"),
    "empty --prompt": (["--prompt", "  ", "--answer", "x"], None, "the prompt is empty"),
    "top-k zero": (["--prompt", "hi", "--top-k", "0"], None, "--top-k must be at least 1"),
    "top-k negative": (["--prompt", "hi", "--top-k", "-3"], None, "--top-k must be at least 1"),
    "device without CUDA": (["--prompt", "hi", "--device", "cuda"], None, "CUDA is not available"),
    "device nonsense": (["--prompt", "hi", "--device", "banana"], None, "is not a device"),
    "escapes in a prompts file": (["--prompts-file", "{file}"], '{"prompt": "\\u001b[31m"}\n{"x": 1}\n',
                                                      "prompts.jsonl:2"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_query_bad_input(case, tiny_study, tmp_path, capsys):
    args, content, says = QUERY_CASES[case]
    file = _prompts(tmp_path, content) if content is not None else tmp_path / "prompts.jsonl"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{file}", str(file)) for a in args]
    assert msif(["query", "--study", str(tiny_study), *args]) == 2
    out = _one_line_error(capsys, says)
    assert out == ""  # nothing ran: every prompt is checked before the first one


ARGPARSE_CASES = {
    "unknown method": (["query", "--study", "S", "--prompt", "hi", "--method", "foo"], "invalid choice: 'foo'"),
    "top-k not a number": (["query", "--study", "S", "--prompt", "hi", "--top-k", "ten"], "invalid int value"),
    "prompt and prompts file": (["query", "--study", "S", "--prompt", "a", "--prompts-file", "f"], "not allowed with"),
    "unknown flag": (["query", "--study", "S", "--prompt", "a", "--colour"], "unrecognized arguments: --colour"),
    "port not a number": (["app", "--port", "http"], "invalid int value"),
    "factor precision": (["query", "--study", "S", "--prompt", "a", "--factor-precision", "int8"],
                         "invalid choice: 'int8'"),
}


@pytest.mark.parametrize("case", list(ARGPARSE_CASES))
def test_bad_flags_are_one_line(case, capsys):
    argv, says = ARGPARSE_CASES[case]
    with pytest.raises(SystemExit) as stopped:
        msif(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "--help" in err, err


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _edit_manifest(root: Path, change) -> None:
    path = root / layout.MANIFEST.path
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DAMAGE = {  # id -> (what to do to the study, what the message says)
    "safetensors header flipped": (lambda r: _flip(r / "factors/finetuned/layer-0000.safetensors", 12),
                                   "factors/finetuned/layer-0000.safetensors in"),
    "parquet flipped": (lambda r: _flip(r / layout.DOCUMENTS.path, 100), "the corpus stage"),
    "shard header flipped": (lambda r: _flip(r / layout.shard_file(0, "whitened"), 20), "the projection stage"),
    "shard truncated": (lambda r: (r / layout.shard_file(0, "sq_norms")).write_bytes(b"\x93NUMPY"),
                        "checksum mismatch"),
    "tokenizer deleted": (lambda r: (r / "tokenizer/tokenizer.json").unlink(), "tokenizer/tokenizer.json in"),
    "model config edited": (lambda r: (r / "models/finetuned/config.json").write_text("{}"), "the finetune stage"),
    "manifest without files": (lambda r: _edit_manifest(r, lambda d: d.pop("files")), "is damaged"),
    "manifest without stages": (lambda r: _edit_manifest(r, lambda d: d.pop("stages")), "is damaged"),
    "manifest not JSON": (lambda r: (r / layout.MANIFEST.path).write_bytes(b"\x00{"), "cannot be read"),
    "manifest of another format": (lambda r: _edit_manifest(r, lambda d: d.update(format_version=1)),
                                   "built by another msif"),
    "manifest config not a number": (lambda r: _edit_manifest(r, lambda d: d["config"]["influence"].update(alpha="x")),
                                     "influence.alpha must be a number"),
    "manifest stage records broken": (lambda r: _edit_manifest(r, lambda d: d["stages"].update(index=[])),
                                      "is damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_study_is_refused_in_one_line(case, study, capsys):
    damage, says = DAMAGE[case]
    damage(study)
    assert msif(["query", "--study", str(study), "--prompt", "hi", "--answer", "x"]) == 2
    _one_line_error(capsys, says)


BUILD_CASES = {  # id -> (argv, TOML content or None, what the message says)
    "config missing": (["precompute", "--config", "{tmp}/none.toml", "--out", "{tmp}/s"], None, "does not exist"),
    "config a directory": (["precompute", "--config", "{tmp}", "--out", "{tmp}/s"], None, "is not a file"),
    "config not TOML": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"], "[models\n", "not valid TOML"),
    "config not UTF-8": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"], b"\xff\xfe[", "is not UTF-8"),
    "config value not a number": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"],
                                  '[influence]\nalpha = "big"\n', "influence.alpha must be a number"),
    "config unknown key": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"], "[influence]\nalfa = 1\n",
                           "unknown key(s) in [influence]: alfa"),
    "config batch size zero": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"],
                               "[influence]\nbatch_size = 0\n", "influence.batch_size must be at least 1"),
    "config list of numbers": (["precompute", "--config", "{toml}", "--out", "{tmp}/s"],
                               "[influence]\ninclude = [1]\n", "influence.include must be a list of strings"),
    "extra documents negative": (["build-demo", "--out", "{tmp}/s", "--tiny", "--extra-documents", "-5"], None,
                                 "--extra-documents must be >= 0"),
    "out is a file": (["build-demo", "--out", "{tmp}/file", "--tiny"], None, "is a file, not a study directory"),
    "nproc zero": (["build-demo", "--out", "{tmp}/s", "--tiny", "--nproc", "0"], None, "--nproc must be at least 1"),
    "plan memory unit": (["plan", "--config", str(CONFIG), "--gpu-memory", "80XB"], None, "give a size"),
}


@pytest.mark.parametrize("case", list(BUILD_CASES))
def test_build_bad_input(case, tmp_path, capsys):
    argv, content, says = BUILD_CASES[case]
    toml = tmp_path / "study.toml"
    if content is not None:  # a setting is tried on an otherwise valid config
        toml.write_bytes(content if isinstance(content, bytes) else
                         (MINIMAL if content.startswith("[influence]") else "").encode() + content.encode())
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{toml}", str(toml)) for a in argv]
    assert build(argv) == 2
    _one_line_error(capsys, says)
    assert not (tmp_path / "s").exists()  # nothing was built


def test_a_base_config_merged_twice_is_still_reported(tmp_path, capsys):
    """A [influence] table repeated by a hand edit: TOML's own message, one line."""
    toml = tmp_path / "study.toml"
    toml.write_text(CONFIG.read_text() + "\n[influence]\nalpha = 1\n")
    assert build(["precompute", "--config", str(toml), "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "not valid TOML")


# -- the app ------------------------------------------------------------------------------------
def _app(study: Path, monkeypatch, **params) -> AppTest:
    monkeypatch.setenv(STUDY_ENV, str(study))
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def test_url_parameters_that_mean_nothing_are_named(tiny_study, monkeypatch):
    at = _app(tiny_study, monkeypatch, method="foo", colour="blue")
    warnings = " ".join(w.value for w in at.warning)
    assert "Unknown method 'foo'" in warnings and "Ignored URL parameter 'colour'" in warnings


def test_a_prompt_over_the_context_is_refused_in_the_app(tiny_study, monkeypatch):
    at = _app(tiny_study, monkeypatch, prompt=LONG_PROMPT, answer="In Ostgate.")
    assert "trace" not in at.session_state
    assert any("does not fit the study's context" in e.value for e in at.error)


def test_a_study_damaged_while_served_is_refused_at_the_next_run(study, monkeypatch):
    at = _app(study, monkeypatch)
    assert not at.error
    _flip(study / layout.shard_file(0, "whitened"), 200)  # read lazily by the index: not yet in memory
    at.run()
    assert any("changed after the study was built" in e.value for e in at.error)


def test_a_damaged_study_in_the_app_shows_no_server_path(study, monkeypatch):
    _flip(study / layout.DOCUMENTS.path, 100)
    at = _app(study, monkeypatch)
    errors = " ".join(e.value for e in at.error)
    assert "changed after the study was built" in errors and "the corpus stage" in errors
    assert str(study) not in errors and "/tmp" not in errors


def test_a_study_with_null_model_checksums_is_refused_in_one_line_in_the_app(study, monkeypatch):
    """The page a fresh clone's `make demo` showed: a study recorded by an older msif under a relative
    path, with null model checksums, opened by the app. A line that says what to run, no error page."""
    manifest = json.loads((study / "manifest.json").read_text())
    for record in manifest["stages"].values():
        if "identity" in record["config"]:
            record["config"]["identity"] = {r: dict.fromkeys(f) for r, f in record["config"]["identity"].items()}
    (study / "manifest.json").write_text(json.dumps(manifest))
    at = _app(study, monkeypatch)
    errors = " ".join(e.value for e in at.error)
    assert "records no checksum of the base model's files" in errors and "msif build-demo --out" in errors
    assert str(study) not in errors and "/tmp" not in errors


@pytest.fixture
def unforeseen(monkeypatch):
    """An error no message was written for, carrying a server path; the app's cached Tracer dropped
    so that opening the study runs again."""
    import streamlit

    def broken(*args, **kwargs):
        raise TypeError("'<' not supported between instances of 'NoneType' and 'str' in /srv/msif/secret.py")

    streamlit.cache_resource.clear()
    streamlit.cache_data.clear()
    yield broken
    streamlit.cache_resource.clear()
    streamlit.cache_data.clear()


def test_an_unforeseen_error_opening_the_study_is_one_line(tiny_study, monkeypatch, unforeseen):
    import engine.study.opened

    monkeypatch.setattr(engine.study.opened, "_check_identity", unforeseen)
    at = _app(tiny_study, monkeypatch)
    assert [e.value for e in at.error] == ["Cannot open the study: internal error (TypeError); please report it."]
    assert not at.exception


def test_an_unforeseen_error_in_a_page_is_one_line(tiny_study, monkeypatch, unforeseen):
    from explorer.tracer import Tracer

    monkeypatch.setattr(Tracer, "trace", unforeseen)
    at = _app(tiny_study, monkeypatch, prompt="Where was Yvin Marlford born?")
    assert [e.value for e in at.error] == ["Could not trace: internal error (TypeError); please report it."]
    import explorer.overview

    monkeypatch.setattr(explorer.overview, "summarize", unforeseen)
    at.switch_page("views/study.py").run()
    assert [e.value for e in at.error] == ["This page failed: internal error (TypeError); please report it."]
    assert not at.exception and "/srv" not in " ".join(e.value for e in at.error)


# -- output safety ------------------------------------------------------------------------------
def test_terminal_output_escapes_control_characters(tiny_study, capsys):
    assert msif(["query", "--study", str(tiny_study), "--prompt", "\x1b[2J\x1b[31mWhere?\r",
                 "--answer", "\x1b]0;owned\x07In Ostgate.\u202e", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[31mWhere?" in out and "\\u202e" in out


def test_similarity_baselines_are_not_labelled_as_influence(tiny_study, capsys):
    assert msif(["query", "--study", str(tiny_study), "--prompt", "Where?", "--answer", "In Ostgate.",
                 "--method", "representation", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "most similar:" in out and "least similar:" in out and "has no sign" in out
    assert "opponents:" not in out and "raises the answer's log-likelihood" not in out


def test_csv_cells_a_spreadsheet_would_evaluate_are_neutralised(tiny_study):
    import csv
    import io

    from explorer import export
    from explorer.tracer import Tracer

    trace = Tracer.open(tiny_study).trace("=1+2 where?", '=HYPERLINK("http://x.example","y")', top_k=2)
    rows = list(csv.DictReader(io.StringIO(export.to_csv(trace).decode())))
    cells = [row[c] for row in rows for c in ("prompt", "answer", "title", "snippet", "top_tokens", "method")]
    assert rows and not [c for c in cells if c[:1] in export.FORMULA_STARTS]
    assert rows[0]["answer"] == "'" + trace.answer and rows[0]["prompt"] == "'=1+2 where?"
    assert float(rows[0]["score"]) == pytest.approx(trace.proponents[0].score if trace.proponents else
                                                    trace.opponents[0].score, rel=1e-6)  # numbers stay numbers


def test_a_busy_port_is_refused_before_any_url_is_printed():
    import socket

    from explorer.server import check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on localhost is in use"):
            check_port("localhost", port)
    with pytest.raises(ValueError, match="not a TCP port"):
        check_port("localhost", 70000)
